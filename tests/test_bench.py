"""The benchmark suite runs (tiny sizes): a smoke test, no figure is asserted."""

from __future__ import annotations

import pytest

from bench import relay, throughput


def test_relay_benchmark_measures_every_path() -> None:
    r = relay.run(rounds=1, per_round=20, warmup=5)
    assert set(r["paths"]) == {"direct", "relay", "proxy", "broker"}
    assert all(v["count"] == 20 and v["p50"] > 0 for v in r["paths"].values())
    assert r["relay_overhead_ratio"] > 0


def test_security_benchmark_measures_plain_curve_metrics_and_control_brokers() -> None:
    """A round trip through the CURVE broker also proves its client and engine authenticated."""
    r = relay.run_security(sets=2, rounds=1, per_round=20, warmup=5)
    assert set(r["paths"]) == {"plain", "curve", "metrics", "control"}
    assert all(v["count"] == 40 and v["p50"] > 0 for v in r["paths"].values())  # both sets pooled
    assert len(r["set_p50s"]) == 2 and all(set(s) == set(r["paths"]) for s in r["set_p50s"])
    assert r["curve_overhead_ratio"] > 0 and r["metrics_overhead_ratio"] > 0 and r["control_ratio"] > 0


def test_throughput_benchmark_streams_without_errors() -> None:
    r = throughput.run([2], seconds=1.0)
    [row] = r["rows"]
    assert row["errors"] == 0 and row["chunks_per_s"] > 0 and row["chunk_latency_us"]["count"] > 0


def test_gpu_benchmark_says_why_it_cannot_run_piper_on_cuda() -> None:
    import onnxruntime
    import pytest

    from bench import gpu

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: bench.gpu measures Piper on CUDA here")
    r = gpu.piper_cuda(1)
    assert set(r) == {"skipped"} and "CPUExecutionProvider" in r["skipped"]


def test_gateways_report_section_names_every_side_and_ratio() -> None:
    from bench import report

    s = {"p50": 50.0, "p90": 60.0, "n": 1}
    g = {
        "reps": 1,
        "first_ms": {"passage": {"zmq": s, "wyoming_gw": s, "http_gw": s}, "short": {"zmq": s, "wyoming_gw": s, "http_gw": s, "wyoming_piper": s},
                     "long": {"zmq": s, "wyoming_gw": s, "wyoming_piper": s}},
        "wyoming_ttfa_ratio": 1.01, "http_ttfa_ratio": 1.02, "wyoming_short_ttfa_ratio": 1.03, "http_short_ttfa_ratio": 1.04,
        "gateway_peer_short_ratio": 0.99, "gateway_peer_long_ratio": 0.2,
    }
    text = "\n".join(report._gateway_lines(g))
    assert "| 47-word sentence | 50.0 / 60.0 | 50.0 / 60.0 |  | 50.0 / 60.0 |" in text
    assert all(str(v) in text for v in (1.01, 1.02, 1.03, 1.04, 0.99, 0.2))


def test_the_side_by_sides_player_counts_underruns_and_when_the_listener_hears_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playback starts at the first chunk; a chunk that arrives after the audio before it would
    have played out is an underrun, and the listener waits for it: the end is heard that much later."""
    from bench import peer

    clock = iter([1.0, 1.05, 1.25, 1.28])  # chunks of 0.1 s: the third arrives 0.05 s after the first two ran out
    monkeypatch.setattr(peer.time, "perf_counter", lambda: next(clock))
    player = peer._Player(t0=0.9)
    for _ in range(4):
        player.chunk(0.1)
    heard = player.heard()
    assert heard.underruns == 1
    assert (round(heard.first, 3), round(heard.last, 3), round(heard.audio_s, 3)) == (0.1, 0.38, 0.4)
    assert round(heard.heard_end, 3) == 0.55  # 1.25 + 0.2 of audio left to play, from 0.9
    assert round(heard.headroom, 3) == -0.05  # its closest call: the underrun


def test_the_side_by_sides_player_reports_the_closest_call_after_the_first_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window's chunks arrive together, and within a burst the audio in hand only grows: the
    calls are the later bursts' first chunks (the first burst's second chunk comes with one chunk
    in hand by design, which is no call)."""
    from bench import peer

    clock = iter([1.0, 1.001, 1.012, 1.2, 1.2005, 1.35])  # chunks of 0.1 s
    monkeypatch.setattr(peer.time, "perf_counter", lambda: next(clock))
    player = peer._Player(t0=0.9)
    for _ in range(3):
        player.chunk(0.1)
    assert player.heard().headroom is None  # one burst: never at risk
    for _ in range(3):
        player.chunk(0.1)
    heard = player.heard()
    assert heard.underruns == 0
    assert round(heard.headroom, 3) == 0.1  # 0.3 s sent by 1.0 + 0.3, the next chunk at 1.2
