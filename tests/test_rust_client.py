"""The Rust client crate (clients/rust) against a real ``tts-broker serve``.

Builds the crate offline from Debian's packaged crates (run
``scripts/install-rust-deps.sh`` first), with its async client (feature
``tokio``), runs its own ``cargo test``, then has its ``tts-say`` binary speak
into WAV files that are checked here, and runs its examples: the voice
pipeline's ``TtsEngine`` over the broker, eight tasks on one async handle, a
worker killed mid-stream, a broker restarted while the client is idle, and the
time-to-first-audio probe the benchmark drives.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import soundfile as sf

from bench.rust_client import TARGET, cargo
from tests.asr import SENTENCE, assert_heard_like_piper
from tests.conftest import EN_VOICE, ROOT, Served, free_port, start_serve, stop_serve, wait_services

RUST_DIR = ROOT / "clients" / "rust"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
NEEDED_CRATES = ("zmq-0.9", "zmq-sys-", "serde_json-1.", "tokio-1.", "futures-0.3")
HINT = "run scripts/install-rust-deps.sh (as root) to install libzmq and the Debian Rust crates"
TTFA = re.compile(r"time to first audio: ([0-9.]+) ms")
# examples/async_table.rs: one line per stream when it ends.
STREAM_ROW = re.compile(
    r"^stream rid=(?P<rid>\S+) task=(?P<task>\d+) first_audio_ms=(?P<ttfa>[0-9.]+|none) chunks=(?P<chunks>\d+) "
    r"samples=(?P<samples>\d+) rate=(?P<rate>\d+) gapless=(?P<gapless>yes|no) failovers=(?P<failovers>\d+) "
    r"outcome=(?P<outcome>\S+)$",
    re.M,
)

# A cold build of the crate plus its test profile can take minutes on a slow machine.
pytestmark = pytest.mark.timeout(1500)


class MissingTooling(Exception):
    """cargo, libzmq or the Debian crates are not installed."""


def _run_cargo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """cargo as a fresh machine has it: Debian's toolchain (``bench.rust_client.cargo``)."""
    try:
        command, env = cargo()
    except FileNotFoundError as exc:
        raise MissingTooling(f"{exc}; {HINT}") from None
    return subprocess.run([command, *args], cwd=RUST_DIR, env=env, capture_output=True, text=True, timeout=timeout)


def _build() -> Path:
    missing = [c for c in NEEDED_CRATES if not any(DEBIAN_REGISTRY.glob(c + "*"))]
    if missing:
        raise MissingTooling(f"Debian Rust crates missing from {DEBIAN_REGISTRY} ({', '.join(missing)}*): {HINT}")
    proc = _run_cargo("build", "--offline", "--release", "--features", "tokio", "--bins", "--examples", timeout=1200)
    if proc.returncode != 0:
        raise MissingTooling(f"cargo build --offline --release failed ({HINT}):\n{proc.stderr[-4000:]}")
    return TARGET / "release"


@pytest.fixture(scope="module")
def rust_build() -> Path | MissingTooling:
    """Build ``tts-say`` and the examples (async ones included) offline (release), once per module."""
    try:
        return _build()
    except MissingTooling as exc:
        return exc


