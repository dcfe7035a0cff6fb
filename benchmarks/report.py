"""Turn the raw results into the summary (ratios, targets met or not), a Markdown table, a JSON file
and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def _phase(results: dict[str, Any], key: str, phase: str) -> dict[str, Any] | None:
    target = results.get(key)
    if not target or "phases" not in target:
        return None
    return target["phases"].get(phase)  # type: ignore[no-any-return]


def _get(results: dict[str, Any], key: str, phase: str, field: str) -> float | None:
    row = _phase(results, key, phase)
    value = row.get(field) if row else None
    return float(value) if value is not None else None


def summarize(results: dict[str, Any], concurrency: int, stream_concurrency: int) -> dict[str, Any]:
    c, sc = f"plain_c{concurrency}", f"stream_c{stream_concurrency}"
    gw, ll, dr = "llmgateway", "litellm", "direct"

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def diff(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    s: dict[str, Any] = {
        "rps_c32": {k: _get(results, k, c, "rps") for k in (dr, gw, ll)},
        "rps_c1": {k: _get(results, k, "plain_c1", "rps") for k in (dr, gw, ll)},
        "streams_per_s": {k: _get(results, k, sc, "rps") for k in (dr, gw, ll)},
        "added_p50_ms": {
            k: diff(_get(results, k, "plain_c1", "p50_ms"), _get(results, dr, "plain_c1", "p50_ms")) for k in (gw, ll)
        },
        "added_p99_ms": {
            k: diff(_get(results, k, "plain_c1", "p99_ms"), _get(results, dr, "plain_c1", "p99_ms")) for k in (gw, ll)
        },
        "ttft_overhead_ms": {
            k: diff(_get(results, k, "stream_c1", "ttft_p50_ms"), _get(results, dr, "stream_c1", "ttft_p50_ms"))
            for k in (gw, ll)
        },
        "cpu_ms_per_request": {k: _get(results, k, c, "cpu_ms_per_request") for k in (gw, ll, "llmgateway_2w")},
        "rss_after_load_mb": {k: (results.get(k) or {}).get("rss_after_load_mb") for k in (gw, ll)},
    }
    s["rps_ratio_vs_litellm"] = ratio(s["rps_c32"][gw], s["rps_c32"][ll])
    s["streams_ratio_vs_litellm"] = ratio(s["streams_per_s"][gw], s["streams_per_s"][ll])
    one, two = s["cpu_ms_per_request"][gw], s["cpu_ms_per_request"]["llmgateway_2w"]
    s["cpu_per_request_change_2w_pct"] = 100 * (two - one) / one if one and two else None
    soak = results.get("soak")
    s["soak_rss_growth_pct"] = soak.get("growth_pct") if soak else None

    def check(name: str, value: float | None, ok: bool | None, shown: str) -> dict[str, Any]:
        return {"target": name, "value": value, "met": ok, "shown": shown}

    def fmt(v: float | None, pattern: str) -> str:
        return pattern.format(v) if v is not None else "not measured"

    r, st = s["rps_ratio_vs_litellm"], s["streams_ratio_vs_litellm"]
    ap50, ttft = s["added_p50_ms"][gw], s["ttft_overhead_ms"][gw]
    rss, growth, cpu2 = s["rss_after_load_mb"][gw], s["soak_rss_growth_pct"], s["cpu_per_request_change_2w_pct"]
    rps = s["rps_c32"][gw]
    s["targets"] = [
        check(
            "≥ 20x LiteLLM's req/s (default chain, 1 worker each)", r, None if r is None else r >= 20, fmt(r, "{:.1f}x")
        ),
        check(
            "added p50 ≤ 0.3 ms at 1 connection", ap50, None if ap50 is None else ap50 <= 0.3, fmt(ap50, "{:.3f} ms")
        ),
        check("≥ 25x LiteLLM's streams/s", st, None if st is None else st >= 25, fmt(st, "{:.1f}x")),
        check("TTFT overhead ≤ 0.5 ms", ttft, None if ttft is None else ttft <= 0.5, fmt(ttft, "{:.3f} ms")),
        check("RSS ≤ 80 MB after load", rss, None if rss is None else rss <= 80, fmt(rss, "{:.1f} MB")),
        check(
            "RSS growth < 5 % over the soak", growth, None if growth is None else growth < 5, fmt(growth, "{:+.2f} %")
        ),
        check(
            "CPU ms/request within 10 % from 1 worker to 2",
            cpu2,
            None if cpu2 is None else abs(cpu2) <= 10,
            fmt(cpu2, "{:+.1f} %"),
        ),
        check(
            f"core issue: ≥ 2,500 req/s at {concurrency} connections",
            rps,
            None if rps is None else rps >= 2500,
            fmt(rps, "{:,.0f} req/s"),
        ),
        check(
            "core issue: added p50 ≤ 0.5 ms at 1 connection",
            ap50,
            None if ap50 is None else ap50 <= 0.5,
            fmt(ap50, "{:.3f} ms"),
        ),
    ]
    return s


def _f(v: Any, pattern: str = "{:.3f}") -> str:
    if v is None:
        return "-"
    return pattern.format(v)


def markdown(data: dict[str, Any]) -> str:
    results, summary, settings = data["results"], data["summary"], data["settings"]
    c, sc = settings["concurrency"], settings["stream_concurrency"]
    direct = results.get("direct", {})
    d50 = _get(results, "direct", "plain_c1", "p50_ms")
    d99 = _get(results, "direct", "plain_c1", "p99_ms")
    dttft = _get(results, "direct", "stream_c1", "ttft_p50_ms")
    lines = [
        f"# Benchmark results ({data['started_at']})",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Machine: {data['machine']['nproc']} CPUs ({data['machine']['cpu_model']}), "
        f"{data['machine']['memory_gib']} GiB, Python {data['machine']['python']}, kernel {data['machine']['kernel']}; "
        f"load average at start {' '.join(data['machine']['loadavg'])}, at end {' '.join(data.get('loadavg_end', []))}.",
        f"Load: {'wrk (1 thread)' if settings['wrk'] else 'in-repo aiohttp client'} for plain requests, the in-repo "
        f"aiohttp client for streams; {settings['duration']} s per phase after {settings['warmup']} s warm-up"
        + (f", median of {settings['repeat']} runs" if settings["repeat"] > 1 else "")
        + f"; upstream latency {settings['latency_ms']} ms, {settings['chunks']} chunks per stream"
        + (f" {settings['chunk_delay_ms']} ms apart" if settings["chunk_delay_ms"] else " in one write")
        + ".",
        f"llmgateway chain: {settings['chain']}."
        + (
            " Not enabled (not available when measured): "
            + "; ".join(f"{k}: {v}" for k, v in settings["skipped_features"].items())
            + "."
            if settings.get("skipped_features")
            else ""
        ),
        "",
        f"| target | req/s c=1 | req/s c={c} | p50 c=1 (ms) | added p50 (ms) | added p99 (ms) | streams/s c={sc} | TTFT p50 (ms) | TTFT overhead (ms) | RSS after load (MB) | CPU ms/req (c={c}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, target in results.items():
        if key == "soak" or not isinstance(target, dict):
            continue
        if "error" in target:
            lines.append(f"| {target['name']} | failed to start: see latest.json | | | | | | | | | |")
            continue
        ph = target.get("phases", {})
        p1, pc, s1, ss = (ph.get(k) or {} for k in ("plain_c1", f"plain_c{c}", "stream_c1", f"stream_c{sc}"))
        is_direct = target is direct
        a50 = None if is_direct or d50 is None or not p1 else p1["p50_ms"] - d50
        a99 = None if is_direct or d99 is None or not p1 else p1["p99_ms"] - d99
        attft = None if is_direct or dttft is None or not s1.get("ttft_p50_ms") else s1["ttft_p50_ms"] - dttft
        lines.append(
            "| "
            + " | ".join(
                [
                    target["name"],
                    _f(p1.get("rps"), "{:,.0f}"),
                    _f(pc.get("rps"), "{:,.0f}"),
                    _f(p1.get("p50_ms")),
                    _f(a50),
                    _f(a99),
                    _f(ss.get("rps"), "{:,.0f}"),
                    _f(s1.get("ttft_p50_ms")),
                    _f(attft),
                    _f(target.get("rss_after_load_mb"), "{:.1f}"),
                    _f(pc.get("cpu_ms_per_request")),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "## Targets (ratios from this one run, one worker each)",
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
    ]
    for t in summary["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['shown']} | {met} |")
    soak = results.get("soak")
    if soak:
        lines += [
            "",
            f"Soak: {soak['duration_s']:.0f} s, {soak['requests']:,} requests; RSS {soak['baseline']['rss_mb']:.1f} MB "
            f"at {soak['baseline']['t_s']:.0f} s → {soak['final']['rss_mb']:.1f} MB at the end ({soak['growth_pct']:+.2f} %).",
        ]
    lines += [
        "",
        "Added latency = the gateway's p50 (p99) at one connection minus the upstream's own, measured in the same "
        "run; TTFT overhead likewise for the first streamed event. CPU ms/req = CPU time of the server's process tree "
        "(utime+stime from /proc) during the phase ÷ requests answered. The machine column in latest.json "
        "(`machine_busy_pct`, `other_processes_pct`) tells how busy the machine was and how much of it was other work.",
    ]
    return "\n".join(lines) + "\n"


def write_json(data: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))


def chart(data: dict[str, Any], path: Path) -> bool:
    """A 2x2 PNG: req/s at c=N, added latency, streams/s, CPU ms per request. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results, settings = data["results"], data["settings"]
    c, sc = settings["concurrency"], settings["stream_concurrency"]
    rows = [(k, v) for k, v in results.items() if k != "soak" and isinstance(v, dict) and "phases" in v and v["phases"]]
    names = [v["name"].replace(" (", "\n(") for _, v in rows]
    colors = [
        "#999999" if v["kind"] == "direct" else "#d62728" if v["kind"] == "litellm" else "#1f77b4" for _, v in rows
    ]

    def values(phase: str, field: str) -> list[float | None]:
        out: list[float | None] = []
        for _, v in rows:
            value = (v["phases"].get(phase) or {}).get(field)
            out.append(float(value) if value is not None else None)
        return out

    def added(phase: str, field: str, base: float) -> list[float | None]:
        return [
            None if x is None or v["kind"] == "direct" else max(0.0, x - base)
            for x, (_, v) in zip(values(phase, field), rows, strict=True)
        ]

    d50 = _get(results, "direct", "plain_c1", "p50_ms") or 0.0
    dttft = _get(results, "direct", "stream_c1", "ttft_p50_ms") or 0.0
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    panels = [
        (
            axes[0][0],
            values(f"plain_c{c}", "rps"),
            f"requests/s at {c} connections (log scale; higher is better)",
            "{:,.0f}",
            True,
        ),
        (
            axes[0][1],
            values(f"stream_c{sc}", "rps"),
            f"streams/s at {sc} concurrent (log scale; higher is better)",
            "{:,.0f}",
            True,
        ),
        (
            axes[1][0],
            added("plain_c1", "p50_ms", d50),
            "added p50 latency at 1 connection, ms (lower is better)",
            "{:.2f}",
            False,
        ),
        (
            axes[1][1],
            added("stream_c1", "ttft_p50_ms", dttft),
            "time-to-first-token overhead, ms (lower is better)",
            "{:.2f}",
            False,
        ),
    ]
    for ax, vals, title, pattern, log in panels:
        shown = [v if v is not None else 0.0 for v in vals]
        bars = ax.barh(range(len(rows)), shown, color=colors)
        if log:
            ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for bar, v, (_, row) in zip(bars, vals, rows, strict=True):
            text = " " + pattern.format(v) if v is not None else " not measured"
            if v is None and row["kind"] == "direct":
                text = " (the baseline)"
            x = bar.get_width() if v else (1 if log else 0)
            ax.text(x, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
        ax.margins(x=0.18)
    fig.suptitle(
        f"llmgateway vs LiteLLM — {data['machine']['nproc']} CPUs, canned upstream, {data['started_at']}", fontsize=12
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
