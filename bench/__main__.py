"""``python -m bench [--quick]``: every benchmark, baselines in the same run, results in bench/results/.

The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import failover, gateways, peer, relay, report, rust_client, throughput, ttfa
from .common import machine_info

GOALS = {
    "relay_overhead_ratio": ("<=", 1.3),
    "curve_overhead_ratio": ("<=", 1.10),
    "metrics_overhead_ratio": ("<=", 1.02),
    "ttfa_ratio": ("<=", 1.10),
    "chunks_per_s": (">=", 20_000),
    "failover_gap_ms": ("<=", 1000),
    "long_sentence_ttfa_ratio": ("<=", 0.25),
    "short_sentence_ttfa_ratio": ("<=", 1.0),
    "frames_underruns": ("<=", 0),
    "timings_ttfa_ratio": ("<=", 1.03),
    "rust_ttfa_ratio": ("<=", 1.05),
    # Against wyoming-piper on the same voice, same run (bench/peer.py; issue 14's goals).
    "peer_long_first_ratio": ("<=", 0.20),
    "peer_passage_first_ratio": ("<=", 0.40),
    "peer_short_first_p50_ratio": ("<=", 1.0),
    "peer_short_first_p90_ratio": ("<=", 1.0),
    "peer_long_last_ratio": ("<=", 1.05),
    "peer_passage_last_ratio": ("<=", 1.05),
    "peer_cpu_ratio": ("<=", 1.05),
    "peer_four_first_p90_ratio": ("<=", 0.5),
    "peer_four_wall_ratio": ("<=", 1.0),
    "peer_four_underruns": ("<=", 0),
    "peer_table_npc_first_vs_solo": ("<=", 1.5),
    "peer_table_narration_vs_solo": ("<=", 1.1),
    "peer_table_underruns": ("<=", 0),
    "peer_rss_ratio": ("<=", 1.15),
    # The same right after the loads, before an idle worker gives back what they grew.
    "peer_rss_busy_ratio": ("<=", 1.15),
    # The gateways (bench/gateways.py; issue 17's goals).
    "wyoming_ttfa_ratio": ("<=", 1.10),
    "http_ttfa_ratio": ("<=", 1.10),
    "gateway_peer_short_ratio": ("<=", 1.0),
    "gateway_peer_long_ratio": ("<=", 0.25),
}


GATEWAY_KEYS = ("wyoming_ttfa_ratio", "http_ttfa_ratio", "gateway_peer_short_ratio", "gateway_peer_long_ratio")
GATEWAY_REPS = {True: 24, False: 32}
"""Repetitions of the gateways case, quick run or full: the same whether run alone or in the set."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few minutes on a 2-core machine")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--skip-xtts", action="store_true", help="skip the XTTS figures (no torch installed)")
    p.add_argument("--skip-rust", action="store_true", help="skip the Rust client figures (no cargo)")
    p.add_argument("--skip-peer", action="store_true", help="skip the side-by-side with wyoming-piper and the gateways case (bench/peer_env.py not built)")
    p.add_argument("--only-gateways", action="store_true", help="run only the gateways case: bench/results/gateways-MODE.json (RESULTS.md is not rewritten)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    q = a.quick
    if a.only_gateways:
        r = {"mode": "quick" if q else "full", "machine": machine_info(), "gateways": gateways.run(reps=GATEWAY_REPS[q])}
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gateways-{r['mode']}.json").write_text(json.dumps(r, indent=1))
        print(json.dumps({k: r["gateways"][k] for k in GATEWAY_KEYS}, separators=(",", ":")))
        return 0
    results: dict[str, Any] = {"mode": "quick" if q else "full", "machine": machine_info()}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        results[name] = fn()
        print(f"[bench] {name} done in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
        return results[name]

    step("relay", lambda: relay.run(rounds=5 if q else 20, per_round=300))
    step("security", lambda: relay.run_security(sets=24 if q else 32, rounds=1, per_round=300))
    step("ttfa_piper", lambda: ttfa.run_piper(reps=15 if q else 40))
    step("piper_modes", lambda: ttfa.run_piper_modes(reps=10 if q else 25))
    step("timings", lambda: ttfa.run_timings(reps=12 if q else 25))
    if not a.skip_xtts:
        step("ttfa_xtts", lambda: ttfa.run_xtts(reps=4 if q else 15))
    step("throughput", lambda: throughput.run([1, 8, 32, 64] if q else [1, 4, 8, 16, 32, 64, 128], seconds=3 if q else 10))
    step("failover_kill", lambda: failover.gap(reps=3 if q else 10))
    step("failover_stop", lambda: failover.gap(reps=2 if q else 5, how=signal.SIGSTOP))
    step("slow_clients", lambda: failover.slow_clients(8 if q else 32))
    if not a.skip_rust:
        step("rust_client", lambda: rust_client.run(reps=40 if q else 80, loads=3 if q else 10))
    if not a.skip_peer:
        step("peer", lambda: peer.run(reps=5 if q else 15, loads=2 if q else 5))
        step("gateways", lambda: gateways.run(reps=GATEWAY_REPS[q]))

    headline = {
        "relay_overhead_ratio": results["relay"]["relay_overhead_ratio"],
        "curve_overhead_ratio": results["security"]["curve_overhead_ratio"],
        "metrics_overhead_ratio": results["security"]["metrics_overhead_ratio"],
        "security_control_ratio": results["security"]["control_ratio"],
        "ttfa_ratio": results["ttfa_piper"]["ttfa_ratio"],
        "ttfa_ratio_sentence_mode": results["ttfa_piper"]["sentence_mode"]["ttfa_ratio"],
        "chunks_per_s": results["throughput"]["chunks_per_s"],
        "failover_gap_ms": results["failover_kill"]["failover_gap_ms"],
        "failover_gap_sigstop_ms": results["failover_stop"]["failover_gap_ms"],
        "xtts_ttfa_ratio": results.get("ttfa_xtts", {}).get("ttfa_ratio"),
        "long_sentence_ttfa_ratio": results["piper_modes"]["long_sentence_ttfa_ratio"],
        "short_sentence_ttfa_ratio": results["piper_modes"]["short_sentence_ttfa_ratio"],
        "frames_underruns": results["piper_modes"]["frames_underruns"],
        "timings_ttfa_ratio": results["timings"]["timings_ttfa_ratio"],
        "rust_ttfa_ratio": results.get("rust_client", {}).get("rust_ttfa_ratio"),
        "rust_8_streams_ttfa_ms": results.get("rust_client", {}).get("rust_8_streams_ttfa_ms"),
        **results.get("peer", {}).get("peer", {}),
        **{k: results.get("gateways", {}).get(k) for k in GATEWAY_KEYS},
    }
    headline["goals_met"] = {
        k: (headline[k] <= v if op == "<=" else headline[k] >= v) for k, (op, v) in GOALS.items() if headline.get(k) is not None
    }
    results["headline"] = headline
    report.write(results, Path(a.out), GOALS)
    print(json.dumps(headline, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
