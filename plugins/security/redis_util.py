"""Redis for the request path: a small pipelined client that fails fast, and redis-py for the rest.

Rate limits and budgets call one Lua script per request, on the request path. redis-py's asyncio
client spends about 60 µs of Python per call (pool, retries, timeouts, response callbacks) — more than
Redis spends running the script — so those calls go through :class:`ScriptClient`: one connection,
commands pipelined in order, RESP2 replies matched first-in first-out, a timeout per call (a late
reply poisons the connection: it is closed and every waiting call fails), reconnection on the next
call. Concurrent calls that find no connection share one connection attempt, and the first call on a
new connection (connect, TLS, AUTH, SELECT and the command) is bounded by one timeout: a hung Redis
fails every waiting caller together, after ``timeout`` seconds, not one after the other. An error
reply that means "this server cannot serve you" (READONLY after a failover, LOADING, MASTERDOWN)
closes the connection, so the next call reconnects (and finds the new primary behind the same name).
Anything else (pub/sub, tools) uses redis-py through :func:`make_redis`.

Every failure is raised as something in :func:`redis_errors` — callers catch exactly that and fall
back; Redis trouble must never become a 5xx or a hung request. Work that may wait (finished requests,
settlements) goes through :class:`BackgroundBatches`: queued, sent in batches by one background task,
retried until Redis takes it. :func:`redis_options` and :func:`close_redis` are the configuration and
the shutdown that the plugins keeping counters in Redis share.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    from llmgateway.core.config import Section

REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)

# error replies after which this connection is useless (the server is a replica now, or not ready)
_RECONNECT_ON = ("READONLY", "LOADING", "MASTERDOWN")


class ReplyError(Exception):
    """Redis answered with an error (a script error, NOSCRIPT, a wrong password...)."""


def redis_errors() -> tuple[type[BaseException], ...]:
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - the redis extra is not installed
        return (*REDIS_ERRORS, ReplyError)
    return (*REDIS_ERRORS, ReplyError, redis.exceptions.RedisError)


def transient(exc: BaseException) -> bool:
    """Whether a failed call may succeed when tried again (connection trouble, a timeout, a server
    that is busy, loading or no longer the primary) rather than never (a script error)."""
    if isinstance(exc, ReplyError):
        return str(exc).startswith((*_RECONNECT_ON, "BUSY", "OOM", "TRYAGAIN"))
    return isinstance(exc, redis_errors())


def make_redis(url: str, *, timeout: float, max_connections: int = 256) -> Any:
    """A redis-py asyncio client for ``url`` with short timeouts and no retries (pub/sub, tools)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(timeout * 4, 1.0),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


# ---- RESP2 ------------------------------------------------------------------------------------

_INCOMPLETE = object()


def bulk(value: Any) -> bytes:
    """One command argument as RESP2 writes it (a bulk string): bytes as they are, text as UTF-8,
    integers in decimal, anything else as its ``str()``. Callers that send the same arguments again
    and again (a scope's name and rule) keep the encoded form."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, int):
        data = b"%d" % value
    else:
        data = (value if isinstance(value, str) else str(value)).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def encode_command(args: tuple[Any, ...]) -> bytes:
    return b"".join([b"*%d\r\n" % len(args), *map(bulk, args)])


def parse_reply(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply starting at ``pos``: (value, position after it), or (_INCOMPLETE, pos). Simple
    strings are bytes, as hiredis gives them."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == 0x2B:  # +simple string
        return line, after
    if kind == 0x2D:  # -error
        return ReplyError(line.decode(errors="replace")), after
    if kind == 0x3A:  # :integer
        return int(line), after
    if kind == 0x24:  # $bulk string
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return _INCOMPLETE, pos
        return bytes(buf[after : after + size]), after + size + 2
    if kind == 0x2A:  # *array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(buf, after)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, after
    raise ConnectionError(f"unexpected byte {kind!r} in a Redis reply")


class PyReader:
    """RESP2 replies in pure Python, with hiredis.Reader's interface: :meth:`feed` bytes, :meth:`gets`
    the next complete reply or ``False`` (RESP2 has no boolean). An error reply is a
    :class:`ReplyError` value; a reply that is not RESP2 raises ``ConnectionError``."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def gets(self) -> Any:
        value, after = parse_reply(self.buffer, self.pos)
        if value is _INCOMPLETE:
            if self.pos:
                del self.buffer[: self.pos]
                self.pos = 0
            return False
        self.pos = after
        return value


