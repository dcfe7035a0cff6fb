"""Load generators, all closed-loop at a fixed concurrency for a fixed time.

* :func:`wrk_plain` — wrk (Debian package ``wrk``) with a generated Lua script for the POST body;
  its ``done`` callback prints one JSON line with the counts and latency percentiles (µs).
* :func:`py_plain` — the same measurement with an in-repo aiohttp client (when wrk is missing).
* :func:`py_stream` — an aiohttp client for SSE streams: time to first token (first ``data:`` event
  received), full stream time, streams/s; every stream must end with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson


@dataclass
class LoadResult:
    tool: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def wrk_script(body: bytes, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode())}"]
    for key, value in headers.items():
        lines.append(f"wrk.headers[{_lua_string(key)}] = {_lua_string(value)}")
    lines.append(
        """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50":%.1f,"p90":%.1f,"p99":%.1f,"mean":%.1f,"max":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""
    )
    return "\n".join(lines)


def wrk_plain(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float, workdir: Path
) -> LoadResult:
    script = workdir / "post.lua"
    script.write_text(wrk_script(body, headers))
    seconds = max(1, round(duration))
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (rc={out.returncode}):\n{out.stdout}\n{out.stderr}")
    data = orjson.loads(line[len("BENCHJSON ") :])
    elapsed = data["duration_us"] / 1e6
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=elapsed,
        requests=data["requests"],
        errors=errors,
        rps=(data["requests"] - errors) / elapsed if elapsed else 0.0,
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        mean_ms=data["mean"] / 1000,
        extra={
            "max_ms": data["max"] / 1000,
            "errors_by_kind": {k: data[k] for k in ("connect", "read", "write", "status", "timeout")},
        },
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def _result(
    tool: str, concurrency: int, elapsed: float, latencies: list[float], errors: int, ttfts: list[float] | None = None
) -> LoadResult:
    latencies.sort()
    ok = len(latencies)
    result = LoadResult(
        tool=tool,
        concurrency=concurrency,
        duration_s=elapsed,
        requests=ok + errors,
        errors=errors,
        rps=ok / elapsed if elapsed else 0.0,
        p50_ms=_percentile(latencies, 50) * 1000,
        p90_ms=_percentile(latencies, 90) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000,
        mean_ms=(sum(latencies) / ok * 1000) if ok else float("nan"),
    )
    if ttfts is not None:
        ttfts.sort()
        result.ttft_p50_ms = _percentile(ttfts, 50) * 1000
        result.ttft_p99_ms = _percentile(ttfts, 99) * 1000
    return result


async def _closed_loop(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float, stream: bool
) -> LoadResult:
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:
        started = time.perf_counter()
        stop_at = started + duration
        clock = time.perf_counter

        async def worker() -> None:
            nonlocal errors
            while clock() < stop_at:
                t0 = clock()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        if stream:
                            first = 0.0
                            tail = b""
                            async for chunk in response.content.iter_any():
                                if not first and b"data:" in chunk:
                                    first = clock()
                                tail = (tail + chunk)[-64:]
                            ok = response.status == 200 and b"[DONE]" in tail and first > 0
                            if ok:
                                ttfts.append(first - t0)
                        else:
                            await response.read()
                            ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    latencies.append(clock() - t0)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _result("aiohttp", concurrency, elapsed, latencies, errors, ttfts if stream else None)


def _run(coro: Any) -> LoadResult:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[no-any-return]


def py_plain(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float) -> LoadResult:
    return _run(_closed_loop(url, body, headers, concurrency, duration, stream=False))


def py_stream(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float) -> LoadResult:
    return _run(_closed_loop(url, body, headers, concurrency, duration, stream=True))
