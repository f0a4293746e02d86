"""The intelligibility check's own footing: a decode cut short must not fail every later one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests import asr


class Interrupted(Exception):
    pass


class CutAfterDecode:
    """The decoder, with the decode interrupted where pytest-timeout's alarm landed in CI:
    after ``process_raw``, before ``end_utt``."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def process_raw(self, *args: Any, **kwargs: Any) -> None:
        self.real.process_raw(*args, **kwargs)
        raise Interrupted


def test_a_transcription_cut_short_leaves_the_next_one_working() -> None:
    """That interruption used to leave the utterance open, so every later test's
    ``start_utt()`` failed ("Failed to start utterance processing", 14 tests in one CI run)."""
    voice = asr._piper_voice()
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(asr.SENTENCE)])
    rate = voice.config.sample_rate
    heard = asr.words_heard(asr.SENTENCE, asr.transcribe(audio, rate))
    asr._decoder = CutAfterDecode(asr._decoder)  # not put back: that decoder is left mid-utterance
    with pytest.raises(Interrupted):
        asr.transcribe(audio, rate)
    assert asr.words_heard(asr.SENTENCE, asr.transcribe(audio, rate)) == heard
