"""The Rust client crate (clients/rust) against a real ``tts-broker serve``.

Builds the crate offline from Debian's packaged crates (run
``scripts/install-rust-deps.sh`` first), runs its own ``cargo test``, then has
its ``tts-say`` binary speak into WAV files that are checked here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf

from tests.asr import transcribe, words_heard
from tests.conftest import ROOT, Served, free_port, start_serve, stop_serve, wait_services

RUST_DIR = ROOT / "clients" / "rust"
TARGET = RUST_DIR / "target"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
NEEDED_CRATES = ("zmq-0.9", "zmq-sys-", "serde_json-1.")
HINT = "run scripts/install-rust-deps.sh (as root) to install libzmq and the Debian Rust crates"
SENTENCE = "The dragon sleeps beneath the mountain. Gather your courage and follow me."
TTFA = re.compile(r"time to first audio: ([0-9.]+) ms")

# A cold build of the crate plus its test profile can take minutes on a slow machine.
pytestmark = pytest.mark.timeout(1500)


class MissingTooling(Exception):
    """cargo, libzmq or the Debian crates are not installed."""


def _cargo() -> str:
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not os.access(found, os.X_OK):
        raise MissingTooling(f"cargo not found: install a Rust toolchain, then {HINT}")
    return found


def _cargo_env() -> dict[str, str]:
    return {**os.environ, "CARGO_TARGET_DIR": str(TARGET), "CARGO_TERM_COLOR": "never"}


def _run_cargo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_cargo(), *args], cwd=RUST_DIR, env=_cargo_env(), capture_output=True, text=True, timeout=timeout
    )


def _build() -> Path:
    missing = [c for c in NEEDED_CRATES if not any(DEBIAN_REGISTRY.glob(c + "*"))]
    if missing:
        raise MissingTooling(f"Debian Rust crates missing from {DEBIAN_REGISTRY} ({', '.join(missing)}*): {HINT}")
    proc = _run_cargo("build", "--offline", "--release", "--bins", "--examples", timeout=1200)
    if proc.returncode != 0:
        raise MissingTooling(f"cargo build --offline --release failed ({HINT}):\n{proc.stderr[-4000:]}")
    return TARGET / "release"


@pytest.fixture(scope="module")
def rust_build() -> Path | MissingTooling:
    """Build ``tts-say`` and the examples offline (release), once per module."""
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


def _check_spoken(proc: subprocess.CompletedProcess, out: Path, rate: int, subtype: str) -> None:
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
    assert words_heard(SENTENCE, transcribe(audio, rate)) >= 0.6
    assert not out.with_name(out.name + ".part").exists()


def test_cargo_unit_tests(rust_build: Path | MissingTooling) -> None:
    """Framing, parsing, sequence checks, WAV header and the scripted-broker tests: no broker needed."""
    _bins(rust_build)
    proc = _run_cargo("test", "--offline", timeout=1200)
    assert proc.returncode == 0, f"cargo test --offline failed ({HINT}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = re.findall(r"test result: ok\. (\d+) passed; 0 failed", proc.stdout)
    assert results and sum(map(int, results)) >= 30, proc.stdout[-3000:]


def test_tts_say_writes_a_16_bit_wav(rust_build: Path | MissingTooling, broker: Served, tmp_path: Path) -> None:
    rust_bins = _bins(rust_build)
    out = tmp_path / "say.wav"
    proc = _say(rust_bins, broker, out)
    _check_spoken(proc, out, 22050, "PCM_16")
    assert "piper en_US-joe-medium" in proc.stdout


def test_tts_say_writes_a_float_wav_at_16k(rust_build: Path | MissingTooling, broker: Served, tmp_path: Path) -> None:
    rust_bins = _bins(rust_build)
    out = tmp_path / "say-f32.wav"
    proc = _say(rust_bins, broker, out, "--format", "f32le", "--sample-rate", "16000")
    _check_spoken(proc, out, 16000, "FLOAT")


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


def test_stream_after_idle_broker_restart(rust_build: Path | MissingTooling, tmp_path: Path) -> None:
    """The broker restarts while the Rust client is idle; its next stream must be served, not
    failed by the stale disconnect notice the restart left queued (``examples/idle_restart.rs``)."""
    from tests.test_client import serve_on

    rust_bins = _bins(rust_build)
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    running = [serve_on(tmp_path / "first", fe, be)]
    proc = subprocess.Popen([str(rust_bins / "examples" / "idle_restart"), fe], stdin=subprocess.PIPE,
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
