"""What the gateway tests share: the broker's status and the serving worker, read over ZeroMQ."""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from tests.conftest import EN_VOICE, Served

SERVICE = f"piper.{EN_VOICE}"


def status(s: Served) -> dict[str, Any]:
    c = s.client()
    try:
        return json.loads(c.call(b"tts.status", b"{}")[3])
    finally:
        c.close()


def wait_for(s: Served, what: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    """Poll ``tts.status`` until ``what(status)``; the last status, or AssertionError naming it."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(s)
        if what(st):
            return st
        assert time.monotonic() < deadline, f"status never satisfied the condition: {st}"
        time.sleep(0.05)


def idle(st: dict[str, Any], workers: int = 2) -> bool:
    """Nothing in flight and ``workers`` live idle workers of the bundled voice."""
    svc = st["services"].get(SERVICE, {"workers": []})
    return st["inflight"] == 0 and len(svc["workers"]) == workers and not any(w["busy"] for w in svc["workers"])


def busy_pid(st: dict[str, Any]) -> int:
    [pid] = [w["pid"] for w in st["services"][SERVICE]["workers"] if w["busy"]]
    return pid
