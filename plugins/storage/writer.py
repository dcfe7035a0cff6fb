"""Write-behind for usage rows (each with its routing decision): never awaited on the request path, never lost.

* :meth:`UsageWriter.put` (the ``llmgateway_record_usage`` implementation) encodes the record and
  its routing decision as one spool line (JSON, ~2 µs) and appends it to an in-memory deque: no
  I/O, no await. A batch is then these lines joined (for the SQLite process) or parsed back (for
  PostgreSQL, a slice at a time): preparing 500 rows at flush time held the event loop ~1 ms.
* A background task flushes in batches: as soon as ``batch_size`` rows are waiting, or every
  ``flush_interval`` seconds. A batch is one bulk ``INSERT … ON CONFLICT DO NOTHING`` on the request
  id (the routing decision is columns of the usage row), so writing a batch twice is harmless.
  A SQLite file is written by :class:`SqliteProcess` (a process of its own: sqlite3 would hold this
  process's GIL while it binds each batch); PostgreSQL by asyncpg in this event loop.
* When a write fails or times out (database down, network cut), the batch is appended to a spool
  file (JSON lines, one row each) in ``spool_dir`` and the writer switches to *down*: every
  interval it pings the database and, once it answers, replays the spool files and resumes.
* The queue is bounded (``queue_size`` rows, about 0.7 KB each): when it is full, the oldest
  ``batch_size`` records go to the spool file in one append (on the request that found the queue
  full: a few milliseconds), so memory stays bounded and nothing is dropped. Rows spooled while the
  database answers (the writer could not keep up) are replayed as soon as the queue has drained,
  interleaved with writes of the live queue (a replay does not hold the queue back; when requests
  still come faster than the database takes rows, the excess goes through the spool again).
* A batch the database refuses while it answers (a row it will never take) is split until the
  refused rows are alone; those go to ``rejected-<pid>-<token>.jsonl`` in ``spool_dir`` (kept, logged,
  never replayed) and everything else is written: one bad row never holds back the others, nor is
  it retried forever.
* :meth:`UsageWriter.stop` (lifespan shutdown, e.g. after SIGTERM) flushes what is queued, or spools
  it when the database does not answer within ``timeout``; a request that finishes even later is
  spooled directly. Spool files left by a stopped or crashed process are replayed at the next start.

Spool files are named ``usage-<pid>-<token>-<n>.jsonl``; a process replays its own files and those
of processes that are no longer running, never the file another live worker is appending to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from llmgateway.core.types import RoutingDecision, UsageRecord

from . import rows as _rows
from .database import Database
from .rows import USAGE_COLUMNS, Row, row_lists

log = logging.getLogger("llmgateway.storage")

UTC = dt.UTC


def to_row(record: UsageRecord, decision: RoutingDecision | None) -> Row:
    """One usage record (and its routing decision) as plain JSON-able data: the spool format.

    Spool files outlive versions (a file left by a crash is replayed by the next release): keep this
    shape, the decision as a ``"decision"`` object (``alias`` included, though the row's own alias is
    what is stored), or keep reading the old one in :func:`.rows.row_lists`."""
    principal = record.principal
    usage = record.usage
    row: Row = {
        "request_id": record.request_id,
        "started_at": record.started_at,
        "endpoint": record.endpoint,
        "key_id": principal.key_id,
        "user_id": principal.user_id,
        "team_id": principal.team_id,
        "alias": record.alias,
        "provider": record.provider,
        "deployment": record.deployment,
        "upstream_model": record.upstream_model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_estimated": usage.estimated,
        "cost": record.cost,
        "saved_cost": record.saved_cost,
        "latency_ms": record.latency_ms,
        "ttft_ms": record.ttft_ms,
        "status": record.status,
        "error_code": record.error_code,
        "cache_hit": record.cache_hit,
        "streamed": record.streamed,
        "client_disconnected": record.client_disconnected,
        "attempts": record.attempts,
        "metadata": record.metadata,
    }
    if decision is not None:
        row["decision"] = {
            "alias": decision.alias,
            "strategy": decision.strategy,
            "candidates": [[d, s] for d, s in decision.candidates],
            "chosen": decision.chosen,
            "reason": decision.reason,
            "fallbacks": list(decision.fallbacks),
            "outcome": decision.outcome,
        }
    return row


#: rows parsed and converted between two turns of the event loop when a PostgreSQL batch is prepared
SLICE = 64
#: seconds between two tries while the usage table does not match this version (a rolling upgrade)
SCHEMA_RETRY = 10.0

#: one usage row as its spool line (JSON and a newline): what the queue, the spool and the SQLite
#: process carry
Line = bytes


def encode_row(record: UsageRecord, decision: RoutingDecision | None) -> Line:
    """The spool line of one record. (``+ b"\n"`` also copies orjson's output into a bytes object
    of its own size: kept as returned, each held a ~8 KB buffer.)"""
    row = to_row(record, decision)
    try:
        return orjson.dumps(row, default=str) + b"\n"
    except (TypeError, orjson.JSONEncodeError):  # metadata a plugin filled with something odd
        row["metadata"] = {"unencodable": repr(row.get("metadata"))[:500]}
        return orjson.dumps(row, default=str) + b"\n"


_STATEMENTS: dict[tuple[str, str], tuple[str, list[Any]]] = {}


def _statement(conn: Any, model: Any, columns: tuple[str, ...]) -> tuple[str, list[Any]]:
    """``INSERT … ON CONFLICT DO NOTHING`` for ``columns`` in the connection's dialect (built by
    Tortoise's own executor, once) and the fields that convert each value for the database."""
    key = (conn.capabilities.dialect, model.__name__)
    found = _STATEMENTS.get(key)
    if found is None:
        executor = conn.executor_class(model=model, db=conn)
        query = executor._prepare_insert_statement(list(columns), has_generated=False, ignore_conflicts=True)
        fields_map = model._meta.fields_map
        found = _STATEMENTS[key] = (query.get_sql(), [fields_map[c] for c in columns])
    return found


