"""Every error the gateway can show a client, and the one boundary where upstream failures become them.

The exception tree (status code in brackets; ``type`` / ``code`` as they appear in the OpenAI envelope)::

    GatewayError                                   [500] server_error
    ├── InvalidRequestError                        [400] invalid_request_error
    │   ├── UnsupportedParameterError              [400] invalid_request_error / unsupported_parameter
    │   ├── ContextWindowExceededError             [400] invalid_request_error / context_length_exceeded
    │   └── ContentPolicyError                     [400] invalid_request_error / content_policy_violation
    ├── RequestTooLargeError                       [413] invalid_request_error / request_too_large
    ├── AuthenticationError                        [401] authentication_error / invalid_api_key
    ├── PermissionDeniedError                      [403] permission_error
    ├── NotFoundError                              [404] not_found_error
    │   └── ModelNotFoundError                     [404] invalid_request_error / model_not_found
    ├── RateLimitError                             [429] rate_limit_error / rate_limit_exceeded
    │   └── BudgetExceededError                    [429] insufficient_quota / budget_exceeded
    ├── ServiceUnavailableError                    [503] service_unavailable (e.g. draining)
    └── UpstreamError                              [502] upstream_error  (raised only by map_upstream_errors)
        ├── UpstreamStatusError                    [upstream status, see _STATUS_MAP]
        ├── UpstreamTimeoutError                   [504] timeout
        ├── UpstreamConnectionError                [502] upstream_connection_error
        └── UpstreamProtocolError                  [502] upstream_protocol_error (bad body, cut stream)

Rules that hold for every class:

* ``message`` is written for the client; it never contains a traceback or a secret. Anything built
  from upstream text goes through :func:`redact` with the provider's secrets.
* ``error_class`` is what fallback and retry policies match on: ``"429"``, ``"5xx"``, ``"timeout"``,
  ``"connection"``, ``"context_window"``, ``"content_policy"``, ``"auth"``, ``"bad_request"``.
* ``retry_after`` (seconds) is kept from the upstream ``Retry-After`` header and sent back to the client.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import orjson

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "ConfigError",
    "ContentPolicyError",
    "ContextWindowExceededError",
    "GatewayError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "UnsupportedParameterError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "error_from_upstream_status",
    "map_upstream_errors",
    "redact",
]


class ConfigError(Exception):
    """Bad configuration: raised at startup (never during a request) with the file, key and reason."""

    def __init__(self, reason: str, *, key: str = "", file: str = "") -> None:
        self.reason = reason
        self.key = key
        self.file = file
        where = ", ".join(part for part in (file, f"key '{key}'" if key else "") if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class GatewayError(Exception):
    """Base of every error a client can see. Subclasses set the defaults; instances may override."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    error_class: str = "server"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        error_class: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if error_class is not None:
            self.error_class = error_class
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})
        if retry_after is not None:
            self.headers.setdefault("retry-after", _retry_after_header(retry_after))

    @property
    def retryable(self) -> bool:
        """Whether another attempt (same or other deployment) may succeed."""
        return self.error_class in ("429", "5xx", "timeout", "connection")

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())

    def sse_event(self) -> bytes:
        """The one event that ends a stream that failed after its first byte."""
        return b"data: " + self.body() + b"\n\n"


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    error_class = "bad_request"


class UnsupportedParameterError(InvalidRequestError):
    code = "unsupported_parameter"


class ContextWindowExceededError(InvalidRequestError):
    code = "context_length_exceeded"
    error_class = "context_window"


class ContentPolicyError(InvalidRequestError):
    code = "content_policy_violation"
    error_class = "content_policy"


class RequestTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    error_class = "bad_request"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    error_class = "auth"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"
    error_class = "auth"


