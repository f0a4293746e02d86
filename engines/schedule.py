"""Which of its jobs a worker speaks next: the one whose listener would run out of audio first.

A worker that holds several jobs (``slots`` in its capabilities) advances them one piece of
audio at a time (a decoder window, or a sentence), always the job with the earliest
*playback deadline*:

* before its first audio, a job's deadline is when it arrived: it is already late, so a new
  line's first window goes before every stream that has audio in hand, and new lines start
  in arrival order;
* after that, the deadline is when the audio sent so far ends if played in real time from
  its first chunk — the moment its listener would hear a gap.

At a real-time factor of about 0.05, one worker keeps many real-time streams fed this way,
and an NPC's first words jump ahead of the narrator's tenth window instead of waiting for
the whole narration (earliest-deadline-first is the optimal single-processor policy when a
feasible order exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar


@dataclass
class Playback:
    """A job's audio as its listener plays it; times in seconds of ``time.monotonic()``."""

    arrived: float
    first: Optional[float] = None
    """When its first audio was sent."""
    audio_s: float = 0.0
    """Seconds of audio sent so far."""

    def sent(self, seconds: float, now: float) -> None:
        if self.first is None:
            self.first = now
        self.audio_s += seconds

    @property
    def deadline(self) -> float:
        return self.arrived if self.first is None else self.first + self.audio_s


class HasPlayback:
    playback: Playback


J = TypeVar("J", bound=HasPlayback)


def next_up(jobs: Sequence[J]) -> J:
    """The job to advance now: earliest deadline, the older job on a tie."""
    return min(jobs, key=lambda job: (job.playback.deadline, job.playback.arrived))
