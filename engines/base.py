"""What an engine is: a small class that turns (text, options) into float audio.

Everything else a worker does — MDP, heartbeats, cancel, chunking, format and
rate conversion — is the runtime's job (``engines/runtime.py``), written once.
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Union

import numpy as np

from broker.tts import BAD_REQUEST, RequestError, SynthesisRequest, normalize_language
from engines.alignment import Alignment
from engines.schedule import Pacing


class Engine(abc.ABC):
    """A loaded model, ready to speak. Constructed once per worker process."""

    engine: str
    """Engine family: ``piper`` or ``xtts``."""
    native_rate: int
    """Rate of the float audio :meth:`speak` yields, in Hertz."""
    slots: int = 1
    """Jobs a worker holds at once by default, advanced in turns (``engines/schedule.py``).
    More than one only where :meth:`speak` generators of several requests can be
    interleaved, and the engine is fast enough to feed them."""
    threads: int = 1
    """Synthesis threads: how many of its jobs a worker advances at the same moment. More
    than one only where :meth:`speak` generators of different requests may run concurrently
    (a thread-safe model, shared state guarded); a second thread lets a new line's first
    piece start while another stream's long piece is in progress."""
    parallel: bool = False
    """Whether, while it holds several jobs, a further synthesis thread advances their later
    pieces beside the first thread: for an engine whose runs then take a share of the cores
    each (Piper's frame mode, on half). Otherwise only the first thread advances a job after
    its first piece, one run at a time on every core."""

    timings: tuple[str, ...] = ()
    """Timing kinds (``broker.tts.TIMING_KINDS``) the engine can tell, from its own alignment.
    An engine that offers any yields an ``engines.alignment.Alignment`` from :meth:`speak`
    just before the audio it describes, when the request asks for timings; one that offers
    none (XTTS) never does, and its streams say ``"timings": []``: nothing is invented."""

    @property
    @abc.abstractmethod
    def service(self) -> str:
        """MDP service this worker registers (one per voice or model)."""

    @abc.abstractmethod
    def languages(self) -> list[str]:
        """Primary language subtags served (``en``, ``pt``…)."""

    @abc.abstractmethod
    def voices(self) -> list[str]:
        """Voice (or speaker) names a request may ask for."""

    @abc.abstractmethod
    def voice_for(self, request: SynthesisRequest) -> str:
        """Name of the voice that will speak ``request`` (reported in ``start``)."""

    @abc.abstractmethod
    def speak(self, text: str, request: SynthesisRequest) -> Iterable[Union[np.ndarray, Alignment]]:
        """Speak one sentence: float32 mono arrays at :attr:`native_rate`, as soon as each exists
        (and, for an engine with :attr:`timings` asked for them, an ``Alignment`` before each piece).

        The runtime has already split the text (``engines/text.py``) and pulls
        lazily, checking for cancellation between arrays, so a generator that
        does its work on demand is cancelled between pieces.
        """

    def speak_paced(self, text: str, request: SynthesisRequest, pacing: Pacing) -> Iterable[Union[np.ndarray, Alignment]]:
        """:meth:`speak`, told how much time it may take before its listener runs out of audio.

        ``pacing.budget()`` is that time in seconds, now, and ``pacing.sharing()`` how many
        jobs take turns on this worker. An engine that can trade latency for work (Piper's
        frame mode decodes in windows) sizes its next piece by them; the default ignores them.
        """
        return self.speak(text, request)

    def release_memory(self) -> None:
        """Called when the worker has been idle a while (``engines/runtime.IDLE_RELEASE_S``): give
        back what serving grew beyond what the next request needs to start (buffers sized for
        the largest request so far), so an idle worker does not hold its peak. Nothing by default."""

    def max_chars(self, language: str) -> int:
        """Longest sentence this engine takes in one piece, in characters."""
        return 400

    def check(self, request: SynthesisRequest) -> None:
        """Refuse a request this engine cannot serve, before any audio."""
        if normalize_language(request.language) not in self.languages():
            raise RequestError(BAD_REQUEST, f"{self.service} does not speak {request.language!r}")
        if request.voice is not None and request.voice not in self.voices():
            raise RequestError(BAD_REQUEST, f"{self.service} has no voice {request.voice!r}")

    def capabilities(self) -> dict[str, Any]:
        """Sent in READY so the broker can route by language, engine and voice."""
        return {
            "protocol": "tts/1",
            "engine": self.engine,
            "languages": self.languages(),
            "voices": self.voices(),
            "sample_rate": self.native_rate,
            "timings": list(self.timings),
        }
