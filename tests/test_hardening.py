"""What probing the wire found (issue 11), each against real processes.

A real ``tts-broker serve`` with two Piper workers of the bundled voice, and
hand-written peers (``tests/mdp_peers.py`` style: no project framing code)
that send what a careless or hostile client or worker would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import zmq

from tests.conftest import EN_VOICE, Served, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient, RawStream

SERVICE = f"piper.{EN_VOICE}"
GRACE_MS = 1500


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``serve`` with two workers of the bundled English voice and a short service grace period."""
    workers = f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n'
    s = start_serve(tmp_path_factory.mktemp("hard"), workers, f"request_timeout_ms = 8000\nservice_grace_ms = {GRACE_MS}")
    try:
        wait_services(s.frontend, [SERVICE])
        c = s.client()
        deadline = time.monotonic() + 120
        while len(status(c)["services"][SERVICE]["workers"]) < 2:
            assert time.monotonic() < deadline, "second worker never came up"
            time.sleep(0.2)
        c.close()
        yield s
    finally:
        rc = stop_serve(s)
        assert rc == 0, s.log_text()[-3000:]
        assert "Traceback" not in s.log_text(), s.log_text()[-3000:]


def status(c: RawClient) -> dict:
    return json.loads(c.call(b"tts.status", b"{}")[3])


def spoken(c: RawClient, rid: bytes, text: str = "Hello there.", **fields: object) -> RawStream:
    s = c.request(rid, {"text": text, **fields})
    c.wait(s)
    s.check_invariants()
    assert s.names()[-1] == b"end" and len(s.pcm()) > 1000, s.names()
    return s


def error_of(s: RawStream) -> dict:
    assert s.done and s.names()[-1] == b"error", s.names()
    return s.json_of(b"error")


