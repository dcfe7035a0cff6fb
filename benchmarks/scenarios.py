"""The generated gateway.toml and the optional parts of the default chain, one flag each.

The core chain (always on): ``[auth] master_key`` (the client sends it), the router, accounting
through whatever plugins record usage. Each :class:`Feature` adds a TOML fragment (and optionally a
setup step, e.g. creating a virtual key) for a part other plugins provide: the database
(write-behind usage to SQLite or PostgreSQL), virtual keys from the database, a Redis rate limit, the
response cache. ``--feature NAME[=VALUE]`` turns one on; ``--chain full`` turns on every feature
whose plugin is installed (``llmgateway check-config`` accepts its section) and whose service
answers. To adapt to a plugin's real settings, edit its fragment here, nothing else.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MASTER_KEY = "sk-bench-master-0123456789"
UPSTREAM_KEY = "sk-bench-upstream"
ALIAS = "bench"
UPSTREAM_MODEL = "gpt-4o-mini"
POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/llmgateway_bench"
REDIS_URL = "redis://127.0.0.1:6379/14"


@dataclass
class Env:
    """What a fragment may refer to."""

    upstream_url: str  # http://127.0.0.1:PORT
    workdir: Path
    port: int
    workers: int = 1
    server: str = "hypercorn"
    api_key: str = MASTER_KEY  # what the clients send; a feature may replace it (virtual keys)


@dataclass
class Feature:
    name: str
    help: str
    values: tuple[str, ...]  # accepted values; the first is the default
    toml: Callable[[Env, str], str]
    service: Callable[[str], tuple[str, int] | None] = lambda value: None
    setup: Callable[[Env, str, Path], None] | None = None  # after the config is written, before serving
    requires: tuple[str, ...] = ()


def _database_toml(env: Env, value: str) -> str:
    url = POSTGRES_URL if value == "postgres" else f"sqlite://{env.workdir / 'bench.db'}"
    return f'[database]\nurl = "{url}"\n'


def _database_setup(env: Env, value: str, config: Path) -> None:
    """Every gateway start gets an empty database (same conditions for every target), migrated."""
    if value == "postgres":
        _fresh_postgres_db()
    else:
        for path in env.workdir.glob("bench.db*"):
            path.unlink()
    _run_cli(["db", "migrate", "--config", str(config)], allow_missing=True)


def _fresh_postgres_db() -> None:
    """Drop and create the benchmark's own ``llmgateway_bench`` database (trust auth on loopback)."""
    import asyncio

    import asyncpg  # type: ignore[import-not-found,unused-ignore]

    async def create() -> None:
        conn = await asyncpg.connect("postgres://postgres@127.0.0.1:5432/postgres")
        try:
            await conn.execute("DROP DATABASE IF EXISTS llmgateway_bench WITH (FORCE)")
            await conn.execute("CREATE DATABASE llmgateway_bench")
        finally:
            await conn.close()

    asyncio.run(create())


def _keys_setup(env: Env, value: str, config: Path) -> None:
    """Create one virtual key with the plugin's CLI and make the clients send it."""
    out = _run_cli(
        ["keys", "create", "--config", str(config), "--name", "bench", "--model", ALIAS, "--json"], allow_missing=False
    )
    found = re.search(r'"key"\s*:\s*"(sk-[^"]+)"', out) or re.search(r"\b(sk-[A-Za-z0-9_\-]{16,})", out)
    if not found:
        raise RuntimeError(f"`llmgateway keys create` printed no key:\n{out}")
    env.api_key = found.group(1)


def _ratelimit_toml(env: Env, value: str) -> str:
    lines = ["[ratelimit]", f'backend = "{value}"']
    if value == "redis":
        lines.append(f'redis_url = "{REDIS_URL}"')
        lines.append('key_prefix = "llmgateway-bench:"')
    # limits far above what the benchmark sends: every request is counted, none is refused
    lines += [
        "[ratelimit.defaults.key]",
        "rpm = 100000000",
        "tpm = 10000000000",
        f"[ratelimit.models.{ALIAS}]",
        "rpm = 100000000",
    ]
    return "\n".join(lines) + "\n"


def _cache_toml(env: Env, value: str) -> str:
    lines = ["[cache]", f'backend = "{value}"']
    if value == "redis":
        lines.append(f'url = "{REDIS_URL}"')
    return "\n".join(lines) + "\n"


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature(
            "database",
            "usage write-behind to a database: sqlite (a file in the work dir) or postgres (127.0.0.1:5432)",
            ("sqlite", "postgres"),
            _database_toml,
            service=lambda v: ("127.0.0.1", 5432) if v == "postgres" else None,
            setup=_database_setup,
        ),
        Feature(
            "keys",
            "clients send a virtual key from the database (created with `llmgateway keys create`)",
            ("on",),
            lambda env, v: "",
            setup=_keys_setup,
            requires=("database",),
        ),
        Feature(
            "ratelimit",
            "rate limit checked on every request: redis (127.0.0.1:6379) or memory",
            ("redis", "memory"),
            _ratelimit_toml,
            service=lambda v: ("127.0.0.1", 6379) if v == "redis" else None,
        ),
        Feature(
            "cache",
            "response cache (the cache-hit scenario repeats one request): memory or redis",
            ("memory", "redis"),
            _cache_toml,
            service=lambda v: ("127.0.0.1", 6379) if v == "redis" else None,
        ),
    )
}


