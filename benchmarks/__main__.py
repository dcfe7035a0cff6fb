"""``python -m benchmarks run`` — see benchmarks/README.md."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import orjson

from . import report
from .runner import Runner, Settings, machine_info
from .scenarios import FEATURES, Chain, Env, detect_full_chain, parse_features, variant_features

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="llmgateway benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure the upstream, llmgateway and LiteLLM one after the other")
    run.add_argument("--duration", type=float, default=10.0, help="seconds per load phase (default 10)")
    run.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default 2)")
    run.add_argument("--repeat", type=int, default=1, help="run each phase N times and keep the median")
    run.add_argument("--concurrency", type=int, default=32, help="connections for the req/s phase (default 32)")
    run.add_argument("--stream-concurrency", type=int, default=16, help="concurrent streams (default 16)")
    run.add_argument("--latency-ms", type=float, default=0.0, help="upstream latency before answering")
    run.add_argument("--chunk-delay-ms", type=float, default=0.0, help="upstream delay between stream chunks")
    run.add_argument("--chunks", type=int, default=8, help="content chunks per upstream stream (default 8)")
    run.add_argument("--quick", action="store_true", help="1 s phases, no warm-up, no extra scenarios (smoke)")
    run.add_argument("--skip-litellm", action="store_true", help="do not install or measure LiteLLM")
    run.add_argument("--no-wrk", action="store_true", help="use the in-repo aiohttp client even if wrk exists")
    run.add_argument("--no-workers2", action="store_true", help="skip the two-worker scenarios")
    run.add_argument(
        "--servers",
        default="uvicorn,granian",
        help="other servers to measure llmgateway on, comma-separated ('none' or '' for none; default uvicorn,granian)",
    )
    run.add_argument(
        "--chain",
        choices=("full", "core"),
        default="full",
        help="full (default): every feature of the default chain that is installed and reachable; core: none",
    )
    run.add_argument(
        "--feature",
        "-f",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="enable a chain feature explicitly: "
        + "; ".join(f"{f.name} ({'|'.join(f.values)})" for f in FEATURES.values()),
    )
    run.add_argument("--extra-toml", type=Path, help="a TOML file appended to the generated gateway.toml")
    run.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SPEC",
        help="an extra llmgateway row: 'core' (no features) or features changed from the main chain, "
        "e.g. 'database=postgres' or 'ratelimit=memory,-keys' (repeatable)",
    )
    run.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="also run a soak for RSS growth")
    run.add_argument("--profile", action="store_true", help="py-spy record the gateway under load")
    run.add_argument(
        "--baselines",
        action="store_true",
        help="also measure hypercorn alone and a bare hypercorn + upstream-client proxy (benchmarks/baselines.py)",
    )
    run.add_argument("--out", type=Path, default=HERE / "results", help="where latest.{md,json,png} go")
    again = sub.add_parser("report", help="re-render latest.md and latest.png from latest.json")
    again.add_argument("--out", type=Path, default=HERE / "results")
    return parser


def rerender(out: Path) -> int:
    data = orjson.loads((out / "latest.json").read_bytes())
    settings = data["settings"]
    data["summary"] = report.summarize(data["results"], settings["concurrency"], settings["stream_concurrency"])
    (out / "latest.md").write_text(report.markdown(data))
    report.write_json(data, out / "latest.json")
    png = report.chart(data, out / "latest.png")
    print(f"written: {out / 'latest.md'}, {out / 'latest.json'}" + (f", {out / 'latest.png'}" if png else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return rerender(args.out)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "tmp"
    workdir.mkdir(parents=True, exist_ok=True)

    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        stream_concurrency=args.stream_concurrency,
        repeat=max(1, args.repeat),
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        chunks=args.chunks,
        use_wrk=not args.no_wrk,
        litellm=not args.skip_litellm,
        workers2=not args.no_workers2,
        servers=tuple(s for s in args.servers.split(",") if s and s != "none"),
        soak=args.soak,
        profile=args.profile,
        baselines=args.baselines,
    )
    if args.quick:
        settings.duration, settings.warmup, settings.repeat = 1.0, 0.0, 1
        settings.workers2, settings.servers = False, ()

    features = parse_features(args.feature)
    skipped: dict[str, str] = {}
    if args.chain == "full":
        probe_env = Env(upstream_url="http://127.0.0.1:9", workdir=workdir, port=0)
        detected, skipped = detect_full_chain(probe_env, workdir)
        features = detected | features
        skipped = {k: v for k, v in skipped.items() if k not in features}
    extra = args.extra_toml.read_text() if args.extra_toml else ""
    settings.chain = Chain(features, extra)
    settings.skipped_features = skipped
    for spec in args.variant:
        settings.variants.append((spec, Chain(variant_features(features, spec), extra)))
    print(f"llmgateway chain: {settings.chain.label()}", flush=True)
    for name, why in skipped.items():
        print(f"  (not enabled: {name}: {why})", flush=True)

    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    machine = machine_info()
    runner = Runner(settings, workdir, log=lambda m: print(m, flush=True))
    results = runner.run()
    data = {
        "command": command,
        "started_at": started_at,
        "machine": machine,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "settings": {
            "duration": settings.duration,
            "warmup": settings.warmup,
            "repeat": settings.repeat,
            "concurrency": settings.concurrency,
            "stream_concurrency": settings.stream_concurrency,
            "latency_ms": settings.latency_ms,
            "chunk_delay_ms": settings.chunk_delay_ms,
            "chunks": settings.chunks,
            "wrk": bool(settings.use_wrk and machine["wrk"]),
            "chain": settings.chain.label(),
            "features": settings.chain.features,
            "skipped_features": skipped,
        },
        "results": results,
    }
    data["summary"] = report.summarize(results, settings.concurrency, settings.stream_concurrency)
    md = report.markdown(data)
    (out / "latest.md").write_text(md)
    report.write_json(data, out / "latest.json")
    png = report.chart(data, out / "latest.png")
    print()
    print(md)
    print(
        f"written: {out / 'latest.md'}, {out / 'latest.json'}"
        + (f", {out / 'latest.png'}" if png else " (no PNG: matplotlib missing)")
    )
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v and k in ("llmgateway", "direct")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
