"""The runtime's audio path: chunking, format conversion, resampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.audio import LIMIT_KNEE, PIECE_MAX_MS, ChunkEncoder, soft_limit, to_pcm


def _tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_s16_and_f32_conversion() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], dtype=np.float32)
    s16 = np.frombuffer(to_pcm(x, "s16le"), dtype="<i2")
    assert list(s16) == [0, 16383, -16383, 32767, -32767, 32767, -32767]
    f32 = np.frombuffer(to_pcm(x, "f32le"), dtype="<f4")
    assert list(f32) == [0.0, 0.5, -0.5, 1.0, -1.0, 1.0, -1.0]
    with pytest.raises(ValueError):
        to_pcm(x, "mp3")


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    chunk_ms=st.sampled_from([10, 20, 40, 100]),
)
def test_chunks_cover_the_segment_exactly_without_resampling(pieces: list[int], chunk_ms: int) -> None:
    enc = ChunkEncoder(22050, 22050, "f32le", chunk_ms)
    audio = np.random.default_rng(0).uniform(-1, 1, sum(pieces)).astype(np.float32)
    chunks: list[bytes] = []
    pos = 0
    for n in pieces:
        chunks += enc.push(audio[pos : pos + n])
        pos += n
    chunks += enc.end_segment()
    out = np.frombuffer(b"".join(chunks), dtype="<f4")
    assert np.array_equal(out, audio)
    n = 22050 * chunk_ms // 1000
    assert all(len(c) == n * 4 for c in chunks[:-1]) and (not chunks or 0 < len(chunks[-1]) <= n * 4)


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.integers(0, 50_000), min_size=1, max_size=6), out_rate=st.sampled_from([22050, 16000, 48000]))
def test_without_a_chunk_size_each_piece_leaves_whole_in_chunks_of_at_most_a_second(pieces: list[int], out_rate: int) -> None:
    """Nothing is held back for a chunk to fill: all a push's audio (all the resampler gives
    back) goes out at once, cut at PIECE_MAX_MS; the segment's audio is all there, in order."""
    enc = ChunkEncoder(22050, out_rate, "f32le", None)
    audio = np.random.default_rng(1).uniform(-1, 1, sum(pieces)).astype(np.float32)
    most = out_rate * PIECE_MAX_MS // 1000 * 4
    chunks: list[bytes] = []
    pos = 0
    for n in pieces:
        out = list(enc.push(audio[pos : pos + n]))
        pos += n
        assert all(0 < len(c) <= most for c in out)
        assert all(len(c) == most for c in out[:-1])  # cut only where a second is full
        if out_rate == 22050:
            assert sum(len(c) for c in out) == n * 4
        chunks += out
    chunks += enc.end_segment()
    out = np.frombuffer(b"".join(chunks), dtype="<f4")
    if out_rate == 22050:
        assert np.array_equal(out, audio)
    else:
        assert len(out) == enc.position(len(audio))


@pytest.mark.parametrize("out_rate", [8000, 16000, 24000, 44100, 48000])
def test_resampling_keeps_duration_and_pitch(out_rate: int) -> None:
    enc = ChunkEncoder(22050, out_rate, "f32le", 40)
    tone = _tone(22050, 1.0)
    chunks = list(enc.push(tone[:7000])) + list(enc.push(tone[7000:])) + list(enc.end_segment())
    out = np.frombuffer(b"".join(chunks), dtype="<f4")
    assert abs(len(out) - out_rate) <= 2
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * out_rate / len(out)
    assert abs(peak_hz - 440) < 3
    # Each segment flushes the resampler: a second segment starts clean.
    again = list(enc.push(tone)) + list(enc.end_segment())
    assert abs(len(b"".join(again)) // 4 - out_rate) <= 2


@given(st.lists(st.floats(-50.0, 50.0, allow_nan=False, width=32), min_size=1, max_size=200))
def test_soft_limit_never_reaches_past_full_scale_and_keeps_quiet_samples(xs: list[float]) -> None:
    x = np.array(xs, dtype=np.float32)
    y = soft_limit(x)
    assert np.all(np.abs(y) <= 1.0)
    quiet = np.abs(x) <= LIMIT_KNEE
    assert np.array_equal(y[quiet], x[quiet])
    assert np.all(np.sign(y) == np.sign(x))
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order]) >= -1e-7), "not monotonic"


def test_soft_limit_is_smooth_at_the_knee() -> None:
    eps = 1e-4
    x = np.array([LIMIT_KNEE - eps, LIMIT_KNEE, LIMIT_KNEE + eps], dtype=np.float64)
    y = soft_limit(x)
    assert abs((y[2] - y[1]) / eps - 1.0) < 1e-3  # slope 1 on both sides: no kink to hear
