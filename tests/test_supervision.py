"""Process-level behaviour: crashed workers restart, vanished clients are cancelled, clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.conftest import EN_VOICE, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient
from tests.test_e2e import LONG

SERVICE = f"piper.{EN_VOICE}"


def _pids(client: RawClient) -> list[int]:
    st = json.loads(client.call(b"tts.status", b"{}")[3])
    return [w["pid"] for w in st["services"].get(SERVICE, {}).get("workers", [])]


def test_crashed_worker_is_restarted_and_vanished_client_cancelled(tmp_path: Path) -> None:
    s = start_serve(tmp_path, f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\n')
    try:
        wait_services(s.frontend, [SERVICE])
        c = s.client()
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
