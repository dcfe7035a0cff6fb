"""The ASGI plumbing the fake provider servers share: the lifespan protocol, reading a request whole,
recording it, JSON answers and server-sent events.

A fake subclasses :class:`FakeServer` (a dataclass) and implements :meth:`FakeServer.handle`; what
makes it that provider (paths, auth, bodies, error envelopes, extra headers, SSE framing quirks)
stays in the fake, passed to these helpers as arguments.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

Headers = Iterable[tuple[bytes, bytes]]
Dumps = Callable[[Any], bytes]


@dataclass
class Request:
    """An incoming HTTP request, its body read whole and its header names lower-cased."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    raw: bytes

    def json(self) -> Any:
        """The body parsed as JSON, ``{}`` when empty (raises ``orjson.JSONDecodeError``)."""
        return orjson.loads(self.raw) if self.raw else {}


@dataclass
class Recorded:
    """One request as a fake saw it, kept in ``FakeServer.requests`` for assertions.

    ``query`` is as the fake records it: every value (``parse_qs``) unless the fake says otherwise.
    """

    method: str
    path: str
    query: dict[str, Any]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeServer(abc.ABC):
    """An ASGI app answering lifespan, reading each request and handing it to :meth:`handle`."""

    requests: list[Recorded] = field(default_factory=list, kw_only=True)

    def reset(self) -> None:
        self.requests.clear()

    def record(self, request: Request, body: Any, query: dict[str, Any] | None = None) -> None:
        self.requests.append(
            Recorded(request.method, request.path, request.query if query is None else query, request.headers, body)
        )

    @abc.abstractmethod
    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        """Answer one HTTP request (``receive`` is there to notice a client going away)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = Request(
            method=scope["method"],
            path=scope["path"],
            query=parse_qs(scope.get("query_string", b"").decode()),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            raw=raw,
        )
        await self.handle(request, send, receive)


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    headers: Headers | None = None,
    *,
    content_type: bytes = b"application/json",
    dumps: Dumps = orjson.dumps,
) -> None:
    """A whole JSON response: content-type and content-length first, then ``headers``."""
    body = dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def start_sse(
    send: Send, headers: Headers | None = None, *, content_type: bytes = b"text/event-stream; charset=utf-8"
) -> None:
    """Start a 200 event stream: content-type first, then ``headers``."""
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type), *(headers or ())]}
    )


async def send_event(
    send: Send,
    data: Any,
    *,
    event: str | None = None,
    prefix: bytes = b"data: ",
    end: bytes = b"\n\n",
    dumps: Dumps = orjson.dumps,
) -> None:
    """One SSE frame: ``event: <event>`` if named, then ``prefix`` + data (bytes as they are, anything
    else as JSON) + ``end``."""
    frame = prefix + (data if isinstance(data, bytes) else dumps(data)) + end
    if event is not None:
        frame = b"event: " + event.encode() + b"\n" + frame
    await send({"type": "http.response.body", "body": frame, "more_body": True})


async def end_body(send: Send) -> None:
    """The last, empty body message of a streamed response."""
    await send({"type": "http.response.body", "body": b"", "more_body": False})
