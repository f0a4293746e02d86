"""The Rust async client against the Python client, on the same broker, interleaved.

``clients/rust/examples/ttfa_probe.rs`` (built here, release, offline) holds one async client
handle for the whole run and answers one JSON line per request line, so a request costs
no process start. Each repetition speaks the same passage through the Python client and
through the probe, which side goes first alternating; ``rust_ttfa_ratio`` = Rust median /
Python median time to first audio, both measured in the client from just before the request
is sent. Then 8 copies at once through the one Rust handle: p50/p99 first audio over all
streams, against the same passage alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from broker.client import TtsClient

from .common import ROOT, endpoint, percentile, processes
from .ttfa import SETTLE_S, TEXT, _through_broker

CRATE = ROOT / "clients" / "rust"
TARGET = CRATE / "target"


DEBIAN_TOOLCHAIN = Path("/usr/bin")
"""Where Debian's cargo and rustc are (scripts/install-rust-deps.sh installs them)."""


def cargo() -> tuple[str, dict[str, str]]:
    """cargo and its environment: Debian's toolchain, the one a fresh machine gets (rustc 1.63,
    the crate's rust-version), even where another (rustup's) comes first on PATH; any cargo on
    PATH only where Debian's is absent (not a Debian machine)."""
    env = {**os.environ, "CARGO_TARGET_DIR": str(TARGET), "CARGO_TERM_COLOR": "never"}
    debian = DEBIAN_TOOLCHAIN / "cargo"
    if os.access(debian, os.X_OK) and os.access(DEBIAN_TOOLCHAIN / "rustc", os.X_OK):
        env.update(RUSTC=str(DEBIAN_TOOLCHAIN / "rustc"), RUSTDOC=str(DEBIAN_TOOLCHAIN / "rustdoc"))
        env["PATH"] = f"{DEBIAN_TOOLCHAIN}{os.pathsep}{env.get('PATH', '')}"
        return str(debian), env
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not os.access(found, os.X_OK):
        raise FileNotFoundError("cargo not found: run scripts/install-rust-deps.sh (make test does)")
    return found, env


def build_probe() -> Path:
    command, env = cargo()
    subprocess.run(
        [command, "build", "--offline", "--release", "--features", "tokio", "--example", "ttfa_probe"],
        cwd=CRATE, env=env, check=True, capture_output=True,
    )
    return TARGET / "release" / "examples" / "ttfa_probe"


class _Probe:
    def __init__(self, path: Path, frontend: str) -> None:
        self.proc = subprocess.Popen([str(path), frontend], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def speak(self, text: str, concurrent: int = 1) -> list[float]:
        """First-audio times in ms, one per stream."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"text": text, "concurrent": concurrent}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if not answer.get("ok"):
            raise RuntimeError(f"the Rust probe failed: {answer}")
        return [float(x) for x in answer["ttfa_ms"]]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def run(reps: int = 15, loads: int = 3) -> dict[str, Any]:
    probe_path = build_probe()
    fe, be = endpoint(), endpoint()
    rust: list[float] = []
    python: list[float] = []
    eight: list[float] = []
    argvs = [
        ["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
        ["-m", "engines.piper", "--backend", be, "--device", "cpu", "--log-level", "WARNING"],
    ]
    with processes(*argvs), TtsClient(fe, timeout=120) as client:
        assert client.wait_ready(timeout=120)
        probe = _Probe(probe_path, fe)
        try:
            probe.speak("Warm up.")
            _through_broker(client, "Warm up.")
            for rep in range(reps):
                sides = [("rust", lambda: rust.append(probe.speak(TEXT)[0])),
                         ("python", lambda: python.append(_through_broker(client, TEXT)[0] * 1000))]
                for _, measure in sides if rep % 2 == 0 else sides[::-1]:
                    measure()
                    time.sleep(SETTLE_S)
            for _ in range(loads):
                eight += probe.speak(TEXT, concurrent=8)
                time.sleep(SETTLE_S)
        finally:
            probe.close()
    return {
        "text": TEXT,
        "reps": reps,
        "rust_ttfa_ms": round(statistics.median(rust), 1),
        "python_ttfa_ms": round(statistics.median(python), 1),
        "rust_ttfa_ratio": round(statistics.median(rust) / statistics.median(python), 3),
        "rust_all_ms": [round(x, 1) for x in rust],
        "python_all_ms": [round(x, 1) for x in python],
        "rust_8_streams_ttfa_ms": {"p50": round(percentile(eight, 50), 1), "p99": round(percentile(eight, 99), 1), "count": len(eight)},
    }


if __name__ == "__main__":
    print(json.dumps(run(reps=6, loads=2), indent=1))
