"""Shared fixtures: real broker and worker processes over loopback TCP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.fixtures.tiny_piper import build_tiny_piper_voice
from tests.mdp_peers import RawClient

ROOT = Path(__file__).resolve().parent.parent
EN_VOICE = "en_US-joe-medium"
PT_VOICE = "pt_BR-tinyfixture-x_low"
STORY = " ".join(
    f"Chapter {i}: the caravan crossed the river at dawn, and the guards counted every wagon twice."
    for i in range(1, 9)
)
"""Eight sentences, ~45 s of speech and ~3 s of synthesis: long enough to kill or stop the serving
worker mid-stream, short enough that hearing it (~7 s of PocketSphinx per draw, eight draws of
piper-tts's for the bar, shared by every test that uses it) stays well inside a test's timeout.
Three times as long, the first test to need its bar ran past 300 s in CI."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    """A running ``tts-broker serve`` process and how to reach it."""

    proc: subprocess.Popen
    frontend: str
    backend: str
    log: Path

    def client(self) -> RawClient:
        return RawClient(self.frontend)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_services(frontend: str, services: list[str], timeout: float = 120.0, curve: Optional[tuple[bytes, bytes, bytes]] = None) -> None:
    client = RawClient(frontend, curve=curve)
    try:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            assert time.monotonic() < deadline, f"services never came up: {pending}"
            if client.call(b"mmi.service", pending[0].encode(), timeout=5)[3] == b"200":
                pending.pop(0)
            else:
                time.sleep(0.1)
    finally:
        client.close()


def start_serve(tmp: Path, workers_toml: Optional[str], extra_broker: str = "", top: str = "") -> Served:
    """Start ``tts-broker serve`` on free ports; ``workers_toml`` None means no config file (defaults).

    ``top`` goes before ``[broker]`` (top-level keys such as ``engine_modules``)."""
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "broker.cli", "serve", "--frontend", fe, "--backend", be]
    if workers_toml is not None:
        cfg = tmp / "serve.toml"
        cfg.write_text(f'log_level = "INFO"\n{top}\n[broker]\n{extra_broker}\n{workers_toml}')
        argv += ["--config", str(cfg)]
    log = tmp / "serve.log"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Served(proc, fe, be, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing test's report ends with the last lines of every ``serve.log`` under its
    ``tmp_path``: CI keeps only what is printed, not the test's files."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.rglob("serve.log")):
            lines = log.read_text(errors="replace").splitlines()[-60:]
            report.sections.append((f"{log.relative_to(tmp)}, last {len(lines)} lines", "\n".join(lines)))


def stop_serve(served: Served) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGINT)
        try:
            return served.proc.wait(30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
            raise
    return served.proc.returncode


@pytest.fixture(scope="session")
def tiny_pt_voice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tone-producing Piper-format voice for pt_BR: a test fixture, not a product voice."""
    return build_tiny_piper_voice(tmp_path_factory.mktemp("voices"), PT_VOICE)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_pt_voice: Path) -> Iterator[Served]:
    """``tts-broker serve`` with the bundled English voice and the tiny pt_BR fixture voice."""
    tmp = tmp_path_factory.mktemp("serve")
    workers = (
        f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\n'
        f'[[workers]]\nvoice = "{tiny_pt_voice}"\ndevice = "cpu"\n'
    )
    s = start_serve(tmp, workers, "request_timeout_ms = 8000")
    try:
        wait_services(s.frontend, [f"piper.{EN_VOICE}", f"piper.{PT_VOICE}"])
        yield s
    finally:
        rc = stop_serve(s)
        assert rc == 0, f"serve exited with {rc}; log:\n{s.log_text()[-3000:]}"


@pytest.fixture
def client(served: Served) -> Iterator[RawClient]:
    c = served.client()
    yield c
    c.close()


os.environ.setdefault("PYTHONUNBUFFERED", "1")


@dataclass
class Gatewayed:
    """``serve`` with two Piper workers of the bundled voice and both gateways (``[gateways]``)."""

    served: Served
    wyoming_port: int
    http_url: str


def wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"serve exited; log:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}; log:\n{log.read_text(errors='replace')[-3000:]}"
            time.sleep(0.1)


def wait_workers(s: Served, service: str, n: int, timeout: float = 120.0) -> None:
    import json

    c = s.client()
    try:
        deadline = time.monotonic() + timeout
        while len(json.loads(c.call(b"tts.status", b"{}")[3])["services"].get(service, {"workers": []})["workers"]) < n:
            assert time.monotonic() < deadline, f"{service}: fewer than {n} workers"
            time.sleep(0.1)
    finally:
        c.close()


@pytest.fixture(scope="session")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gatewayed]:
    wy, http = free_port(), free_port()
    workers = (
        f'[gateways]\nwyoming = "tcp://127.0.0.1:{wy}"\nhttp = "127.0.0.1:{http}"\n'
        f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n'
    )
    s = start_serve(tmp_path_factory.mktemp("gateways"), workers)
    try:
        wait_services(s.frontend, [f"piper.{EN_VOICE}"])
        wait_workers(s, f"piper.{EN_VOICE}", 2)
        wait_listening(wy, s.proc, s.log)
        wait_listening(http, s.proc, s.log)
        yield Gatewayed(s, wy, f"http://127.0.0.1:{http}")
    finally:
        rc = stop_serve(s)
        assert rc == 0, f"serve exited with {rc}; log:\n{s.log_text()[-3000:]}"
