"""The measurement sequence: start the canned upstream, then for each target (one after the other,
never two at once) warm up and run the load phases, reading the server's CPU time and memory from
/proc around each phase. Also the soak (memory growth) and the py-spy profile."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import load, procs
from .scenarios import Chain
from .targets import Target, direct, start_litellm, start_llmgateway

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Settings:
    duration: float = 10.0
    warmup: float = 2.0
    concurrency: int = 32
    stream_concurrency: int = 16
    repeat: int = 1
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    chunks: int = 8
    use_wrk: bool = True
    litellm: bool = True
    workers2: bool = True
    servers: tuple[str, ...] = ("uvicorn", "granian")
    cache: bool = False
    soak: float = 0.0
    profile: bool = False
    baselines: bool = False
    chain: Chain = field(default_factory=Chain)
    skipped_features: dict[str, str] = field(default_factory=dict)
    variants: list[tuple[str, Chain]] = field(default_factory=list)  # extra llmgateway rows: (label, chain)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


@dataclass
class Meter:
    """CPU of the server tree, the load generator and the machine over one phase."""

    pid: int | None
    upstream_pid: int
    cpu0: float = 0.0
    up0: float = 0.0
    self0: float = 0.0
    kids0: float = 0.0
    machine0: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> Meter:
        self.cpu0 = procs.cpu_seconds(self.pid) if self.pid else 0.0
        self.up0 = procs.cpu_seconds(self.upstream_pid)
        self.self0 = time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.kids0 = kids.ru_utime + kids.ru_stime
        self.machine0 = machine_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> dict[str, float]:
        server = (procs.cpu_seconds(self.pid) - self.cpu0) if self.pid else 0.0
        upstream = procs.cpu_seconds(self.upstream_pid) - self.up0
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        loadgen = (time.process_time() - self.self0) + (kids.ru_utime + kids.ru_stime - self.kids0)
        busy, total = machine_cpu()
        ncpu = os.cpu_count() or 1
        d_busy, d_total = busy - self.machine0[0], total - self.machine0[1]
        machine_pct = 100 * ncpu * d_busy / d_total if d_total else 0.0
        wall = d_total / ncpu / procs.CLOCK_TICKS if d_total else 0.0
        others = machine_pct - 100 * (server + upstream + loadgen) / wall if wall else 0.0
        return {
            "server_cpu_s": server,
            "upstream_cpu_s": upstream,
            "loadgen_cpu_s": loadgen,
            "machine_busy_pct": machine_pct,  # of one core; 200 = both cores busy
            "other_processes_pct": max(0.0, others),
        }


def _median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    if len(results) == 1:
        return results[0]
    ordered = sorted(results, key=lambda r: r["rps"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["repeats"] = [{"rps": r["rps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]} for r in results]
    for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "cpu_ms_per_request"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            chosen[key] = statistics.median(values)
    return chosen


class Runner:
    def __init__(self, settings: Settings, workdir: Path, log: Callable[[str], None] = print) -> None:
        self.s = settings
        self.workdir = workdir
        self.log = log
        self.upstream: procs.Child | None = None
        self.upstream_url = ""
        self.results: dict[str, Any] = {}

    # ---- upstream -----------------------------------------------------------------------------

    def start_upstream(self) -> None:
        port = procs.free_port()
        argv = [
            sys.executable,
            "-m",
            "benchmarks.upstream",
            "--port",
            str(port),
            "--latency-ms",
            str(self.s.latency_ms),
            "--chunk-delay-ms",
            str(self.s.chunk_delay_ms),
            "--chunks",
            str(self.s.chunks),
        ]
        self.upstream = procs.start("upstream", argv, self.workdir / "upstream.log", cwd=str(ROOT))
        procs.wait_port(port, 20, self.upstream.proc, self.upstream.log)
        self.upstream_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None
        # the soak leaves hundreds of MB of usage rows (database files, the write-behind spool)
        for pattern in ("bench.db*", "llmgateway.db*", "llmgateway-spool/*"):
            for path in self.workdir.glob(pattern):
                path.unlink()

    # ---- one load phase ---------------------------------------------------------------------

    def plain(self, target: Target, concurrency: int, duration: float) -> load.LoadResult:
        body, headers = target.body(False), target.headers()
        if self.s.use_wrk and load.have_wrk():
            return load.wrk_plain(target.url, body, headers, concurrency, duration, self.workdir)
        return load.py_plain(target.url, body, headers, concurrency, duration)

    def stream(self, target: Target, concurrency: int, duration: float) -> load.LoadResult:
        return load.py_stream(target.url, target.body(True), target.headers(), concurrency, duration)

    def phase(self, target: Target, kind: str, concurrency: int) -> dict[str, Any]:
        assert self.upstream is not None
        runs = []
        for _ in range(self.s.repeat):
            with Meter(target.pid, self.upstream.pid) as meter:
                if kind == "plain":
                    result = self.plain(target, concurrency, self.s.duration)
                else:
                    result = self.stream(target, concurrency, self.s.duration)
                cpu = meter.read()
            row = result.as_dict() | cpu
            ok = result.requests - result.errors
            row["cpu_ms_per_request"] = (cpu["server_cpu_s"] * 1000 / ok) if (ok and target.pid) else None
            runs.append(row)
        row = _median_result(runs)
        ttft = f", TTFT p50 {row['ttft_p50_ms']:.3f} ms" if row.get("ttft_p50_ms") is not None else ""
        cpu_txt = f", {row['cpu_ms_per_request']:.3f} CPU ms/req" if row.get("cpu_ms_per_request") else ""
        self.log(
            f"  {kind:<6} c={concurrency:<3} {row['rps']:>9.1f}/s  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms"
            f"{ttft}{cpu_txt}  errors {row['errors']}  [machine {row['machine_busy_pct']:.0f}%, others {row['other_processes_pct']:.0f}%]"
        )
        if row["errors"]:
            self.log(f"  !! {row['errors']} failed requests in this phase")
        return row

    def warm(self, target: Target) -> None:
        if self.s.warmup <= 0:
            return
        self.plain(target, self.s.concurrency, self.s.warmup)
        self.stream(target, 4, min(1.0, self.s.warmup))

    # ---- a target ------------------------------------------------------------------------

    def measure(self, target: Target, phases: tuple[str, ...]) -> dict[str, Any]:
        self.log(f"== {target.name}  [{target.kind}, {target.server or '-'}, workers={target.workers}]")
        self.warm(target)
        out: dict[str, Any] = {
            "name": target.name,
            "kind": target.kind,
            "workers": target.workers,
            "server": target.server,
            "chain": target.chain,
            "info": {k: v for k, v in target.info.items() if k != "argv"},
            "phases": {},
        }
        if target.pid:
            out["rss_before_load_mb"] = procs.rss_bytes(target.pid)[0] / 2**20
        c, sc = self.s.concurrency, self.s.stream_concurrency
        table = {
            "plain_c1": ("plain", 1),
            f"plain_c{c}": ("plain", c),
            "stream_c1": ("stream", 1),
            f"stream_c{sc}": ("stream", sc),
        }
        for name in phases:
            kind, conc = table[name]
            out["phases"][name] = self.phase(target, kind, conc)
        if target.pid:
            total, each = procs.rss_bytes(target.pid)
            out["rss_after_load_mb"] = total / 2**20
            out["rss_per_process_mb"] = [x / 2**20 for x in each]
            self.log(f"  RSS after load {total / 2**20:.1f} MB ({len(each)} process(es))")
        return out

    def all_phases(self) -> tuple[str, ...]:
        return ("plain_c1", f"plain_c{self.s.concurrency}", "stream_c1", f"stream_c{self.s.stream_concurrency}")

    def run_llmgateway(
        self,
        key: str,
        name: str,
        *,
        workers: int = 1,
        server: str = "hypercorn",
        phases: tuple[str, ...] | None = None,
        chain: Chain | None = None,
    ) -> Target | None:
        try:
            target = start_llmgateway(
                name, self.upstream_url, self.workdir, chain or self.s.chain, workers=workers, server=server
            )
        except (RuntimeError, TimeoutError) as exc:
            self.log(f"!! {name} did not start: {exc}")
            self.results[key] = {"name": name, "kind": "llmgateway", "error": str(exc)[-2000:]}
            return None
        try:
            self.results[key] = self.measure(target, phases or self.all_phases())
            if self.s.profile and key == "llmgateway":
                self.results[key]["profile"] = self.profile(target)
        finally:
            target.stop()
        return target

    def run_baseline(self, key: str, name: str, app: str) -> None:
        """A reference row (benchmarks/baselines.py) under hypercorn, one worker, uvloop."""
        port = procs.free_port()
        hypercorn = str(Path(sys.executable).with_name("hypercorn"))
        argv = [hypercorn, "-k", "uvloop", "-w", "1", "-b", f"127.0.0.1:{port}", f"benchmarks.baselines:{app}"]
        env = {**os.environ, "BASELINE_UPSTREAM": self.upstream_url}
        child = procs.start(name, argv, self.workdir / f"baseline-{app}.log", env=env, cwd=str(HERE.parent))
        target = Target(name, "baseline", base_url=f"http://127.0.0.1:{port}", api_key=None, server="hypercorn")
        target.child = child
        try:
            procs.wait_port(port, 30, child.proc, child.log)
            self.results[key] = self.measure(target, self.all_phases())
        except (RuntimeError, TimeoutError) as exc:
            self.log(f"!! {name} did not start: {exc}")
            self.results[key] = {"name": name, "kind": "baseline", "error": str(exc)[-2000:]}
        finally:
            target.stop()

    def run(self) -> dict[str, Any]:
        self.start_upstream()
        try:
            upstream_target = direct(self.upstream_url)
            self.results["direct"] = self.measure(upstream_target, self.all_phases())
            if self.s.baselines:
                for app, label in (
                    ("static", "hypercorn alone (canned answer, no upstream call)"),
                    ("proxy", "hypercorn + h1 proxy (no gateway logic)"),
                ):
                    self.run_baseline(f"baseline_{app}", label, app)
            self.run_llmgateway("llmgateway", "llmgateway (hypercorn, 1 worker)")
            if self.s.litellm:
                try:
                    litellm = start_litellm(self.upstream_url, self.workdir)
                except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
                    self.log(f"!! LiteLLM did not start: {exc}")
                    self.results["litellm"] = {"name": "LiteLLM", "kind": "litellm", "error": str(exc)[-2000:]}
                else:
                    try:
                        self.results["litellm"] = self.measure(litellm, self.all_phases())
                    finally:
                        litellm.stop()
            if self.s.workers2:
                self.run_llmgateway(
                    "llmgateway_2w",
                    "llmgateway (hypercorn, 2 workers)",
                    workers=2,
                    phases=(f"plain_c{self.s.concurrency}", f"stream_c{self.s.stream_concurrency}"),
                )
            for server in self.s.servers:
                if not _importable(server):
                    self.log(f"-- {server} is not installed: skipped (pip install -e '.[bench]')")
                    continue
                self.run_llmgateway(f"llmgateway_{server}", f"llmgateway ({server}, 1 worker)", server=server)
                if self.s.workers2:
                    self.run_llmgateway(
                        f"llmgateway_{server}_2w",
                        f"llmgateway ({server}, 2 workers)",
                        workers=2,
                        server=server,
                        phases=(f"plain_c{self.s.concurrency}",),
                    )
            for label, chain in self.s.variants:
                self.run_llmgateway(
                    f"llmgateway_variant_{label}", f"llmgateway (hypercorn, 1 worker, {label})", chain=chain
                )
            if self.s.soak > 0:
                self.results["soak"] = self.soak()
        finally:
            self.stop()
        return self.results

    # ---- soak ------------------------------------------------------------------------------

    def soak(self) -> dict[str, Any]:
        """Alternate plain (wrk, c=concurrency) and streaming load on one worker for ``soak`` seconds,
        sampling RSS after every slice. Growth is measured from the sample after the first 10 %."""
        self.log(f"== soak: {self.s.soak:.0f} s on llmgateway (hypercorn, 1 worker)")
        target = start_llmgateway(
            "llmgateway soak", self.upstream_url, self.workdir, self.s.chain, workers=1, server="hypercorn"
        )
        assert target.pid is not None
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        requests = 0
        try:
            samples.append({"t_s": 0.0, "rss_mb": procs.rss_bytes(target.pid)[0] / 2**20, "requests": 0})
            slice_s = min(10.0, max(1.0, self.s.soak / 20))
            n = 0
            while time.monotonic() - started < self.s.soak:
                if n % 2 == 0:
                    result = self.plain(target, self.s.concurrency, slice_s)
                else:
                    result = self.stream(target, self.s.stream_concurrency, slice_s)
                requests += result.requests
                n += 1
                rss = procs.rss_bytes(target.pid)[0] / 2**20
                samples.append({"t_s": time.monotonic() - started, "rss_mb": rss, "requests": requests})
                if n % 6 == 0:
                    self.log(f"  t={samples[-1]['t_s']:.0f}s RSS {rss:.1f} MB after {requests} requests")
        finally:
            target.stop()
        warm = next((s for s in samples if s["t_s"] >= self.s.soak * 0.1), samples[min(1, len(samples) - 1)])
        final = samples[-1]
        growth = 100 * (final["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"] if warm["rss_mb"] else 0.0
        self.log(
            f"  RSS {warm['rss_mb']:.1f} MB at {warm['t_s']:.0f}s → {final['rss_mb']:.1f} MB at end: {growth:+.2f} %"
        )
        return {
            "duration_s": self.s.soak,
            "samples": samples,
            "baseline": warm,
            "final": final,
            "growth_pct": growth,
            "requests": requests,
        }

    # ---- profile ---------------------------------------------------------------------------

    def profile(self, target: Target) -> dict[str, Any]:
        """py-spy on the gateway under plain and streaming load: flame graphs and top self-time lines."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            self.log("-- py-spy is not installed: no profile (pip install -e '.[bench]')")
            return {}
        assert target.pid is not None
        out: dict[str, Any] = {}
        seconds = max(3, round(self.s.duration))
        for kind in ("plain", "stream"):
            raw = self.workdir / f"profile-{kind}.txt"
            argv = [
                py_spy,
                "record",
                "-p",
                str(target.pid),
                "-d",
                str(seconds),
                "-r",
                "500",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
            ]
            spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            if kind == "plain":
                self.plain(target, self.s.concurrency, seconds + 1)
            else:
                self.stream(target, self.s.stream_concurrency, seconds + 1)
            spy.wait(timeout=60)
            if raw.exists():
                out[kind] = {"raw": str(raw), "top": summarize_profile(raw)}
                self.log(f"  profile ({kind}): {raw}")
        return out


def summarize_profile(raw: Path, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares (percent of samples) per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n

    def best(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"self": best(own), "inclusive": best(incl)} if total else {}


def _importable(server: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(server) is not None


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        (int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")), 0
    )
    versions: dict[str, str | None] = {}
    import importlib.metadata as md

    for dist in ("llmgateway", "hypercorn", "uvicorn", "granian", "starlette", "httpx", "aiohttp", "uvloop", "orjson"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    wrk = None
    if load.have_wrk():
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "wrk"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "wrk": wrk,
        "git_commit": commit.stdout.strip() or None,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
