"""Text → sentence spans, the unit of streaming, cancel and failover.

The runtime, not each engine, splits text, because the broker needs to know
exactly which characters a finished piece of audio covered: after each
segment the worker reports the character offset where the next one starts,
and a failover resumes from there. Segments are spans of the original string,
so concatenating them gives the text back exactly.

The rule: a sentence ends after ``.``, ``!``, ``?``, ``…`` (or runs of them),
plus any closing quotes or brackets, where whitespace follows. A sentence
longer than ``max_chars`` is cut at the last comma, semicolon or colon before
the limit, else at the last space, else hard.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*\s+")
_SOFT_BREAK = re.compile(r"[,;:]\s+")


def _cut(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    spans = []
    while end - start > max_chars:
        window = text[start : start + max_chars]
        soft = [m.end() for m in _SOFT_BREAK.finditer(window)]
        cut = soft[-1] if soft else window.rfind(" ") + 1
        if cut <= 0:
            cut = max_chars
        spans.append((start, start + cut))
        start += cut
    spans.append((start, end))
    return spans


def split_sentences(text: str, max_chars: int = 400) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` covering ``text`` exactly; each holds at least one non-space character
    except that leading whitespace is folded into the first span."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        spans += _cut(text, start, m.end(), max_chars)
        start = m.end()
    if start < len(text):
        spans += _cut(text, start, len(text), max_chars)
    # Merge spans that hold only whitespace or punctuation into their neighbour.
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and not any(c.isalnum() for c in text[s:e]):
            merged[-1] = (merged[-1][0], e)
        elif merged and not any(c.isalnum() for c in text[merged[-1][0] : merged[-1][1]]):
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def whole_sentences(text: str) -> int:
    """Length of the longest prefix of ``text`` made of finished sentences (0 if none is).

    For text that arrives in pieces (a Wyoming ``synthesize-chunk`` stream, an
    LLM's tokens): the prefix can be spoken now, the rest waits for more text.
    A sentence is finished by the same rule as :func:`split_sentences`: its
    closing punctuation followed by whitespace."""
    end = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
    return end
