"""Routing by language, voice and engine, and fallback chains, through the core."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from broker import tts
from broker.core import CoreSettings
from broker.routing import Step, parse_step
from tests.core_rig import (
    C1,
    CAPS_EN,
    CAPS_EN_AMY,
    CAPS_PT,
    CAPS_XTTS,
    DISCONNECT,
    EXPIRY,
    Rig,
    SETTINGS,
    SVC_EN,
    SVC_EN_AMY,
    SVC_PT,
    SVC_XTTS,
    TIMEOUT,
    W1,
    W2,
    W3,
    _stream_on,
    audio,
    caps,
    end,
    error_code,
    events,
    job_key,
    mark,
    only_final,
    other_json,
    requests_to,
    sent_request,
    start,
    to_client,
)

# --------------------------------------------------------------------------
# Routing by language, voice and engine
# --------------------------------------------------------------------------


def _two_languages() -> Rig:
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)
    rig.worker(W2, SVC_PT, CAPS_PT, now=0.1)
    return rig


def test_pt_br_routes_to_pt_worker() -> None:
    rig = _two_languages()
    out = rig.request(C1, b"a", language="pt-BR", text="Olá.")
    [req] = requests_to(out, W2)
    assert requests_to(out, W1) == []
    assert json.loads(req.body[1])["language"] == "pt"


def test_pt_waits_for_pt_worker_rather_than_using_en() -> None:
    rig = _two_languages()
    job_key(rig.request(C1, b"a", language="pt"), W2)
    out = rig.request(C1, b"b", language="pt-PT")
    assert out == []  # W1 is idle but speaks only en


def test_en_routes_to_en_worker() -> None:
    rig = _two_languages()
    out = rig.request(C1, b"a", language="en-GB")
    [req] = requests_to(out, W1)
    assert json.loads(req.body[1])["language"] == "en"


def test_unknown_language_goes_to_default_en() -> None:
    rig = _two_languages()
    out = rig.request(C1, b"a", language="de")
    [req] = requests_to(out, W1)
    assert json.loads(req.body[1])["language"] == "en"
    assert requests_to(out, W2) == []


def test_default_language_setting_is_used() -> None:
    rig = Rig(replace(SETTINGS, default_language="pt"))
    rig.worker(W1, SVC_EN, CAPS_EN)
    rig.worker(W2, SVC_PT, CAPS_PT)
    out = rig.request(C1, b"a", language="de")
    [req] = requests_to(out, W2)
    assert json.loads(req.body[1])["language"] == "pt"


def test_voice_narrows_the_choice() -> None:
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)  # idle longest
    rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=0.1)
    out = rig.request(C1, b"a", voice="en_US-amy-medium")
    [req] = requests_to(out, W2)
    assert json.loads(req.body[1])["voice"] == "en_US-amy-medium"
    # Another amy request waits for W2 even though W1 is idle.
    assert rig.request(C1, b"b", voice="en_US-amy-medium") == []
    out = rig.request(C1, b"c", voice="en_US-joe-medium")
    job_key(out, W1)


def test_unknown_voice_is_bad_request_immediately() -> None:
    rig = Rig()
    rig.worker(W1)
    out = rig.request(C1, b"a", voice="xx_XX-nobody-low")
    assert error_code(out, C1) == tts.BAD_REQUEST
    _, ev = only_final(out, C1)
    assert "xx_XX-nobody-low" in ev.message and "en_US-joe-medium" in ev.message
    assert not rig.core.jobs and not rig.core.workers[W1].jobs


def test_configured_voice_may_wait_for_its_worker() -> None:
    rig = Rig(replace(SETTINGS, known_voices=frozenset({"en_US-amy-medium"})))
    rig.worker(W1)
    assert rig.request(C1, b"a", voice="en_US-amy-medium") == []
    out = rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=1.0)
    [req] = requests_to(out, W2)
    assert req.body[0] == b"a"


def test_unknown_engine_is_bad_request_immediately() -> None:
    rig = Rig()
    rig.worker(W1)
    assert error_code(rig.request(C1, b"a", engine="xtts"), C1) == tts.BAD_REQUEST


def test_engine_selection() -> None:
    rig = Rig()
    rig.worker(W1, "xtts.multi", caps("en", "ana", engine="xtts"), now=0.0)
    rig.worker(W2, SVC_EN, CAPS_EN, now=0.1)
    job_key(rig.request(C1, b"a", engine="xtts"), W1)
    # Without an engine, piper services are preferred.
    rig2 = Rig()
    rig2.worker(W1, "xtts.multi", caps("en", "ana", engine="xtts"), now=0.0)
    rig2.worker(W2, SVC_EN, CAPS_EN, now=0.1)
    job_key(rig2.request(C1, b"a"), W2)


def test_engine_service_addressed_directly() -> None:
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)
    rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=0.1)
    out = rig.request(C1, b"a", service=SVC_EN_AMY, language="pt-BR")
    [req] = requests_to(out, W2)
    # Addressed directly, the engine gets the language asked for (and refuses what it cannot speak).
    assert json.loads(req.body[1])["language"] == "pt"
    assert to_client(rig.core.on_worker(W2, start(req.address, b"a"), 0.2), C1) == []
    out = rig.core.on_worker(W2, end(req.address, b"a"), 0.3)
    [s, r] = to_client(out, C1)
    assert s.service == SVC_EN_AMY and not s.final and tts.decode_event(s.body)[1].worker["id"] == "w2"  # type: ignore[union-attr]
    assert r.service == SVC_EN_AMY and r.final
    assert tts.decode_event(r.body)[0] == b"a"


def test_engine_service_request_fails_over_within_that_service_only() -> None:
    rig = Rig()
    rig.worker(W1, SVC_EN_AMY, CAPS_EN_AMY, now=0.0)
    rig.worker(W2, SVC_EN, CAPS_EN, now=0.0)  # same language, other service: never used
    k = job_key(rig.request(C1, b"a", service=SVC_EN_AMY), W1)
    out = rig.core.on_worker(W1, DISCONNECT, 0.1)
    assert requests_to(out, W2) == [] and to_client(out, C1) == []
    out = rig.worker(W3, SVC_EN_AMY, CAPS_EN_AMY, now=0.2)
    [req] = requests_to(out, W3)
    assert req.address == k


def test_engine_service_request_waits_for_that_service_only() -> None:
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN)
    rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY)
    job_key(rig.request(C1, b"a", service=SVC_EN_AMY), W2)
    assert rig.request(C1, b"b", service=SVC_EN_AMY) == []
    rig.keepalive(TIMEOUT)
    out = rig.core.tick(TIMEOUT)  # W1 stayed idle all along
    rid, ev = only_final(out, C1, SVC_EN_AMY.encode())
    assert rid == b"b" and ev.code == tts.TIMEOUT


def test_engine_service_bad_request_echoes_service() -> None:
    rig = Rig()
    rig.worker(W1)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", SVC_EN.encode(), b"a", b"not json"], 0.0)
    assert error_code(out, C1, SVC_EN.encode()) == tts.BAD_REQUEST


# --------------------------------------------------------------------------
# Fallback chains
# --------------------------------------------------------------------------


def _piper_and_xtts(settings: CoreSettings = SETTINGS) -> Rig:
    rig = Rig(settings)
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)
    rig.worker(W2, SVC_XTTS, CAPS_XTTS, now=0.0)
    return rig


def test_parse_step() -> None:
    assert parse_step("piper:en_US-joe-medium") == Step("piper.en_US-joe-medium")
    assert parse_step("xtts") == Step("xtts")
    assert parse_step("xtts:narrator") == Step("xtts", "narrator")
    for bad in ("piper", "piper:", "espeak:x", ""):
        with pytest.raises(ValueError):
            parse_step(bad)


def test_default_chain_prefers_piper_then_xtts() -> None:
    rig = _piper_and_xtts()
    job_key(rig.request(C1, b"a"), W1)
    out = rig.request(C1, b"b")  # piper busy: the next step of the chain
    [req] = requests_to(out, W2)
    assert "voice" not in sent_request(req)


def test_default_chain_orders_piper_services_by_name() -> None:
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)  # joe: idle longest
    rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=1.0)  # amy sorts first
    job_key(rig.request(C1, b"a", now=2.0), W2)


def test_failover_from_piper_to_xtts_when_the_only_piper_worker_dies() -> None:
    rig = _piper_and_xtts()
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4,))
    rig.keepalive(2.0, W2)
    out = rig.core.tick(0.1 + EXPIRY)
    [req] = requests_to(out, W2)
    sent = sent_request(req)
    # The request named no voice: XTTS must not be asked for a Piper voice.
    assert "voice" not in sent
    assert sent["text"] == " Two." and sent["language"] == "en"
    assert sent["format"] == "s16le" and sent["sample_rate"] == 22050  # not XTTS' native 24 kHz
    out = rig.core.on_worker(W2, start(k, b"a", engine="xtts", voice="narrator"), 3.2)
    [(_, _, ev)] = events(out, C1)
    fo = other_json(ev)
    assert fo["engine"] == "xtts" and fo["voice"] == "narrator" and fo["worker"]["id"] == "w2"
    rig.core.on_worker(W2, audio(k, b"a", b"\x00\x00"), 3.3)
    rig.core.on_worker(W2, mark(k, b"a", 5), 3.3)
    [(_, _, ev)] = events(rig.core.on_worker(W2, end(k, b"a"), 3.4), C1)
    assert ev.stats["engines"] == ["piper", "xtts"] and ev.stats["failovers"] == 1  # type: ignore[union-attr]


def test_failover_from_piper_to_xtts_before_audio() -> None:
    rig = _piper_and_xtts()
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_send_failed(True, W1, 0.1)
    [req] = requests_to(out, W2)
    assert req.address == k and "voice" not in sent_request(req) and "sample_rate" not in sent_request(req)


def test_engine_narrows_the_chain() -> None:
    rig = _piper_and_xtts()
    job_key(rig.request(C1, b"a", engine="xtts"), W2)  # piper idle, not asked
    k = job_key(rig.request(C1, b"b", engine="piper"), W1)
    out = rig.core.on_worker(W1, DISCONNECT, 0.1)
    # A piper-only request never fails over to XTTS.
    assert requests_to(out, W2) == [] and [j.key for j in rig.core.waiting] == [k]
    assert error_code(rig.core.tick(0.1 + TIMEOUT), C1) == tts.UNAVAILABLE


def test_voice_narrows_the_chain() -> None:
    rig = _piper_and_xtts()
    out = rig.request(C1, b"a", voice="narrator")
    [req] = requests_to(out, W2)  # piper idle but does not speak it
    assert sent_request(req)["voice"] == "narrator"
    k = job_key(rig.request(C1, b"b", voice="en_US-joe-medium"), W1)
    rig.serve(W2, req.address, b"a", 0.1)  # XTTS idle again
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    # Joe's voice is Piper's only: no failover to XTTS.
    assert requests_to(out, W2) == [] and [j.key for j in rig.core.waiting] == [k]


def test_configured_chain_order_beats_the_default() -> None:
    s = replace(SETTINGS, chains={"en": (parse_step("xtts"), parse_step("piper:en_US-joe-medium"))})
    rig = _piper_and_xtts(s)
    k = job_key(rig.request(C1, b"a"), W2)  # XTTS first, although piper is idle too
    out = rig.core.on_worker(W2, DISCONNECT, 0.1)
    [req] = requests_to(out, W1)
    assert req.address == k


def test_configured_chain_leaves_out_unlisted_services() -> None:
    s = replace(SETTINGS, chains={"en": (Step(SVC_EN_AMY),)})
    rig = Rig(s)
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)
    assert rig.request(C1, b"a") == []  # joe is idle but not in the chain
    out = rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=0.1)
    job_key(out, W2)


def test_chain_step_voice_is_sent_to_the_worker() -> None:
    s = replace(SETTINGS, chains={"en": (Step(SVC_EN), Step("xtts", "narrator"))})
    rig = _piper_and_xtts(s)
    [req] = requests_to(rig.request(C1, b"a"), W1)
    assert "voice" not in sent_request(req)
    [req] = requests_to(rig.request(C1, b"b"), W2)  # piper busy: the XTTS step, as narrator
    assert sent_request(req)["voice"] == "narrator"
    rig2 = _piper_and_xtts(s)
    k = job_key(rig2.request(C1, b"a"), W1)
    out = rig2.core.on_worker(W1, DISCONNECT, 0.1)
    [req] = requests_to(out, W2)
    assert req.address == k and sent_request(req)["voice"] == "narrator"


def test_chain_step_voice_must_match_a_requested_voice() -> None:
    s = replace(SETTINGS, chains={"en": (Step(SVC_EN), Step("xtts", "narrator"))})
    rig = _piper_and_xtts(s)
    job_key(rig.request(C1, b"a", voice="narrator"), W2)
    # "ana" is an XTTS speaker, but the chain's XTTS step speaks as narrator only.
    assert rig.request(C1, b"b", voice="ana") == []


def test_configured_chain_for_a_language_no_worker_speaks() -> None:
    s = replace(SETTINGS, chains={"de": (Step("xtts", "narrator"),)})
    rig = _piper_and_xtts(s)
    out = rig.request(C1, b"a", language="de-AT", text="Hallo.")
    [req] = requests_to(out, W2)
    assert sent_request(req)["voice"] == "narrator"


def test_language_without_speaker_or_chain_follows_the_default_chain() -> None:
    s = replace(SETTINGS, chains={"en": (Step("xtts"), Step(SVC_EN))})
    rig = _piper_and_xtts(s)
    out = rig.request(C1, b"a", language="fr", text="Salut.")
    [req] = requests_to(out, W2)
    assert sent_request(req)["language"] == "en"


def test_xtts_language_routes_without_piper() -> None:
    rig = _piper_and_xtts()
    out = rig.request(C1, b"a", language="pt-BR", text="Olá.")
    [req] = requests_to(out, W2)
    assert sent_request(req)["language"] == "pt"
