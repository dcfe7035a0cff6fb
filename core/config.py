"""``gateway.toml``: loading, ``${ENV}`` interpolation and validation.

The core validates the sections it owns (``server``, ``plugins``, ``providers``, ``models``). Every
other top-level section belongs to a plugin, which reads it in ``llmgateway_configure`` through
:meth:`GatewayConfig.section`; a section nobody read is reported as unknown. Every error is a
:class:`~llmgateway.core.errors.ConfigError` naming the file, the key and the reason.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .types import Deployment, ModelGroup

T = TypeVar("T")

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

CORE_SECTIONS = ("server", "plugins", "providers", "models")

# provider options whose values are secrets (api_key, azure_client_secret, azure_ad_token, password...)
_SECRET_NAME = re.compile(r"key|secret|password|(^|_)token$", re.IGNORECASE)


def _interpolate(value: Any, key: str, file: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set", key=key, file=file)

        return _ENV.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{key}.{k}" if key else k, file, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{key}[{i}]", file, env) for i, v in enumerate(value)]
    return value


class Section:
    """Typed, checked access to one table of the config. Every getter names the key on error."""

    def __init__(self, data: Mapping[str, Any], key: str, file: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError("must be a table", key=key, file=file)
        self.data = data
        self.key = key
        self.file = file
        self._read: set[str] = set()

    def _k(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(reason, key=self._k(name), file=self.file)

    def _get(self, name: str, types: tuple[type, ...], what: str, default: Any, required: bool) -> Any:
        self._read.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        if isinstance(value, bool) and bool not in types:
            raise self.error(name, f"must be {what}, not a boolean")
        if not isinstance(value, types):
            raise self.error(name, f"must be {what}, not {type(value).__name__} {value!r}")
        return value

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(name, (str,), "a string", default, required)
        return value  # type: ignore[no-any-return]

    def opt_string(self, name: str) -> str | None:
        value = self._get(name, (str,), "a string", None, False)
        return value if value else None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def integer(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
        value = self._get(name, (int,), "an integer", default, default is None)
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value  # type: ignore[no-any-return]

    def opt_integer(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self._get(name, (int,), "an integer", None, False)
        if value is not None and minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value  # type: ignore[no-any-return]

    def number(self, name: str, default: float | None = None, *, minimum: float | None = None) -> float:
        value = self._get(name, (int, float), "a number", default, default is None)
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return float(value)

    def opt_number(self, name: str, *, minimum: float | None = None) -> float | None:
        value = self._get(name, (int, float), "a number", None, False)
        if value is None:
            return None
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        return self._get(name, (bool,), "true or false", default, False)  # type: ignore[no-any-return]

    def strings(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self._get(name, (list,), "a list of strings", default if default is not None else [], False)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"must be a string, not {item!r}", key=f"{self._k(name)}[{i}]", file=self.file)
        return list(value)

    def table(self, name: str) -> Section:
        value = self._get(name, (dict,), "a table", {}, False)
        return Section(value, self._k(name), self.file)

    def mapping(self, name: str) -> dict[str, Any]:
        return dict(self._get(name, (dict,), "a table", {}, False))

    def string_map(self, name: str) -> dict[str, str]:
        value = self.mapping(name)
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConfigError(f"must be a string, not {v!r}", key=f"{self._k(name)}.{k}", file=self.file)
        return value

    def rest(self) -> dict[str, Any]:
        """Keys no getter read yet (for passing on to a plugin that validates them)."""
        return {k: v for k, v in self.data.items() if k not in self._read}

    def check_unknown(self) -> None:
        """Fail on keys no getter asked for: typos must not be silently ignored."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "is not a known setting" + _suggest(unknown[0], self._read))


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    server: str = "hypercorn"
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    expose_routing_header: bool = False
    public_models: bool = True  # /v1/models readable without a key
    gc_threshold: int = 10_000  # see core/app.py tune_gc (0: Python's own garbage collector settings)


@dataclass(slots=True)
class PluginsConfig:
    order: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    entry_points: bool = True