def _bins(rust_build: Path | MissingTooling) -> Path:
    """The release directory; a missing toolchain FAILS the calling test (never skips it)."""
    if isinstance(rust_build, MissingTooling):
        pytest.fail(str(rust_build), pytrace=False)
    assert (rust_build / "tts-say").is_file()
    return rust_build


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``tts-broker serve`` with the default configuration (one Piper worker, en_US-joe-medium)."""
    s = start_serve(tmp_path_factory.mktemp("rust-serve"), None)
    try:
        wait_services(s.frontend, ["tts"], timeout=120)
        yield s
    finally:
        rc = stop_serve(s)
        assert rc == 0, f"serve exited with {rc}; log:\n{s.log_text()[-3000:]}"


def _say(bins: Path, served: Served, out: Path, *extra: str, text: str = SENTENCE) -> subprocess.CompletedProcess:
    argv = [str(bins / "tts-say"), text, "-o", str(out), "--endpoint", served.frontend, "--language", "en",
            "--timeout-ms", "60000", "--wait-ready-ms", "30000", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _check_spoken(
    proc: subprocess.CompletedProcess, out: Path, rate: int, subtype: str, again: Callable[[], subprocess.CompletedProcess]
) -> None:
    """``again`` runs the same ``tts-say`` once more: the intelligibility check's second draw."""

    def redraw() -> np.ndarray:
        proc = again()
        assert proc.returncode == 0, f"tts-say failed: {proc.stderr}"
        return sf.read(str(out), dtype="float32")[0]

    assert proc.returncode == 0, f"tts-say failed: {proc.stderr}"
    m = TTFA.search(proc.stdout)
    assert m, f"no time to first audio printed: {proc.stdout!r}"
    assert 0 < float(m.group(1)) < 30_000
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (rate, 1, subtype), info
    assert info.duration > 1.0, info
    audio, sr = sf.read(str(out), dtype="float32")
    assert sr == rate and audio.ndim == 1
    assert float(np.sqrt(np.mean(audio**2))) > 0.01, "the WAV is silent"
    assert np.all(np.isfinite(audio))
    assert not out.with_name(out.name + ".part").exists()
    assert_heard_like_piper(SENTENCE, audio, rate, again=redraw)


def test_the_crate_builds_with_the_toolchain_a_fresh_debian_machine_gets() -> None:
    """scripts/install-rust-deps.sh installs Debian's cargo and rustc, and the tests build with
    them even where rustup's newer toolchain comes first on PATH: the crate must keep
    building with the oldest compiler it declares (``rust-version``)."""
    declared = re.search(r'^rust-version = "([0-9.]+)"', (RUST_DIR / "Cargo.toml").read_text(), re.M)
    assert declared, "Cargo.toml declares no rust-version"
    if not Path("/etc/debian_version").is_file():
        pytest.skip("not a Debian machine: Debian's toolchain is not the one a fresh machine gets here")
    command, env = cargo()
    assert command == "/usr/bin/cargo", f"{command}: {HINT}"
    rustc = subprocess.run([env["RUSTC"], "--version"], capture_output=True, text=True, check=True).stdout
    assert rustc.startswith(f"rustc {declared.group(1)}"), (rustc, declared.group(1))


def test_cargo_unit_tests(rust_build: Path | MissingTooling) -> None:
    """Framing, parsing, sequence checks, WAV header and the scripted-broker tests of both clients
    (blocking, and async with the ``tokio`` feature): no broker needed."""
    _bins(rust_build)
    proc = _run_cargo("test", "--offline", "--all-features", timeout=1200)
    assert proc.returncode == 0, f"cargo test --offline failed ({HINT}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = re.findall(r"test result: ok\. (\d+) passed; 0 failed", proc.stdout)
    assert results and sum(map(int, results)) >= 60, proc.stdout[-3000:]
    assert "a_stalled_reader_does_not_stall_the_others ... ok" in proc.stdout, "the async tests did not run"


def test_tts_say_writes_a_16_bit_wav(rust_build: Path | MissingTooling, broker: Served, tmp_path: Path) -> None:
    rust_bins = _bins(rust_build)
    out = tmp_path / "say.wav"
    proc = _say(rust_bins, broker, out)
    _check_spoken(proc, out, 22050, "PCM_16", lambda: _say(rust_bins, broker, out))
    assert "piper en_US-joe-medium" in proc.stdout


def test_tts_say_writes_a_float_wav_at_16k(rust_build: Path | MissingTooling, broker: Served, tmp_path: Path) -> None:
    rust_bins = _bins(rust_build)
    out = tmp_path / "say-f32.wav"
    extra = ("--format", "f32le", "--sample-rate", "16000")
    proc = _say(rust_bins, broker, out, *extra)
    _check_spoken(proc, out, 16000, "FLOAT", lambda: _say(rust_bins, broker, out, *extra))


