"""Minimal MDP/0.2 peers written from RFC 18 alone, independent of ``broker.mdp``.

They stand in for the foreign clients and workers the broker must serve:
nothing here imports the project's framing code.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import zmq


@dataclass
class RawStream:
    """Everything one request id received, in arrival order."""

    events: list[tuple[bool, list[bytes]]] = field(default_factory=list)
    """(final, body frames after the service name) per message."""

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1][0]

    def names(self) -> list[bytes]:
        return [body[1] for _, body in self.events]

    def json_of(self, name: bytes) -> dict:
        return next(json.loads(body[2]) for _, body in self.events if body[1] == name)

    def audio(self) -> list[tuple[int, bytes]]:
        return [(struct.unpack(">I", body[2])[0], body[3]) for _, body in self.events if body[1] == b"audio"]

    def pcm(self) -> bytes:
        return b"".join(p for _, p in self.audio())

    def check_invariants(self) -> None:
        """One start before any audio, gapless sequence from 0, exactly one FINAL, last."""
        names = self.names()
        finals = [f for f, _ in self.events]
        assert finals.count(True) == 1 and finals[-1], f"exactly one FINAL, last: {names}"
        if b"audio" in names:
            assert names.count(b"start") == 1 and names.index(b"start") < names.index(b"audio"), names
            assert [s for s, _ in self.audio()] == list(range(len(self.audio()))), "sequence has gaps"


class RawClient:
    """A DEALER speaking MDP/0.2 client frames by hand."""

    def __init__(self, endpoint: str, ctx: Optional[zmq.Context] = None, curve: Optional[tuple[bytes, bytes, bytes]] = None) -> None:
        """``curve``: (public, secret, broker public) z85 keys, for a broker with CURVE (libzmq's options, RFC 26)."""
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        self.sock.connect(endpoint)
        self.streams: dict[bytes, RawStream] = {}
        self.other: list[list[bytes]] = []

    def send(self, service: bytes, *body: bytes) -> None:
        self.sock.send_multipart([b"MDPC02", b"\x01", service, *body])

    def request(self, rid: bytes, obj: object, service: bytes = b"tts") -> RawStream:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.streams[rid] = RawStream()
        self.send(service, rid, raw)
        return self.streams[rid]

    def whole(self, obj: object) -> RawStream:
        """One more request of ``obj`` under a fresh id, waited to its end (an intelligibility
        check's second draw)."""
        s = self.request(os.urandom(6).hex().encode(), obj)
        self.wait(s)
        return s

    def cancel(self, rid: bytes) -> None:
        self.send(b"tts.cancel", rid)

    def recv(self, timeout: float = 30.0) -> Optional[list[bytes]]:
        if not self.sock.poll(timeout * 1000):
            return None
        frames = self.sock.recv_multipart()
        assert frames[0] == b"MDPC02" and frames[1] in (b"\x02", b"\x03"), frames[:2]
        body = frames[3:]
        final = frames[1] == b"\x03"
        if frames[2] in (b"tts", b"xtts") or frames[2].startswith(b"piper."):
            if body and body[0] in self.streams:
                self.streams[body[0]].events.append((final, body))
                return frames
        self.other.append(frames)
        return frames

    def wait(self, *streams: RawStream, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(s.done for s in streams):
            left = deadline - time.monotonic()
            assert left > 0, f"streams did not finish in time: {[s.names() for s in streams]}; other replies {self.other[-3:]}"
            self.recv(left)

    def call(self, service: bytes, *body: bytes, timeout: float = 5.0) -> list[bytes]:
        """A request/reply on a non-TTS service; returns the reply frames."""
        self.send(service, *body)
        deadline = time.monotonic() + timeout
        while True:
            for i, frames in enumerate(self.other):
                if frames[2] == service:
                    return self.other.pop(i)
            left = deadline - time.monotonic()
            assert left > 0, f"no reply from {service!r}"
            self.recv(left)

    def close(self) -> None:
        self.sock.close(linger=0)


class EchoWorker(threading.Thread):
    """A foreign MDP/0.2 worker: echoes each request body back as one PARTIAL and a FINAL."""

    def __init__(self, endpoint: str, service: bytes = b"echo", heartbeat_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.service = service
        self.heartbeat_s = heartbeat_s
        self.stop = threading.Event()
        self.served = 0

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sock.send_multipart([b"MDPW02", b"\x01", self.service])
        next_hb = time.monotonic() + self.heartbeat_s
        while not self.stop.is_set():
            if sock.poll(50):
                frames = sock.recv_multipart()
                if frames[:2] == [b"MDPW02", b"\x02"]:
                    address, empty, body = frames[2], frames[3], frames[4:]
                    assert empty == b""
                    sock.send_multipart([b"MDPW02", b"\x03", address, b"", b"partial", *body])
                    sock.send_multipart([b"MDPW02", b"\x04", address, b"", b"final", *body])
                    self.served += 1
            if time.monotonic() >= next_hb:
                sock.send_multipart([b"MDPW02", b"\x05"])
                next_hb = time.monotonic() + self.heartbeat_s
        sock.send_multipart([b"MDPW02", b"\x06"])
        sock.close(linger=100)


class MisbehavingEngine(threading.Thread):
    """A worker that registers as a Piper engine and then fails every request in one way.

    ``mode``: ``garbage`` (answers with frames that are not TTS events),
    ``error`` (answers FINAL error internal), ``stall`` (heartbeats, never answers).
    A test peer only: it stands for a broken engine process.
    """

    def __init__(self, endpoint: str, mode: str, voice: str = "en_US-joe-medium", heartbeat_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.mode, self.voice, self.heartbeat_s = endpoint, mode, voice, heartbeat_s
        self.stop = threading.Event()
        self.requests = 0
        self.disconnected = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        caps = {"protocol": "tts/1", "engine": "piper", "languages": ["en"], "voices": [self.voice], "sample_rate": 22050}
        sock.send_multipart([b"MDPW02", b"\x01", f"piper.{self.voice}".encode(), json.dumps(caps).encode()])
        next_hb = time.monotonic()
        while not self.stop.is_set():
            if sock.poll(20):
                frames = sock.recv_multipart()
                if frames == [b"MDPW02", b"\x06"]:
                    self.disconnected.set()
                    break
                if frames[:2] == [b"MDPW02", b"\x02"] and frames[4:] != [b"tts.cancel"]:
                    self.requests += 1
                    address, rid = frames[2], frames[4]
                    if self.mode == "garbage":
                        sock.send_multipart([b"MDPW02", b"\x03", address, b"", rid, b"audio", b"\x00\x00\x00\x00", b"odd"])
                    elif self.mode == "error":
                        body = json.dumps({"code": "internal", "message": "model exploded"}).encode()
                        sock.send_multipart([b"MDPW02", b"\x04", address, b"", rid, b"error", body])
            if time.monotonic() >= next_hb:
                sock.send_multipart([b"MDPW02", b"\x05"])
                next_hb = time.monotonic() + self.heartbeat_s
        sock.close(linger=0)
