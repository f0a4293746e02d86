"""Chaos: workers killed, frozen, broken or restarted under real streams (loopback, real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.asr import assert_heard_like_piper
from tests.conftest import EN_VOICE, ROOT, STORY, Served, free_port, start_serve, stop_serve, wait_services
from tests.mdp_peers import MisbehavingEngine, RawClient, RawStream
from tests.test_e2e import s16

SERVICE = f"piper.{EN_VOICE}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def check_sentence_accounting(s: RawStream, text: str) -> None:
    """Marks cover the text once, in order: every sentence was delivered exactly once."""
    ends = [json.loads(body[2])["end"] for _, body in s.events if body[1] == b"mark"]
    segments = [json.loads(body[2])["segment"] for _, body in s.events if body[1] == b"mark"]
    assert ends == sorted(set(ends)), "marks went backwards or repeated"
    assert segments == list(range(len(segments)))
    assert ends and not any(c.isalnum() for c in text[ends[-1]:]), "text not delivered to the end"
    assert s.json_of(b"end")["segments"] == len(ends)


def first_audio(c: RawClient, s: RawStream) -> int:
    """Wait for the first chunk; return the serving worker's pid."""
    while not s.audio():
        assert c.recv(60) is not None
    return s.json_of(b"start")["worker"]["pid"]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two Piper workers of one voice and an XTTS worker (tiny fixture checkpoint) under ``serve``."""
    from tests.fixtures.tiny_xtts import build_tiny_xtts_checkpoint

    xtts = build_tiny_xtts_checkpoint(tmp_path_factory.mktemp("xtts"))
    workers = (
        f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n'
        f'[[workers]]\nengine = "xtts"\nmodel_dir = "{xtts}"\ndevice = "cpu"\nstream_chunk_size = 4\n'
        f'[routing]\nchains = {{ en = ["piper:{EN_VOICE}", "xtts"] }}\n'
    )
    s = start_serve(tmp_path_factory.mktemp("chaos"), workers)
    try:
        wait_services(s.frontend, [SERVICE, "xtts"])
        wait_workers(s, SERVICE, 2)
        yield s
    finally:
        assert stop_serve(s) == 0, s.log_text()[-3000:]


def wait_workers(s: Served, service: str, n: int, timeout: float = 60) -> list[int]:
    c = s.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            st = json.loads(c.call(b"tts.status", b"{}")[3])["services"].get(service, {"workers": []})
            pids = [w["pid"] for w in st["workers"]]
            if len(pids) == n and all(not w["busy"] for w in st["workers"]):
                return pids
            assert time.monotonic() < deadline, f"{service}: wanted {n} idle workers, have {st['workers']}"
            time.sleep(0.1)
    finally:
        c.close()


@pytest.mark.parametrize("stream", ["frames", "sentence"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "sigstop"])
def test_serving_worker_lost_mid_stream_resumes_without_loss(chaos: Served, how: signal.Signals, stream: str) -> None:
    c = chaos.client()

    def story_through_a_loss() -> tuple[RawStream, int]:
        """The story, its serving worker lost at its first audio, waited to its end."""
        wait_workers(chaos, SERVICE, 2)
        s = c.request(os.urandom(6).hex().encode(), {"text": STORY, "stream": stream})
        pid = first_audio(c, s)
        os.kill(pid, how)
        try:
            c.wait(s, timeout=90)
        finally:
            if how == signal.SIGSTOP:
                os.kill(pid, signal.SIGCONT)
        return s, pid

    s, pid = story_through_a_loss()
    s.check_invariants()
    assert s.names()[-1] == b"end", s.events[-1]
    [failover] = [json.loads(b[2]) for _, b in s.events if b[1] == b"failover"]
    assert failover["worker"]["pid"] != pid and failover["engine"] == "piper"
    assert s.json_of(b"end")["failovers"] == 1
    check_sentence_accounting(s, STORY)
    assert_heard_like_piper(STORY, s16(s.pcm()), 22050, again=lambda: s16(story_through_a_loss()[0].pcm()))
    # The lost worker is out of rotation until it is back: restarted (kill) or resumed (stop).
    wait_workers(chaos, SERVICE, 2)
    c.close()


def test_every_piper_worker_lost_mid_stream_xtts_takes_over_at_the_announced_rate(chaos: Served) -> None:
    pids = wait_workers(chaos, SERVICE, 2)
    c = chaos.client()
    s = c.request(b"story", {"text": STORY, "format": "f32le"})
    first_audio(c, s)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        c.wait(s, timeout=120)
        nxt = c.request(b"english", {"text": "Who speaks now?"})
        c.wait(nxt, timeout=60)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    s.check_invariants()
    assert s.names()[-1] == b"end"
    failovers = [json.loads(b[2]) for _, b in s.events if b[1] == b"failover"]
    assert failovers[-1]["engine"] == "xtts"
    start = s.json_of(b"start")
    assert (start["format"], start["sample_rate"]) == ("f32le", 22050)
    assert all(len(p) % 4 == 0 for _, p in s.audio())
    check_sentence_accounting(s, STORY)
    # With every Piper worker gone, English goes to XTTS from the start.
    assert nxt.json_of(b"start")["engine"] == "xtts"
    wait_workers(chaos, SERVICE, 2)
    c.close()


def test_idle_worker_killed_is_routed_around(chaos: Served) -> None:
    pids = wait_workers(chaos, SERVICE, 2)
    os.kill(pids[0], signal.SIGKILL)
    c = chaos.client()
    streams = [c.request(f"r{i}".encode(), {"text": "A short line."}) for i in range(4)]
    c.wait(*streams, timeout=60)
    for s in streams:
        s.check_invariants()
        assert s.names()[-1] == b"end"
    wait_workers(chaos, SERVICE, 2)
    c.close()


@pytest.fixture
def lone_broker(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen]]:
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log = (tmp_path / "broker.log").open("wb")
    argv = [sys.executable, "-m", "broker", "--frontend", fe, "--backend", be, "--stuck-timeout-ms", "1500"]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    yield fe, be, p
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0


def piper_worker(be: str, tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / "worker.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "engines.piper", "--backend", be, "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("mode", ["garbage", "error", "stall"])
def test_broken_engine_is_failed_over_invisibly(lone_broker: tuple[str, str, subprocess.Popen], tmp_path: Path, mode: str) -> None:
    fe, be, _ = lone_broker
    bad = MisbehavingEngine(be, mode)
    bad.start()
    wait_services(fe, [SERVICE])  # the broken one registered first: it gets the first request
    good = piper_worker(be, tmp_path)
    try:
        c = RawClient(fe)
        deadline = time.monotonic() + 60
        while len(json.loads(c.call(b"tts.status", b"{}")[3])["services"][SERVICE]["workers"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s = c.request(b"x", {"text": "The bridge holds. For now."})
        c.wait(s, timeout=60)
        s.check_invariants()
        assert s.names()[0] == b"start" and s.names()[-1] == b"end"  # one normal stream
        assert b"failover" not in s.names()
        assert bad.requests == 1 and s.json_of(b"start")["worker"]["pid"] == good.pid
        st = json.loads(c.call(b"tts.status", b"{}")[3])
        assert st["counters"]["failovers"] == 1 and st["services"][SERVICE]["failures"] == 1
        assert st["services"][SERVICE]["last_failure"]
        if mode in ("garbage", "stall"):
            assert bad.disconnected.wait(10)  # out of rotation until it re-registers
        c.close()
    finally:
        bad.stop.set()
        good.send_signal(signal.SIGTERM)
        good.wait(30)


def test_broker_restart_clients_get_a_clean_error_and_workers_reregister(tmp_path: Path) -> None:
    from broker.client import TtsClient, TtsError

    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "broker", "--frontend", fe, "--backend", be]
    log = (tmp_path / "broker.log").open("ab")
    broker = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    worker = piper_worker(be, tmp_path)
    try:
        with TtsClient(fe, timeout=60) as client:
            assert client.wait_ready(timeout=60)
            stream = client.speak(STORY)
            next(iter(stream))
            broker.kill()
            broker.wait()
            with pytest.raises(TtsError) as err:
                stream.audio()
            assert err.value.code == "unavailable"
            broker = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            assert client.wait_ready(timeout=60)  # the worker re-registered by itself
            again = client.speak("We are back.")
            assert len(again.audio()) > 0 and again.start is not None and again.start.worker["pid"] == worker.pid
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
