"""One TTS stream as its client sees it, rebuilt from one or more workers' events.

The client is promised one gapless stream: one ``start``, audio numbered 0,
1, 2, …, ``mark`` offsets into *its* text, one ``end`` with statistics. The
workers that speak it may change underneath (failover), each numbering from 0
and counting offsets in the text it was given. :class:`Stream` does that
rewriting, with no sockets and no routing: the core (``broker/core.py``) feeds
it the events of whichever worker holds the job and sends what it returns.

Rules:

* The first worker's ``start`` is held until its first audio, so a worker that
  fails before audio is replaced invisibly.
* A later worker's ``start`` must match the announced format and rate, and is
  turned into a ``failover`` event saying where in the text it resumes.
* Each worker ``mark`` is rebased onto the client's text and must advance.
* Each worker ``timing`` is rebased likewise, and onto the client's sample
  clock: a later worker counts samples from its own first one, which is the
  client's ``samples`` when it took over. Timings are held with ``start``
  until the audio they describe, so a failover before audio stays invisible.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from . import tts
from .tts import EventError, Frames


@dataclass(eq=False)
class Stream:
    rid: bytes
    text_len: int
    """Length of the client's text, in characters."""
    created: float
    """When the request arrived (seconds, the core's clock)."""
    seq: int = 0
    """Next audio sequence number the client gets."""
    samples: int = 0
    width: int = 2
    """Bytes per sample of the announced format."""
    rate: int = 0
    format: str = "s16le"
    first_audio: Optional[float] = None
    engines: list[str] = field(default_factory=list)
    voice: Optional[str] = None
    """The voice of the first ``start`` the client got (what its first audio was spoken in)."""
    held_start: Optional[tts.Start] = None
    """The current worker's ``start``, held until its first audio."""
    started: bool = False
    """The client has had its ``start``: format and rate are promised."""
    base: int = 0
    """Offset in the client's text where the current worker's text begins (characters)."""
    delivered: int = 0
    """Offset in the client's text up to which whole sentences reached the client (characters)."""
    segments: int = 0
    failover_reason: Optional[str] = None
    """Set while a failed-over stream waits for its next worker's ``start``."""
    sample_base: int = 0
    """Samples the client had when the current worker took over: where its clock starts."""
    held_timings: list[Frames] = field(default_factory=list)
    """The current worker's ``timing`` bodies, held with its ``start`` until its first audio."""

    def audio_ok(self, seq_frame: bytes, pcm: bytes) -> bool:
        """The one validity check of a worker's audio chunk, for the hot path and the slow one alike."""
        return len(seq_frame) == 4 and len(pcm) % self.width == 0

    def on_start(self, start: tts.Start, worker_id: str) -> list[Frames]:
        """Hold a first ``start`` until audio; turn a later one into a ``failover`` event."""
        if start.format not in tts.SAMPLE_WIDTH:
            raise EventError(f"unknown format {start.format!r}")
        rate = start.sample_rate
        if not tts.MIN_RATE <= rate <= tts.MAX_RATE:
            raise EventError(f"sample rate {rate} outside {tts.MIN_RATE}-{tts.MAX_RATE} Hz")
        start.worker = {**start.worker, "id": worker_id}
        if not self.started:
            self.width, self.rate, self.format = tts.SAMPLE_WIDTH[start.format], rate, start.format
            self.held_start = start
            return []
        if (start.format, rate) != (self.format, self.rate):
            raise EventError(f"resumed as {start.format}@{rate}, not the announced {self.format}@{self.rate}")
        event = tts.Failover(start.engine, start.voice, start.worker, self.failover_reason or "", self.base, start.timings)
        self.failover_reason = None
        self.engines.append(start.engine)
        return [event.body(self.rid)]

    def audio(self, pcm: bytes, now: float) -> list[Frames]:
        """Bodies to send for one chunk: the held ``start`` first, then the renumbered audio."""
        bodies = self.release_start()
        if self.first_audio is None:
            self.first_audio = now
        self.samples += len(pcm) // self.width
        bodies.append([self.rid, b"audio", struct.pack(">I", self.seq), pcm])
        self.seq += 1
        return bodies

    def release_start(self) -> list[Frames]:
        """The held ``start`` (first worker only) and timings, in the order they came."""
        bodies, self.held_timings = self.held_timings, []
        if self.held_start is None:
            return bodies
        start, self.held_start = self.held_start, None
        self.started = True
        self.engines.append(start.engine)
        if self.voice is None:
            self.voice = start.voice
        return [start.body(self.rid), *bodies]

    def on_timing(self, timing: tts.Timing, body: Frames) -> list[Frames]:
        """A worker's timings for its next sentence (decoded from ``body``): rebased, and held
        until that sentence's audio. The first worker's need no rebasing: its JSON goes on as it
        came (encoding a sentence's timings again cost the broker ~1 ms on the way to first audio)."""
        if timing.last_char() > self.text_len - self.base:
            raise EventError("timing word beyond the text")
        if self.sample_base == 0 and self.base == 0:
            self.held_timings.append([self.rid, tts.Timing.name, body[2]])
        else:
            self.held_timings.append(timing.shifted(self.sample_base, self.base).body(self.rid))
        return []

    def on_mark(self, mark: tts.Mark) -> Frames:
        """A worker finished a sentence: rebase its offset onto the client's text."""
        end = self.base + mark.end
        if not self.delivered < end <= self.text_len:
            raise EventError(f"mark end {mark.end} does not advance within the text")
        self.delivered = end
        self.segments += 1
        return tts.Mark(end, self.segments - 1).body(self.rid)

    def on_end(self, end: tts.End, now: float, failovers: int) -> Frames:
        end.stats.update(self.stats(now, failovers))
        return end.body(self.rid)

    def resume_point(self) -> int:
        """Where the next worker starts in the client's text, after a failover."""
        self.held_start = None
        self.held_timings = []
        self.sample_base = self.samples
        if self.started:
            self.base = self.delivered
        return self.base

    def stats(self, now: float, failovers: int) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "audio_s": round(self.samples / self.rate, 4) if self.rate else 0.0,
            "chunks": self.seq,
            "ttfa_ms": round((self.first_audio - self.created) * 1000, 2) if self.first_audio is not None else None,
            "total_ms": round((now - self.created) * 1000, 2),
            "engines": self.engines,
            "segments": self.segments,
            "failovers": failovers,
        }
