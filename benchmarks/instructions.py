"""Instructions per served request, counted by valgrind: numbers that do not move with the machine.

    .venv/bin/python -m benchmarks.instructions [--targets static,proxy,core,full] [--requests 300,900]
        [--stream] [--concurrency 8]

Req/s and CPU ms on a shared VM swing with the load and differ from one machine to the next (the
same code measured 3x apart on two sessions' machines). Instructions do not: each target runs as a
real server (hypercorn, one worker, uvloop; the gateway through ``llmgateway serve``) under
``valgrind --tool=callgrind`` twice, answering two different numbers of requests from the canned
upstream; the difference of the two totals divided by the difference of the requests is what one
request costs the server process — startup, imports, warm-up and shutdown cancel out.

Targets: ``static`` (hypercorn alone, a canned answer: benchmarks/baselines.py), ``proxy`` (hypercorn
and the gateway's upstream client, no gateway logic: the floor), ``core`` (the repository's default
chain: master key, router, usage written behind to SQLite), ``nostorage`` (the same without the
storage plugin) and ``full`` (plus a virtual key from the database and a Redis rate limit; needs
Redis). Load: ``--concurrency`` connections from this
process, plain requests or, with ``--stream``, 8-chunk streams. Under valgrind a server runs ~50x
slower: a target takes a few minutes. The whole-machine cost of Redis or the upstream is not in
these numbers (other processes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

import aiohttp

from . import procs
from .scenarios import ALIAS, MASTER_KEY, Chain, Env, parse_features, write_config

ROOT = Path(__file__).resolve().parent.parent
CHAINS = {
    "core": Chain(),
    "nostorage": Chain(extra_toml='[plugins]\ndisabled = ["storage"]\n'),
    "full": Chain(parse_features(["database=sqlite", "keys", "ratelimit=redis"])),
}


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


async def _load(url: str, key: str, requests: int, concurrency: int, stream: bool) -> None:
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "hello there"}]}
    if stream:
        body["stream"] = True
    headers = {"authorization": f"Bearer {key}"}
    left = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def _count(target: str, requests: int, upstream: str, workdir: Path, args: argparse.Namespace) -> int:
    port = procs.free_port()
    out = workdir / f"{target}-{requests}.callgrind"
    log = workdir / f"{target}-{requests}.log"
    key = MASTER_KEY
    env = {**os.environ, "BASELINE_UPSTREAM": upstream}
    if target in ("static", "proxy"):
        hypercorn = str(Path(sys.executable).with_name("hypercorn"))
        # -w 0: the worker in this process (with -w 1 hypercorn spawns it and valgrind would count the parent)
        argv = [hypercorn, "-k", "uvloop", "-w", "0", "-b", f"127.0.0.1:{port}", f"benchmarks.baselines:{target}"]
        cwd = str(ROOT)
    else:
        run_dir = workdir / f"{target}-{requests}"
        run_dir.mkdir()
        genv = Env(upstream_url=upstream, workdir=run_dir, port=port)
        config = write_config(genv, CHAINS[target], run_dir / "gateway.toml")
        key = genv.api_key
        cli = str(Path(sys.executable).with_name("llmgateway"))
        argv = [cli, "serve", "--config", str(config), "--port", str(port)]
        cwd = str(run_dir)
    child = procs.start(target, [*_valgrind(out), *argv], log, env=env, cwd=cwd)
    try:
        procs.wait_port(port, 600, child.proc, log)
        asyncio.run(_load(f"http://127.0.0.1:{port}/v1/chat/completions", key, requests, args.concurrency, args.stream))
    finally:
        child.stop(timeout=600)
    found = re.findall(r"Collected : (\d+)", log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no instruction count in {log}:\n{log.read_text(errors='replace')[-2000:]}")
    return int(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--targets", default="static,proxy,core,full")
    parser.add_argument("--requests", default="300,900", help="two request counts")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    small, large = (int(n) for n in args.requests.split(","))
    with tempfile.TemporaryDirectory(prefix="llmgw-instr-") as tmp:
        workdir = Path(tmp)
        port = procs.free_port()
        upstream = procs.start(
            "upstream",
            [sys.executable, "-m", "benchmarks.upstream", "--port", str(port)],
            workdir / "upstream.log",
            cwd=str(ROOT),
        )
        try:
            procs.wait_port(port, 20, upstream.proc, upstream.log)
            url = f"http://127.0.0.1:{port}"
            kind = "streams" if args.stream else "plain requests"
            print(f"instructions per request, {kind}, concurrency {args.concurrency} ({small} vs {large} requests)")
            for target in args.targets.split(","):
                a = _count(target, small, url, workdir, args)
                b = _count(target, large, url, workdir, args)
                print(f"  {target:8s} {(b - a) / (large - small):>12,.0f}", flush=True)
        finally:
            upstream.stop()


if __name__ == "__main__":
    main()