def test_tts_say_reports_broker_errors(rust_build: Path | MissingTooling, broker: Served, tmp_path: Path) -> None:
    rust_bins = _bins(rust_build)
    out = tmp_path / "nope.wav"
    proc = _say(rust_bins, broker, out, "--voice", "no-such-voice")
    assert proc.returncode == 1
    assert "bad_request" in proc.stderr and "no-such-voice" in proc.stderr, proc.stderr
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_concurrent_streams_and_cancel(rust_build: Path | MissingTooling, broker: Served) -> None:
    """The crate's example: three streams on one socket read in reverse order, then a cancel."""
    rust_bins = _bins(rust_build)
    proc = subprocess.run([str(rust_bins / "examples" / "concurrent"), broker.frontend],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if re.search(r": \d+ bytes at 22050 Hz s16le", l)]
    assert len(lines) == 3, proc.stdout
    assert [l.split(":")[0].rsplit("-", 1)[1] for l in lines] == ["2", "1", "0"], proc.stdout
    assert all(int(re.search(r": (\d+) bytes", l).group(1)) > 10_000 for l in lines), proc.stdout
    assert re.search(r"cancelled after \d+ chunk\(s\): cancelled", proc.stdout), proc.stdout


@pytest.mark.parametrize("example", ["idle_restart", "async_idle_restart"])
def test_stream_after_idle_broker_restart(rust_build: Path | MissingTooling, tmp_path: Path, example: str) -> None:
    """The broker restarts while the Rust client is idle; its next stream must be served, not
    failed by the stale disconnect notice the restart left queued, with no reconnect code
    (``examples/idle_restart.rs``: blocking client; ``examples/async_idle_restart.rs``: async)."""
    from tests.test_client import serve_on

    rust_bins = _bins(rust_build)
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    running = [serve_on(tmp_path / "first", fe, be)]
    proc = subprocess.Popen([str(rust_bins / "examples" / example), fe], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_services(fe, ["tts"], timeout=120)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert re.match(r"before: \d+ bytes", first), (first, proc.stderr.read() if proc.poll() is not None else "")
        assert int(first.split()[1]) > 10_000, first
        rc = stop_serve(running.pop())
        assert rc == 0, f"serve exited with {rc}"
        running.append(serve_on(tmp_path / "second", fe, be))
        wait_services(fe, ["tts"], timeout=120)
        out, err = proc.communicate("go\n", timeout=120)
        assert proc.returncode == 0, f"second stream failed: {err}"
        m = re.search(r"after: (\d+) bytes, engines \[\"piper\"\]", out)
        assert m and int(m.group(1)) > 10_000, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in running:
            assert stop_serve(s) == 0, s.log_text()[-3000:]


def _example(bins: Path, name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(bins / "examples" / name), *args], capture_output=True, text=True, timeout=timeout)


ENGINE_ROW = re.compile(
    r"^(?P<how>whole|stream) lang=(?P<lang>\S+) routed=(?P<routed>\S+) chunks=(?P<chunks>\d+) "
    r"samples=(?P<samples>\d+) rate=(?P<rate>\d+) channels=(?P<channels>\d+) seconds=(?P<seconds>[0-9.]+) "
    r"rms=(?P<rms>[0-9.]+)$",
    re.M,
)


def test_tts_engine_example_speaks_routed_languages_at_a_fixed_rate(
    rust_build: Path | MissingTooling, broker: Served, tmp_path: Path
) -> None:
    """The voice pipeline's ``TtsEngine``/``PiperAudio`` over the broker (``examples/tts_engine.rs``):
    an English line and a German one (routed to English, as the pipeline routes), each as a
    whole utterance (the blocking trait) and streamed as f32 chunks, all at the fixed output rate
    asked with the ``sample_rate`` option (16 kHz here, not the voice's native 22.05 kHz)."""
    rust_bins = _bins(rust_build)
    run = lambda: _example(rust_bins, "tts_engine", broker.frontend, "--rate", "16000", "--wav-dir", str(tmp_path))  # noqa: E731
    proc = run()
    assert proc.returncode == 0, proc.stderr
    rows = {(m["how"], m["lang"]): m for m in ENGINE_ROW.finditer(proc.stdout)}
    assert set(rows) == {("whole", "en"), ("whole", "de"), ("stream", "en"), ("stream", "de")}, proc.stdout
    for (how, lang), m in rows.items():
        assert m["routed"] == "en", m[0]
        assert (int(m["rate"]), int(m["channels"])) == (16000, 1), m[0]
        assert float(m["seconds"]) > 1.0 and float(m["rms"]) > 0.01, m[0]
        assert int(m["chunks"]) > (2 if how == "stream" else 0), m[0]  # streamed in the engine's pieces, not gathered
        audio, sr = sf.read(str(tmp_path / f"{how}-{lang}.wav"), dtype="float32")
        assert sr == 16000 and audio.ndim == 1 and len(audio) == int(m["samples"]), m[0]
        assert np.all(np.isfinite(audio)) and float(np.max(np.abs(audio))) <= 1.0
    for how in ("whole", "stream"):
        wav = tmp_path / f"{how}-en.wav"
        audio, _ = sf.read(str(wav), dtype="float32")
        assert_heard_like_piper(SENTENCE, audio, 16000, how, again=lambda: run().check_returncode() or sf.read(str(wav), dtype="float32")[0])


