"""A canned OpenAI-compatible upstream, as cheap as we can make it, in its own process.

Raw asyncio protocol (uvloop when installed), HTTP/1.1 keep-alive, responses prebuilt at start:

* ``POST /v1/chat/completions`` (and ``/chat/completions``): a chat completion; with ``"stream": true``
  an SSE stream of ``--chunks`` content chunks, a finish chunk, a usage chunk when
  ``stream_options.include_usage`` is asked, then ``data: [DONE]`` (chunked transfer encoding).
* ``POST /v1/embeddings``: one small embedding. ``GET /v1/models``: one model.

``--latency-ms`` delays every answer (the first byte of a stream); ``--chunk-delay-ms`` spaces the
stream chunks (0 sends the whole stream in one write).

    python -m benchmarks.upstream --port 9100 [--latency-ms 0] [--chunk-delay-ms 0] [--chunks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import orjson

MODEL = "gpt-4o-mini"
WORDS = ["The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog", "."]


def _chat_body() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
        }
    )


def _stream_events(chunks: int, include_usage: bool) -> list[bytes]:
    created = int(time.time())
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": MODEL}
    events: list[bytes] = []
    for i in range(chunks):
        delta: dict[str, object] = {"content": WORDS[i % len(WORDS)]}
        if i == 0:
            delta["role"] = "assistant"
        events.append(
            b"data: "
            + orjson.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]})
            + b"\n\n"
        )
    events.append(
        b"data: "
        + orjson.dumps({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        + b"\n\n"
    )
    if include_usage:
        usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _plain_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-ratelimit-remaining-requests: 9999\r\n\r\n%s" % (len(body), body)
    )


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
NOT_FOUND = _plain_response(
    b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'
)
NOT_FOUND = NOT_FOUND.replace(b"200 OK", b"404 Not Found", 1)


class Canned:
    """The prebuilt answers and the timing settings, shared by every connection."""

    def __init__(self, latency_ms: float, chunk_delay_ms: float, chunks: int) -> None:
        self.latency = latency_ms / 1000
        self.chunk_delay = chunk_delay_ms / 1000
        self.chat = _plain_response(_chat_body())
        self.embedding = _plain_response(
            orjson.dumps(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
                    "model": "text-embedding-3-small",
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }
            )
        )
        self.models = _plain_response(
            orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "x"}]})
        )
        self.stream_events = {u: [_chunked(e) for e in _stream_events(chunks, u)] for u in (False, True)}
        self.stream_whole = {u: STREAM_HEAD + b"".join(ev) + b"0\r\n\r\n" for u, ev in self.stream_events.items()}


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("_buf", "_busy", "_canned", "_loop", "_transport")

    def __init__(self, canned: Canned) -> None:
        self._canned = canned
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._busy = False  # a delayed answer is pending: later pipelined requests wait

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        while self._transport is not None and not self._busy:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)].strip())
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self._buf = buf[total:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        canned = self._canned
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        method, _, rest = line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if path.endswith(b"/chat/completions") or path.endswith(b"/completions"):
            compact = body.replace(b" ", b"")
            if b'"stream":true' in compact:
                include_usage = b'"include_usage":true' in compact
                self._stream(include_usage)
                return
            self._reply(canned.chat)
        elif path.endswith(b"/embeddings"):
            self._reply(canned.embedding)
        elif method == b"GET" and path.endswith(b"/models"):
            self._reply(canned.models)
        else:
            self._reply(NOT_FOUND)

    def _reply(self, data: bytes) -> None:
        if self._canned.latency:
            self._busy = True
            self._loop.call_later(self._canned.latency, self._write_then_continue, data)
        elif self._transport is not None:
            self._transport.write(data)

    def _write_then_continue(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
        self._busy = False
        self._drain()

    def _stream(self, include_usage: bool) -> None:
        canned = self._canned
        if not canned.chunk_delay:
            self._reply(canned.stream_whole[include_usage])
            return
        parts = [STREAM_HEAD + canned.stream_events[include_usage][0], *canned.stream_events[include_usage][1:]]
        parts.append(b"0\r\n\r\n")
        self._busy = True
        self._loop.call_later(canned.latency, self._stream_part, parts, 0)

    def _stream_part(self, parts: list[bytes], index: int) -> None:
        if self._transport is None:
            return
        self._transport.write(parts[index])
        if index + 1 < len(parts):
            self._loop.call_later(self._canned.chunk_delay, self._stream_part, parts, index + 1)
        else:
            self._busy = False
            self._drain()


async def serve(host: str, port: int, canned: Canned) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(canned), host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"upstream ready on http://{host}:{port} pid={os.getpid()}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args(argv)
    canned = Canned(args.latency_ms, args.chunk_delay_ms, args.chunks)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(serve(args.host, args.port, canned))


if __name__ == "__main__":
    main()
