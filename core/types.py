"""The plain data the request path carries: who asked, what they asked for, where it went, what it cost.

Everything here is a slotted dataclass: cheap to build per request, typed for plugin authors.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.datastructures import Headers

if TYPE_CHECKING:
    from .errors import GatewayError

Endpoint = Literal["chat.completions", "completions", "embeddings", "messages", "count_tokens"]

ROLES = ("admin", "operator", "viewer", "user")


@dataclass(slots=True, frozen=True)
class Principal:
    """The authenticated caller. ``kind`` says how it was established."""

    kind: Literal["anonymous", "master", "virtual_key", "jwt"]
    roles: frozenset[str] = frozenset({"user"})
    key_id: str | None = None
    key_prefix: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    allowed_models: frozenset[str] | None = None  # None: every model
    metadata: dict[str, Any] = field(default_factory=dict)

    def may_use(self, alias: str) -> bool:
        return self.allowed_models is None or alias in self.allowed_models or "*" in self.allowed_models

    @property
    def tenant(self) -> str:
        """The scope that must isolate cached answers and limits by default."""
        if self.team_id:
            return f"team:{self.team_id}"
        if self.key_id:
            return f"key:{self.key_id}"
        if self.user_id:
            return f"user:{self.user_id}"
        return self.kind


ANONYMOUS = Principal(kind="anonymous", roles=frozenset({"user"}))


@dataclass(slots=True)
class Deployment:
    """One concrete way to serve an alias: a provider instance plus an upstream model and its facts."""

    alias: str
    provider: str
    model: str
    index: int = 0
    weight: float = 1.0
    input_price: float | None = None  # USD per million input tokens
    output_price: float | None = None  # USD per million output tokens
    cached_input_price: float | None = None
    quality: float | None = None
    tags: tuple[str, ...] = ()
    context_window: int | None = None
    max_output_tokens: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # defaults merged into every upstream request
    _id: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        self._id = f"{self.alias}/{self.provider}/{self.model}#{self.index}"

    @property
    def id(self) -> str:
        """``alias/provider/model#index``: stable, unique within a config (computed once: the
        identifying fields are not changed after the config is loaded)."""
        return self._id


@dataclass(slots=True)
class ModelGroup:
    """An alias clients send as ``model`` and the deployments behind it (config ``[[models]]``)."""

    name: str
    deployments: list[Deployment]
    strategy: str = "ordered"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # other aliases tried after this group's own
    max_attempts: int = 3
    retry_backoff: float = 0.25
    timeout: float | None = None  # overall deadline in seconds for one request
    cache: dict[str, Any] = field(default_factory=dict)
    hedge: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    owned_by: str = "llmgateway"
    created: int = field(default_factory=lambda: int(time.time()))
    kinds: tuple[str, ...] = ("chat", "completions", "embeddings")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out

    @classmethod
    def from_openai(cls, data: dict[str, Any] | None, *, estimated: bool = False) -> Usage:
        if not data:
            return cls(estimated=estimated)
        prompt_details = data.get("prompt_tokens_details") or {}
        completion_details = data.get("completion_tokens_details") or {}
        prompt = int(data.get("prompt_tokens") or data.get("input_tokens") or 0)
        completion = int(data.get("completion_tokens") or data.get("output_tokens") or 0)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
            estimated=estimated,
        )


@dataclass(slots=True)
class Attempt:
    """One call to one deployment. The pipeline appends one per try (retries, fallbacks, hedges)."""

    deployment: Deployment
    started: float
    finished: float | None = None
    first_byte: float | None = None
    error: Exception | None = None
    status: int | None = None
    rate_limit_headers: dict[str, str] = field(default_factory=dict)

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started


@dataclass(slots=True)
class RoutingDecision:
    """Why a deployment was chosen. Written through the storage write path, never awaited."""

    alias: str
    strategy: str
    candidates: list[tuple[str, float | None]]  # (deployment id, score) best first
    chosen: str | None
    reason: str
    fallbacks: list[str] = field(default_factory=list)
    outcome: str = "pending"


@dataclass(slots=True)
class UsageRecord:
    """What accounting receives once per request, after the response (or stream) has ended."""

    request_id: str
    endpoint: str
    alias: str | None
    provider: str | None
    deployment: str | None
    upstream_model: str | None
    principal: Principal
    usage: Usage
    cost: float | None
    status: int
    error_code: str | None
    latency_ms: float
    ttft_ms: float | None
    streamed: bool
    cache_hit: bool
    client_disconnected: bool
    started_at: float  # unix time
    attempts: int
    saved_cost: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CachedResponse:
    """A complete answer a cache plugin returns; the core replays it as JSON or as SSE."""

    body: dict[str, Any]
    usage: Usage
    provider: str | None = None
    deployment: str | None = None
    saved_cost: float | None = None


@dataclass(slots=True)
class RequestContext:
    """Everything known about one request. Hooks read it and may change the documented fields.

    ``body`` is the parsed OpenAI-format request; plugins may edit it before the provider phase.
    ``state`` is scratch space for plugins (namespace your keys). ``on_finish`` callbacks run after
    accounting (budgets settle, concurrency slots free) even when the client disconnected.
    """

    request_id: str
    endpoint: Endpoint
    body: dict[str, Any]
    headers: Headers
    client_host: str | None
    path: str
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    principal: Principal = ANONYMOUS
    authenticated: bool = False  # set once llmgateway_authenticate accepted the caller
    alias: str = ""
    stream: bool = False
    model_group: ModelGroup | None = None
    labels: dict[str, float] = field(default_factory=dict)
    candidates: list[Deployment] = field(default_factory=list)
    decision: RoutingDecision | None = None
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage | None = None
    cost: float | None = None
    cache_hit: bool = False
    cache_status: str | None = None
    client_disconnected: bool = False
    response_headers: dict[str, str] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    on_finish: list[Callable[[RequestContext], Awaitable[None]]] = field(default_factory=list)
    #: called with every chunk about to be forwarded to a streaming client (sync, keep it cheap);
    #: a watcher that returns an error ends the stream with that error as its last event
    stream_watchers: list[Callable[[bytes], GatewayError | None]] = field(default_factory=list)

    @property
    def deployment(self) -> Deployment | None:
        return self.attempts[-1].deployment if self.attempts else None

    def max_output_tokens(self) -> int | None:
        value = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return int(value) if isinstance(value, int) else None
