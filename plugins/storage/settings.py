"""``[database]`` in gateway.toml: parsed and checked once, at configure time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from llmgateway.core.config import GatewayConfig, Section

DEFAULT_URL = "sqlite://llmgateway.db"
SCHEMES = ("sqlite", "postgres", "postgresql", "asyncpg", "mysql", "mssql", "oracle")
PRIORITIES = ("idle", "low", "normal")


@dataclass(slots=True, frozen=True)
class WriteBehind:
    batch_size: int = 500
    flush_interval: float = 1.0
    # records held in memory while the database is slow (~1 KB each); beyond, they go to the spool.
    # The writer drains ~10,000 rows/s to SQLite: 10,000 is seconds of backlog at any sustained load.
    queue_size: int = 10_000
    spool_dir: str = "llmgateway-spool"
    # a SQLite file's batches written by a process of their own (writer.SqliteProcess); false: on a
    # thread of the server (~20 MB less, but sqlite3 then holds the server's GIL while binding)
    process: bool = True
    # that process's CPU priority: "idle" (Linux SCHED_IDLE: it runs when a CPU has nothing else to
    # do, and a woken server takes the CPU from it at once), "low" (nice 19), "normal"
    priority: str = "idle"


@dataclass(slots=True, frozen=True)
class Retention:
    raw_days: int = 30
    hourly_days: int = 90
    daily_days: int = 0  # 0: keep daily rollups forever
    late_hours: int = 48  # hourly rollups recomputed this far back (rows replayed late from the spool)
    schedule: str = "7 * * * *"


@dataclass(slots=True, frozen=True)
class StorageSettings:
    url: str = DEFAULT_URL
    migrate_on_startup: bool = True
    timeout: float = 5.0
    write_behind: WriteBehind = WriteBehind()
    retention: Retention = Retention()

    @property
    def dialect(self) -> str:
        scheme = urlsplit(self.url).scheme
        return "postgres" if scheme in ("postgres", "postgresql", "asyncpg") else scheme

    @property
    def display_url(self) -> str:
        """The URL without its password (for logs and ``llmgateway db status``)."""
        parts = urlsplit(self.url)
        if parts.scheme == "sqlite":
            return self.url.split("?", 1)[0]
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return parts._replace(netloc=netloc).geturl()
        return self.url


def base_dir(config_path: str) -> Path:
    """The directory relative paths in the config are resolved against (cwd for a config from a string)."""
    if not config_path or config_path.startswith("<"):
        return Path.cwd()
    return Path(config_path).resolve().parent


def resolve_url(url: str, base: Path) -> str:
    """Make a relative SQLite path absolute (against ``base``) and add a busy timeout."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return url
    path = url[len("sqlite://") :].split("?", 1)[0]
    if path != ":memory:":
        path = str((base / path).resolve()) if not os.path.isabs(path) else path
    params = dict(parse_qsl(parts.query))
    params.setdefault("busy_timeout", "10000")
    return f"sqlite://{path}?{urlencode(params)}"


def parse(config: GatewayConfig) -> StorageSettings:
    section = config.section("database")
    base = base_dir(config.path)
    url = section.string("url", DEFAULT_URL)
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise section.error("url", f"must start with one of {', '.join(s + '://' for s in SCHEMES)}, not {url!r}")
    if scheme == "sqlite" and not url[len("sqlite://") :].split("?", 1)[0]:
        raise section.error("url", "needs a file path, e.g. sqlite://llmgateway.db")
    wb = _write_behind(section.table("write_behind"), base)
    retention = _retention(section.table("retention"))
    settings = StorageSettings(
        url=resolve_url(url, base),
        migrate_on_startup=section.boolean("migrate_on_startup", True),
        timeout=section.number("timeout", 5.0, minimum=0.1),
        write_behind=wb,
        retention=retention,
    )
    section.check_unknown()
    return settings


def _write_behind(s: Section, base: Path) -> WriteBehind:
    d = WriteBehind()
    spool = s.string("spool_dir", d.spool_dir)
    wb = WriteBehind(
        batch_size=s.integer("batch_size", d.batch_size, minimum=1),
        flush_interval=s.number("flush_interval", d.flush_interval, minimum=0.01),
        queue_size=s.integer("queue_size", d.queue_size, minimum=1),
        spool_dir=str(base / spool) if not os.path.isabs(spool) else spool,
        process=s.boolean("process", d.process),
        priority=s.choice("priority", PRIORITIES, d.priority),
    )
    s.check_unknown()
    return wb


def _retention(s: Section) -> Retention:
    d = Retention()
    r = Retention(
        raw_days=s.integer("raw_days", d.raw_days, minimum=1),
        hourly_days=s.integer("hourly_days", d.hourly_days, minimum=1),
        daily_days=s.integer("daily_days", d.daily_days, minimum=0),
        late_hours=s.integer("late_hours", d.late_hours, minimum=1),
        schedule=s.string("schedule", d.schedule),
    )
    if len(r.schedule.split()) != 5:
        raise s.error("schedule", f"must be a cron expression with 5 fields, not {r.schedule!r}")
    if r.late_hours >= r.raw_days * 24:
        raise s.error("late_hours", "must be shorter than raw_days (raw rows are needed to recompute rollups)")
    s.check_unknown()
    return r