class FakeWorker:
    """A DEALER on the backend that says what it is told to."""

    def __init__(self, backend: str, identity: Optional[bytes] = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(backend)

    def ready(self, service: str, caps: Optional[dict] = None) -> None:
        self.sock.send_multipart([b"MDPW02", b"\x01", service.encode(), *([json.dumps(caps).encode()] if caps is not None else [])])

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([b"MDPW02", *frames])

    def received(self, timeout: float) -> list[list[bytes]]:
        got, deadline = [], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(left * 1000):
                got.append(self.sock.recv_multipart())
        return got

    def close(self) -> None:
        self.sock.close(linger=0)


def piper_caps(voice: str, *languages: str, **extra: object) -> dict:
    return {"protocol": "tts/1", "engine": "piper", "languages": list(languages), "voices": [voice], **extra}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------


def _surrogate(served: Served) -> None:
    c = served.client()
    try:
        for i in range(3):
            s = c.request(b"bad%d" % i, b'{"text": "\\ud800 hello"}')
            c.wait(s, timeout=10)
            s.check_invariants()
            err = error_of(s)
            assert err["code"] == "bad_request" and "surrogate" in err["message"], err
        spoken(c, b"after")
    finally:
        c.close()
    assert served.proc.poll() is None and "broker stopped" not in served.log_text()


def test_lone_surrogate_is_refused_with_one_worker(served: Served) -> None:
    _surrogate(served)


def test_lone_surrogate_is_refused_with_two_workers(hard: Served) -> None:
    _surrogate(hard)


def test_every_control_character_is_cleaned_not_an_engine_fault(hard: Served) -> None:
    c = hard.client()
    try:
        chars = [chr(x) for x in range(0x20) if chr(x) not in "\t\n\r"] + ["\x7f", "\x85"]
        for i in range(0, len(chars), 4):  # a few at a time: two workers, and no queue timeout on a slow machine
            batch = chars[i : i + 4]
            streams = [c.request(b"cc%d" % ord(ch), {"text": f"Hello{ch}there."}) for ch in batch]
            c.wait(*streams, timeout=60)
            for ch, s in zip(batch, streams):
                s.check_invariants()
                assert s.names()[-1] == b"end" and s.pcm(), (hex(ord(ch)), s.names(), s.events[-1])
        assert "embedded null" not in hard.log_text()
    finally:
        c.close()


def test_reused_request_id_gets_exactly_one_final_and_nothing_after(hard: Served) -> None:
    c = hard.client()
    try:
        long = " ".join(f"Sentence number {i} keeps the worker busy for a while." for i in range(30))
        s = c.request(b"dup", {"text": long})
        while not s.audio():
            assert c.recv(30) is not None
        c.send(b"tts", b"dup", json.dumps({"text": "Again."}).encode())
        c.wait(s, timeout=30)
        seen = len(s.events)
        c.recv(1.5)  # anything after the FINAL would arrive here
        assert len(s.events) == seen, "events after the FINAL"
        s.check_invariants()
        assert error_of(s)["code"] == "bad_request"
        spoken(c, b"dup")  # the id is free again
    finally:
        c.close()


def test_one_workers_odd_capabilities_do_not_redefine_the_service(hard: Served) -> None:
    fake = FakeWorker(hard.backend)
    c = hard.client()
    try:
        fake.ready(SERVICE, piper_caps(EN_VOICE, "zz"))
        assert not [f for f in fake.received(0.5) if f[:2] == [b"MDPW02", b"\x06"]]
        fake.send(b"\x06")
        time.sleep(0.3)
        assert "zz" not in status(c)["services"][SERVICE]["languages"]
        spoken(c, b"after-zz", language="en")
    finally:
        fake.close()
        c.close()


def test_departed_language_waits_for_a_restart_then_falls_back_to_the_default(hard: Served) -> None:
    fake = FakeWorker(hard.backend)
    c = hard.client()
    try:
        fake.ready("piper.pt_BR-fake-medium", piper_caps("pt_BR-fake-medium", "pt"))
        time.sleep(0.3)
        fake.send(b"\x06")
        time.sleep(0.2)
        s = spoken(c, b"pt", text="Bom dia.", language="pt-BR")
        # Spoken by the default language's voice once the grace period ran out, not refused.
        assert s.json_of(b"start")["voice"] == EN_VOICE
        assert "piper.pt_BR-fake-medium" not in status(c)["services"]
    finally:
        fake.close()
        c.close()


def test_non_string_voices_in_ready_disconnect_the_worker(hard: Served) -> None:
    fake = FakeWorker(hard.backend)
    c = hard.client()
    try:
        fake.ready("piper.en_US-odd-medium", piper_caps("x", "en") | {"voices": [1, {"a": 1}]})
        assert [b"MDPW02", b"\x06"] in fake.received(1.0)
        s = c.request(b"voice", {"text": "Hi.", "voice": "nobody"})
        c.wait(s, timeout=10)
        s.check_invariants()
        assert error_of(s)["code"] == "bad_request"
    finally:
        fake.close()
        c.close()


def test_twenty_thousand_readys_from_one_socket_leave_the_broker_small(hard: Served) -> None:
    c = hard.client()
    fake = FakeWorker(hard.backend)
    try:
        spoken(c, b"warm")
        before = rss_kb(hard.proc.pid)
        for i in range(20_000):
            fake.ready(f"flood{i}")
            fake.send(b"\x06")
        fake.ready("flood-last")
        deadline = time.monotonic() + 60
        while c.call(b"mmi.service", b"flood-last")[3] != b"200":
            assert time.monotonic() < deadline, "broker never got through the READYs"
            time.sleep(0.1)
        st = status(c)
        raw = json.dumps(st)
        assert st["service_count"] <= 256 + 2 and len(raw) < 200_000, (st["service_count"], len(raw))
        grown_mb = (rss_kb(hard.proc.pid) - before) / 1024
        # Unbounded, the table cost ~1.6 kB per service (54 → 168 MB for 72k): 20k would be ~30 MB.
        assert grown_mb < 10, f"serve grew {grown_mb:.1f} MB"
        spoken(c, b"after-flood")
    finally:
        fake.close()
        c.close()


def test_a_worker_id_from_status_cannot_take_over_the_worker(hard: Served) -> None:
    c = hard.client()
    hijackers: list[FakeWorker] = []
    try:
        ids = [w["id"] for w in status(c)["services"][SERVICE]["workers"]]
        assert len(ids) == 2
        for wid in ids:
            h = FakeWorker(hard.backend, identity=wid.encode())
            h.send(b"\x05")  # a heartbeat, to claim the session
            hijackers.append(h)
        time.sleep(0.5)
        # Both real workers still serve (several requests, so both get one), and no text reaches the hijackers.
        streams = [c.request(b"after-hijack%d" % i, {"text": "The real worker speaks."}) for i in range(4)]
        c.wait(*streams, timeout=60)
        for s in streams:
            s.check_invariants()
            assert s.names()[-1] == b"end"
        assert len({s.json_of(b"start")["worker"]["id"] for s in streams}) == 2
        for h in hijackers:
            assert not [f for f in h.received(0.3) if f[1:2] == [b"\x02"]], "a hijacker got a request"
        assert len(status(c)["services"][SERVICE]["workers"]) == 2
    finally:
        for h in hijackers:
            h.close()
        c.close()


def test_counters_add_up_once_nothing_is_in_flight(hard: Served) -> None:
    c = hard.client()
    try:
        spoken(c, b"count")
        s = c.request(b"count-bad", {"text": ""})
        c.wait(s, timeout=10)
        deadline = time.monotonic() + 30
        while (st := status(c))["inflight"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        n = st["counters"]
        assert n["requests"] == n["completed"] + n["errors"] + n["cancelled"] + n["expired"], n
    finally:
        c.close()
