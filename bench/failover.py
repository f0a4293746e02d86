"""Failover gap, and broker memory under clients that stop reading.

Gap: two Piper workers behind ``python -m broker`` at the default heartbeat
settings; a long request; once audio flows, SIGKILL (or SIGSTOP) the worker
serving it. The gap is the time from the signal to the first audio chunk that
the *next* worker produced (after the ``failover`` event) at the client:
chunks the dead worker had already sent are not counted.

Slow clients: clients that ask for long streams and never read. The broker
queues at most ``client_hwm`` messages toward each, then cancels its streams;
its memory must stay bounded.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import zmq

from .common import ROOT, endpoint, processes, rss_mb

STORY = " ".join(f"Chapter {i}: the caravan crossed the river at dawn, and the guards counted every wagon twice." for i in range(1, 30))


def _worker(be: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engines.piper", "--backend", be, "--device", "cpu", "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _idle_workers(sock: zmq.Socket, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sock.send_multipart([b"MDPC02", b"\x01", b"tts.status", b"{}"])
        reply = sock.recv_multipart()
        svc = json.loads(reply[3])["services"].get("piper.en_US-joe-medium")
        if svc and svc["idle"] >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("workers did not come up")


def gap(reps: int = 3, how: signal.Signals = signal.SIGKILL) -> dict[str, Any]:
    fe, be = endpoint(), endpoint()
    gaps = []
    with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "ERROR"]):
        workers = [_worker(be), _worker(be)]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(fe)
        try:
            for rep in range(reps):
                _idle_workers(sock, 2)
                rid = b"g%d" % rep
                sock.send_multipart([b"MDPC02", b"\x01", b"tts", rid, json.dumps({"text": STORY}).encode()])
                victim = t_kill = None
                failed_over = False
                while True:
                    frames = sock.recv_multipart()
                    if frames[2] != b"tts" or frames[3] != rid:
                        continue
                    event = frames[4]
                    if event == b"start":
                        victim = json.loads(frames[5])["worker"]["pid"]
                    elif event == b"audio" and t_kill is None:
                        os.kill(victim, how)  # type: ignore[arg-type]
                        t_kill = time.perf_counter()
                    elif event == b"failover":
                        failed_over = True
                    elif event == b"audio" and failed_over and len(gaps) == rep:
                        gaps.append((time.perf_counter() - t_kill) * 1000)  # type: ignore[operator]
                    if frames[1] == b"\x03":
                        if event != b"end":
                            raise RuntimeError(f"stream failed: {frames[5:]}")
                        break
                for w in workers:  # replace the victim
                    if w.pid == victim:
                        if how == signal.SIGSTOP:
                            w.kill()
                        w.wait()
                        workers[workers.index(w)] = _worker(be)
        finally:
            sock.close()
            for w in workers:
                w.kill()
                w.wait()
    return {
        "signal": how.name,
        "failover_gap_ms": round(statistics.median(gaps), 1),
        "all_ms": [round(g, 1) for g in gaps],
        "heartbeat_ms": 250,
        "liveness": 3,
    }


def slow_clients(clients: int = 16, chunks: int = 3000, seconds: float = 5.0) -> dict[str, Any]:
    fe, be = endpoint(), endpoint()
    with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "ERROR"],
                   ["-m", "bench.peers", "engine", "--backend", be, "--sockets", str(clients), "--chunks", str(chunks), "--bytes", "1764"]) as (broker, _):
        time.sleep(1.5)
        before = rss_mb(broker.pid)
        ctx = zmq.Context.instance()
        socks = []
        for i in range(clients):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 100)  # a client that reads nothing and buffers little
            s.connect(fe)
            for j in range(4):
                s.send_multipart([b"MDPC02", b"\x01", b"tts", b"%d-%d" % (i, j), b'{"text":"x","voice":"synthetic"}'])
            socks.append(s)
        peak = before
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peak = max(peak, rss_mb(broker.pid))
            time.sleep(0.1)
        for s in socks:
            s.close()
        time.sleep(0.5)
        after = rss_mb(broker.pid)
    return {"clients": clients, "streams_per_client": 4, "chunks_per_stream": chunks, "chunk_bytes": 1764,
            "broker_rss_before_mb": round(before, 1), "broker_rss_peak_mb": round(peak, 1), "broker_rss_after_mb": round(after, 1)}