_PLAIN: dict[int, tuple[bool, ...]] = {}  # id(fields list of _STATEMENTS) -> which fields need no conversion


def _plain(fields: list[Any]) -> tuple[bool, ...]:
    """Fields whose class keeps Tortoise's base ``to_db_value`` (a value of the field's type is sent as
    is): for those the per-value call (type check and validators) is skipped, a third of the
    writer's CPU. Datetime, JSON and the like still convert through their field."""
    found = _PLAIN.get(id(fields))
    if found is None:
        from tortoise.fields.base import Field

        found = _PLAIN[id(fields)] = tuple(type(f).to_db_value is Field.to_db_value for f in fields)
    return found


def _values(fields: list[Any], model: Any, values: list[Any]) -> list[Any]:
    plain = _plain(fields)
    return [
        value if as_is and (value is None or isinstance(value, field.field_type)) else field.to_db_value(value, model)
        for field, as_is, value in zip(fields, plain, values, strict=True)
    ]


async def insert_rows(db: Database, rows: Sequence[Row | Line]) -> None:
    """Insert usage rows (each with its decision; as dicts or spool lines) in one bulk insert; rows
    already present are skipped.

    Rows go straight from the spool format to ``executemany`` (no model instances: several times
    faster), through Tortoise's statement builder; on PostgreSQL through its field conversions, on
    SQLite as the values those conversions would store (:mod:`.rows`). In this process: the
    writer sends a SQLite file's rows to :class:`SqliteProcess` instead."""
    from tortoise.transactions import in_transaction

    from .models import UsageRecord

    sqlite = db.dialect == "sqlite"
    usage: list[list[Any]] = []
    if not sqlite:
        with db.activate():
            sql, fields = _statement(db.connection, UsageRecord, USAGE_COLUMNS)
    for start in range(0, len(rows), SLICE):  # a slice at a time, requests running in between
        if start:
            await asyncio.sleep(0)
        part = [orjson.loads(r) if isinstance(r, bytes) else r for r in rows[start : start + SLICE]]
        converted = row_lists(part, sqlite)
        usage.extend(converted if sqlite else [_values(fields, UsageRecord, v) for v in converted])

    async def write() -> None:
        with db.activate():
            if sqlite:
                await _write_sqlite(db.connection, usage)
                return
            async with in_transaction() as conn:
                await conn.execute_many(sql, usage)

    # A task of its own: when the connection dies mid-transaction, Tortoise can leave the failed
    # transaction as "the connection" in the context of the task that ran it; that must not be the
    # writer's long-lived task.
    await asyncio.create_task(write())


