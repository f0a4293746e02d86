"""When each phoneme and word of a sentence sounds: from a voice's own durations to ``timing`` events.

A VITS voice (Piper) decides how long each phoneme id lasts (its duration
predictor's ``ceil(exp(logw) · length_scale)``, in latent frames of ``hop``
samples) before it makes any audio, and its audio is exactly those frames
long. So an engine that can read those durations knows, before the first
sample, where every phoneme falls: it yields an :class:`Alignment` just
before the audio it describes, and the worker runtime turns it into a
``timing`` event on the stream's clock (:func:`to_timing`).

Three steps, each here:

* **Symbols → phones.** Piper's phonemizer gives Unicode code points (stress
  marks, length marks and diacritics separately) and ids with a pad after
  each. A phone is one base symbol with its modifiers, its time that of its
  ids and their pads (as piper-tts's own ``include_alignments`` counts it);
  runs of pauses (sentence start ``^``, end ``$``, spaces, punctuation) are
  one pause each. Phones tile the piece's audio exactly.
* **Phones → words.** Words are the runs of sounds between pauses. espeak does
  not keep the text's words one to one (``of the`` → ``ʌvðə``, ``42`` →
  ``fˈɔːɹɾi tˈuː``), so each text word is phonemized alone (cached) and the
  sentence's symbols are matched against theirs (``difflib``: whole words
  first, then the symbols between), unless the counts agree on plain text,
  where they map one to one.
* **Native samples → stream samples.** Offsets scale by ``out/in`` exactly as
  the stream resampler places samples (``ChunkEncoder.position``), and count
  from the stream's first sample.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

from broker import tts
from engines.visemes import MODIFIERS_AFTER, MODIFIERS_BEFORE, PAUSES, VISEME_OF, viseme

BOS, EOS, PAD = "^", "$", "_"
"""Piper's sentence start, end and pad symbols."""

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
"""A word of the text: letters and digits, with inner apostrophes (``didn't``)."""
_PLAIN = re.compile(r"^[^\W\d_]|[\s'’\".,;:!?()\-–—…]$")
"""A character of plain text, for which espeak keeps words one to one unless it joins them."""


class Phone(NamedTuple):
    """One phone (or pause) of a piece, in the voice's native samples from the piece's first.

    Phones, words and segments are named tuples: a sentence has hundreds of each, made on the way
    to its first audio, and a frozen dataclass took ~3x as long to make."""

    label: str
    start: int
    end: int
    pause: bool


class Word(NamedTuple):
    start: int
    end: int
    """Native samples from the piece's first, like :class:`Phone`."""
    char: tuple[int, int]
    """Half-open character span in the sentence text the engine was given."""


@dataclass(frozen=True)
class Alignment:
    """What an engine yields just before a piece of audio: where its phones and words fall."""

    phones: list[Phone]
    words: list[Word]
    samples: int
    """Length of the piece's audio, native samples (the phones end there)."""


class _Seg(NamedTuple):
    label: str
    lo: int
    hi: int
    """Symbols ``[lo, hi)`` of the piece (its ``^`` first)."""
    pause: bool


def segment(symbols: Sequence[str]) -> list[_Seg]:
    """Group a piece's symbols (``^``, phonemes, ``$``) into phones and pauses.

    Stress marks join the symbol after them, other modifiers the one before;
    a modifier with nothing to join is a pause (it has no mouth shape)."""
    segs: list[_Seg] = []
    i, n = 0, len(symbols)
    while i < n:
        lo = i
        if symbols[i] in PAUSES:
            while i < n and symbols[i] in PAUSES:
                i += 1
            segs.append(_Seg("".join(symbols[lo:i]), lo, i, True))
            continue
        while i < n and symbols[i] in MODIFIERS_BEFORE:
            i += 1
        if i < n and symbols[i] not in PAUSES and symbols[i] not in MODIFIERS_AFTER:
            i += 1
            while i < n and symbols[i] in MODIFIERS_AFTER:
                i += 1
            segs.append(_Seg("".join(symbols[lo:i]), lo, i, False))
        else:
            while i < n and (symbols[i] in MODIFIERS_AFTER or symbols[i] in MODIFIERS_BEFORE):
                i += 1
            i = max(i, lo + 1)
            segs.append(_Seg("".join(symbols[lo:i]), lo, i, True))
    return segs


def _base(label: str) -> str:
    """The first base symbol of a phone label: what word matching compares."""
    return next((ch for ch in label if ch in VISEME_OF or (ch not in MODIFIERS_BEFORE and ch not in MODIFIERS_AFTER)), "?")


