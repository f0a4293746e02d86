"""Processes the benchmarks run against: baselines and a synthetic engine worker.

Run as ``python -m bench.peers ROLE ...``. Every role answers a request with
the same messages — ``start``, ``chunks`` × ``audio``, ``end`` in MDP/0.2
client framing — so the paths compare like for like:

* ``direct``: a ROUTER that clients talk to with no broker at all;
* ``relay`` + ``relay-worker``: the least an MDP relay must do, in Python
  (swap identities, forward), with no checks, routing or heartbeats;
* ``proxy`` + ``relay-worker``: ``zmq.proxy`` (C) between ROUTER and DEALER;
* ``engine``: a synthetic *engine worker* for the real broker (MDP/0.2 worker
  protocol, heartbeats, capabilities), ``sockets`` of them in one process. Its
  audio is silence stamped with the send time (``time.perf_counter_ns``, a
  system-wide monotonic clock on Linux) so clients can measure chunk latency.
  It is a load generator for ``bench/``, never an engine of the product.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from typing import Iterator

import zmq

CLIENT = b"MDPC02"
START = json.dumps({"sample_rate": 22050, "format": "s16le", "engine": "piper", "voice": "synthetic", "worker": {"pid": 0}, "channels": 1}).encode()
END = b'{"synthetic":true}'


def audio_payload(nbytes: int) -> bytes:
    """PCM of ``nbytes`` whose first 8 bytes carry the send time in ns."""
    return struct.pack("<q", time.perf_counter_ns()) + bytes(max(0, nbytes - 8))


def replies(service: bytes, rid: bytes, chunks: int, nbytes: int) -> Iterator[list[bytes]]:
    """The messages of one answer, each audio chunk stamped as it is about to be sent."""
    yield [CLIENT, b"\x02", service, rid, b"start", START]
    for i in range(chunks):
        yield [CLIENT, b"\x02", service, rid, b"audio", struct.pack(">I", i), audio_payload(nbytes)]
    yield [CLIENT, b"\x03", service, rid, b"end", END]


def run_direct(endpoint: str, chunks: int, nbytes: int) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        ident, *frames = sock.recv_multipart()
        for r in replies(frames[2], frames[3], chunks, nbytes):
            sock.send_multipart([ident, *r])


def run_relay(frontend: str, backend: str) -> None:
    ctx = zmq.Context.instance()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.bind(frontend)
    be.bind(backend)
    worker = be.recv_multipart()[0]  # its hello
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if fe in ready:
            be.send_multipart([worker, *fe.recv_multipart()])
        if be in ready:
            fe.send_multipart(be.recv_multipart()[1:])


def run_proxy(frontend: str, backend: str) -> None:
    ctx = zmq.Context.instance()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    fe.bind(frontend)
    be.bind(backend)
    zmq.proxy(fe, be)


def run_relay_worker(backend: str, chunks: int, nbytes: int) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(backend)
    sock.send(b"hello")
    while True:
        msg = sock.recv_multipart()
        if len(msg) < 4:
            continue
        client, frames = msg[0], msg[1:]
        for r in replies(frames[2], frames[3], chunks, nbytes):
            sock.send_multipart([client, *r])


def run_engine(
    backend: str, sockets: int, chunks: int, nbytes: int, heartbeat_s: float = 0.25, curve: tuple[str, str] | None = None
) -> None:
    """``sockets`` synthetic MDP/0.2 engine workers in one poll loop; ``curve``: (secret cert, broker cert) paths."""
    keys = None
    if curve is not None:
        from broker.keys import connecting_keys

        keys = connecting_keys(*curve)
    ctx = zmq.Context.instance()
    caps = json.dumps({"protocol": "tts/1", "engine": "piper", "languages": ["en"], "voices": ["synthetic"], "sample_rate": 22050}).encode()
    socks = []
    poller = zmq.Poller()
    for _ in range(sockets):
        s = ctx.socket(zmq.DEALER)
        if keys is not None:
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = keys.public, keys.secret, keys.server
        s.connect(backend)
        s.send_multipart([b"MDPW02", b"\x01", b"piper.synthetic", caps])
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    next_hb = time.monotonic() + heartbeat_s
    while True:
        for s, _ in poller.poll(heartbeat_s * 1000 / 2):
            frames = s.recv_multipart()
            if frames[1] != b"\x02" or frames[4:] == [b"tts.cancel"]:
                continue
            addr, rid = frames[2], frames[4]
            for r in replies(b"", rid, chunks, nbytes):
                s.send_multipart([b"MDPW02", b"\x04" if r[1] == b"\x03" else b"\x03", addr, b"", *r[3:]])
        if time.monotonic() >= next_hb:
            for s in socks:
                s.send_multipart([b"MDPW02", b"\x05"])
            next_hb = time.monotonic() + heartbeat_s


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers")
    p.add_argument("role", choices=["direct", "relay", "proxy", "relay-worker", "engine"])
    p.add_argument("--frontend")
    p.add_argument("--backend")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--bytes", type=int, default=1764)
    p.add_argument("--sockets", type=int, default=1)
    p.add_argument("--curve-key", help="engine: secret certificate, for a broker with CURVE")
    p.add_argument("--broker-key", help="engine: the broker's public certificate")
    a = p.parse_args()
    if a.role == "direct":
        run_direct(a.frontend, a.chunks, a.bytes)
    elif a.role == "relay":
        run_relay(a.frontend, a.backend)
    elif a.role == "proxy":
        run_proxy(a.frontend, a.backend)
    elif a.role == "relay-worker":
        run_relay_worker(a.backend, a.chunks, a.bytes)
    else:
        run_engine(a.backend, a.sockets, a.chunks, a.bytes, curve=(a.curve_key, a.broker_key) if a.curve_key else None)


if __name__ == "__main__":
    main()