async def _write_sqlite(client: Any, usage: list[list[Any]]) -> None:
    """The whole batch (BEGIN, the insert, COMMIT) as one call into the SQLite thread, the insert a
    few multi-row statements (:func:`.rows.insert_many`).

    Through Tortoise a transaction was six awaited calls into aiosqlite's thread and one GIL
    hand-over per row; with the event loop busy 20 ms per iteration (requests) the writer managed
    ~300-1,500 rows/s and fell behind at ~1,100 requests/s; as one call, ~3,600 rows/s. Tortoise's
    connection lock is held meanwhile, so no other query runs inside the transaction."""
    from .models import UsageRecord

    usage_sql, _ = _statement(client, UsageRecord, USAGE_COLUMNS)
    async with client.acquire_connection() as connection:
        await connection._execute(_rows.write_batch, connection._conn, usage_sql, usage)


class SqliteProcess:
    """The usage rows of a SQLite file written by a process of its own (:mod:`.rows`, run as a
    script), so that SQLite never holds the server's GIL.

    Started on the first batch; a batch is one write of JSON and one line back. Whatever breaks the
    exchange — the process died, a broken pipe, the caller's timeout cancelling it halfway — kills the
    process (its next answer could no longer be matched to its batch) and raises; the next batch
    starts a new one. A batch the process may have committed before it was killed is written again by
    the spool's replay: rows already present are skipped. An error SQLite raised comes back as the
    same sqlite3 exception class, so the writer tells a busy database from a refused row as before."""

    def __init__(self, path: str, sql: str, busy_timeout: float, priority: str = "idle") -> None:
        setup = {"path": path, "sql": sql, "busy_timeout": busy_timeout, "priority": priority}
        self.setup = orjson.dumps(setup) + b"\n"
        self.process: asyncio.subprocess.Process | None = None
        self._killed: list[asyncio.subprocess.Process] = []
        self._lock = asyncio.Lock()  # one batch at a time: answers are matched to batches by order

    async def _start(self) -> asyncio.subprocess.Process:
        await self._reap()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not its own directory first on sys.path (it is a package's directory)
            _rows.__file__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None
        process.stdin.write(self.setup)
        self.process = process
        return process

    async def open(self) -> None:
        """Start the process now rather than on the first batch."""
        async with self._lock:
            if self.process is None:
                await self._start()

    async def insert(self, lines: list[Line]) -> None:
        async with self._lock:
            await self._insert(lines)

    async def _insert(self, lines: list[Line]) -> None:
        payload = b"[%b]" % b",".join(lines)
        process = self.process or await self._start()
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(b"%d\n%b" % (len(payload), payload))
            await process.stdin.drain()
            answer = await process.stdout.readline()
        except BaseException:
            self._kill()
            raise
        if answer == b"ok\n":
            return
        if not answer.startswith(b"E\t"):
            self._kill()
            raise ConnectionError("the SQLite writer process exited")
        _, kind, message = answer.decode(errors="replace").rstrip("\n").split("\t", 2)
        error = getattr(sqlite3, kind, None)
        if not (isinstance(error, type) and issubclass(error, sqlite3.Error)):
            error = sqlite3.DatabaseError
        raise error(message)

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.returncode is None:
                process.kill()
            self._killed.append(process)

    async def _reap(self) -> None:
        while self._killed:
            await self._killed.pop().wait()

    async def aclose(self, wait: float) -> None:
        """End of input: the process finishes its batch (there is none: the writer waited for its
        answers) and exits; killed if it has not within ``wait`` seconds."""
        process, self.process = self.process, None
        if process is not None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                async with asyncio.timeout(wait):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        await self._reap()


#: what SQLite and PostgreSQL say when a table or column the rows need is not there (SQLSTATE
#: 42P01 / 42703 on PostgreSQL)
_SCHEMA_TROUBLE = ("no such table", "no such column", "has no column named", "does not exist")


def _schema_trouble(exc: BaseException) -> bool:
    """The usage table does not match this version's rows: a migration this version needs is not
    applied yet, or a newer version applied one (a rolling upgrade). Not the rows' fault: they are
    spooled and written once the schema matches, never set aside."""
    cause = exc.__cause__
    if getattr(cause, "sqlstate", None) in ("42P01", "42703"):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _SCHEMA_TROUBLE)


def _transport_trouble(exc: BaseException) -> bool:
    """A failure of the connection or of time (the database is down or slow), not of the rows."""
    from tortoise.exceptions import DBConnectionError

    if isinstance(exc, (TimeoutError, OSError, ConnectionError, DBConnectionError)):
        return True
    text = str(exc).lower()  # SQLite shared by several workers: contention, not a bad row
    return "database is locked" in text or "database is busy" in text