class WordMap:
    """Which text word each sound of a sentence belongs to, for one voice's phonemizer.

    ``phonemize`` is the voice's (text → pieces of symbols). Words phonemized
    alone are cached, a bounded number of them."""

    CACHE = 50_000

    def __init__(self, phonemize: Callable[[str], list[list[str]]]) -> None:
        self._phonemize = phonemize
        self._cache: dict[str, str] = {}

    def _skeleton(self, word: str) -> str:
        """A text word's sounds alone: one base symbol per phone."""
        found = self._cache.get(word)
        if found is None:
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            symbols = [s for piece in self._phonemize(word) for s in piece]
            found = self._cache[word] = "".join(_base(s.label) for s in segment(symbols) if not s.pause)
        return found

    def assign(self, text: str, pieces: Sequence[Sequence[_Seg]]) -> list[list[Optional[tuple[int, int]]]]:
        """For each piece, for each of its segments: the character span of its text word (None: none)."""
        tokens = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        sounds = [(p, k) for p, segs in enumerate(pieces) for k, s in enumerate(segs) if not s.pause]
        words: list[list[int]] = []  # runs of sounds between pauses: indices into `sounds`
        for j, (p, k) in enumerate(sounds):
            if words and sounds[j - 1][0] == p and sounds[j - 1][1] == k - 1:
                words[-1].append(j)
            else:
                words.append([j])
        owner: list[Optional[int]] = [None] * len(sounds)
        if len(words) == len(tokens) and all(_PLAIN.match(c) for c in text):
            for t, word in enumerate(words):
                for j in word:
                    owner[j] = t
        elif tokens and sounds:
            skeletons = [self._skeleton(text[a:b]) for a, b in tokens]
            of_char = [t for t, sk in enumerate(skeletons) for _ in sk]
            said = [_base(pieces[p][k].label) for p, k in sounds]
            for a, b, size in _matching(["".join(said[j] for j in word) for word in words], skeletons):
                for d in range(size):
                    owner[a + d] = of_char[b + d]
            for word in words:  # sounds espeak said differently take their neighbours' word
                known = [owner[j] for j in word if owner[j] is not None]
                fill = known[0] if known else None
                for j in word:
                    fill = owner[j] if owner[j] is not None else fill
                    owner[j] = fill
            last: Optional[int] = None
            for j in range(len(owner)):  # words come in text order
                if owner[j] is None or (last is not None and owner[j] < last):  # type: ignore[operator]
                    owner[j] = last
                last = owner[j]
        out: list[list[Optional[tuple[int, int]]]] = [[None] * len(segs) for segs in pieces]
        for (p, k), t in zip(sounds, owner):
            if t is not None:
                out[p][k] = tokens[t]
        return out


def _matching(said: Sequence[str], alone: Sequence[str]) -> Iterator[tuple[int, int, int]]:
    """Matching characters ``(i, j, n)`` of ``"".join(said)`` (the sentence's words as espeak
    said them) and ``"".join(alone)`` (each text word's sounds alone): whole words where they are
    the same (most of them), and character by character in the stretches between. One
    character-level match over a whole sentence took ~2 ms of a 47-word sentence's first audio;
    the stretches between equal words are a few characters each."""
    said_at = list(accumulate(map(len, said), initial=0))
    alone_at = list(accumulate(map(len, alone), initial=0))
    said_text, alone_text = "".join(said), "".join(alone)
    i = j = 0  # the first words of each not matched yet
    for block in difflib.SequenceMatcher(None, said, alone, autojunk=False).get_matching_blocks():
        if block.a > i and block.b > j:  # unequal words before this block, on both sides
            a0, b0 = said_at[i], alone_at[j]
            between = difflib.SequenceMatcher(None, said_text[a0 : said_at[block.a]], alone_text[b0 : alone_at[block.b]], autojunk=False)
            yield from ((a0 + m.a, b0 + m.b, m.size) for m in between.get_matching_blocks() if m.size)
        if block.size:
            yield said_at[block.a], alone_at[block.b], said_at[block.a + block.size] - said_at[block.a]
        i, j = block.a + block.size, block.b + block.size


def symbol_samples(symbols: Sequence[str], id_map: Mapping[str, Sequence[int]], id_samples: Sequence[int]) -> Optional[list[int]]:
    """Samples of each symbol (``^``, phonemes, ``$``): its ids and the pad after each, as Piper
    builds the ids (``piper.phoneme_ids``); None if the counts do not fit the ids."""
    pad = len(id_map.get(PAD, ()))
    counts = []
    for i, s in enumerate(symbols):
        ids = len(id_map.get(s, ()))
        counts.append(ids + (pad if i < len(symbols) - 1 else 0))
    if sum(counts) != len(id_samples):
        return None
    out, at = [], 0
    for c in counts:
        out.append(int(sum(id_samples[at : at + c])))
        at += c
    return out


def align_piece(
    symbols: Sequence[str], segs: Sequence[_Seg], words: Sequence[Optional[tuple[int, int]]], samples: Sequence[int]
) -> Alignment:
    """The alignment of one piece from its segments, their words and each symbol's samples."""
    starts = [0]
    for n in samples:
        starts.append(starts[-1] + n)
    phones = [Phone(s.label, starts[s.lo], starts[s.hi], s.pause) for s in segs]
    spans: list[Word] = []
    for phone, span in zip(phones, words):
        if span is None:
            continue
        if spans and spans[-1].char == span:
            spans[-1] = Word(spans[-1].start, phone.end, span)
        else:
            spans.append(Word(phone.start, phone.end, span))
    return Alignment(phones, spans, starts[-1])


def to_timing(
    alignment: Alignment,
    kinds: Iterable[str],
    sentence: str,
    char_base: int,
    at: Callable[[int], int],
) -> tts.Timing:
    """A ``timing`` event for one piece: ``at`` maps a native sample of the piece to the stream's
    clock; words are the sentence's characters, ``char_base`` where it starts in the worker's text."""
    kinds = set(kinds)
    timing = tts.Timing()
    if "phonemes" in kinds:
        timing.phonemes = [tts.PhonemeTime(at(p.start), at(p.end), p.label) for p in alignment.phones]
    if "words" in kinds:
        timing.words = [
            tts.WordTime(at(w.start), at(w.end), sentence[w.char[0] : w.char[1]], (char_base + w.char[0], char_base + w.char[1]))
            for w in alignment.words
        ]
    if "visemes" in kinds:
        visemes: list[tts.VisemeTime] = []
        for p in alignment.phones:
            v = "sil" if p.pause else viseme(p.label)
            if visemes and visemes[-1].viseme == v:
                visemes[-1] = tts.VisemeTime(visemes[-1].start, at(p.end), v)
            else:
                visemes.append(tts.VisemeTime(at(p.start), at(p.end), v))
        timing.visemes = visemes
    return timing
