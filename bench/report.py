"""Benchmark results → JSON, PNG plots and a markdown table in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _relay_cdf(r: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in r["cdf"].items():
        ax.plot([v for _, v in points], [p for p, _ in points], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("round trip, µs (request + 7 replies)")
    ax.set_ylabel("percentile")
    ax.set_title(f"Cost per message: broker / minimal relay p50 = {r['relay_overhead_ratio']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ttfa_bars(results: dict[str, Any], path: Path) -> None:
    rows = [(k.removeprefix("ttfa_"), results[k]) for k in ("ttfa_piper", "ttfa_xtts") if k in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.35
    for i, (name, r) in enumerate(rows):
        ax.bar(i - width / 2, r["direct_ttfa_ms"], width, color="tab:gray", label="in-process" if i == 0 else None)
        ax.bar(i + width / 2, r["broker_ttfa_ms"], width, color="tab:blue", label="through the broker" if i == 0 else None)
        ax.text(i + width / 2, r["broker_ttfa_ms"], f"×{r['ttfa_ratio']}", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), [n for n, _ in rows])
    ax.set_ylabel("median time to first audio, ms")
    ax.set_title("Time to first audio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(r: dict[str, Any], path: Path) -> None:
    rows = r["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [row["clients"] for row in rows]
    ax.plot(x, [row["chunks_per_s"] for row in rows], marker="o", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("chunks/s (20 ms each)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [row["chunk_latency_us"]["p99"] / 1000 for row in rows], marker="s", color="tab:red")
    ax2.set_ylabel("p99 chunk latency, ms", color="tab:red")
    ax.set_title("Throughput through one broker")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict[str, Any], goals: dict[str, tuple[str, float]]) -> str:
    h = results["headline"]
    m = results["machine"]
    r = results["relay"]["paths"]
    tp = results["throughput"]
    lines = [
        f"# Benchmark results ({results['mode']})",
        "",
        f"Measured {m['when']} on {m['cpus']} CPUs ({m['machine']}), Python {m['python']}, libzmq {m['libzmq']}. "
        "Every figure compares with a baseline measured in the same run; absolute times are context only.",
        "",
        "| figure | value | goal | met |",
        "|---|---|---|---|",
    ]
    for key, (op, goal) in goals.items():
        if h.get(key) is None:
            continue  # a step skipped in this run
        lines.append(f"| `{key}` | {h[key]} | {op} {goal:g} | {'yes' if h['goals_met'][key] else '**no**'} |")
    lines += [
        "",
        "## Cost per message (µs per round trip: one request, 7 replies)",
        "",
        "| path | p50 | p90 | p99 |",
        "|---|---|---|---|",
        *[f"| {name} | {v['p50']} | {v['p90']} | {v['p99']} |" for name, v in r.items()],
        "",
        f"`relay_overhead_ratio` = broker p50 / minimal Python relay p50 = **{results['relay']['relay_overhead_ratio']}** "
        f"(p99 ratio {results['relay']['relay_overhead_ratio_p99']}).",
        "",
        "![relay CDF](relay_cdf.png)",
        "",
        *_security_rows(results),
        "## Time to first audio",
        "",
        "| engine | in-process ms | broker ms | ratio | in-process RTF | broker RTF |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("piper (worker default)", results["ttfa_piper"]), ("piper, sentence mode", results["ttfa_piper"]["sentence_mode"])]
    if "ttfa_xtts" in results:
        rows.append(("xtts (tiny model, CPU)", results["ttfa_xtts"]))
    for name, t in rows:
        lines.append(f"| {name} | {t['direct_ttfa_ms']} | {t['broker_ttfa_ms']} | {t['ttfa_ratio']} | {t['direct_rtf']} | {t['broker_rtf']} |")
    lines += [
        "",
        "![TTFA](ttfa.png)",
        "",
        "### Piper: frame streaming versus sentence streaming (a frames worker and a piper-tts sentence worker, through a broker each)",
        "",
        "| case | frames ms | sentence ms | ratio |",
        "|---|---|---|---|",
        *[
            f"| {case} first sentence | {results['piper_modes'][f'{case}_frames_ttfa_ms']} | "
            f"{results['piper_modes'][f'{case}_sentence_ttfa_ms']} | {results['piper_modes'][f'{case}_sentence_ttfa_ratio']} |"
            for case in ("long", "short")
        ],
        "",
        f"Underruns in frame mode at real-time playback: {results['piper_modes']['frames_underruns']} "
        "(a chunk arriving after the audio before it had finished playing).",
        "",
        "## Throughput (20 ms chunks, synthetic workers)",
        "",
        "| streams | chunks/s | p50 latency ms | p99 latency ms | broker RSS MB |",
        "|---|---|---|---|---|",
        *[
            f"| {row['clients']} | {row['chunks_per_s']} | {row['chunk_latency_us']['p50'] / 1000:.1f} | "
            f"{row['chunk_latency_us']['p99'] / 1000:.1f} | {row['broker_rss_mb']} |"
            for row in tp["rows"]
        ],
        "",
        "![throughput](throughput.png)",
        "",
        "## Failover and memory",
        "",
        f"- SIGKILL of the serving worker → first audio from the next worker: median **{results['failover_kill']['failover_gap_ms']} ms** "
        f"({results['failover_kill']['all_ms']}).",
        f"- SIGSTOP (frozen worker, found by heartbeat): median {results['failover_stop']['failover_gap_ms']} ms ({results['failover_stop']['all_ms']}).",
        f"- Broker RSS: idle {tp['broker_rss_idle_mb']} MB; {results['slow_clients']['clients']} clients that never read, 4 long streams each: "
        f"peak {results['slow_clients']['broker_rss_peak_mb']} MB, {results['slow_clients']['broker_rss_after_mb']} MB after they left "
        "(bounded by `client_hwm` messages per client; their streams are cancelled).",
        "",
    ]
    if "rust_client" in results:
        rc = results["rust_client"]
        lines += [
            "## Rust async client",
            "",
            f"- Time to first audio of the passage through the Rust async client ({rc['rust_ttfa_ms']} ms) ÷ the Python client "
            f"({rc['python_ttfa_ms']} ms), same broker, interleaved: **{rc['rust_ttfa_ratio']}**.",
            f"- 8 streams at once through one Rust handle: first audio p50 {rc['rust_8_streams_ttfa_ms']['p50']} ms, "
            f"p99 {rc['rust_8_streams_ttfa_ms']['p99']} ms ({rc['rust_8_streams_ttfa_ms']['count']} streams).",
            "",
        ]
    if "peer" in results:
        lines += _peer_lines(results["peer"])
    if "gateways" in results:
        lines += _gateway_lines(results["gateways"])
    return "\n".join(lines)


def _gateway_lines(g: dict[str, Any]) -> list[str]:
    """First audio through the Wyoming and HTTP gateways (bench/gateways.py)."""
    f = g["first_ms"]
    sides = (("zmq", "ZeroMQ client"), ("wyoming_gw", "Wyoming gateway"), ("http_gw", "HTTP gateway"), ("wyoming_piper", "wyoming-piper"))
    lines = [
        "## Gateways (same broker, same run, interleaved)",
        "",
        f"First audio p50 / p90 ms at the client, {g['reps']} repetitions; `tts-broker serve` as it ships with "
        "`--wyoming` and `--http`, and wyoming-piper 2.5.2 on the same voice.",
        "",
        "| case | " + " | ".join(name for _, name in sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for case, label in (("passage", "3-sentence passage"), ("short", "\"Halt! Who goes there?\""), ("long", "47-word sentence")):
        cells = [f"{f[case][s]['p50']} / {f[case][s]['p90']}" if s in f[case] else "" for s, _ in sides]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"`wyoming_ttfa_ratio` **{g['wyoming_ttfa_ratio']}**, `http_ttfa_ratio` **{g['http_ttfa_ratio']}** (gateway ÷ ZeroMQ, passage, the median of the ratios within each rotation; "
        f"short line {g['wyoming_short_ttfa_ratio']} and {g['http_short_ttfa_ratio']}); our Wyoming gateway ÷ wyoming-piper: "
        f"short **{g['gateway_peer_short_ratio']}**, 47-word sentence **{g['gateway_peer_long_ratio']}**.",
        "",
    ]
    return lines


def _table_scene(p: dict[str, Any], path: Path) -> None:
    """First audio of each NPC line in the table scene, against the same line alone, per server."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color, dx in (("ours", "tab:blue", -0.2), ("wyoming", "tab:gray", 0.2)):
        firsts = p[f"table_{name}_npc_first_ms"]
        ax.bar([i + dx for i in range(len(firsts))], firsts, 0.4, color=color, label=f"{name}: NPC line during the narration")
        ax.axhline(p[f"table_{name}_npc_solo_first_ms"], color=color, linestyle="--", label=f"{name}: the line alone (median)")
    ax.set_xlabel("NPC line (0.3, 0.6, 0.9 s into the narration; every run)")
    ax.set_ylabel("time to first audio, ms")
    ax.set_title("Table scene: NPC lines while the narrator speaks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _peer_lines(p: dict[str, Any]) -> list[str]:
    def row(case: str, what: str, ours: Any, theirs: Any, ratio: Any) -> str:
        return f"| {case} | {what} | {ours} | {theirs} | {ratio} |"

    q = p["peer"]
    return [
        "## Side by side with wyoming-piper (same voice, same run)",
        "",
        f"Default `tts-broker serve` (workers: {p['workers']}) against wyoming-piper 2.5.2 with its defaults, "
        f"{p['reps']} interleaved repetitions (the short line three times as many), {p['loads']} runs of each load.",
        "",
        "| case | figure | ours | wyoming-piper | ratio |",
        "|---|---|---|---|---|",
        row("47-word sentence", "first audio p50 ms", p["long_ours_first_ms"]["p50"], p["long_wyoming_first_ms"]["p50"], q["peer_long_first_ratio"]),
        row("3-sentence passage", "first audio p50 ms", p["passage_ours_first_ms"]["p50"], p["passage_wyoming_first_ms"]["p50"], q["peer_passage_first_ratio"]),
        row("\"Halt! Who goes there?\"", "first audio p50 ms", p["short_ours_first_ms"]["p50"], p["short_wyoming_first_ms"]["p50"], q["peer_short_first_p50_ratio"]),
        row("\"Halt! Who goes there?\"", "first audio p90 ms", p["short_ours_first_ms"]["p90"], p["short_wyoming_first_ms"]["p90"], q["peer_short_first_p90_ratio"]),
        row("47-word sentence", "last audio p50 ms", p["long_ours_last_ms"], p["long_wyoming_last_ms"], q["peer_long_last_ratio"]),
        row("passage", "last audio p50 ms", p["passage_ours_last_ms"], p["passage_wyoming_last_ms"], q["peer_passage_last_ratio"]),
        row("passage", "server CPU s", p["cpu_per_passage_ours_s"], p["cpu_per_passage_wyoming_s"], q["peer_cpu_ratio"]),
        row("4 passages at once", "first audio p90 ms", p["four_ours_first_ms"]["p90"], p["four_wyoming_first_ms"]["p90"], q["peer_four_first_p90_ratio"]),
        row("4 passages at once", "wall p50 ms", p["four_ours_wall_ms"], p["four_wyoming_wall_ms"], q["peer_four_wall_ratio"]),
        row("4 passages at once", "underruns", p["four_ours_underruns"], p["four_wyoming_underruns"], ""),
        row("table scene", "worst NPC first audio ÷ alone", p["table_ours_npc_first_vs_solo"], p["table_wyoming_npc_first_vs_solo"], ""),
        row("table scene", "narration last audio ÷ alone", p["table_ours_narration_vs_solo"], p["table_wyoming_narration_vs_solo"], ""),
        row("table scene", "narration heard to its end ÷ alone", p["table_ours_narration_heard_vs_solo"], p["table_wyoming_narration_heard_vs_solo"], ""),
        row("table scene", "underruns", p["table_ours_underruns"], p["table_wyoming_underruns"], ""),
        row("right after the last request", "engine process RSS MB", p["rss_busy"]["ours"]["largest_mb"], p["rss_busy"]["wyoming"]["largest_mb"], q["peer_rss_busy_ratio"]),
        row("after the run, idle", "engine process RSS MB", p["rss"]["ours"]["largest_mb"], p["rss"]["wyoming"]["largest_mb"], q["peer_rss_ratio"]),
        "",
        "![table scene](table_scene.png)",
        "",
    ]


def _security_rows(results: dict[str, Any]) -> list[str]:
    """The broker round trip plain / CURVE / metrics (bench.relay.run_security), when measured."""
    sec = results.get("security")
    if not sec:
        return []
    return [
        "## CURVE and metrics (µs per round trip through the broker, interleaved; all sets pooled)",
        "",
        "| broker | p50 | p90 | p99 |",
        "|---|---|---|---|",
        *[f"| {name} | {v['p50']} | {v['p90']} | {v['p99']} |" for name, v in sec["paths"].items()],
        "",
        f"`curve_overhead_ratio` = **{sec['curve_overhead_ratio']}** (p99 {sec['curve_overhead_ratio_p99']}), "
        f"`metrics_overhead_ratio` = **{sec['metrics_overhead_ratio']}** (p99 {sec['metrics_overhead_ratio_p99']}); "
        f"a second plain broker ÷ the first (the run's noise floor): {sec.get('control_ratio', '—')}. "
        f"Each ratio is the median over {sec.get('sets', 1)} sets of fresh processes of that set's p50 ratio.",
        "",
    ]


def write(results: dict[str, Any], out: Path, goals: dict[str, tuple[str, float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"results-{results['mode']}.json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    _relay_cdf(results["relay"], out / "relay_cdf.png")
    _ttfa_bars(results, out / "ttfa.png")
    _throughput(results["throughput"], out / "throughput.png")
    if "peer" in results:
        _table_scene(results["peer"], out / "table_scene.png")
    (out / "RESULTS.md").write_text(_table(results, goals))