class Spool:
    """Append-only JSON-lines files in one directory; see the module docstring for the naming."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.pid = os.getpid()
        self.token = secrets.token_hex(4)
        self.seq = 0
        self.rows_written = 0

    @property
    def current(self) -> Path:
        return self.dir / f"usage-{self.pid}-{self.token}-{self.seq}.jsonl"

    def write_lines(self, lines: Iterable[Line], *, sync: bool = False) -> int:
        data = b"".join(lines)
        if not data:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.current, "ab") as file:
            file.write(data)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        count = data.count(b"\n")
        self.rows_written += count
        return count

    def reject(self, lines: Iterable[Line]) -> int:
        """Rows the database refuses by themselves (not because it is down) go to
        ``rejected-<pid>-<token>.jsonl``: kept for a person to look at, never replayed."""
        data = b"".join(lines)
        if not data:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"rejected-{self.pid}-{self.token}.jsonl", "ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return data.count(b"\n")

    def has_files(self) -> bool:
        return bool(self.replayable())

    def pending_rows(self) -> int:
        """Rows waiting in the files this process may replay (what the next start will write)."""
        total = 0
        for path in self.replayable():
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
                total += sum(1 for line in file if line.strip())
        return total

    def replayable(self) -> list[Path]:
        """Files this process may replay: its own (rotated first) and those of processes that ended."""
        if not self.dir.is_dir():
            return []
        out: list[Path] = []
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if not name.startswith("usage-") or ".jsonl" not in name:
                continue
            parts = name.split(".jsonl", 1)[0].split("-")
            if len(parts) != 4:
                continue
            pid, token = int(parts[1]) if parts[1].isdigit() else -1, parts[2]
            if name.endswith(".jsonl") or name.endswith(f".replaying-{self.pid}-{self.token}"):
                mine = pid == self.pid and token == self.token
                if mine or not _alive(pid):
                    out.append(path)
            elif ".replaying-" in name:
                claimer = name.rsplit(".replaying-", 1)[1].split("-")
                if len(claimer) == 2 and claimer[0].isdigit() and not _alive(int(claimer[0])):
                    out.append(path)
        return out

    def claim(self, path: Path) -> Path | None:
        """Rename ``path`` so no other process replays it; None when someone else got it first."""
        base = path.name.split(".jsonl", 1)[0] + ".jsonl"
        claimed = path.with_name(f"{base}.replaying-{self.pid}-{self.token}")
        if path == claimed:
            return path
        if path == self.current:
            self.seq += 1  # later writes go to a new file
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        return claimed


def _request_id(line: Line) -> Any:
    try:
        return orjson.loads(line).get("request_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _read_lines(file: Any, limit: int) -> list[bytes]:
    lines: list[bytes] = []
    while len(lines) < limit:
        line = file.readline()
        if not line:
            break
        line = line.strip()
        if line:
            lines.append(line)
    return lines


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(slots=True)
class WriterStats:
    written: int = 0
    spooled: int = 0
    replayed: int = 0
    overflowed: int = 0
    failures: int = 0
    batches: int = 0
    rejected: int = 0  # rows the database refused on their own (kept in rejected-*.jsonl)


class UsageWriter:
    def __init__(
        self,
        db: Database,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        queue_size: int = 10_000,
        spool_dir: str = "llmgateway-spool",
        timeout: float = 5.0,
        sqlite_process: bool = True,
        process_priority: str = "idle",
    ) -> None:
        self.db = db
        self.use_process = sqlite_process
        self.process_priority = process_priority
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        self.timeout = timeout
        self.spool = Spool(spool_dir)
        self.queue: collections.deque[Line] = collections.deque()
        self.stats = WriterStats()
        self.down_since: float | None = None
        # the last failure was the schema's (see _schema_trouble): retried every SCHEMA_RETRY seconds
        self.schema_mismatch = False
        self.schema_retry = SCHEMA_RETRY
        self._retry_at = 0.0
        self.late_hours: set[int] = set()  # hours that received replayed rows (rollups recompute them)
        self._wake: asyncio.Event | None = None
        self.sqlite_process: SqliteProcess | None = None  # a SQLite file's writes, once started
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False
        self._overflowed = False  # rows were spooled while the database answered: replay them once caught up
        self._overflow_logged = 0.0

    # ---- the request path ----------------------------------------------------------------

    def put(self, record: UsageRecord, decision: RoutingDecision | None) -> None:
        """Queue one record (as its spool line). Never awaits, never touches the database."""
        line = encode_row(record, decision)
        if self._stopped:
            self.stats.spooled += self.spool.write_lines([line])
            return
        queue = self.queue
        queue.append(line)
        size = len(queue)
        if size >= self.queue_size:
            self._overflow()
        elif size >= self.batch_size and self._wake is not None:
            self._wake.set()

    def _overflow(self) -> None:
        """Move the oldest records (one batch) from the full queue to the spool file."""
        lines = self._drain(min(self.batch_size, self.queue_size))
        written = self.spool.write_lines(lines)
        self.stats.overflowed += written
        self.stats.spooled += written
        self._overflowed = True
        now = time.monotonic()
        if now - self._overflow_logged >= 10.0:  # at most one line per 10 s however long it lasts
            self._overflow_logged = now
            log.warning(
                "usage queue full (%d records): the database does not keep up; %d rows spooled to %s so far",
                self.queue_size,
                self.stats.overflowed,
                self.spool.current,
            )

    def _drain(self, limit: int) -> list[Line]:
        queue = self.queue
        return [queue.popleft() for _ in range(min(limit, len(queue)))]

    # ---- background ----------------------------------------------------------------------

    def start(self) -> None:
        path = self.db.sqlite_path
        if path is not None and self.use_process:  # a file: written by a process of its own
            from .models import UsageRecord

            with self.db.activate():
                sql, _ = _statement(self.db.connection, UsageRecord, USAGE_COLUMNS)
            self.sqlite_process = SqliteProcess(
                path, sql, busy_timeout=max(0.05, self.timeout * 0.8), priority=self.process_priority
            )
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="llmgateway-storage-writer")

    async def open_process(self) -> None:
        """Start the SQLite writer process before requests come (a serving gateway's startup):
        started by the first batch, its spawn (a fork of this ~60 MB process) held the requests of
        that moment up to ~12 ms. Should it fail, the first batch tries again (and spools)."""
        if self.sqlite_process is not None:
            try:
                await self.sqlite_process.open()
            except OSError as exc:
                log.warning("the SQLite writer process did not start (%s); retried with the first batch", exc)

    async def stop(self) -> None:
        """Flush (or spool) everything queued, then stop; later records are spooled directly."""
        self._stopping = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        else:
            await self.flush()
        self._stopped = True
        self._spool_queue()
        if self.sqlite_process is not None:
            await self.sqlite_process.aclose(self.timeout)

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        if self.spool.has_files():
            await self.replay()
        while not self._stopping:
            if not wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await wake.wait()
            wake.clear()
            try:
                await self.flush()
                if self._overflowed and self.down_since is None and len(self.queue) < self.batch_size:
                    self._overflowed = False
                    await self.replay()
            except Exception:  # never let the writer die
                log.exception("usage writer failed; retrying")
        await self.flush(final=True)

    async def flush(self, *, final: bool = False) -> None:
        """Write every queued row (in batches); spool them while the database is down (or its usage
        table does not match: then tried again every ``schema_retry`` seconds)."""
        if self.down_since is not None:
            if self.schema_mismatch and time.monotonic() < self._retry_at and not final:
                self._spool_queue()
                return
            if not await self._database_back():
                self._spool_queue()
                return
            await self.replay()
        await self._write_queue(0, final=final)

    async def _write_queue(self, keep: int, *, final: bool = False) -> bool:
        """Write the rows queued now, in batches, until at most ``keep`` are left; False when a write
        failed (then everything queued is in the spool). Rows queued meanwhile wait for the next
        flush (``batch_size`` of them, or ``flush_interval``): writing them at once too made the
        batches as small as what arrived during one write (~12 rows at one connection, where the
        SQLite process then spent ~140 µs of CPU per row). ``final``: everything, late rows too."""
        left = len(self.queue) - keep
        while (left > 0 or final) and len(self.queue) > keep:
            lines = self._drain(min(self.batch_size, left) if left > 0 else self.batch_size)
            left -= len(lines)
            if not await self._write(lines):
                self._spool_queue()
                return False
            if not final:
                await asyncio.sleep(0)  # let requests run between batches
        return True

    def _spool_queue(self) -> None:
        """Everything queued to the spool, one batch at a time (no second copy of the whole queue)."""
        while self.queue:
            self.stats.spooled += self.spool.write_lines(self._drain(self.batch_size), sync=not self.queue)

    async def _insert(self, rows: list[Line]) -> BaseException | None:
        """Insert ``rows`` (spool lines); the error when that failed. A batch the database refuses while it
        answers (a row it will never take) is split until the refused rows are alone: those are
        set aside (:meth:`Spool.reject`), the rest written. Returns an error only when the database
        itself is in trouble (down, slow, its usage table not this version's): then nothing of
        ``rows`` was set aside."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.sqlite_process is not None:
                    await self.sqlite_process.insert(rows)
                else:
                    await insert_rows(self.db, rows)
            self.schema_mismatch = False
            return None
        except Exception as exc:
            if _transport_trouble(exc):
                self.db.reset()
                return exc
            if _schema_trouble(exc):
                self.schema_mismatch = True
                self._retry_at = time.monotonic() + self.schema_retry
                return exc
            if not await self._answers():  # (resets the pool itself)
                return exc
            error: BaseException = exc  # the database answers: it is these rows
        if len(rows) == 1:
            self.stats.rejected += self.spool.reject(rows)
            log.error(
                "the database refused usage row %s (%s: %s); kept in %s, not retried",
                _request_id(rows[0]),
                type(error).__name__,
                error,
                self.spool.dir,
            )
            return None
        half = len(rows) // 2
        for part in (rows[:half], rows[half:]):
            trouble = await self._insert(part)
            if trouble is not None:
                return trouble  # the database went away meanwhile: the caller spools (duplicates are skipped)
        return None

    async def _answers(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self.db.ping()
        except Exception:
            self.db.reset()
            return False
        return True

    async def _write(self, rows: list[Line]) -> bool:
        rejected = self.stats.rejected
        exc = await self._insert(rows)
        if exc is not None:
            self.stats.failures += 1
            self.stats.spooled += self.spool.write_lines(rows, sync=True)
            if self.down_since is None:
                self.down_since = time.monotonic()
                if self.schema_mismatch:
                    log.error(
                        "the usage table does not match this version of llmgateway (%s: %s): a migration is "
                        "pending, or a newer version applied one; rows are spooled to %s and written once it "
                        "matches (retried every %.0f s)",
                        type(exc).__name__,
                        exc,
                        self.spool.dir,
                        self.schema_retry,
                    )
                else:
                    log.error(
                        "usage rows could not be written (%s: %s); spooling to %s until the database answers",
                        type(exc).__name__,
                        exc,
                        self.spool.dir,
                    )
            return False
        self.stats.written += len(rows) - (self.stats.rejected - rejected)
        self.stats.batches += 1
        return True

    async def _database_back(self) -> bool:
        try:
            await self.db.ping()
        except Exception as exc:
            log.debug("database still unreachable: %s: %s", type(exc).__name__, exc)
            self.db.reset()
            return False
        if not self.schema_mismatch:  # (a schema retry: the database answered all along)
            log.warning(
                "database answers again after %.1f s; replaying the spool", time.monotonic() - (self.down_since or 0)
            )
        self.down_since = None
        return True

    async def replay(self) -> int:
        """Insert the rows of every spool file this process may replay; returns how many."""
        total = 0
        for path in self.spool.replayable():
            claimed = self.spool.claim(path)
            if claimed is None:
                continue
            count = await self._replay_file(claimed)
            if count < 0:
                return total
            total += count
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claimed)
        if total:
            log.warning("replayed %d spooled usage rows", total)
        return total

    async def _replay_file(self, path: Path) -> int:
        count = 0
        file = await asyncio.to_thread(open, path, "rb")
        try:
            while True:
                lines: list[bytes] = await asyncio.to_thread(_read_lines, file, self.batch_size)
                if not lines:
                    return count
                batch: list[Line] = []
                hours: set[int] = set()
                for line in lines:
                    try:
                        row = orjson.loads(line)
                        hours.add(int(float(row["started_at"]) // 3600))
                    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
                        # a torn last line from a crash: nothing to recover
                        log.error("skipping an unreadable line in %s", path)
                        continue
                    batch.append(line + b"\n")
                if batch and not await self._replay_batch(batch, hours):
                    return -1
                count += len(batch)
                # requests keep coming while a (possibly large) spool is replayed: keep the queue
                # drained so it never overflows back into the spool
                if len(self.queue) >= self.batch_size and not await self._write_queue(self.batch_size // 2):
                    return -1
        finally:
            file.close()

    async def _replay_batch(self, rows: list[Line], hours: set[int]) -> bool:
        rejected = self.stats.rejected
        exc = await self._insert(rows)
        if exc is not None:
            self.stats.failures += 1
            if self.down_since is None:
                self.down_since = time.monotonic()
            log.error("replaying spooled usage rows failed (%s); will retry", type(exc).__name__)
            return False
        self.stats.replayed += len(rows) - (self.stats.rejected - rejected)
        self.late_hours |= hours
        return True
