"""Server-sent events: splitting an upstream byte stream into events, and writing frames.

The decoder only finds event boundaries; it never parses JSON. Frames are forwarded as they are
unless a provider translates them.
"""

from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"


class SSEDecoder:
    """Incremental splitter: ``feed`` bytes, get back complete event blocks (without the blank line).

    Handles LF, CRLF and CR line endings (Gemini separates frames with CRLF CRLF), and boundaries
    that fall anywhere inside a chunk.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            hold = buf.endswith(b"\r")
            if hold:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if hold:
                buf += b"\r"
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        parts = buf.split(b"\n\n")
        self._buf = parts.pop()
        return [part for part in parts if part.strip(b"\n")]

    def close(self) -> list[bytes]:
        """Whatever is left when the stream ended (a final event without its blank line)."""
        rest, self._buf = self._buf.rstrip(b"\r\n"), b""
        return [rest] if rest else []


def parse_event(block: bytes) -> tuple[str | None, bytes]:
    """(event name, data) of one event block; comment lines are skipped, data lines joined."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return None, block[6:]
    event: str | None = None
    data: list[bytes] = []
    for line in block.lstrip(b"\n").split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return event, b"\n".join(data)


def frame(payload: object) -> bytes:
    """One ``data:`` frame holding ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def named_frame(event: str, payload: object) -> bytes:
    """One frame with an ``event:`` line (Anthropic style)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
