"""Per-request latency at one connection, as a time series: where the slow requests of a run are.

    .venv/bin/python -m benchmarks.latency_series --url http://127.0.0.1:8080/v1/chat/completions \\
        [--duration 10] [--warmup 2] [--warmup-concurrency 32] [--key sk-...] [--slow-ms 2]

After a warm-up at ``--warmup-concurrency`` connections (as ``python -m benchmarks run`` warms a
target), one connection sends plain chat requests back to back for ``--duration`` seconds. Printed:
p50 / p99 / max, every request slower than ``--slow-ms`` with the CLOCK_MONOTONIC time it ended
(``time.monotonic()``: the same clock a server can log, to line the two up), and p99 per second.
Session 6 found with it a stall of this machine every 0.512 s (upstream alone included) and slow
requests at the usage writer's batch frequency (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson

from .scenarios import ALIAS, MASTER_KEY


def _percentile(values: list[float], q: float) -> float:
    return values[int(q * (len(values) - 1))]


async def series(
    url: str, key: str, duration: float, warmup: float, warmup_concurrency: int
) -> list[tuple[float, float]]:
    """(CLOCK_MONOTONIC end time, latency in ms) of each request of the one-connection phase."""
    body = orjson.dumps({"model": ALIAS, "messages": [{"role": "user", "content": "Say something short about foxes."}]})
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")

        stop = time.monotonic() + warmup

        async def warm() -> None:
            while time.monotonic() < stop:
                await one()

        await asyncio.gather(*(warm() for _ in range(warmup_concurrency)))
        out: list[tuple[float, float]] = []
        end = time.monotonic() + duration
        while time.monotonic() < end:
            started = time.perf_counter()
            await one()
            out.append((time.monotonic(), (time.perf_counter() - started) * 1e3))
    return out


def report(points: list[tuple[float, float]], slow_ms: float) -> str:
    latencies = sorted(ms for _, ms in points)
    first = points[0][0]
    lines = [
        f"{len(points)} requests: p50 {_percentile(latencies, 0.5):.3f} ms, "
        f"p99 {_percentile(latencies, 0.99):.3f} ms, max {latencies[-1]:.2f} ms",
        f"slower than {slow_ms} ms (monotonic end time, ms):",
    ]
    lines += [f"  {at:.4f} {ms:.2f}" for at, ms in points if ms >= slow_ms]
    lines.append("p99 per second:")
    for second in range(int(points[-1][0] - first) + 1):
        window = sorted(ms for at, ms in points if second <= at - first < second + 1)
        if window:
            lines.append(f"  {second:3d}  {len(window):6d} requests  p99 {_percentile(window, 0.99):.3f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True, help="a chat completions URL (a gateway, or an upstream directly)")
    parser.add_argument("--key", default=MASTER_KEY)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--warmup-concurrency", type=int, default=32)
    parser.add_argument("--slow-ms", type=float, default=2.0)
    args = parser.parse_args()
    points = asyncio.run(series(args.url, args.key, args.duration, args.warmup, args.warmup_concurrency))
    print(report(points, args.slow_ms))


if __name__ == "__main__":
    main()
