"""The TTS layer's wire format (broker/tts.py): request validation and events."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import tts

LIMIT = 100


def _req(**obj: object) -> bytes:
    return json.dumps(obj).encode()


def _code(raw: bytes, limit: int = LIMIT) -> tts.RequestError:
    with pytest.raises(tts.RequestError) as info:
        tts.parse_request(raw, limit)
    return info.value


# --------------------------------------------------------------------------
# parse_request
# --------------------------------------------------------------------------

BAD_REQUESTS = {
    "invalid JSON": b"{text: hi}",
    "not UTF-8": b"\xff\xfe{}",
    "empty frame": b"",
    "JSON list": b'["hello"]',
    "JSON string": b'"hello"',
    "JSON null": b"null",
    "JSON number": b"5",
    "missing text": _req(language="en"),
    "text not a string": _req(text=5),
    "text null": _req(text=None),
    "empty text": _req(text=""),
    "blank text": _req(text="  \n\t "),
    "bad format": _req(text="hi", format="wav"),
    "sample_rate 7999": _req(text="hi", sample_rate=7999),
    "sample_rate 48001": _req(text="hi", sample_rate=48001),
    "sample_rate not a number": _req(text="hi", sample_rate="fast"),
    "bad language tag (one letter)": _req(text="hi", language="e"),
    "bad language tag (digits)": _req(text="hi", language="12"),
    "bad language tag (space)": _req(text="hi", language="en US"),
    "bad language tag (empty)": _req(text="hi", language=""),
    "unknown engine": _req(text="hi", engine="festival"),
    "chunk_ms too small": _req(text="hi", chunk_ms=9),
    "chunk_ms too large": _req(text="hi", chunk_ms=1001),
    "priority too low": _req(text="hi", priority=-11),
    "priority too high": _req(text="hi", priority=11),
    "priority not an integer": _req(text="hi", priority=1.5),
    "priority a boolean": _req(text="hi", priority=True),
    "speed zero": _req(text="hi", speed=0),
    "speed too high": _req(text="hi", speed=4.5),
    "empty voice": _req(text="hi", voice=""),
}


@pytest.mark.parametrize("raw", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request(raw: bytes) -> None:
    err = _code(raw)
    assert err.code == tts.BAD_REQUEST
    assert err.message
    assert str(err) == err.message


def test_unknown_key_is_named() -> None:
    err = _code(_req(text="hi", voicee="x"))
    assert err.code == tts.BAD_REQUEST
    assert "voicee" in err.message


def test_missing_text_is_named() -> None:
    err = _code(_req(language="en"))
    assert "text" in err.message


def test_bad_field_is_named() -> None:
    assert "sample_rate" in _code(_req(text="hi", sample_rate=7999)).message
    assert "language" in _code(_req(text="hi", language="e")).message
    assert "engine" in _code(_req(text="hi", engine="festival")).message
    assert "format" in _code(_req(text="hi", format="wav")).message


@pytest.mark.parametrize("raw", [b'{"text": "hi", "speed": NaN}', b'{"text": "hi", "speed": Infinity}'])
def test_non_finite_speed_is_refused_as_not_a_number(raw: bytes) -> None:
    assert "finite" in _code(raw).message


def test_too_large() -> None:
    err = _code(_req(text="x" * (LIMIT + 1)))
    assert err.code == tts.TOO_LARGE
    assert str(LIMIT) in err.message
    # Exactly at the limit is fine.
    assert tts.parse_request(_req(text="x" * LIMIT), LIMIT).text == "x" * LIMIT


def test_too_large_wins_over_other_problems() -> None:
    assert _code(_req(text="x" * (LIMIT + 1), bogus=1)).code == tts.TOO_LARGE


def test_defaults() -> None:
    r = tts.parse_request(_req(text="Hello."), LIMIT)
    assert r.text == "Hello."
    assert r.language == "en"
    assert r.format == "s16le"
    assert r.chunk_ms is None  # the engine's pieces (engines/audio.py)
    assert r.voice is None
    assert r.engine is None
    assert r.sample_rate is None
    assert r.speed == 1.0
    assert r.priority is None  # 0


def test_all_fields_accepted() -> None:
    r = tts.parse_request(
        _req(text="Olá", language="pt-BR", voice="pt_BR-faber-medium", engine="piper", format="f32le", sample_rate=16000, chunk_ms=20, speed=1.5, priority=-10),
        LIMIT,
    )
    assert (r.language, r.voice, r.engine, r.format, r.sample_rate, r.chunk_ms, r.speed, r.priority) == (
        "pt-BR",
        "pt_BR-faber-medium",
        "piper",
        "f32le",
        16000,
        20,
        1.5,
        -10,
    )


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_sample_rate_bounds_inclusive(rate: int) -> None:
    assert tts.parse_request(_req(text="hi", sample_rate=rate), LIMIT).sample_rate == rate


@pytest.mark.parametrize("tag", ["en", "pt-BR", "en_US", "zh-Hant-TW", "yue", "PT"])
def test_language_tags_accepted(tag: str) -> None:
    assert tts.parse_request(_req(text="hi", language=tag), LIMIT).language == tag


def test_to_json_round_trip_omits_none() -> None:
    r = tts.parse_request(_req(text="hi", language="pt"), LIMIT)
    d = json.loads(r.to_json())
    assert "voice" not in d and "engine" not in d and "sample_rate" not in d
    assert tts.parse_request(r.to_json(), LIMIT) == r


@given(st.binary(max_size=64))
def test_parse_request_only_raises_request_error(raw: bytes) -> None:
    try:
        tts.parse_request(raw, LIMIT)
    except tts.RequestError as exc:
        assert exc.code in tts.ERROR_CODES


def test_deeply_nested_request_is_bad_request() -> None:
    assert _code(b"[" * 100_000).code == tts.BAD_REQUEST


def test_check_request_id() -> None:
    tts.check_request_id(b"x")
    tts.check_request_id(b"x" * 255)
    for bad in (b"", b"x" * 256):
        with pytest.raises(tts.RequestError) as info:
            tts.check_request_id(bad)
        assert info.value.code == tts.BAD_REQUEST


@pytest.mark.parametrize(
    "tag, primary",
    [("pt-BR", "pt"), ("pt_BR", "pt"), ("en-US", "en"), ("en_US", "en"), ("EN", "en"), ("en", "en"), ("zh-Hant-TW", "zh")],
)
def test_normalize_language(tag: str, primary: str) -> None:
    assert tts.normalize_language(tag) == primary


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------

RID = b"req-1"


def test_start_round_trip() -> None:
    ev = tts.Start(22050, "s16le", "piper", "en_US-joe-medium", {"id": "w1", "pid": 42})
    body = ev.body(RID)
    assert body[:2] == [RID, b"start"]
    assert len(body) == 3
    d = json.loads(body[2])
    assert d == {"sample_rate": 22050, "format": "s16le", "engine": "piper", "voice": "en_US-joe-medium", "worker": {"id": "w1", "pid": 42}, "channels": 1}
    rid, back = tts.decode_event(body)
    assert rid == RID
    assert back == ev


def test_start_extra_keys_pass_through() -> None:
    ev = tts.Start(24000, "f32le", "xtts", "ana", {"id": "w2", "pid": 7}, extra={"model": "v2", "nested": {"a": [1, 2]}})
    body = ev.body(RID)
    d = json.loads(body[2])
    assert d["model"] == "v2" and d["nested"] == {"a": [1, 2]}
    assert "extra" not in d
    _, back = tts.decode_event(body)
    assert back == ev
    assert back.extra == {"model": "v2", "nested": {"a": [1, 2]}}


def test_start_decoded_from_foreign_json_keeps_unknown_keys() -> None:
    raw = json.dumps({"sample_rate": 16000, "format": "s16le", "engine": "piper", "voice": "v", "worker": {"pid": 1}, "lang": "pt"}).encode()
    _, ev = tts.decode_event([RID, b"start", raw])
    assert isinstance(ev, tts.Start)
    assert ev.channels == 1
    assert ev.extra == {"lang": "pt"}


@given(st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_audio_round_trip(seq: int, pcm: bytes) -> None:
    body = tts.Audio(seq, pcm).body(RID)
    assert body == [RID, b"audio", struct.pack(">I", seq), pcm]
    assert len(body[2]) == 4
    assert tts.decode_event(body) == (RID, tts.Audio(seq, pcm))


def test_audio_seq_is_big_endian() -> None:
    assert tts.Audio(1, b"").body(RID)[2] == b"\x00\x00\x00\x01"
    assert tts.Audio(0x01020304, b"").body(RID)[2] == b"\x01\x02\x03\x04"


def test_end_round_trip() -> None:
    stats = {"samples": 4410, "audio_s": 0.2, "ttfa_ms": 12.5, "engines": ["piper"]}
    body = tts.End(stats).body(RID)
    assert body[:2] == [RID, b"end"]
    assert tts.decode_event(body) == (RID, tts.End(stats))


@pytest.mark.parametrize("code", tts.ERROR_CODES)
def test_error_round_trip(code: str) -> None:
    body = tts.Error(code, "something went wrong").body(RID)
    assert body[:2] == [RID, b"error"]
    assert json.loads(body[2]) == {"code": code, "message": "something went wrong"}
    assert tts.decode_event(body) == (RID, tts.Error(code, "something went wrong"))
    assert tts.error_body(RID, code, "something went wrong") == body


def test_error_missing_fields_defaults() -> None:
    assert tts.decode_event([RID, b"error", b"{}"]) == (RID, tts.Error(tts.INTERNAL, ""))


def test_unknown_event_is_other() -> None:
    rid, ev = tts.decode_event([RID, b"progress", b"a", b"b"])
    assert rid == RID
    assert ev == tts.Other("progress", [b"a", b"b"])
    _, ev = tts.decode_event([RID, b"\xff"])
    assert isinstance(ev, tts.Other) and ev.frames == []


MALFORMED_EVENTS = {
    "empty": [],
    "rid only": [RID],
    "start without JSON": [RID, b"start"],
    "start two JSON frames": [RID, b"start", b"{}", b"{}"],
    "start not JSON": [RID, b"start", b"{"],
    "start not UTF-8": [RID, b"start", b"\xff"],
    "start missing keys": [RID, b"start", b'{"sample_rate": 1}'],
    "start JSON list": [RID, b"start", b"[]"],
    "start JSON null": [RID, b"start", b"null"],
    "start JSON number": [RID, b"start", b"3"],
    "audio 3 frames": [RID, b"audio", b"\x00\x00\x00\x00"],
    "audio 5 frames": [RID, b"audio", b"\x00\x00\x00\x00", b"", b""],
    "audio short seq": [RID, b"audio", b"\x00\x00\x00", b"pcm"],
    "audio long seq": [RID, b"audio", b"\x00\x00\x00\x00\x00", b"pcm"],
    "end without JSON": [RID, b"end"],
    "end not JSON": [RID, b"end", b"nope"],
    "end two frames": [RID, b"end", b"{}", b"{}"],
    "error without JSON": [RID, b"error"],
    "error not JSON": [RID, b"error", b"{"],
}


@pytest.mark.parametrize("body", MALFORMED_EVENTS.values(), ids=MALFORMED_EVENTS.keys())
def test_malformed_event_raises_value_error(body: list[bytes]) -> None:
    with pytest.raises(ValueError):
        tts.decode_event(body)


@pytest.mark.parametrize("raw", [b'"format"', b'"sample_rate format engine voice worker"', b"[]", b"null", b"1"])
def test_start_json_not_object_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        tts.decode_event([RID, b"start", raw])


@pytest.mark.parametrize("raw", [b"[]", b"null", b"1", b'"x"'])
def test_error_json_not_object_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        tts.decode_event([RID, b"error", raw])


@pytest.mark.parametrize("raw", [b"[]", b"null", b"1", b'"x"'])
def test_end_json_not_object_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        tts.decode_event([RID, b"end", raw])


def test_event_names() -> None:
    assert (tts.Start.name, tts.Audio.name, tts.End.name, tts.Error.name) == (b"start", b"audio", b"end", b"error")
    assert tts.RESERVED_SERVICES == {"tts", "tts.cancel", "tts.status"}
    assert tts.WORKER_CANCEL == b"tts.cancel"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
event_frames = st.one_of(
    st.binary(max_size=16),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["sample_rate", "format", "engine", "voice", "worker", "channels", "code", "message", "x"]), json_values, max_size=7
    ).map(lambda d: json.dumps(d).encode()),
)


@given(st.lists(event_frames, max_size=2), st.sampled_from([b"start", b"audio", b"end", b"error", b"x"]), st.lists(event_frames, max_size=3))
def test_decode_event_only_raises_value_error(head: list[bytes], name: bytes, tail: list[bytes]) -> None:
    body = [*head[:1], name, *tail] if head else [name, *tail]
    try:
        rid, ev = tts.decode_event(body)
    except ValueError:
        return
    assert isinstance(rid, bytes)
    assert isinstance(ev, (tts.Start, tts.Audio, tts.End, tts.Error, tts.Other))
    if isinstance(ev, tts.End):
        assert isinstance(ev.stats, dict)