class NotFoundError(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"
    error_class = "bad_request"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    code = "model_not_found"


class RateLimitError(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    error_class = "429"


class BudgetExceededError(RateLimitError):
    type = "insufficient_quota"
    code = "budget_exceeded"
    error_class = "budget"


class ServiceUnavailableError(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"
    error_class = "5xx"


class UpstreamError(GatewayError):
    """Something went wrong between the gateway and a provider. Carries where it happened."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"
    error_class = "5xx"

    def __init__(self, message: str, *, provider: str = "", upstream_status: int | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.provider = provider
        self.upstream_status = upstream_status


class UpstreamStatusError(UpstreamError):
    """The provider answered with an error status; the status the client gets keeps its meaning."""

    def __init__(self, message: str, *, upstream_status: int, **kwargs: Any) -> None:
        default = (
            (502, "upstream_error", "bad_gateway", "5xx")
            if upstream_status >= 500
            else (400, "invalid_request_error", None, "bad_request")
        )
        status, error_type, code, error_class = _STATUS_MAP.get(upstream_status, default)
        kwargs.setdefault("status", status)
        kwargs.setdefault("type", error_type)
        if kwargs.get("code") is None:
            kwargs["code"] = code
        kwargs.setdefault("error_class", error_class)
        super().__init__(message, upstream_status=upstream_status, **kwargs)


class UpstreamTimeoutError(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"
    error_class = "timeout"


class UpstreamConnectionError(UpstreamError):
    code = "upstream_connection_error"
    error_class = "connection"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


# upstream status -> (status for the client, type, code, error_class)
_STATUS_MAP: dict[int, tuple[int, str, str | None, str]] = {
    400: (400, "invalid_request_error", None, "bad_request"),
    401: (401, "authentication_error", "upstream_authentication_failed", "auth"),
    403: (403, "permission_error", "upstream_permission_denied", "auth"),
    404: (404, "not_found_error", "upstream_not_found", "bad_request"),
    408: (504, "timeout", "upstream_timeout", "timeout"),
    409: (409, "invalid_request_error", "conflict", "bad_request"),
    413: (413, "invalid_request_error", "request_too_large", "bad_request"),
    422: (400, "invalid_request_error", None, "bad_request"),
    429: (429, "rate_limit_error", "rate_limit_exceeded", "429"),
    500: (502, "upstream_error", "upstream_server_error", "5xx"),
    502: (502, "upstream_error", "bad_gateway", "5xx"),
    503: (503, "service_unavailable", "upstream_unavailable", "5xx"),
    504: (504, "timeout", "upstream_timeout", "timeout"),
    529: (503, "service_unavailable", "overloaded", "5xx"),
}

_CONTEXT_HINTS = ("context length", "context_length", "maximum context", "too many tokens", "prompt is too long")


def _retry_after_header(seconds: float) -> str:
    return str(max(0, int(seconds + 0.999)))


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``Retry-After`` (or ``retry-after-ms``); None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import time
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+[A-Za-z0-9._\-]{6,}|AIza[0-9A-Za-z_\-]{10,})")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove configured secrets and anything that looks like an API key or bearer token."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[REDACTED]")
    return _SECRETISH.sub("[REDACTED]", text)


def error_from_upstream_status(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    message: str,
    *,
    upstream_code: str | None = None,
    param: str | None = None,
    secrets: Iterable[str] = (),
) -> UpstreamStatusError:
    """Build the client-facing error for an upstream error response (the only place statuses map)."""
    clean = redact(message.strip() or f"HTTP {status}", secrets)[:2000]
    retry_after = parse_retry_after(headers) if status in (429, 503, 529) else None
    kwargs: dict[str, Any] = {"provider": provider, "retry_after": retry_after, "param": param}
    lowered = clean.lower()
    if status == 400 and (
        upstream_code == "context_length_exceeded" or any(hint in lowered for hint in _CONTEXT_HINTS)
    ):
        kwargs.update(code="context_length_exceeded", error_class="context_window")
    elif status == 400 and upstream_code in ("content_filter", "content_policy_violation"):
        kwargs.update(code="content_policy_violation", error_class="content_policy")
    elif status in (400, 404, 409, 422) and upstream_code:
        kwargs["code"] = upstream_code
    if status in (401, 403):
        text = f"Provider '{provider}' refused the gateway's credentials ({status}): {clean}"
    elif status == 429:
        text = f"Provider '{provider}' is rate limiting requests: {clean}"
    elif status >= 500:
        text = f"Provider '{provider}' failed ({status}): {clean}"
    else:
        text = f"Provider '{provider}' rejected the request ({status}): {clean}"
    return UpstreamStatusError(text, upstream_status=status, **kwargs)


def error_message_from_body(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, param) from the common JSON error shapes; raw text when it is not JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")[:500], None, None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            message = err.get("message") or err.get("msg") or err.get("detail") or ""
            code = err.get("code") or err.get("type") or err.get("status")
            param = err.get("param")
            return (
                str(message) if message else orjson.dumps(err).decode(),
                str(code) if code is not None else None,
                str(param) if param is not None else None,
            )
        if isinstance(err, str):
            return err, None, None
        for key in ("message", "detail"):
            if isinstance(data.get(key), str):
                return str(data[key]), None, None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return error_message_from_body(orjson.dumps(data[0]))
    return body.decode("utf-8", "replace")[:500], None, None


class map_upstream_errors:
    """The boundary: transport failures of an upstream call become :class:`UpstreamError` subclasses.

    Error *responses* are turned into errors by :func:`error_from_upstream_status`; this maps what
    happens when there is no usable response at all (timeouts, refused connections, cut streams).
    A plain class rather than ``@contextmanager``: it wraps every upstream call, and a generator
    based context manager costs several times more per use.
    """

    __slots__ = ("provider", "secrets")

    def __init__(self, provider: str, secrets: Iterable[str] = ()) -> None:
        self.provider = provider
        self.secrets = secrets

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, GatewayError):
            return
        error = _upstream_failure(self.provider, self.secrets, exc)
        if error is not None:
            raise error from None


def _upstream_failure(provider: str, secrets: Iterable[str], exc: BaseException) -> GatewayError | None:
    """The client-facing error for a transport failure, or None to let ``exc`` through."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(f"Provider '{provider}' timed out ({type(exc).__name__})", provider=provider)
    if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        detail = redact(str(exc) or type(exc).__name__, secrets)
        if isinstance(exc, httpx.ConnectError):
            return UpstreamConnectionError(f"Could not connect to provider '{provider}': {detail}", provider=provider)
        return UpstreamProtocolError(f"The connection to provider '{provider}' broke: {detail}", provider=provider)
    if isinstance(exc, httpx.HTTPError):
        detail = redact(str(exc) or type(exc).__name__, secrets)
        return UpstreamConnectionError(f"Provider '{provider}' failed: {detail}", provider=provider)
    if isinstance(exc, (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError)):
        return UpstreamProtocolError(
            f"Provider '{provider}' sent a response the gateway could not read ({type(exc).__name__})",
            provider=provider,
        )
    return None
