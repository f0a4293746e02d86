"""Process-level behaviour: crashed workers restart, vanished clients are cancelled, clean shutdown,
workers die with ``serve`` even on ``kill -9``, and a dead broker thread is replaced."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from broker import mdp
from broker.cli import Service
from broker.config import BrokerConfig, Config
from broker.tts import SynthesisRequest
from engines.base import Engine
from engines.runtime import WorkerRuntime
from tests.asr import assert_heard_like_piper
from tests.conftest import EN_VOICE, free_port, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient
from tests.test_e2e import LONG, SENTENCE, s16

SERVICE = f"piper.{EN_VOICE}"


def _pids(client: RawClient) -> list[int]:
    st = json.loads(client.call(b"tts.status", b"{}")[3])
    return [w["pid"] for w in st["services"].get(SERVICE, {}).get("workers", [])]


def test_default_serve_speaks_restarts_crashed_workers_and_cancels_vanished_clients(tmp_path: Path) -> None:
    s = start_serve(tmp_path, None)  # the default configuration: one worker, bundled voice
    try:
        wait_services(s.frontend, [SERVICE])
        c = s.client()
        first = c.request(b"hello", {"text": SENTENCE})
        c.wait(first)
        first.check_invariants()
        assert_heard_like_piper(SENTENCE, s16(first.pcm()), 22050, again=lambda: s16(c.whole({"text": SENTENCE}).pcm()))
        (pid,) = _pids(c)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            pids = _pids(c)
            if pids and pids != [pid]:
                break
            assert time.monotonic() < deadline, "worker was not restarted"
            time.sleep(0.1)
        r = c.request(b"after-crash", {"text": "Back on my feet."})
        c.wait(r)
        assert r.names()[-1] == b"end" and r.json_of(b"start")["worker"]["pid"] == pids[0]

        # A client that vanishes mid-stream: its job is cancelled at the worker,
        # which is then free for the next client long before the text would end.
        gone = s.client()
        g = gone.request(b"gone", {"text": LONG[:4900]})
        while not g.audio():
            assert gone.recv(30) is not None
        gone.close()
        nxt = c.request(b"next", {"text": "Next in line."})
        c.wait(nxt, timeout=8)
        assert nxt.names()[-1] == b"end"
        counters = json.loads(c.call(b"tts.status", b"{}")[3])["counters"]
        assert counters["cancelled"] >= 1
        c.close()
    finally:
        assert stop_serve(s) == 0
    # Clean shutdown took the worker processes down too.
    for p in pids:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker pid {p} still running after shutdown")


def test_standalone_broker_and_worker_processes(tmp_path: Path) -> None:
    """``python -m broker`` and ``python -m engines.piper`` as separate processes, as on two hosts."""
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log = (tmp_path / "procs.log").open("wb")
    broker = subprocess.Popen([sys.executable, "-m", "broker", "--frontend", fe, "--backend", be], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    worker = subprocess.Popen([sys.executable, "-m", "engines.piper", "--backend", be, "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_services(fe, ["tts"])
        c = RawClient(fe)
        r = c.request(b"x", {"text": "Across the network.", "sample_rate": 48000})
        c.wait(r)
        r.check_invariants()
        assert r.json_of(b"start")["sample_rate"] == 48000 and r.json_of(b"start")["worker"]["pid"] == worker.pid
        c.close()
    finally:
        for p in (worker, broker):
            p.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0 and broker.wait(30) == 0


def test_worker_startup_errors_are_clear(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "engines.piper", "--voice", "xx_XX-nobody-low"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown Piper voice 'xx_XX-nobody-low'" in r.stderr
    for spec, says in (("/nonexistent/map:0", "No such file"), ("no-index", "PATH:INDEX")):
        r = subprocess.run([sys.executable, "-m", "engines.piper", "--host-cores", spec], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--host-cores" in r.stderr and says in r.stderr, r.stderr[-500:]
    import onnxruntime
    import pytest

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine can run CUDA: the no-GPU error cannot happen")
    r = subprocess.run([sys.executable, "-m", "engines.piper", "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "device 'cuda' requested" in r.stderr


def test_a_worker_that_crashes_in_native_code_leaves_its_threads_stacks_in_its_log(tiny_pt_voice: Path) -> None:
    """What ``serve`` collects of a worker that segfaults (onnxruntime, torch and espeak-ng are
    native code): every thread's Python stack, not only the exit status."""
    import subprocess

    from tests.conftest import ROOT

    argv = [sys.executable, "-m", "engines.piper", "--backend", f"tcp://127.0.0.1:{free_port()}", "--voice", str(tiny_pt_voice), "--device", "cpu"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "READY" in line:
                break
        os.kill(proc.pid, signal.SIGSEGV)
        err = proc.stderr.read()
        assert proc.wait(30) == -signal.SIGSEGV
    finally:
        proc.kill()
        proc.wait()
    assert "Fatal Python error: Segmentation fault" in err and "engines/runtime.py" in err and "synth" in err, err[-3000:]


class _Silence(Engine):
    """A test engine: 10 ms of silence per sentence."""

    engine = "piper"
    native_rate = 16000
    service = "silence"

    def languages(self) -> list[str]:
        return ["en"]

    def voices(self) -> list[str]:
        return ["silence"]

    def voice_for(self, request: SynthesisRequest) -> str:
        return "silence"

    def speak(self, text: str, request: SynthesisRequest) -> list[np.ndarray]:
        return [np.zeros(160, dtype=np.float32)]


def test_a_worker_without_a_broker_warns_once_and_says_when_one_answers(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    runtime = WorkerRuntime(_Silence(), endpoint, heartbeat_s=0.02, liveness=2)
    thread = threading.Thread(target=runtime.run)
    caplog.set_level(logging.INFO, logger="engines.runtime")
    thread.start()
    broker = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        time.sleep(0.5)  # a dozen liveness periods with nobody there
        assert [r.levelname for r in caplog.records if "reconnecting" in r.message] == ["WARNING"]
        assert sum("READY" in r.message for r in caplog.records) == 1
        broker.bind(endpoint)
        assert broker.poll(5000)
        identity, protocol, command, *_ = broker.recv_multipart()
        assert (protocol, command) == (mdp.WORKER, mdp.W_READY)
        broker.send_multipart([identity, *mdp.HEARTBEAT_FRAMES])
        deadline = time.monotonic() + 5
        while not any("answered" in r.message for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(r.levelname == "INFO" and "answered" in r.message for r in caplog.records)
    finally:
        runtime.stop()
        thread.join(5)
        broker.close(linger=0)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, read from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie: an orphan's zombie may wait for a reaper that never comes."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_SIGNAL_INSIDE_HANDLER = """
import os, signal, sys, threading
from broker.server import BrokerServer
from engines.runtime import WorkerRuntime
from tests.conftest import free_port
from tests.test_supervision import _Silence

if sys.argv[1] == "worker":
    target = WorkerRuntime(_Silence(), f"tcp://127.0.0.1:{free_port()}", heartbeat_s=0.05)
else:
    target = BrokerServer(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
handler = lambda *_: target.stop()  # as the CLIs install it
signal.signal(signal.SIGTERM, handler)

def inside_handler(frame):
    while frame is not None:
        if frame.f_code is handler.__code__:
            return True
        frame = frame.f_back
    return False

def again(frame, event, arg):  # a second SIGTERM at every line the first one runs
    if event == "line":
        signal.raise_signal(signal.SIGTERM)
    return again

sys.settrace(lambda frame, event, arg: again if event == "call" and inside_handler(frame) else None)
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
target.run()
print("stopped")
"""


@pytest.mark.parametrize("which", ["worker", "broker"])
def test_a_second_sigterm_inside_the_first_ones_handler_still_stops_the_process(which: str) -> None:
    """On shutdown a worker gets two SIGTERMs a few ms apart (its starting thread ends, then the
    supervisor terminates it); the second can land while the first handler runs. Here it lands at
    every line of it. A handler that took a lock (``Event.set``) wedged there until killed."""
    import subprocess

    from tests.conftest import ROOT

    try:
        r = subprocess.run([sys.executable, "-c", _SIGNAL_INSIDE_HANDLER, which], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the {which} wedged in its own SIGTERM handler") from None
    assert r.returncode == 0 and r.stdout.strip() == "stopped", r.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with serve through Linux's PR_SET_PDEATHSIG")
def test_kill_9_of_serve_leaves_no_worker_behind(tmp_path: Path) -> None:
    s = start_serve(tmp_path, None)  # the default configuration: one Piper worker
    workers: list[int] = []
    try:
        wait_services(s.frontend, [SERVICE])
        c = s.client()
        workers = _pids(c)
        c.close()
        assert workers and set(workers) <= set(_children(s.proc.pid)), (workers, _children(s.proc.pid))
        s.proc.kill()
        s.proc.wait()
        deadline = time.monotonic() + 10
        while alive := [p for p in workers if _running(p)]:
            assert time.monotonic() < deadline, f"workers {alive} outlived a kill -9 of serve"
            time.sleep(0.1)
    finally:
        for p in workers:  # do not leave orphans to the rest of the suite when this fails
            if _running(p):
                os.kill(p, signal.SIGKILL)
        stop_serve(s)


def _service() -> Service:
    """``serve``'s Service in this process, on free ports, with no supervised workers."""
    return Service(Config(broker=BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"), workers=[]))


def test_a_broker_thread_that_ends_unasked_is_replaced_on_the_same_endpoints(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker.cli")
    with _service() as svc:
        frontend = svc.cfg.broker.frontend
        worker = WorkerRuntime(_Silence(), svc.cfg.broker.backend)
        worker_thread = threading.Thread(target=worker.run)
        worker_thread.start()
        c = RawClient(frontend)
        try:
            wait_services(frontend, ["silence"], timeout=10)
            old = svc.server
            old.stop()  # its loop ends, though the Service asked for nothing
            svc.thread.join(5)
            assert not svc.thread.is_alive()
            svc.check()
            assert svc.restarts == 1 and svc.server is not old and svc.thread.is_alive()
            assert (svc.cfg.broker.frontend, svc.server.frontend_ep) == (frontend, frontend)
            # The worker re-registers by itself, and a client connected before answers on.
            wait_services(frontend, ["silence"], timeout=10)
            r = c.request(b"after-restart", {"text": "Still here."})
            c.wait(r, timeout=10)
            r.check_invariants()
            assert r.names()[-1] == b"end" and r.json_of(b"start")["worker"]["pid"] == os.getpid()
            svc.check()  # a live broker is left alone
            assert svc.restarts == 1
        finally:
            c.close()
            worker.stop()
            worker_thread.join(5)
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == ["broker thread died; restarting it (restart 1)"]


class _Escapes(BaseException):
    """Not an Exception: nothing in the broker's loop is meant to catch it."""


def test_an_exception_escaping_the_broker_loop_is_logged_and_the_broker_restarted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="broker.cli")

    def tick(now: float) -> list:
        raise _Escapes("boom")

    with _service() as svc:
        old = svc.server
        old.core.tick = tick  # type: ignore[method-assign]
        svc.thread.join(5)
        assert not svc.thread.is_alive()
        svc.check()
        assert svc.restarts == 1 and svc.server is not old
        c = RawClient(svc.cfg.broker.frontend)
        try:
            st = json.loads(c.call(b"tts.status", b"{}")[3])
            assert st["inflight"] == 0
        finally:
            c.close()
    failed = [r for r in caplog.records if r.message == "broker thread failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None and failed[0].exc_info[0] is _Escapes
    assert any(r.message == "broker thread died; restarting it (restart 1)" for r in caplog.records)