def test_async_table_eight_tasks_on_one_handle(rust_build: Path | MissingTooling, broker: Served) -> None:
    """``examples/async_table.rs``: eight tokio tasks share one async client handle (one socket)
    and speak at once; every stream is complete, gapless and its own."""
    rust_bins = _bins(rust_build)
    proc = _example(rust_bins, "async_table", broker.frontend)
    assert proc.returncode == 0, proc.stderr
    rows = list(STREAM_ROW.finditer(proc.stdout))
    assert sorted(int(m["task"]) for m in rows) == list(range(8)), proc.stdout
    rids = [m["rid"] for m in rows]
    assert len(set(rids)) == 8 and len({r.rsplit("-", 1)[0] for r in rids}) == 1, rids  # one client
    for m in rows:
        assert (m["outcome"], m["gapless"], m["failovers"]) == ("end", "yes", "0"), m[0]
        assert int(m["rate"]) == 22050 and m["ttfa"] != "none" and float(m["ttfa"]) > 0, m[0]
        assert int(m["chunks"]) > 2 and int(m["samples"]) > 22050, m[0]
    assert len(re.findall(r"^start rid=\S+ task=\d engine=piper voice=\S+ pid=[1-9]\d*$", proc.stdout, re.M)) == 8


STORY = " ".join(
    f"Chapter {i}: the caravan crossed the river at dawn, and the guards counted every wagon twice."
    for i in range(1, 25)
)


