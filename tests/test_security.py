"""CURVE and ZAP against real processes (issue 15): who gets in, who gets nothing, what crosses the wire.

One ``tts-broker serve`` with ``[security] curve = true`` and a supervised
Piper worker on the bundled voice (on the key pair ``serve`` makes for its own
workers), key directories written here with pyzmq's ``zmq.auth``, and peers
that are plain pyzmq sockets with libzmq's CURVE options. "Gets nothing" is
checked by waiting a bounded time for a reply that must not come: a
correctness bound, not a speed assertion.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pytest
import zmq
import zmq.auth

from broker.client import AsyncTtsClient, TtsClient
from broker.config import ConfigError, load_config
from broker.security import is_local_endpoint
from broker.tts import Audio
from tests.asr import SENTENCE, assert_heard_like_piper
from tests.conftest import EN_VOICE, PT_VOICE, ROOT, Served, free_port, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient

SERVICE = f"piper.{EN_VOICE}"
NOTHING_S = 2.0
"""How long a refused peer is watched for a reply that must not come."""
CAPS = {"protocol": "tts/1", "engine": "piper", "languages": ["en"], "voices": [EN_VOICE], "sample_rate": 22050}


@dataclass
class KeyDirs:
    root: Path

    @property
    def broker(self) -> Path:
        return self.root / "broker.key_secret"

    @property
    def broker_public(self) -> Path:
        return self.root / "broker.key"

    def secret(self, name: str) -> Path:
        """The secret certificate of ``name``, wherever it was made."""
        return next(self.root.rglob(f"{name}.key_secret"))

    def curve(self, name: str) -> tuple[bytes, bytes, bytes]:
        """(public, secret, broker public) for a raw peer."""
        public, secret = zmq.auth.load_certificate(self.secret(name))
        assert secret is not None
        return public, secret, zmq.auth.load_certificate(self.broker_public)[0]


def make_keys(root: Path) -> KeyDirs:
    for d in ("clients", "workers", "elsewhere"):
        (root / d).mkdir(parents=True)
    zmq.auth.create_certificates(root, "broker")
    for name in ("c1", "c2"):
        zmq.auth.create_certificates(root / "clients", name)
    for name in ("good", "xonly"):
        zmq.auth.create_certificates(root / "workers", name)
    for name in ("stranger", "c3"):  # never handed to the broker (c3 is added later, on SIGHUP)
        zmq.auth.create_certificates(root / "elsewhere", name)
    return KeyDirs(root)


def security_toml(k: KeyDirs, extra: str = "") -> str:
    return (
        f'[security]\ncurve = true\nbroker_key = "{k.broker}"\nclient_keys = "{k.root / "clients"}"\n'
        f'worker_keys = "{k.root / "workers"}"\nworker_services = {{ xonly = ["xtts"] }}\n{extra}'
    )


@pytest.fixture(scope="module")
def keydirs(tmp_path_factory: pytest.TempPathFactory) -> KeyDirs:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, keydirs: KeyDirs) -> Iterator[Served]:
    workers = security_toml(keydirs) + f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\n'
    s = start_serve(tmp_path_factory.mktemp("secure"), workers, "request_timeout_ms = 8000")
    try:
        wait_services(s.frontend, [SERVICE], curve=keydirs.curve("c1"))
        yield s
    finally:
        rc = stop_serve(s)
        assert rc == 0, s.log_text()[-3000:]
        assert "Traceback" not in s.log_text(), s.log_text()[-3000:]


def status(c: RawClient) -> dict:
    return json.loads(c.call(b"tts.status", b"{}", timeout=10)[3])


def dealer(endpoint: str, curve: Optional[tuple[bytes, bytes, bytes]]) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    sock.connect(endpoint)
    return sock


def answered(sock: zmq.Socket, frames: list[bytes], within: float = NOTHING_S) -> bool:
    """Send and wait for any reply. A refused handshake leaves the DEALER no peer to queue
    for, so its send would block: it is made with a bounded wait, and not being able to
    send at all counts as getting nothing too."""
    sock.setsockopt(zmq.SNDTIMEO, int(within * 1000))
    try:
        sock.send_multipart(frames)
    except zmq.Again:
        return False
    return bool(sock.poll(within * 1000))


def wait_log(s: Served, text: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while s.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"never logged {text!r}:\n{s.log_text()[-2000:]}"
        time.sleep(0.05)


# ------------------------------------------------------------------ clients


def test_authenticated_client_gets_real_speech_and_status_names_the_worker_certificate(secure: Served, keydirs: KeyDirs) -> None:
    def f32(stream: Iterable[object]) -> np.ndarray:
        return np.frombuffer(b"".join(e.pcm for e in stream if isinstance(e, Audio)), dtype="<f4")

    with TtsClient(secure.frontend, curve_key=keydirs.secret("c1"), broker_key=keydirs.broker_public, timeout=60) as client:
        stream = client.speak(SENTENCE, format="f32le", sample_rate=16000)
        audio = f32(stream)
        st = client.status()
        assert stream.end is not None and stream.start is not None
        assert_heard_like_piper(SENTENCE, audio, 16000, again=lambda: f32(client.speak(SENTENCE, format="f32le", sample_rate=16000)))
    [worker] = st["services"][SERVICE]["workers"]
    assert worker["certificate"] == "serve-local"  # serve's own key pair for its children


def test_async_client_with_key_bytes(secure: Served, keydirs: KeyDirs) -> None:
    public, secret = zmq.auth.load_certificate(keydirs.secret("c1"))
    broker_public = zmq.auth.load_certificate(keydirs.broker_public)[0]
    assert secret is not None

    async def run() -> bytes:
        client = AsyncTtsClient(secure.frontend, curve_key=secret, broker_key=broker_public, timeout=60)
        try:
            stream = await client.speak("Halt! Who goes there?")
            return await stream.audio()
        finally:
            await client.close()

    assert len(asyncio.run(run())) > 10_000


@pytest.mark.parametrize("who", ["plain", "unknown key", "worker key on the frontend"])
def test_unknown_or_plain_client_gets_nothing(secure: Served, keydirs: KeyDirs, who: str) -> None:
    curve = {"plain": None, "unknown key": keydirs.curve("stranger"), "worker key on the frontend": keydirs.curve("good")}[who]
    sock = dealer(secure.frontend, curve)
    try:
        assert not answered(sock, [b"MDPC02", b"\x01", b"tts.status", b"{}"])
        assert not answered(sock, [b"MDPC02", b"\x01", b"tts", b"r1", json.dumps({"text": "Open the gate."}).encode()])
    finally:
        sock.close()
    # The same exchange with a known key is answered: the check above can fail.
    ok = dealer(secure.frontend, keydirs.curve("c1"))
    try:
        assert answered(ok, [b"MDPC02", b"\x01", b"tts.status", b"{}"], within=10)
    finally:
        ok.close()


# ------------------------------------------------------------------ workers


def test_unknown_worker_cannot_register_and_is_never_sent_a_request(secure: Served, keydirs: KeyDirs) -> None:
    fake = dealer(secure.backend, keydirs.curve("stranger"))
    c = RawClient(secure.frontend, curve=keydirs.curve("c1"))
    try:
        fake.send_multipart([b"MDPW02", b"\x01", SERVICE.encode(), json.dumps(CAPS).encode()])
        real = [w["pid"] for w in status(c)["services"][SERVICE]["workers"]]
        streams = [c.request(f"u{i}".encode(), {"text": f"Request number {i}."}) for i in range(4)]
        c.wait(*streams)
        for s in streams:
            s.check_invariants()
            assert s.names()[-1] == b"end" and s.json_of(b"start")["worker"]["pid"] in real
        assert not fake.poll(NOTHING_S * 1000), "an unauthenticated worker was sent something"
        assert len(status(c)["services"][SERVICE]["workers"]) == 1
    finally:
        fake.close()
        c.close()


def test_known_worker_registers_with_its_certificate(secure: Served, keydirs: KeyDirs) -> None:
    """The positive control of the test above: the same READY with a known key is accepted."""
    w = dealer(secure.backend, keydirs.curve("good"))
    c = RawClient(secure.frontend, curve=keydirs.curve("c1"))
    try:
        w.send_multipart([b"MDPW02", b"\x01", b"opaque.echo"])  # not an engine service: `good` may not
        w.send_multipart([b"MDPW02", b"\x01", b"xtts", json.dumps({**CAPS, "engine": "xtts", "voices": ["narrator"]}).encode()])
        deadline = time.monotonic() + 10
        while "xtts" not in (st := status(c))["services"] or not st["services"]["xtts"]["workers"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert [w_["certificate"] for w_ in st["services"]["xtts"]["workers"]] == ["good"]
        assert "opaque.echo" not in st["services"]
        wait_log(secure, "certificate good may not register service opaque.echo")
    finally:
        w.send_multipart([b"MDPW02", b"\x06"])
        w.close()
        c.close()


def test_worker_certificate_limited_to_xtts_cannot_register_piper(secure: Served, keydirs: KeyDirs) -> None:
    w = dealer(secure.backend, keydirs.curve("xonly"))
    c = RawClient(secure.frontend, curve=keydirs.curve("c1"))
    try:
        w.send_multipart([b"MDPW02", b"\x01", SERVICE.encode(), json.dumps(CAPS).encode()])
        assert w.poll(10_000), "no DISCONNECT"
        assert w.recv_multipart() == [b"MDPW02", b"\x06"]
        wait_log(secure, f"certificate xonly may not register service {SERVICE}")
        assert [x["certificate"] for x in status(c)["services"][SERVICE]["workers"]] == ["serve-local"]
    finally:
        w.close()
        c.close()


# -------------------------------------------------------------- on the wire


class CaptureRelay(threading.Thread):
    """A TCP relay between a client and the broker that keeps every byte the client sends."""

    def __init__(self, upstream: str) -> None:
        super().__init__(daemon=True)
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        upstream_side: set[socket.socket] = set()
        while not self.stop.is_set():
            ready, _, _ = select.select([self.listener, *pairs], [], [], 0.05)
            for s in ready:
                if s is not self.listener and s not in pairs:
                    continue  # closed with its other half earlier in this round
                if s is self.listener:
                    down, _ = self.listener.accept()
                    try:
                        up = socket.create_connection(self.upstream)
                    except OSError:  # the broker is not listening yet: ZeroMQ reconnects
                        down.close()
                        continue
                    pairs[down], pairs[up] = up, down
                    upstream_side.add(up)
                    continue
                data = s.recv(65536)
                if not data:
                    other = pairs.pop(s)
                    pairs.pop(other, None)
                    s.close()
                    other.close()
                    continue
                if s not in upstream_side:
                    self.captured += data
                pairs[s].sendall(data)
        for s in pairs:
            s.close()
        self.listener.close()


def test_relay_sees_the_text_in_plain_mode_and_not_with_curve(secure: Served, keydirs: KeyDirs, tmp_path: Path) -> None:
    secret_text = "Meet the smuggler at the old mill at midnight."
    # Plain: a broker alone on loopback (the request waits in its queue; it only has to be sent).
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log = (tmp_path / "plain.log").open("wb")
    plain = subprocess.Popen([sys.executable, "-m", "broker", "--frontend", fe, "--backend", be], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    relay = CaptureRelay(fe)
    try:
        c = RawClient(relay.endpoint)
        assert c.call(b"mmi.service", b"tts", timeout=30)[3] == b"404"  # through the relay, to a live broker
        c.request(b"p1", {"text": secret_text})
        deadline = time.monotonic() + 10
        while secret_text.encode() not in relay.captured:
            assert time.monotonic() < deadline, "the relay never saw the request"
            time.sleep(0.05)
        c.close()
    finally:
        relay.stop.set()
        plain.send_signal(signal.SIGINT)
        plain.wait(30)
    # CURVE: the same through a relay to the secure broker, spoken in full.
    relay = CaptureRelay(secure.frontend)
    try:
        with TtsClient(relay.endpoint, curve_key=keydirs.secret("c1"), broker_key=keydirs.broker_public, timeout=60) as client:
            pcm = client.speak(secret_text).audio()
        assert len(pcm) > 10_000
        assert len(relay.captured) > 200  # the request crossed this relay
        for needle in (secret_text, "smuggler", "midnight", "MDPC02", '"text"'):
            assert needle.encode() not in relay.captured, needle
    finally:
        relay.stop.set()


# ---------------------------------------------------------------------- SIGHUP


def test_sighup_rereads_the_key_directories(secure: Served, keydirs: KeyDirs) -> None:
    clients = keydirs.root / "clients"
    before = secure.log_text().count("reloaded keys")
    old = dealer(secure.frontend, keydirs.curve("c2"))
    try:
        assert answered(old, [b"MDPC02", b"\x01", b"tts.status", b"{}"], within=10)
        old.recv_multipart()
        # Revoke c2, admit c3.
        (clients / "c2.key").rename(keydirs.root / "elsewhere" / "c2-revoked.key")
        shutil.copy(keydirs.root / "elsewhere" / "c3.key", clients / "c3.key")
        secure.proc.send_signal(signal.SIGHUP)
        wait_log(secure, "reloaded keys", before + 1)
        new = dealer(secure.frontend, keydirs.curve("c2"))
        admitted = dealer(secure.frontend, keydirs.curve("c3"))
        try:
            assert not answered(new, [b"MDPC02", b"\x01", b"tts.status", b"{}"]), "a revoked key connected anew"
            assert answered(admitted, [b"MDPC02", b"\x01", b"tts.status", b"{}"], within=10), "an added key was refused"
        finally:
            new.close()
            admitted.close()
        # Documented: a connection made before the revocation is not cut.
        assert answered(old, [b"MDPC02", b"\x01", b"tts.status", b"{}"], within=10)
    finally:
        old.close()
        src = keydirs.root / "elsewhere" / "c2-revoked.key"
        if src.exists():
            src.rename(clients / "c2.key")
        (clients / "c3.key").unlink(missing_ok=True)
        secure.proc.send_signal(signal.SIGHUP)


# ------------------------------------------------------------ start-up rules


@pytest.mark.parametrize(
    "endpoint, local",
    [
        ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.1:*", True), ("tcp://[::1]:5555", True),
        ("tcp://localhost:5555", True), ("ipc:///tmp/tts.sock", True), ("inproc://broker", True),
        ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://[::]:5555", False),
        ("tcp://10.1.2.3:5555", False), ("tcp://192.168.0.10:*", False), ("pgm://eth0;239.1.1.1:5555", False),
    ],
)
def test_which_endpoints_count_as_local(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_insecure_bind_is_refused_with_the_reason_and_the_way_out(tmp_path: Path) -> None:
    be = f"tcp://127.0.0.1:{free_port()}"
    for argv in (
        [sys.executable, "-m", "broker.cli", "serve", "--frontend", f"tcp://0.0.0.0:{free_port()}", "--backend", be],
        [sys.executable, "-m", "broker", "--frontend", "tcp://127.0.0.1:0", "--backend", f"tcp://*:{free_port()}"],
    ):
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "plain text" in proc.stderr and "allow_insecure = true" in proc.stderr, proc.stderr
    # The way out works: allow_insecure starts it (no workers; stopped at once).
    cfg = tmp_path / "open.toml"
    cfg.write_text("workers = []\n[security]\nallow_insecure = true\n")
    log = tmp_path / "open.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg), "--frontend", f"tcp://0.0.0.0:{free_port()}", "--backend", be],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while "broker listening" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()


def test_keys_command_writes_zmq_auth_certificates_with_a_private_secret(tmp_path: Path) -> None:
    run = lambda: subprocess.run([sys.executable, "-m", "broker.cli", "keys", str(tmp_path / "k"), "gpu1"], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    proc = run()
    assert proc.returncode == 0, proc.stderr
    public, secret = tmp_path / "k" / "gpu1.key", tmp_path / "k" / "gpu1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and sec is not None and zmq.curve_public(sec) == pub
    again = run()
    assert again.returncode == 1 and "exists" in again.stderr
    assert zmq.auth.load_certificate(secret) == (pub2, sec)  # not overwritten


def test_security_config_is_checked(tmp_path: Path, keydirs: KeyDirs) -> None:
    def load(text: str) -> str:
        p = tmp_path / "c.toml"
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(p)
        return str(err.value)

    assert "broker_key is required" in load("[security]\ncurve = true\n")
    assert "security.curv" in load("[security]\ncurv = true\n")
    assert "no secret-key" in load(security_toml(keydirs).replace(str(keydirs.broker), str(keydirs.broker_public)))
    assert "not a directory" in load(security_toml(keydirs).replace(str(keydirs.root / "clients"), str(tmp_path / "nope")))
    assert "holds no secret-key" in load(security_toml(keydirs) + f'[[workers]]\ncurve_key = "{keydirs.broker_public}"\n')
    p = tmp_path / "ok.toml"
    p.write_text(security_toml(keydirs) + f'[metrics]\nlisten = "127.0.0.1:9464"\n[[workers]]\ncurve_key = "{keydirs.secret("good")}"\n')
    cfg = load_config(p)
    assert cfg.security.curve and cfg.workers[0].curve_key and cfg.metrics.address() == ("127.0.0.1", 9464)
    assert "metrics.listen" in load('[metrics]\nlisten = "9464"\n')


# ------------------------------------------------------- across a real network


def _netns_or_skip() -> str:
    name = f"tts15-{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        reason = getattr(exc, "stderr", "") or str(exc)
        print(f"network namespaces not permitted here: {reason.strip()}")
        pytest.skip(f"network namespaces not permitted here ({reason.strip()[:120]})")
    return name


def test_worker_in_another_network_namespace_over_a_veth_pair(tmp_path: Path, keydirs: KeyDirs, tiny_pt_voice: Path) -> None:
    ns = _netns_or_skip()
    host_if, ns_if = f"v15h{os.getpid() % 10000}", f"v15n{os.getpid() % 10000}"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, timeout=30)  # noqa: E731
    served: Optional[Served] = None
    worker: Optional[subprocess.Popen] = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", "10.215.0.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", "10.215.0.2/30", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # The broker's backend on the veth address (not loopback: allowed only because of CURVE).
        backend = f"tcp://10.215.0.1:{free_port()}"
        fe = f"tcp://127.0.0.1:{free_port()}"
        cfg = tmp_path / "serve.toml"
        cfg.write_text("workers = []\n" + security_toml(keydirs))
        log = tmp_path / "serve.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg), "--frontend", fe, "--backend", backend],
            cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        served = Served(proc, fe, backend, log)
        wlog = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "engines.piper", "--backend", backend, "--voice", str(tiny_pt_voice),
             "--device", "cpu", "--curve-key", str(keydirs.secret("good")), "--broker-key", str(keydirs.broker_public)],
            cwd=ROOT, stdout=wlog, stderr=subprocess.STDOUT,
        )
        wait_services(fe, [f"piper.{PT_VOICE}"], curve=keydirs.curve("c1"))
        with TtsClient(fe, curve_key=keydirs.secret("c1"), broker_key=keydirs.broker_public, timeout=60) as client:
            stream = client.speak("Olá, viajante.", language="pt-BR")
            assert len(stream.audio()) > 1000
            assert stream.start is not None and stream.start.worker["pid"] == worker.pid  # ip netns exec execs it
            st = client.status()
        assert [w["certificate"] for w in st["services"][f"piper.{PT_VOICE}"]["workers"]] == ["good"]
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        if served is not None:
            assert stop_serve(served) == 0, served.log_text()[-3000:]
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