class _Reader(Protocol):
    def feed(self, data: bytes) -> None: ...
    def gets(self) -> Any: ...


_UNREADABLE: tuple[type[BaseException], ...] = (ValueError, ConnectionError)
_hiredis: Any = None
try:  # the C parser of the redis extra: ~15x faster than PyReader on a script's reply
    import hiredis as _hiredis

    _UNREADABLE += (_hiredis.ProtocolError,)
except ImportError:  # pragma: no cover - hiredis is installed with the redis extra
    pass


def make_reader(pure: bool = False) -> _Reader:
    """hiredis' reader when it is installed (unless ``pure``), else :class:`PyReader`."""
    if _hiredis is None or pure:
        return PyReader()
    return cast(_Reader, _hiredis.Reader(replyError=ReplyError))


class _Connection(asyncio.Protocol):
    def __init__(self, timeout: float, reader: _Reader) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = reader
        # calls waiting for their reply, in order, with their deadlines (loop time). Replies come in
        # order and every call has the same timeout, so the first waiting call is always the one due
        # first: one timer per connection, armed for it, instead of a timer per call.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        try:
            reader.feed(data)
            while self.waiting:
                value = reader.gets()
                if value is False:
                    break
                future, _ = self.waiting.popleft()
                if not future.done():
                    if isinstance(value, ReplyError):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
                if isinstance(value, ReplyError) and str(value).startswith(_RECONNECT_ON):
                    # a failover left us on a replica (or the server is loading): reconnect next time
                    self.fail(ConnectionError(f"Redis cannot serve this connection ({str(value).split()[0]})"))
                    return
        except _UNREADABLE as exc:
            self.fail(ConnectionError(f"unreadable Redis reply: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("the connection to Redis was lost"))

    def fail(self, error: BaseException) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        return self.send_encoded(encode_command(args))

    def send_encoded(self, command: bytes) -> asyncio.Future[Any]:
        """Send one command already encoded (RESP2); its reply is the future's result."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to Redis is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        deadline = loop.time() + self.timeout
        self.waiting.append((future, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._due)
        self.transport.write(command)
        return future

    def _due(self) -> None:
        """The timer: fail the connection if the first waiting call is late, else re-arm for it."""
        self._timer = None
        if not self.waiting:
            return
        deadline = self.waiting[0][1]
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self._late()
        else:
            self._timer = loop.call_at(deadline, self._due)

    def _late(self) -> None:
        # replies come in order: once one is late the connection cannot be trusted any more
        self.fail(TimeoutError(f"Redis did not answer within {self.timeout}s"))


class ScriptClient:
    """Lua scripts over one pipelined connection (``redis://[user:password@]host:port/db``, ``rediss://``).

    The only URL option understood is ``?db=`` (the same as the path); any other is a ``ValueError``
    naming it, so a setting meant for redis-py (``ssl_cert_reqs``, ``socket_timeout``...) is never
    silently ignored. Replies are read by hiredis when it is installed; ``pure_python=True`` uses
    :class:`PyReader` (the tests run both)."""

    def __init__(self, url: str, *, timeout: float, pure_python: bool = False) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r} (redis:// or rediss://)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        db = parts.path.strip("/")
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name != "db":
                raise ValueError(f"unsupported Redis URL option {name!r} (only ?db= is understood)")
            if db and value != db:
                raise ValueError(f"the Redis URL names two databases ({db!r} and db={value!r})")
            db = value
        if db and not db.isdigit():
            raise ValueError(f"the Redis database must be a number, not {db!r}")
        self.db = int(db) if db else 0
        self.tls = parts.scheme == "rediss"
        self.timeout = timeout
        self.pure_python = pure_python
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def _connection(self) -> _Connection:
        """The open connection, else the one connection attempt every caller shares."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.get_running_loop().create_task(self._connect(), name="redis-connect")
            attempt.add_done_callback(self._connected)
        # shielded: a caller that gives up (its own timeout, a cancelled request) leaves the others theirs
        return await asyncio.shield(attempt)

    def _connected(self, attempt: asyncio.Task[_Connection]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here: the waiters may all have given up already

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self.tls else None
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.timeout):  # connect, TLS, AUTH and SELECT together
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.timeout, make_reader(self.pure_python)), self.host, self.port, ssl=context
                )
                if self.password is not None:
                    auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                    await conn.send(auth)
                if self.db:
                    await conn.send(("SELECT", self.db))
        except BaseException:
            if conn is not None:
                conn.fail(ConnectionError("could not set up the Redis connection"))
            raise
        self._conn = conn
        return conn

    async def call(self, *args: Any) -> Any:
        return await self.call_encoded(encode_command(args))

    async def call_encoded(self, command: bytes) -> Any:
        """One command already encoded (RESP2), for callers that keep the parts they send each time."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return await conn.send_encoded(command)
        async with asyncio.timeout(self.timeout):  # the whole first call: connecting and the command
            conn = await self._connection()
            return await conn.send_encoded(command)

    async def aclose(self) -> None:
        attempt = self._connecting
        if attempt is not None:  # bounded by its timeout; its waiters get its outcome, not a cancellation
            await asyncio.wait({attempt})
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(ConnectionError("the client was closed"))


class Script:
    """A Lua script bound to a :class:`ScriptClient`: EVALSHA, or EVAL the first time Redis does not
    know the script."""

    def __init__(self, client: ScriptClient, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - the script's name in Redis
        self._evalsha = bulk("EVALSHA") + bulk(self.sha)
        self._eval = bulk("EVAL") + bulk(source)

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        encoded = b"".join([bulk(len(keys)), *map(bulk, keys), *map(bulk, args)])
        return await self.encoded(len(keys) + len(args), encoded)

    async def encoded(self, count: int, arguments: bytes) -> Any:
        """Run with ``arguments`` already encoded: the number of keys, the keys and the arguments, each
        a :func:`bulk` (``count`` of them after the number of keys)."""
        head = b"*%d\r\n" % (count + 3)
        client = self.client
        try:
            conn = client._conn
            if conn is not None and not conn.closed:  # the usual case: one coroutine less
                return await conn.send_encoded(head + self._evalsha + arguments)
            return await client.call_encoded(head + self._evalsha + arguments)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await client.call_encoded(head + self._eval + arguments)


# ---- shared by the plugins that keep counters in Redis --------------------------------------


def redis_options(section: Section) -> tuple[str, str | None, str]:
    """``backend`` (memory or redis), ``redis_url`` (required by the redis backend; a URL that
    :class:`ScriptClient` refuses is a config error naming it) and ``key_prefix`` of a plugin's section."""
    backend = section.choice("backend", ("memory", "redis"), "memory")
    url = section.opt_string("redis_url")
    if backend == "redis" and not url:
        raise section.error("redis_url", 'is required when backend = "redis"')
    if url:
        try:
            ScriptClient(url, timeout=1.0)
        except ValueError as exc:
            raise section.error("redis_url", str(exc)) from None
    return backend, url, section.string("key_prefix", "llmgateway:")


class _Closes(Protocol):
    async def aclose(self) -> None: ...


async def close_redis(backend: _Closes | None, client: _Closes | None) -> None:
    """A plugin's shutdown: its Redis backend first (it sends what it still has queued), then the connection."""
    if backend is not None:
        await backend.aclose()
    if client is not None:
        await client.aclose()


T = TypeVar("T")


class BackgroundBatches(Generic[T]):
    """Work for Redis that need not be done on the request path: queued, and sent in batches by one
    background task (started by the first :meth:`add`, woken by every one).

    ``send`` sends one batch (the oldest ``batch_size`` items at most) and returns the items that
    failed for a passing reason, each with its error; if it raises, the whole batch failed. What
    failed goes back to the front of the queue, so sending an item twice must be harmless, and the
    task reports the error to ``on_error`` and tries again a second later. The queue keeps ``cap``
    items at most, dropping the oldest (``on_drop`` is told how many): when an item is added to a full
    queue (``trim="on_add"``), or once a send has failed (``trim="after_failure"``: a backlog may grow
    while Redis is slow but answering). ``on_change`` is called after :attr:`pending` may have changed.

    :meth:`aclose` stops the task, then sends what is still queued, for two seconds at most;
    ``on_unsent`` is told how many items were left unsent.
    """

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[list[tuple[T, BaseException]]]],
        *,
        name: str,
        batch_size: int,
        cap: int,
        trim: Literal["on_add", "after_failure"],
        on_error: Callable[[BaseException], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
        on_change: Callable[[], None] | None = None,
        on_unsent: Callable[[int], None] | None = None,
    ) -> None:
        self.queue: deque[T] = deque()
        self.sending = 0  # items of the batch being sent
        self._send = send
        self._name = name
        self._batch_size = batch_size
        self._cap = cap
        self._trim = trim
        self._on_error = on_error
        self._on_drop = on_drop
        self._on_change = on_change
        self._on_unsent = on_unsent
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """Items not yet sent: queued, or in the batch being sent."""
        return len(self.queue) + self.sending

    def add(self, *items: T) -> None:
        """Queue ``items`` and wake the background task (started here the first time)."""
        for item in items:
            if self._trim == "on_add" and len(self.queue) >= self._cap:
                self.queue.popleft()
                if self._on_drop is not None:
                    self._on_drop(1)
            self.queue.append(item)
        self._changed()
        if self._flusher is None and not self._closing:
            self._flusher = asyncio.create_task(self._flush_forever(), name=self._name)
        self._wake.set()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _requeue(self, items: list[T]) -> None:
        self.queue.extendleft(reversed(items))
        if self._trim == "after_failure" and len(self.queue) > self._cap:
            dropped = len(self.queue) - self._cap
            for _ in range(dropped):
                self.queue.popleft()
            if self._on_drop is not None:
                self._on_drop(dropped)

    async def flush(self) -> None:
        """Send what is queued, a batch at a time; what failed (or was cancelled) stays queued, and
        the error is raised."""
        queue = self.queue
        while queue:
            batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
            self.sending = len(batch)
            try:
                failed = await self._send(batch)
            except BaseException:  # cancelled too: keep everything (sending twice is harmless)
                self._requeue(batch)
                raise
            finally:
                self.sending = 0
                self._changed()
            if failed:
                self._requeue([item for item, _ in failed])
                self._changed()
                raise failed[-1][1]

    async def _flush_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # kept for the next try
                task = asyncio.current_task()
                if self._closing or (task is not None and task.cancelling()):
                    return  # redis-py may turn a cancellation into a connection error
                if self._on_error is not None:
                    self._on_error(exc)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def aclose(self) -> None:
        """Stop the background task, then send what is still queued (for two seconds at most)."""
        timeout = 2.0
        self._closing = True
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            self._wake.set()
            flusher.cancel()
            await asyncio.wait({flusher}, timeout=timeout)
        if self.queue:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await self.flush()
        if self.queue and self._on_unsent is not None:
            self._on_unsent(len(self.queue))