@dataclass(slots=True)
class ProviderConfig:
    """``[providers.NAME]``: the common keys; the rest (``options``) is validated by the provider plugin."""

    name: str
    type: str
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 600.0
    connect_timeout: float = 5.0
    max_connections: int = 256
    headers: dict[str, str] = field(default_factory=dict)
    drop_unsupported_params: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # the config key, for error messages

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a client, a log line or a metric."""
        values = [self.api_key or ""]
        values += [v for k, v in self.headers.items() if k.lower() in ("authorization", "api-key", "x-api-key")]
        values += [v for k, v in self.options.items() if isinstance(v, str) and _SECRET_NAME.search(k)]
        return tuple(v for v in values if v)


@dataclass(slots=True)
class GatewayConfig:
    path: str
    server: ServerConfig
    plugins: PluginsConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelGroup]
    raw: dict[str, Any]
    _claimed: set[str] = field(default_factory=set)
    _sections: dict[str, Section] = field(default_factory=dict)

    def section(self, name: str) -> Section:
        """The plugin-owned table ``[name]`` (empty when absent). Reading it claims it."""
        self._claimed.add(name)
        if name not in self._sections:
            self._sections[name] = Section(self.raw.get(name, {}), name, self.path)
        return self._sections[name]

    def check_unclaimed(self) -> None:
        for name in self.raw:
            if name not in CORE_SECTIONS and name not in self._claimed:
                raise ConfigError(
                    "is not a known section (no enabled plugin reads it)"
                    + _suggest(name, set(CORE_SECTIONS) | self._claimed),
                    key=name,
                    file=self.path,
                )

    def secrets(self) -> tuple[str, ...]:
        out: list[str] = []
        for provider in self.providers.values():
            out.extend(provider.secrets)
        return tuple(out)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a config file. ``path=None`` looks at ``$LLMGATEWAY_CONFIG``, then ``./gateway.toml``."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get("LLMGATEWAY_CONFIG") or "gateway.toml"
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=file) from None
    return parse_config(text, file=file, env=env)


def parse_config(text: str, *, file: str = "<string>", env: Mapping[str, str] | None = None) -> GatewayConfig:
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    raw = _interpolate(raw, "", file, env)
    return _build(raw, file)


def _build(raw: dict[str, Any], file: str) -> GatewayConfig:
    root = Section(raw, "", file)

    s = root.table("server")
    server = ServerConfig(
        host=s.string("host", "127.0.0.1"),
        port=s.integer("port", 8080, minimum=0),
        workers=s.integer("workers", 1, minimum=1),
        server=s.choice("server", ("hypercorn", "uvicorn", "granian"), "hypercorn"),
        max_body_bytes=s.integer("max_body_bytes", 4 * 1024 * 1024, minimum=1024),
        request_timeout=s.number("request_timeout", 600.0, minimum=0.001),
        drain_timeout=s.number("drain_timeout", 30.0, minimum=0),
        expose_routing_header=s.boolean("expose_routing_header", False),
        public_models=s.boolean("public_models", True),
        gc_threshold=s.integer("gc_threshold", 10_000, minimum=0),
    )
    s.check_unknown()

    p = root.table("plugins")
    plugins = PluginsConfig(
        order=p.strings("order"),
        disabled=p.strings("disabled"),
        modules=p.strings("modules"),
        entry_points=p.boolean("entry_points", True),
    )
    p.check_unknown()

    providers: dict[str, ProviderConfig] = {}
    provs = root.table("providers")
    for name in provs.data:
        t = provs.table(name)
        providers[name] = ProviderConfig(
            name=name,
            type=t.string("type", required=True),
            base_url=t.opt_string("base_url"),
            api_key=t.opt_string("api_key"),
            timeout=t.number("timeout", 600.0, minimum=0.001),
            connect_timeout=t.number("connect_timeout", 5.0, minimum=0.001),
            max_connections=t.integer("max_connections", 256, minimum=1),
            headers=t.string_map("headers"),
            drop_unsupported_params=t.boolean("drop_unsupported_params", False),
            key=t.key,
        )
        providers[name].options = t.rest()

    models: dict[str, ModelGroup] = {}
    entries = raw.get("models", [])
    if not isinstance(entries, list):
        raise ConfigError("must be an array of tables ([[models]])", key="models", file=file)
    for i, entry in enumerate(entries):
        group = _model_group(Section(entry, f"models[{i}]", file), providers)
        if group.name in models:
            raise ConfigError(f"duplicate model name {group.name!r}", key=f"models[{i}].name", file=file)
        models[group.name] = group
    for group in models.values():
        for j, fallback in enumerate(group.fallbacks):
            if fallback not in models:
                i = list(models).index(group.name)
                raise ConfigError(f"unknown model {fallback!r}", key=f"models[{i}].fallbacks[{j}]", file=file)
    return GatewayConfig(path=file, server=server, plugins=plugins, providers=providers, models=models, raw=raw)


def _model_group(m: Section, providers: dict[str, ProviderConfig]) -> ModelGroup:
    name = m.string("name", required=True)
    if not name:
        raise m.error("name", "must not be empty")
    deployments: list[Deployment] = []
    items = m._get("deployments", (list,), "an array of tables", None, True)
    if not items:
        raise m.error("deployments", "needs at least one deployment")
    for j, item in enumerate(items):
        d = Section(item, f"{m.key}.deployments[{j}]", m.file)
        provider = d.string("provider", required=True)
        if provider not in providers:
            known = ", ".join(sorted(providers)) or "none configured"
            raise d.error("provider", f"unknown provider {provider!r} (known: {known})")
        deployments.append(
            Deployment(
                alias=name,
                provider=provider,
                model=d.string("model", required=True),
                index=j,
                weight=d.number("weight", 1.0, minimum=0),
                input_price=d.opt_number("input_price", minimum=0),
                output_price=d.opt_number("output_price", minimum=0),
                cached_input_price=d.opt_number("cached_input_price", minimum=0),
                quality=d.opt_number("quality"),
                tags=tuple(d.strings("tags")),
                context_window=d.opt_integer("context_window", minimum=1),
                max_output_tokens=d.opt_integer("max_output_tokens", minimum=1),
                rpm=d.opt_integer("rpm", minimum=1),
                tpm=d.opt_integer("tpm", minimum=1),
                params=d.mapping("params"),
            )
        )
        d.check_unknown()
    kinds = m.strings("kinds", ["chat", "completions", "embeddings"])
    for kind in kinds:
        if kind not in ("chat", "completions", "embeddings"):
            raise m.error("kinds", f"unknown kind {kind!r} (chat, completions, embeddings)")
    group = ModelGroup(
        name=name,
        deployments=deployments,
        strategy=m.string("strategy", "ordered"),
        strategy_options=m.mapping("strategy_options"),
        fallbacks=m.strings("fallbacks"),
        max_attempts=m.integer("max_attempts", 3, minimum=1),
        retry_backoff=m.number("retry_backoff", 0.25, minimum=0),
        timeout=m.opt_number("timeout", minimum=0.001),
        cache=m.mapping("cache"),
        hedge=m.mapping("hedge"),
        description=m.string("description", ""),
        owned_by=m.string("owned_by", "llmgateway"),
        kinds=tuple(kinds),
    )
    m.check_unknown()
    return group
