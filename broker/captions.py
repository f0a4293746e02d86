"""A stream's ``timing`` events put to use: the current word and viseme, WebVTT captions, a plot.

:class:`TimingTrack` gathers a stream's timings as they come and answers "at
played sample N, which word, which viseme". After a ``failover`` the entries
of the cut sentence beyond the audio received are void (PROTOCOL.md,
"Timings"): :meth:`TimingTrack.failover` drops them, so the track holds each
delivered sentence once. WebVTT is a few lines of text (``WEBVTT``, then
cues); it is written here rather than through a library.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import tts


@dataclass
class TimingTrack:
    """Words and visemes of one stream, on its sample clock, in order."""

    words: list[tts.WordTime] = field(default_factory=list)
    visemes: list[tts.VisemeTime] = field(default_factory=list)
    phonemes: list[tts.PhonemeTime] = field(default_factory=list)

    def add(self, timing: tts.Timing) -> None:
        self.words += timing.words or []
        self.visemes += timing.visemes or []
        self.phonemes += timing.phonemes or []

    def failover(self, received: int) -> None:
        """Another worker took over after ``received`` samples: what lies beyond them never came."""
        self.words = [w for w in self.words if w.start < received]
        self.visemes = [v for v in self.visemes if v.start < received]
        self.phonemes = [p for p in self.phonemes if p.start < received]

    @staticmethod
    def _at(entries: list, sample: int) -> Optional[object]:
        i = bisect.bisect_right([e.start for e in entries], sample) - 1
        return entries[i] if i >= 0 and sample < entries[i].end else None

    def word_at(self, sample: int) -> Optional[tts.WordTime]:
        """The word sounding at ``sample`` of the stream, None between words."""
        return self._at(self.words, sample)  # type: ignore[return-value]

    def viseme_at(self, sample: int) -> str:
        """The mouth shape at ``sample`` (``sil`` where no timing covers it)."""
        v = self._at(self.visemes, sample)
        return v.viseme if isinstance(v, tts.VisemeTime) else "sil"


def _stamp(sample: int, rate: int) -> str:
    ms = round(sample * 1000 / rate)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def webvtt(words: list[tts.WordTime], rate: int) -> str:
    """WebVTT captions, one cue per word, timed on the stream's clock at ``rate`` Hz."""
    lines = ["WEBVTT", ""]
    for n, w in enumerate(words, 1):
        lines += [str(n), f"{_stamp(w.start, rate)} --> {_stamp(max(w.end, w.start + 1), rate)}", w.text.replace("-->", "->"), ""]
    return "\n".join(lines)


def plot_timings(audio: np.ndarray, rate: int, track: TimingTrack, path: Path) -> None:
    """The waveform above its word and viseme tracks, on one time axis, so a person can see they line up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = len(audio) / rate
    fig, (wave, words, visemes) = plt.subplots(
        3, 1, sharex=True, figsize=(max(8.0, seconds * 2.5), 5), gridspec_kw={"height_ratios": [3, 1, 1]}
    )
    wave.plot(np.arange(len(audio)) / rate, audio, linewidth=0.4, color="0.2")
    wave.set_ylabel("audio")
    for row, entries, label in ((words, track.words, "text"), (visemes, track.visemes, "viseme")):
        for i, e in enumerate(entries):
            row.axvspan(e.start / rate, e.end / rate, color=("C0" if i % 2 else "C1"), alpha=0.35)
            row.text((e.start + e.end) / 2 / rate, 0.5, getattr(e, label), ha="center", va="center", fontsize=7, rotation=90 if label == "viseme" else 0)
        row.set_yticks([])
    for w in track.words:
        wave.axvline(w.start / rate, color="C0", linewidth=0.5, alpha=0.6)
    words.set_ylabel("words")
    visemes.set_ylabel("visemes")
    visemes.set_xlabel("seconds")
    visemes.set_xlim(0, seconds)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