@dataclass
class Chain:
    """The features of one gateway configuration, name → value."""

    features: dict[str, str] = field(default_factory=dict)
    extra_toml: str = ""

    def label(self) -> str:
        base = "plugin defaults + master key"
        if not self.features:
            return base
        return base + " + " + ", ".join(f"{k}={v}" if v != "on" else k for k, v in self.features.items())


def parse_features(specs: list[str]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        feature = FEATURES.get(name)
        if feature is None:
            raise SystemExit(f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        value = value or feature.values[0]
        if value not in feature.values:
            raise SystemExit(f"feature {name} takes one of {', '.join(feature.values)}, not {value!r}")
        chosen[name] = value
    for name in list(chosen):
        for needed in FEATURES[name].requires:
            chosen.setdefault(needed, FEATURES[needed].values[0])
    return chosen


def variant_features(base: dict[str, str], spec: str) -> dict[str, str]:
    """``core`` → no features; else comma-separated ``NAME[=VALUE]`` (set) or ``-NAME`` (drop) on ``base``."""
    if spec.strip() == "core":
        return {}
    features = dict(base)
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.startswith("-"):
            features.pop(part[1:], None)
            for name, feature in FEATURES.items():  # drop what needed it
                if part[1:] in feature.requires:
                    features.pop(name, None)
        else:
            features.update(parse_features([part]))
    return features


def gateway_toml(env: Env, chain: Chain) -> str:
    parts = [
        f"""# generated by `python -m benchmarks run` — {chain.label()}
[server]
host = "127.0.0.1"
port = {env.port}
workers = {env.workers}
server = "{env.server}"

[auth]
master_key = "{MASTER_KEY}"

[providers.bench]
type = "openai"
base_url = "{env.upstream_url}/v1"
api_key = "{UPSTREAM_KEY}"

[[models]]
name = "{ALIAS}"
deployments = [{{ provider = "bench", model = "{UPSTREAM_MODEL}" }}]
"""
    ]
    for name, value in chain.features.items():
        parts.append(FEATURES[name].toml(env, value))
    if chain.extra_toml:
        parts.append(chain.extra_toml)
    return "\n".join(p for p in parts if p)


def write_config(env: Env, chain: Chain, path: Path) -> Path:
    path.write_text(gateway_toml(env, chain))
    for name, value in chain.features.items():
        setup = FEATURES[name].setup
        if setup is not None:
            setup(env, value, path)
    return path


def _cli() -> list[str]:
    return [str(Path(sys.executable).with_name("llmgateway"))]


def _run_cli(args: list[str], *, allow_missing: bool) -> str:
    out = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        if allow_missing and ("No such command" in text or ("Usage:" in text and "Error" in text)):
            return text
        raise RuntimeError(f"`llmgateway {' '.join(args)}` failed ({out.returncode}):\n{text}")
    return text


def check_config(path: Path) -> tuple[bool, str]:
    out = subprocess.run(
        [*_cli(), "check-config", "--config", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def _reachable(address: tuple[str, int] | None) -> bool:
    if address is None:
        return True
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1):
        return True
    return False


def available(name: str, value: str, env: Env, workdir: Path) -> tuple[bool, str]:
    """Whether a feature can be used now: its service answers and a config with it validates."""
    feature = FEATURES[name]
    if not _reachable(feature.service(value)):
        return False, f"service {feature.service(value)} is not reachable"
    chain = Chain({n: FEATURES[n].values[0] for n in feature.requires} | {name: value})
    probe = workdir / f"probe-{name}.toml"
    probe.write_text(gateway_toml(env, chain))
    ok, text = check_config(probe)
    if not ok and name == "keys":
        return False, text
    return ok, text.splitlines()[-1] if text else ""


def detect_full_chain(env: Env, workdir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Every feature usable right now (with its preferred value); and why the others are not."""
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    preferred = {"database": "sqlite", "keys": "on", "ratelimit": "redis", "cache": "memory"}
    for name, value in preferred.items():
        if name == "cache":
            continue  # the cache changes what is measured: it has its own scenario
        if any(req not in chosen for req in FEATURES[name].requires):
            skipped[name] = "needs " + ", ".join(FEATURES[name].requires)
            continue
        ok, why = available(name, value, env, workdir)
        if ok and name == "keys":
            ok, why = _keys_cli_exists()
        if ok:
            chosen[name] = value
        else:
            skipped[name] = why
    return chosen, skipped


def _keys_cli_exists() -> tuple[bool, str]:
    out = subprocess.run([*_cli(), "keys", "--help"], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        return False, "no `llmgateway keys` command (no virtual-key plugin installed)"
    return True, ""
