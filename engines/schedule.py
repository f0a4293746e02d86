"""Which of its jobs a worker speaks next: the one whose listener would run out of audio first.

A worker that holds several jobs (``slots`` in its capabilities) advances them one piece of
audio at a time (a decoder window, or a sentence), always the job with the earliest
*playback deadline*:

* before its first audio, a job's deadline is when it arrived: it is already late, so a new
  line's first window goes before every stream that has audio in hand, and new lines start
  in arrival order;
* after that, the deadline is when the audio sent so far ends if played in real time from
  its first chunk — the moment its listener would hear a gap;
* a request's ``priority`` moves its deadline :data:`PRIORITY_STEP_S` sooner per step (later
  for a negative one): a narrator at priority 1 is fed as if its listener had a second less
  in hand than it has, ambient chatter at -1 as if a second more. It decides who gives way: a
  new line's start does not cut short the piece of a stream due before it (a narrator at 1
  with less than a second in hand), and when not every listener can be fed in time, the
  lower priorities run dry first.

At a real-time factor of about 0.05, one worker keeps several real-time streams fed this
way, and an NPC's first words jump ahead of the narrator's next windows instead of waiting
for the whole narration. A piece cannot be cut anywhere, as earliest-deadline-first would
like; instead a worker with a second thread starts a new line there at once, and interrupts
the piece in progress on the first thread if that listener has audio enough to wait
(:meth:`Pacing.interrupt`; the engine goes on with that piece afterwards, from where it was
cut where it can), so the new line's first audio does not share the cores with another
stream's long window.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, TypeVar


PRIORITY_STEP_S = 1.0
"""Seconds sooner a job is due per step of its request's ``priority``: about what a listener
notices (a stream a second from running dry is urgent; one with several seconds is not)."""

SLACK = 1.5
"""How much more audio in hand than a wait strictly needs before a listener is made to wait
(the costs it is compared with are moving averages on a shared machine)."""


@dataclass
class Playback:
    """A job's audio as its listener plays it; times in seconds of ``time.monotonic()``."""

    arrived: float
    first: Optional[float] = None
    """When its first audio was sent."""
    audio_s: float = 0.0
    """Seconds of audio sent so far."""
    urgency_s: float = 0.0
    """Seconds sooner than its listener's own deadline that the job is due: its priority's."""

    def sent(self, seconds: float, now: float) -> None:
        if self.first is None:
            self.first = now
        self.audio_s += seconds

    @property
    def deadline(self) -> float:
        return (self.arrived if self.first is None else self.first + self.audio_s) - self.urgency_s

    def lead(self, now: float) -> float:
        """Seconds of audio its listener has in hand (0 before the first audio)."""
        return 0.0 if self.first is None else max(0.0, self.first + self.audio_s - now)


