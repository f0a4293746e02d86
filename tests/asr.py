"""Speech recognition for intelligibility checks (PocketSphinx's bundled English model)."""

from __future__ import annotations

import numpy as np
import soxr
from pocketsphinx import Decoder

_decoder: Decoder | None = None


def transcribe(audio: np.ndarray, sample_rate: int) -> str:
    """Float mono audio at any rate → lower-case words."""
    global _decoder
    if _decoder is None:
        _decoder = Decoder(samprate=16000, loglevel="FATAL")
    a16 = soxr.resample(audio.astype(np.float32), sample_rate, 16000) if sample_rate != 16000 else audio
    pcm = (np.clip(a16, -1, 1) * 32767).astype("<i2").tobytes()
    _decoder.start_utt()
    _decoder.process_raw(pcm, full_utt=True)
    _decoder.end_utt()
    hyp = _decoder.hyp()
    return hyp.hypstr.lower() if hyp is not None else ""


def words_heard(expected: str, heard: str) -> float:
    """Fraction of the expected words (longer than 3 letters) found in the transcript."""
    want = [w.strip(".,!?").lower() for w in expected.split() if len(w.strip(".,!?")) > 3]
    got = set(heard.split())
    return sum(w in got for w in want) / len(want)