def test_async_stream_survives_kill_9_of_its_worker(rust_build: Path | MissingTooling, tmp_path: Path) -> None:
    """Two Piper workers; the one serving an async stream is killed (-9) mid-stream. Through the
    Rust client the stream goes on: a ``failover`` event naming another worker, no gap, ``end``."""
    from tests.test_failover import wait_workers

    rust_bins = _bins(rust_build)
    service = f"piper.{EN_VOICE}"
    served = start_serve(tmp_path, f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n')
    proc = None
    try:
        wait_services(served.frontend, [service], timeout=120)
        wait_workers(served, service, 2)
        proc = subprocess.Popen([str(rust_bins / "examples" / "async_table"), served.frontend, "--tasks", "1",
                                 "--text", STORY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.match(r"start rid=\S+ task=0 engine=piper voice=\S+ pid=(\d+)$", first.strip())
        assert m, (first, proc.stderr.read() if proc.poll() is not None else "")
        killed = int(m[1])
        os.kill(killed, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{out}\n{err}"
        [failover] = re.findall(r"^failover rid=\S+ task=0 engine=piper reason=.* pid=(\d+) resume_at=\d+$", out, re.M)
        assert int(failover) not in (0, killed), out
        [row] = STREAM_ROW.finditer(out)
        assert (row["outcome"], row["gapless"], row["failovers"]) == ("end", "yes", "1"), row[0]
        # The whole story was spoken: far more audio than what came before the kill.
        assert int(row["samples"]) > 22050 * 60, row[0]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        rc = stop_serve(served)
        assert rc == 0, f"serve exited with {rc}; log:\n{served.log_text()[-3000:]}"


def test_ttfa_probe_answers_one_line_per_request(rust_build: Path | MissingTooling, broker: Served) -> None:
    """``examples/ttfa_probe.rs``, which the benchmark drives: one process, one JSON line out per
    JSON line in, N concurrent streams through one handle, a clear answer for a bad line."""
    rust_bins = _bins(rust_build)
    proc = subprocess.Popen([str(rust_bins / "examples" / "ttfa_probe"), broker.frontend], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for request, n in [({"text": "Hello there."}, 1), ({"text": "Three at once.", "concurrent": 3}, 3),
                           ({"text": "Sentence mode.", "stream": "sentence", "language": "en-US"}, 1)]:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            assert answer["ok"] is True, answer
            assert len(answer["ttfa_ms"]) == len(answer["total_ms"]) == len(answer["chunks"]) == n, answer
            for ttfa, total, chunks in zip(answer["ttfa_ms"], answer["total_ms"], answer["chunks"]):
                assert 0 < ttfa <= total < 60_000 and chunks > 0, answer
        proc.stdin.write("not json\n")
        proc.stdin.flush()
        bad = json.loads(proc.stdout.readline())
        assert bad["ok"] is False and "JSON" in bad["error"], bad
        out, err = proc.communicate(timeout=30)  # end of input: it exits
        assert proc.returncode == 0 and out == "", (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_curve_blocking_and_async_clients_against_a_secure_serve(rust_build: Path | MissingTooling, tmp_path: Path) -> None:
    """Issue 15: ``tts-say --curve-key/--broker-key`` (blocking client) and ``ttfa_probe`` with key
    paths (async client) get real speech from ``serve`` with ``[security] curve = true``; the same
    binary without keys, or with a key the broker does not know, gets nothing and fails."""
    import zmq.auth

    rust_bins = _bins(rust_build)
    keys = tmp_path / "keys"
    for d in ("clients", "workers", "elsewhere"):
        (keys / d).mkdir(parents=True)
    zmq.auth.create_certificates(keys, "broker")
    zmq.auth.create_certificates(keys / "clients", "rust")
    zmq.auth.create_certificates(keys / "elsewhere", "stranger")
    security = (
        f'[security]\ncurve = true\nbroker_key = "{keys / "broker.key_secret"}"\n'
        f'client_keys = "{keys / "clients"}"\nworker_keys = "{keys / "workers"}"\n'
    )
    served = start_serve(tmp_path, security + f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\n')
    own, broker_cert = keys / "clients" / "rust.key_secret", keys / "broker.key"
    try:
        out = tmp_path / "secure.wav"
        with_keys = ("--curve-key", str(own), "--broker-key", str(broker_cert))
        proc = _say(rust_bins, served, out, *with_keys)
        _check_spoken(proc, out, 22050, "PCM_16", lambda: _say(rust_bins, served, out, *with_keys))
        for extra in ([], ["--curve-key", str(keys / "elsewhere" / "stranger.key_secret"), "--broker-key", str(broker_cert)]):
            argv = [str(rust_bins / "tts-say"), "Hello.", "-o", str(tmp_path / "no.wav"), "--endpoint", served.frontend,
                    "--timeout-ms", "3000", "--wait-ready-ms", "2000", *extra]
            refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            # Nothing comes back: the wait ends in a timeout, or the refused handshake reads as a lost connection.
            assert refused.returncode != 0 and ("timeout" in refused.stderr or "unavailable" in refused.stderr), (extra, refused.stderr)
            assert not (tmp_path / "no.wav").exists()
        probe = subprocess.run([str(rust_bins / "examples" / "ttfa_probe"), served.frontend, str(own), str(broker_cert)],
                               input=json.dumps({"text": "Hello there.", "concurrent": 2}) + "\n",
                               capture_output=True, text=True, timeout=120)
        answer = json.loads(probe.stdout.splitlines()[0])
        assert answer["ok"] is True and all(t > 0 for t in answer["ttfa_ms"]), (answer, probe.stderr)
    finally:
        rc = stop_serve(served)
        assert rc == 0, f"serve exited with {rc}; log:\n{served.log_text()[-3000:]}"