class Pacing:
    """What an engine is told about the job it speaks (``Engine.speak_paced``): how long
    its next piece may take, and how many jobs take turns with it."""

    def __init__(
        self,
        playback: Playback,
        jobs: Callable[[], Sequence["HasPlayback"]],
        start_cost: Callable[[], float] = lambda: 0.0,
        share: float = 0.5,
        elsewhere: Callable[[], int] = lambda: 0,
    ) -> None:
        self._playback = playback
        self._jobs = jobs
        self._start_cost = start_cost
        self._elsewhere = elsewhere
        self._share = share
        self._lock = threading.Lock()
        self._stop_run: Optional[Callable[[], None]] = None
        self._run_cost = 0.0
        self.chunk_s = 0.0
        """Seconds of audio per chunk sent to the listener (set once the request is read): up
        to this much of a piece's end waits for the next piece before it goes out, so it is not
        yet in :meth:`lead` (0: a piece is sent whole)."""

    @contextmanager
    def interruptible(self, stop: Callable[[], None], cost: float) -> Iterator[None]:
        """Marks a run of the engine's, expected to take ``cost`` seconds, that :meth:`interrupt`
        may cut short by calling ``stop`` (from another thread). The engine then yields no
        audio for that piece and goes on with it at its next turn (Piper's frame windows from
        the last part they had finished: ``FrameStreamer._vocode``; other runs from the start)."""
        with self._lock:
            self._stop_run, self._run_cost = stop, cost
        try:
            yield
        finally:
            with self._lock:
                self._stop_run = None

    def interrupt(self, wait: float, other_lead: float) -> bool:
        """Cut short the run in progress for another job whose listener has ``other_lead``
        seconds of audio in hand, if that listener would run dry before the run ends while this
        one has audio enough to wait ``wait`` seconds and then for the whole run again (with
        :data:`SLACK` both ways: an engine may have to start it over); True if it was cut."""
        with self._lock:
            if self._stop_run is None or other_lead >= SLACK * self._run_cost:
                return False
            if self._playback.lead(time.monotonic()) < SLACK * (wait + self._run_cost):
                return False
            self._stop_run()
            self._stop_run = None
            return True

    @property
    def paced(self) -> bool:
        return True

    def waiting(self) -> bool:
        """Whether a listener is waiting for this job's first audio (none has been sent): what is
        decoded now is on the way to it, and worth more work to make sooner."""
        return self._playback.first is None

    def sharing(self) -> int:
        """Jobs this worker advances in turns now, this one included."""
        return max(1, len(self._jobs()))

    def others_on_host(self) -> int:
        """Other workers on the same cores that hold a job now (``engines/host_cores.py``): their
        runs overlap this job's, as those of this worker's jobs taking turns do."""
        return self._elsewhere()

    def starting(self) -> int:
        """Other jobs on this worker that have not sent their first audio yet (each goes before
        this one's next piece)."""
        return sum(1 for j in self._jobs() if j.playback is not self._playback and j.playback.first is None)

    def start_cost(self) -> float:
        """Seconds a job's first piece takes on this worker now (a moving average)."""
        return self._start_cost()

    def budget(self) -> float:
        """Seconds the next piece may take: a part (``share``) of this listener's audio in
        hand (0 before the first audio), divided among the jobs in turn; the rest is margin
        for the pieces the others take meanwhile. (Bounding it by the listener with least
        audio instead kept every window minimal, and the margins then cost more than the
        four streams of the benchmark could afford.)"""
        return self._share * self.lead() / self.sharing()

    def lead(self) -> float:
        """Seconds of audio this listener has in hand now."""
        return self._playback.lead(time.monotonic())

    def others_budget(self) -> float:
        """Seconds a piece of this job may take without another job's listener running out
        (a part of the least audio in hand among the others playing); infinite when none is."""
        now = time.monotonic()
        leads = [j.playback.lead(now) for j in self._jobs() if j.playback is not self._playback and j.playback.first is not None]
        return self._share * min(leads) if leads else float("inf")


class _Unpaced(Pacing):
    def __init__(self) -> None:
        super().__init__(Playback(arrived=0.0), lambda: ())

    @property
    def paced(self) -> bool:
        return False

    def waiting(self) -> bool:
        return False


UNPACED: Pacing = _Unpaced()
"""For a caller with no listener to pace for (an engine used in-process): the engine's own schedule."""


class HasPlayback:
    playback: Playback


J = TypeVar("J", bound=HasPlayback)


def next_up(jobs: Sequence[J], now: float = 0.0, start_cost: float = 0.0) -> J:
    """The job to advance now: earliest deadline, the older job on a tie — except that a new
    job does not start while a job already playing has less audio in hand than starting it
    takes (``start_cost`` seconds, as measured): that job is fed first, so that starting one
    does not make another's listener hear a gap."""
    due = min(jobs, key=lambda job: (job.playback.deadline, job.playback.arrived))
    if due.playback.first is None:
        at_risk = [j for j in jobs if j.playback.first is not None and j.playback.lead(now) < start_cost]
        if at_risk:
            return min(at_risk, key=lambda job: job.playback.deadline)
    return due
