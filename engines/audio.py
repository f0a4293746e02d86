"""Float audio from an engine → PCM chunks in the requested format and rate.

This is the only place where engine audio changes rate or format, so every
engine (Piper per sentence, XTTS per streamed chunk) produces identical wire
audio. Resampling is python-soxr's streaming resampler, restarted per
*segment* (a sentence): the resampler's delay is flushed at each segment end,
so a segment's audio is complete when its last chunk is sent.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import soxr

from broker.tts import MAX_CHUNK_MS, SAMPLE_WIDTH

_S16_MAX = 32767.0


PIECE_MAX_MS = MAX_CHUNK_MS
"""The longest chunk a request without ``chunk_ms`` gets: the longest one it may ask for, so a
message is no larger than one a client can ask for (at 48 kHz ``f32le``, 192 kB; the broker's
``max_message_bytes`` is 1 MiB by default)."""

LIMIT_KNEE = 0.7
"""Where :func:`soft_limit` starts bending: below it samples pass unchanged."""


def soft_limit(audio: np.ndarray, knee: float = LIMIT_KNEE) -> np.ndarray:
    """Bend peaks above ``knee`` smoothly towards full scale instead of clipping them.

    For audio whose level is set before its peaks are known (Piper's frame
    mode, one gain per voice): stateless, so each window is limited alone and
    the stream stays seamless; continuous with slope 1 at the knee; never
    beyond ±1, so :func:`to_pcm` has nothing to clip.
    """
    mag = np.abs(audio)
    over = mag > knee
    if not over.any():
        return audio
    out = audio.copy()
    room = 1.0 - knee
    out[over] = np.sign(audio[over]) * (knee + room * np.tanh((mag[over] - knee) / room))
    return out


def to_pcm(audio: np.ndarray, fmt: str) -> bytes:
    """Float samples → little-endian PCM bytes, clipped to [-1, 1].

    Clipping matters for f32le too: engines normalise to full scale, and the
    resampler's ringing can overshoot it slightly.
    """
    clipped = np.clip(audio, -1.0, 1.0)
    if fmt == "s16le":
        return (clipped * _S16_MAX).astype("<i2").tobytes()
    if fmt == "f32le":
        return clipped.astype("<f4").tobytes()
    raise ValueError(f"unknown format {fmt!r}")


class ChunkEncoder:
    """Turns segments of float audio into PCM chunks in the requested format and rate.

    With ``chunk_ms``, chunks are exactly that long except the last one of each segment, which
    carries the remainder, so no audio of a finished sentence waits for the next one. Without
    it, each chunk is the audio the engine has just made (a Piper window, a sentence, an XTTS
    piece), cut at :data:`PIECE_MAX_MS`: nothing is held back for a chunk to fill, and a
    stream is a few messages a second instead of 25. Every message costs its way through the
    worker's threads, the broker and the client, one process wake-up after another, and on a
    small machine each takes a core from the engine's next run: in one ``serve`` on 2 cores,
    30 interleaved pairs, the passage's and the 47-word sentence's last audio came 0.95x as
    late as in 40 ms chunks, first audio unchanged.
    """

    def __init__(self, in_rate: int, out_rate: int, fmt: str, chunk_ms: Optional[int]) -> None:
        if fmt not in SAMPLE_WIDTH:
            raise ValueError(f"unknown format {fmt!r}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.fmt = fmt
        self.chunk_ms = chunk_ms
        """Every chunk's length; None: the engine's pieces."""
        self.chunk_samples = max(1, out_rate * (chunk_ms if chunk_ms is not None else PIECE_MAX_MS) // 1000)
        """Samples per full chunk at the output rate: every chunk's, or the most a piece's may hold."""
        self._pending = np.zeros(0, dtype=np.float32)
        """With ``chunk_ms``: the segment's audio not yet a whole chunk (pieces mode holds none)."""
        self._resampler: Optional[soxr.ResampleStream] = None

    @property
    def fixed(self) -> bool:
        """Whether chunks are cut to one size, holding a piece's end back until it fills one."""
        return self.chunk_ms is not None

    @property
    def held_s(self) -> float:
        """Up to this many seconds of a piece's end wait for the next piece (``Pacing.chunk_s``)."""
        return self.chunk_ms / 1000 if self.chunk_ms is not None else 0.0

    def _resample(self, audio: np.ndarray, last: bool) -> np.ndarray:
        if self.in_rate == self.out_rate:
            return audio
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality="HQ")
        out = self._resampler.resample_chunk(audio, last=last)
        if last:
            self._resampler = None
        return out

    def position(self, native: int) -> int:
        """Where sample ``native`` of the current segment (engine rate) lands in its output.

        ``round(native · out / in)``, exactly: python-soxr's stream resampler removes its own
        filter delay (output sample ``k`` is at time ``k / out`` of the input, and a flushed
        segment of ``N`` input samples gives ``round(N · out / in)``; ``tests/test_audio.py``
        checks both with impulses). So timings scale without any delay term."""
        return (2 * native * self.out_rate + self.in_rate) // (2 * self.in_rate)

    def push(self, audio: np.ndarray) -> Iterator[bytes]:
        """Add engine audio of the current segment; yield the chunks now complete (in pieces
        mode all of it: nothing is held back)."""
        audio = self._resample(np.asarray(audio, dtype=np.float32).reshape(-1), last=False)
        if not self.fixed:
            return self._chunks(audio)
        pending = np.concatenate((self._pending, audio))
        full = len(pending) // self.chunk_samples * self.chunk_samples
        self._pending = pending[full:]
        return self._chunks(pending[:full])

    def end_segment(self) -> Iterator[bytes]:
        """Flush the segment: the resampler's tail and the short final chunk."""
        tail = self._resample(np.zeros(0, dtype=np.float32), last=True) if self._resampler is not None else np.zeros(0, np.float32)
        pending = np.concatenate((self._pending, tail))
        self._pending = np.zeros(0, dtype=np.float32)
        return self._chunks(pending)

    def _chunks(self, audio: np.ndarray) -> Iterator[bytes]:
        n = self.chunk_samples
        for i in range(0, len(audio), n):
            yield to_pcm(audio[i : i + n], self.fmt)
