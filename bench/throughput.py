"""Sustained chunk throughput and chunk latency with many concurrent streams.

One broker, one process of synthetic engine workers (as many MDP workers as
the most concurrent streams measured, each answering with 50 × 20 ms chunks as
fast as it can),
and this process as the clients: each client keeps one stream in flight and
asks for the next as soon as one ends. Chunk latency is the time from the
worker's send (stamped in the PCM) to the client's receipt.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import zmq

from .common import endpoint, histogram, processes, rss_mb, summary

CHUNK_BYTES = 882
"""20 ms of 16-bit mono at 22,050 Hz."""
CHUNKS_PER_STREAM = 50


def _measure(fe: str, clients: int, seconds: float) -> dict[str, Any]:
    ctx = zmq.Context.instance()
    socks = []
    poller = zmq.Poller()
    for _ in range(clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(fe)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    n = 0

    def ask(s: zmq.Socket) -> None:
        nonlocal n
        n += 1
        s.send_multipart([b"MDPC02", b"\x01", b"tts", b"%d" % n, b'{"text":"x","voice":"synthetic"}'])

    for s in socks:
        ask(s)
    hist = histogram()
    chunks = errors = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for s, _ in poller.poll(100):
            while s.get(zmq.EVENTS) & zmq.POLLIN:
                frames = s.recv_multipart()
                event = frames[4]
                if event == b"audio":
                    sent = struct.unpack_from("<q", frames[6])[0]
                    hist.record_value(max(1, (time.perf_counter_ns() - sent) // 1000))
                    chunks += 1
                elif frames[1] == b"\x03":
                    errors += event != b"end"
                    ask(s)
    for s in socks:
        s.close()
    return {"clients": clients, "chunks_per_s": round(chunks / seconds), "errors": errors, "chunk_latency_us": summary(hist)}


def run(clients: list[int], seconds: float = 3.0) -> dict[str, Any]:
    fe, be = endpoint(), endpoint()
    rows = []
    with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
                   ["-m", "bench.peers", "engine", "--backend", be, "--sockets", str(max(clients)),
                    "--chunks", str(CHUNKS_PER_STREAM), "--bytes", str(CHUNK_BYTES)]) as (broker, _):
        time.sleep(1.5)
        idle_rss = rss_mb(broker.pid)
        for c in clients:
            rows.append(_measure(fe, c, seconds))
            rows[-1]["broker_rss_mb"] = round(rss_mb(broker.pid), 1)
    best = max(rows, key=lambda r: r["chunks_per_s"])
    return {"chunk_ms": 20, "chunks_per_stream": CHUNKS_PER_STREAM, "rows": rows, "broker_rss_idle_mb": round(idle_rss, 1),
            "chunks_per_s": best["chunks_per_s"], "at_clients": best["clients"]}
