"""Broker cost per message: one request and its 7 replies, through four paths, interleaved.

Each round trip is a TTS request and ``start`` + 5 × ``audio`` (40 ms of 16-bit
PCM at 22,050 Hz) + ``end``, timed from send to the FINAL at the client:

* ``direct`` — client ↔ worker, no intermediary;
* ``relay`` — through a minimal Python ROUTER↔ROUTER relay (the least an
  MDP relay can do: swap identities and forward);
* ``proxy`` — through ``zmq.proxy`` (C);
* ``broker`` — through this project's broker (``python -m broker``), with a
  synthetic engine worker: full MDP/0.2 validation, routing, request checking,
  heartbeats, sequence rewriting and statistics.

``relay_overhead_ratio`` = broker p50 / relay p50.

:func:`run_security` measures the same round trip through four brokers,
interleaved: plain, with CURVE on both sockets (client and engine
authenticated), with ``[metrics]`` on, and a second plain one as a control.
``curve_overhead_ratio`` = CURVE p50 / plain p50, ``metrics_overhead_ratio`` =
metrics p50 / plain p50, ``control_ratio`` = the second plain broker's p50 / the
first's: what two identical brokers differ by, the floor under which the other two
ratios say nothing. Each is the median over sets of fresh processes of that set's
ratio, CURVE and metrics over the mean of both plain brokers: with one set for a
whole run, each pair of broker and engine processes kept its own placement and luck
from start to end, and the control read 0.74-1.53 over 18 runs on the 2-core VM
(CURVE 1.044 and 1.17 in two quick runs). In sets, it read 0.98-1.07 over six runs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from .common import cdf, endpoint, histogram, processes, summary

PATHS = ("direct", "relay", "proxy", "broker")
REQUEST = json.dumps({"text": "Hello there."}).encode()


def _clients(endpoints: dict[str, str], prepare: Callable[[str, zmq.Socket], None] = lambda p, sock: None) -> dict[str, zmq.Socket]:
    """A connected client socket per path (``prepare`` sets a path's options before it connects)."""
    ctx = zmq.Context.instance()
    socks = {}
    for p, ep in endpoints.items():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        prepare(p, sock)
        sock.connect(ep)
        socks[p] = sock
    return socks


def _round_trip(sock: zmq.Socket, service: bytes, rid: bytes) -> int:
    t0 = time.perf_counter_ns()
    sock.send_multipart([b"MDPC02", b"\x01", service, rid, REQUEST])
    while True:
        if not sock.poll(60_000):
            raise RuntimeError(f"no reply to {rid!r} in 60 s: is its broker and engine still running?")
        frames = sock.recv_multipart()
        if frames[1] == b"\x03":
            if frames[4] != b"end":
                raise RuntimeError(f"round trip failed: {frames[4:]}")
            return (time.perf_counter_ns() - t0) // 1000


def _interleaved(socks: dict[str, zmq.Socket], rounds: int, per_round: int, warmup: int) -> dict[str, Any]:
    """Round trips on every path, a histogram each, then the sockets closed. Interleaved, the
    order rotated each round: every path sees the same machine noise, and none is always the
    one measured right after another."""
    paths = list(socks)
    hists = {p: histogram() for p in paths}
    n = 0
    for p in paths:
        for _ in range(warmup):
            n += 1
            _round_trip(socks[p], b"tts", b"w%d" % n)
    for r in range(rounds):
        k = r % len(paths)
        for p in paths[k:] + paths[:k]:
            for _ in range(per_round):
                n += 1
                hists[p].record_value(max(1, _round_trip(socks[p], b"tts", b"r%d" % n)))
    for sock in socks.values():
        sock.close()
    return hists


def run(rounds: int = 10, per_round: int = 300, warmup: int = 200) -> dict[str, Any]:
    ep = {p: (endpoint(), endpoint()) for p in PATHS}
    argvs = [
        ["-m", "bench.peers", "direct", "--frontend", ep["direct"][0]],
        ["-m", "bench.peers", "relay", "--frontend", ep["relay"][0], "--backend", ep["relay"][1]],
        ["-m", "bench.peers", "relay-worker", "--backend", ep["relay"][1]],
        ["-m", "bench.peers", "proxy", "--frontend", ep["proxy"][0], "--backend", ep["proxy"][1]],
        ["-m", "bench.peers", "relay-worker", "--backend", ep["proxy"][1]],
        ["-m", "broker", "--frontend", ep["broker"][0], "--backend", ep["broker"][1], "--log-level", "WARNING"],
        ["-m", "bench.peers", "engine", "--backend", ep["broker"][1]],
    ]
    with processes(*argvs):
        socks = _clients({p: ep[p][0] for p in PATHS})
        time.sleep(1.0)  # let every peer bind, connect and register
        hists = _interleaved(socks, rounds, per_round, warmup)
    result = {p: summary(h) for p, h in hists.items()}
    return {
        "unit": "µs per round trip (request + 7 replies)",
        "paths": result,
        "cdf": {p: cdf(h) for p, h in hists.items()},
        "relay_overhead_ratio": round(result["broker"]["p50"] / result["relay"]["p50"], 3),
        "relay_overhead_ratio_p99": round(result["broker"]["p99"] / result["relay"]["p99"], 3),
    }


SECURITY_PATHS = ("plain", "curve", "metrics", "control")


def run_security(sets: int = 8, rounds: int = 1, per_round: int = 300, warmup: int = 200) -> dict[str, Any]:
    """The broker round trip plain, with CURVE, with metrics on and plain again, interleaved, in
    ``sets`` sets of fresh processes: each ratio is the median over the sets of that set's p50
    ratio (CURVE and metrics over the mean of the two plain brokers). One set of processes kept
    for a whole run carried its placement and luck from start to end: two identical plain
    brokers read 0.74-1.53 of each other over 18 such runs."""
    import zmq.auth

    hists = {p: histogram() for p in SECURITY_PATHS}
    per_set: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp:
        d = Path(tmp)
        for sub in ("clients", "workers"):
            (d / sub).mkdir()
        zmq.auth.create_certificates(d, "broker")
        zmq.auth.create_certificates(d / "clients", "bench")
        zmq.auth.create_certificates(d / "workers", "engine")
        for _ in range(sets):
            one = _security_set(d, rounds, per_round, warmup)
            per_set.append({p: h.get_value_at_percentile(50) for p, h in one.items()})
            for p, h in one.items():
                hists[p].add(h)

    def ratio(path: str, base: tuple[str, ...] = ("plain", "control")) -> float:
        """The median over the sets of ``path``'s p50 ÷ the mean of the ``base`` brokers' p50s."""
        return round(statistics.median(s[path] * len(base) / sum(s[b] for b in base) for s in per_set), 3)

    result = {p: summary(h) for p, h in hists.items()}
    return {
        "unit": "µs per round trip (request + 7 replies), through the broker",
        "paths": result,
        "sets": sets,
        "set_p50s": per_set,
        "curve_overhead_ratio": ratio("curve"),
        "curve_overhead_ratio_p99": round(result["curve"]["p99"] / result["plain"]["p99"], 3),
        "metrics_overhead_ratio": ratio("metrics"),
        "metrics_overhead_ratio_p99": round(result["metrics"]["p99"] / result["plain"]["p99"], 3),
        "control_ratio": ratio("control", ("plain",)),
    }


def _security_set(d: Path, rounds: int, per_round: int, warmup: int) -> dict[str, Any]:
    """One set of the four brokers and their engines, fresh, measured interleaved and stopped."""
    from broker.keys import connecting_keys, secure_connect

    configs = {
        "plain": "",
        "curve": (
            f'[security]\ncurve = true\nbroker_key = "{d / "broker.key_secret"}"\n'
            f'client_keys = "{d / "clients"}"\nworker_keys = "{d / "workers"}"\n'
        ),
        "metrics": f'[metrics]\nlisten = "127.0.0.1:{endpoint().rsplit(":", 1)[1]}"\n',
        "control": "",
    }
    ep = {p: (endpoint(), endpoint()) for p in SECURITY_PATHS}
    argvs = []
    for p in SECURITY_PATHS:
        cfg = d / f"{p}.toml"
        cfg.write_text("workers = []\n" + configs[p])
        argvs.append(["-m", "broker", "--config", str(cfg), "--frontend", ep[p][0], "--backend", ep[p][1], "--log-level", "WARNING"])
        engine = ["-m", "bench.peers", "engine", "--backend", ep[p][1]]
        if p == "curve":
            engine += ["--curve-key", str(d / "workers" / "engine.key_secret"), "--broker-key", str(d / "broker.key")]
        argvs.append(engine)
    with processes(*argvs):
        keys = {"curve": connecting_keys(d / "clients" / "bench.key_secret", d / "broker.key")}
        socks = _clients({p: ep[p][0] for p in SECURITY_PATHS}, lambda p, sock: secure_connect(sock, keys.get(p)))
        time.sleep(1.5)  # let every broker bind and its engine register (CURVE handshakes included)
        return _interleaved(socks, rounds, per_round, warmup)
