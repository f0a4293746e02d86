"""Sentence spans: the unit of streaming and of failover accounting."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.text import split_sentences


def _pieces(text: str, limit: int = 400) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text, limit)]


def test_sentences_keep_their_punctuation_and_spacing() -> None:
    assert _pieces("Hello there. How are you?  Fine!") == ["Hello there. ", "How are you?  ", "Fine!"]
    assert _pieces('He said "Run." Then silence… And then?') == ['He said "Run." ', "Then silence… ", "And then?"]
    assert _pieces("Olá, aventureiros! Bem-vindos à taverna.") == ["Olá, aventureiros! ", "Bem-vindos à taverna."]
    assert _pieces("No end") == ["No end"]
    assert _pieces("...   ") == ["...   "]
    assert _pieces("") == []


def test_long_sentences_are_cut_at_commas_then_spaces() -> None:
    text = "The road winds on, past the mill, over the bridge, and into the dark wood where nothing sings."
    pieces = _pieces(text, 40)
    assert "".join(pieces) == text and all(len(p) <= 40 for p in pieces)
    assert pieces[0] == "The road winds on, past the mill, "
    assert _pieces("x" * 90, 40) == ["x" * 40, "x" * 40, "x" * 10]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .,!?…\"' \n")), max_size=300), st.integers(5, 120))
def test_spans_cover_the_text_exactly_in_order(text: str, limit: int) -> None:
    spans = split_sentences(text, limit)
    assert "".join(text[s:e] for s, e in spans) == text
    assert all(s < e for s, e in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    # Every span but possibly the first speaks something.
    assert all(any(c.isalnum() for c in text[s:e]) for s, e in spans[1:])
