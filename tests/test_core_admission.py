"""What clients and workers may send: validation, limits, hostile input, hardening, forward compatibility."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from broker import mdp, tts
from broker.core import MAX_EMPTY_SERVICES, MAX_STATUS_SERVICES, MAX_STATUS_WORKERS, Action, BrokerCore
from broker.routing import Step
from tests.core_rig import (
    C1,
    C2,
    CAPS_PT,
    DISCONNECT,
    EXPIRY,
    Rig,
    SETTINGS,
    SVC_EN,
    SVC_PT,
    SVC_XTTS,
    TIMEOUT,
    W1,
    W2,
    W3,
    _busy_worker,
    audio,
    cancel,
    caps,
    disconnected,
    end,
    error,
    error_code,
    events,
    job_key,
    mark,
    names,
    only_final,
    ready,
    reply,
    requests_to,
    sent_request,
    start,
    start_json,
    to_client,
    tts_request,
)

# --------------------------------------------------------------------------
# Regressions: each of these was a bug once
# --------------------------------------------------------------------------


def test_unsolicited_cancelled_error_is_relayed() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_worker(W1, error(k, b"a", tts.CANCELLED, "worker shutting down"), 0.1)
    _, ev = only_final(out, C1)
    assert isinstance(ev, tts.Error) and ev.code == tts.CANCELLED
    assert not rig.core.jobs and rig.core.workers[W1] in rig.core.services[SVC_EN].idle


def test_mark_that_does_not_advance_is_malformed() -> None:
    rig, k = _busy_worker()
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.1)
    assert not disconnected(rig.core.on_worker(W1, mark(k, b"a", 6), 0.2), W1)
    out = rig.core.on_worker(W1, mark(k, b"a", 6), 0.3)
    assert disconnected(out, W1) and to_client(out, C1) == []


def test_malformed_first_mark_does_not_lose_the_held_start() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    rig.core.on_worker(W1, start(k, b"a", rate=16000), 0.1)
    out = rig.core.on_worker(W1, mark(k, b"a", 99), 0.2)  # past the text: malformed
    assert disconnected(out, W1) and to_client(out, C1) == []
    # Nothing was promised to the client: W2 gets the request as sent...
    [req] = requests_to(out, W2)
    assert "sample_rate" not in sent_request(req)
    # ...and the client gets W2's start, not a failover event without any start.
    rig.core.on_worker(W2, start(k, b"a"), 0.3)
    out = rig.core.on_worker(W2, audio(k, b"a", b"\x00\x00"), 0.4)
    assert names(out, C1) == ["start", "audio"]


def test_requeued_opaque_job_gets_a_fresh_deadline() -> None:
    rig = Rig()
    rig.core.on_worker(W1, [b"MDPW02", b"\x01", b"echo"], 0.0)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"hi"], 0.0)
    requests_to(out, W1)
    rig.core.on_worker(W1, DISCONNECT, 9.0)  # worked on it for 9 s, then died before replying
    [job] = rig.core.waiting
    assert job.deadline == 9.0 + TIMEOUT
    assert to_client(rig.core.tick(10.0), C1) == []


@pytest.mark.parametrize("rate", [0, -5, 96000])
def test_resume_request_is_always_a_valid_request(rate: int) -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    rig.core.on_worker(W1, start(k, b"a", rate=rate), 0.1)
    out = rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.2)
    if not disconnected(out, W1):  # either the start is refused as malformed...
        out = rig.core.on_worker(W1, DISCONNECT, 0.3)
    # ...or whatever the next worker is asked is a request the schema accepts.
    for req in requests_to(out, W2):
        tts.parse_request(req.body[1], SETTINGS.max_text_chars)


def test_tick_does_not_hand_a_job_to_a_worker_that_is_dead_too() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)  # both fall silent
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.tick(EXPIRY)
    assert not rig.core.workers
    assert requests_to(out, W2) == []
    assert rig.core.waiting[0].key == k
    assert rig.core.counters["failovers"] == 1 and rig.core.waiting[0].failed == {W1}


# --------------------------------------------------------------------------
# Client-side validation and limits
# --------------------------------------------------------------------------


def test_invalid_client_messages_are_dropped() -> None:
    rig = Rig()
    rig.worker(W1)
    for frames in ([b"junk"], [], [b"MDPC02", b"\x02", b"tts", b"a"], [b"MDPC02", b"\x01", b"tts"], [b"MDPC02", b"\x01", b"t s", b"a", b"{}"]):
        assert rig.core.on_client(C1, frames, 0.0) == []
    assert not rig.core.jobs


@pytest.mark.parametrize(
    "body, code",
    [
        ([b"a", b"not json"], tts.BAD_REQUEST),
        ([b"a", b'{"text": ""}'], tts.BAD_REQUEST),
        ([b"a", b'{"text": "hi", "bogus": 1}'], tts.BAD_REQUEST),
        ([b"a"], tts.BAD_REQUEST),
        ([b"a", b'{"text": "hi"}', b"extra"], tts.BAD_REQUEST),
        ([b"a", json.dumps({"text": "x" * 501}).encode()], tts.TOO_LARGE),
    ],
)
def test_bad_tts_request_gets_final_error(body: list[bytes], code: str) -> None:
    rig = Rig()
    rig.worker(W1)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"tts", *body], 0.0)
    rid, ev = only_final(out, C1)
    assert rid == b"a" and isinstance(ev, tts.Error) and ev.code == code
    assert not rig.core.jobs and not rig.core.workers[W1].jobs


@pytest.mark.parametrize("rid", [b"", b"x" * 256])
def test_request_with_invalid_id_is_dropped(rid: bytes) -> None:
    rig = Rig()
    rig.worker(W1)
    assert rig.core.on_client(C1, tts_request(rid), 0.0) == []
    assert not rig.core.jobs


def test_reused_request_id_ends_the_stream_in_flight_with_one_final() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.05)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00" * 4), 0.05)
    out = rig.request(C1, b"a", now=0.1)
    # Exactly one FINAL for the id, the stream in flight is ended, its worker told to stop,
    # and the duplicate is not dispatched.
    assert names(out, C1) == ["error!"] and error_code(out, C1) == tts.BAD_REQUEST
    assert [r.body for r in requests_to(out, W1)] == [[tts.WORKER_CANCEL]]
    assert (C1, b"a") not in rig.core.by_client and not rig.core.jobs
    # Nothing after the FINAL: the old worker's remaining audio and end are dropped.
    later = rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00" * 4, 1), 0.2)
    later += rig.core.on_worker(W1, end(k, b"a"), 0.2)
    assert to_client(later, C1) == []
    c = rig.core.counters
    assert (c["requests"], c["errors"], c["completed"]) == (1, 1, 0)
    # Another client may use the same id, and once finished the id may be reused.
    assert rig.request(C2, b"a", now=0.3) != [] and (C2, b"a") in rig.core.by_client
    assert (C1, b"a") not in rig.core.by_client
    rig.request(C1, b"a", now=0.4)
    assert (C1, b"a") in rig.core.by_client


def test_per_client_inflight_limit() -> None:
    rig = Rig(replace(SETTINGS, max_inflight_per_client=2))
    rig.worker(W1)
    job_key(rig.request(C1, b"a"), W1)
    assert rig.request(C1, b"b") == []
    assert error_code(rig.request(C1, b"c"), C1) == tts.OVERLOADED
    # Other clients are not affected.
    assert rig.request(C2, b"c") == []
    # A cancel frees a slot.
    rig.core.on_client(C1, cancel(b"b"), 0.1)
    assert rig.request(C1, b"d", now=0.2) == []


def test_max_queue_is_global() -> None:
    rig = Rig(replace(SETTINGS, max_queue=2))
    rig.worker(W1)
    job_key(rig.request(C1, b"a"), W1)
    assert rig.request(C1, b"b") == []
    assert rig.request(C2, b"c") == []
    assert error_code(rig.request(C2, b"d"), C2) == tts.OVERLOADED
    assert len(rig.core.waiting) == 2
    assert (C2, b"d") not in rig.core.by_client


def test_opaque_request_overloaded() -> None:
    rig = Rig(replace(SETTINGS, max_queue=1))
    rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"1"], 0.0)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"2"], 0.0)
    [r] = to_client(out, C1)
    assert r.final and r.body[0] == b"error" and json.loads(r.body[1])["code"] == tts.OVERLOADED


def test_full_queue_does_not_refuse_a_request_an_idle_worker_can_take() -> None:
    rig = Rig(replace(SETTINGS, max_queue=1))
    rig.core.on_client(C2, [b"MDPC02", b"\x01", b"echo", b"x"], 0.0)  # waits: no echo worker
    rig.worker(W1)  # idle TTS worker
    out = rig.request(C1, b"a", now=0.1)
    assert to_client(out, C1) == []
    job_key(out, W1)


def test_requeue_after_worker_loss_keeps_the_job_even_over_max_queue() -> None:
    """max_queue bounds admissions; a job already admitted is never dropped to honour it."""
    rig = Rig(replace(SETTINGS, max_queue=1))
    rig.worker(W1)
    rig.request(C1, b"a")  # runs on W1
    rig.request(C1, b"b")  # fills the queue
    rig.core.on_worker(W1, DISCONNECT, 0.1)  # a comes back before any reply
    assert [j.rid for j in rig.core.waiting] == [b"a", b"b"]
    # ...but no new request is admitted while it is over the bound.
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"tts", b"c", b'{"text": "x"}'], 0.2)
    assert any(b"overloaded" in f for a in out for f in a.frames)


# --------------------------------------------------------------------------
# Hostile input must never make the core raise
# --------------------------------------------------------------------------

CRASHING_REPLIES = {
    "start without JSON frame (IndexError)": lambda k: reply(k, b"a", b"start"),
    "end without JSON frame (IndexError)": lambda k: reply(k, b"a", b"end"),
    "error without JSON frame (IndexError)": lambda k: reply(k, b"a", b"error"),
    "start sample_rate Infinity (OverflowError)": lambda k: reply(k, b"a", b"start", start_json().replace(b"22050", b"1e999")),
}


@pytest.mark.parametrize("make", CRASHING_REPLIES.values(), ids=CRASHING_REPLIES.keys())
def test_malformed_reply_does_not_raise(make) -> None:  # type: ignore[no-untyped-def]
    rig, k = _busy_worker()
    out = rig.core.on_worker(W1, make(k), 0.5)
    assert disconnected(out, W1)


def test_deeply_nested_ready_does_not_raise() -> None:
    out = Rig().core.on_worker(W1, [b"MDPW02", b"\x01", b"svc", b"[" * 100_000], 0.0)
    assert out == [Action(True, W1, mdp.DISCONNECT_FRAMES)]


def test_deeply_nested_request_does_not_raise() -> None:
    out = Rig().core.on_client(C1, [b"MDPC02", b"\x01", b"tts", b"a", b"[" * 100_000], 0.0)
    assert error_code(out, C1) == tts.BAD_REQUEST


# --------------------------------------------------------------------------
# Hardening: what probing the wire found (issue 11)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["text", "voice"])
def test_lone_surrogate_is_refused_at_admission(field: str) -> None:
    rig = Rig()
    rig.worker(W1)
    body = {"text": "hello", field: "\ud800 hello"}
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"tts", b"a", json.dumps(body).encode()], 0.0)
    assert error_code(out, C1) == tts.BAD_REQUEST and requests_to(out, W1) == []
    [(_, _, ev)] = events(out, C1)
    assert field in ev.message and "surrogate" in ev.message  # type: ignore[union-attr]


def test_request_the_broker_cannot_forward_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception while handing a job to a worker ends that job with ``internal``, nothing else."""
    rig = Rig()
    rig.worker(W1)
    real = BrokerCore._request_for

    def explode(self: BrokerCore, job: Any, worker: Any, step: Step) -> bytes:
        if job.rid == b"bad":
            raise RuntimeError("cannot encode")
        return real(self, job, worker, step)

    monkeypatch.setattr(BrokerCore, "_request_for", explode)
    out = rig.request(C1, b"bad")
    assert error_code(out, C1) == tts.INTERNAL and requests_to(out, W1) == []
    assert W1 in rig.core.workers and rig.core.workers[W1] in rig.core.services[SVC_EN].idle
    k = job_key(rig.request(C1, b"good", now=0.1), W1)
    assert names(rig.serve(W1, k, b"good", now=0.2), C1) == ["end!"]
    assert rig.core.counters["errors"] == 1 and rig.core.counters["completed"] == 1


@pytest.mark.parametrize("code", [c for c in range(0x20) if chr(c) not in "\t\n\r"] + [0x7F, 0x85, 0x9F])
def test_control_characters_are_cleaned_at_admission(code: int) -> None:
    rig = Rig()
    rig.worker(W1)
    text = f"Hello{chr(code)}there."
    [req] = requests_to(rig.request(C1, b"a", text=text), W1)
    sent = json.loads(req.body[1])["text"]
    assert sent == "Hello there." and len(sent) == len(text)


def test_only_control_characters_is_empty_text() -> None:
    rig = Rig()
    rig.worker(W1)
    assert error_code(rig.request(C1, b"a", text="\x00\x01\x7f"), C1) == tts.BAD_REQUEST


def test_a_departed_workers_languages_leave_with_it() -> None:
    """One odd READY must not redefine a service for good (it used to replace its capabilities)."""
    rig = Rig()
    rig.worker(W1)
    rig.core.on_worker(W2, ready(SVC_EN, caps("zz")), 0.0)
    assert rig.core.services[SVC_EN].languages == ("en", "zz")
    rig.core.on_worker(W2, DISCONNECT, 0.1)
    assert rig.core.services[SVC_EN].languages == ("en",)
    assert requests_to(rig.request(C1, b"a", now=0.2), W1)


def test_each_worker_gets_only_what_it_speaks() -> None:
    rig = Rig()
    rig.worker(W1, SVC_XTTS, caps("pt", "ana", engine="xtts"))
    rig.worker(W2, SVC_XTTS, caps("en", "narrator", engine="xtts"))
    out = rig.request(C1, b"a", language="en")
    assert requests_to(out, W2) and not requests_to(out, W1)
    out = rig.request(C1, b"b", voice="ana", language="pt")
    assert requests_to(out, W1)


def test_a_language_whose_only_engine_left_waits_for_a_restart_then_falls_back() -> None:
    """Decided: a restart gets ``service_grace_s``; after it the language routes as if never served."""
    rig = Rig()
    rig.worker(W1)
    rig.worker(W2, SVC_PT, CAPS_PT)
    rig.core.on_worker(W2, DISCONNECT, 0.0)
    # Within the grace period a pt request waits for the pt voice ...
    assert rig.request(C1, b"a", language="pt-BR", now=1.0) == []
    assert len(rig.core.waiting) == 1
    # ... which comes back and takes it.
    out = rig.worker(W3, SVC_PT, CAPS_PT, now=2.0)
    assert requests_to(out, W3)
    rig.core.on_worker(W3, DISCONNECT, 2.5)
    rig.keepalive(2.5)
    assert rig.request(C1, b"b", language="pt-BR", now=3.0) == []
    grace = rig.core.s.service_grace_s
    rig.keepalive(2.5 + grace - 0.5)
    assert not requests_to(rig.core.tick(2.5 + grace - 0.1), W1)
    rig.keepalive(2.5 + grace)
    out = rig.core.tick(2.5 + grace + 0.01)
    # Forgotten: the waiting request goes to the default language's voice, as before pt ever registered.
    [req] = requests_to(out, W1)
    assert json.loads(req.body[1])["language"] == "en"
    assert SVC_PT not in rig.core.services


def test_cycling_readys_do_not_grow_the_service_table() -> None:
    rig = Rig()
    for i in range(5000):
        rig.core.on_worker(W1, ready(f"svc{i}", None), i * 1e-4)
        rig.core.on_worker(W1, DISCONNECT, i * 1e-4)
    assert len(rig.core.services) <= MAX_EMPTY_SERVICES
    st_ = rig.core.status()
    assert len(st_["services"]) <= MAX_EMPTY_SERVICES and len(json.dumps(st_)) < 100_000


def test_status_is_bounded_and_lists_engine_services_first() -> None:
    rig = Rig()
    for i in range(MAX_STATUS_SERVICES + 10):
        rig.worker(b"opaque%d" % i, f"svc{i}", None)
    rig.worker(W1)
    for i in range(MAX_STATUS_WORKERS + 5):
        rig.worker(b"en%d" % i)
    st_ = rig.core.status()
    assert len(st_["services"]) == MAX_STATUS_SERVICES and st_["service_count"] == MAX_STATUS_SERVICES + 11
    en = st_["services"][SVC_EN]
    assert len(en["workers"]) == MAX_STATUS_WORKERS and en["worker_count"] == MAX_STATUS_WORKERS + 6


def test_public_worker_id_is_not_the_routing_id() -> None:
    rig = Rig()
    ident = b"piper.en_US-joe-medium/4242/abc/1"
    rig.worker(ident)
    [w] = rig.core.status()["services"][SVC_EN]["workers"]
    assert w["id"] != ident.decode() and ident.hex() not in w["id"]


def test_outcomes_are_counted_once_each() -> None:
    rig = Rig(replace(SETTINGS, max_inflight_per_client=3))
    rig.worker(W1)
    rig.worker(W2, "echo", None)
    k = job_key(rig.request(C1, b"done"), W1)
    rig.serve(W1, k, b"done", 0.1)
    rig.request(C1, b"bad", text="")  # refused: errors
    rig.request(C1, b"q1", now=0.2)  # waits
    rig.core.on_client(C1, cancel(b"q1"), 0.3)  # cancelled, once
    rig.request(C2, b"q2", now=0.4)  # waits, then expires
    rig.keepalive(TIMEOUT)
    rig.core.tick(TIMEOUT + 0.5)
    # Opaque jobs count too: one answered, one whose client vanished.
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"x"], TIMEOUT + 1)
    key = requests_to(out, W2)[0].address
    rig.core.on_worker(W2, [b"MDPW02", b"\x04", key, b"", b"y"], TIMEOUT + 1)
    out = rig.core.on_client(C2, [b"MDPC02", b"\x01", b"echo", b"x"], TIMEOUT + 1)
    rig.core.on_send_failed(False, C2, TIMEOUT + 1)
    c = rig.core.counters
    assert not rig.core.jobs
    assert (c["requests"], c["completed"], c["errors"], c["cancelled"], c["expired"]) == (6, 2, 1, 2, 1)


# --------------------------------------------------------------------------
# Forward compatibility: a newer broker and an older worker
# --------------------------------------------------------------------------


OLD_KEYS = ["text", "language", "voice", "engine", "format", "sample_rate", "chunk_ms"]
"""A worker from before ``speed`` and ``stream`` existed."""


def test_older_worker_gets_only_the_keys_it_understands() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=caps(request_keys=OLD_KEYS))
    [req] = requests_to(rig.request(C1, b"a"), W1)
    sent = json.loads(req.body[1])
    assert set(sent) <= set(OLD_KEYS) and "speed" not in sent and sent["text"] == "Hello there."


def test_request_needing_a_key_the_worker_lacks_is_refused_by_name() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=caps(request_keys=OLD_KEYS))
    out = rig.request(C1, b"a", speed=1.5)
    assert error_code(out, C1) == tts.BAD_REQUEST and requests_to(out, W1) == []
    [(_, _, ev)] = events(out, C1)
    assert "speed" in ev.message  # type: ignore[union-attr]
    assert rig.core.workers[W1] in rig.core.services[SVC_EN].idle
    # The id is free again: the same id without the key is served.
    assert (C1, b"a") not in rig.core.by_client
    assert requests_to(rig.request(C1, b"a"), W1)


def test_worker_that_announces_no_keys_gets_the_base_set() -> None:
    rig = Rig()
    rig.worker(W1)
    [req] = requests_to(rig.request(C1, b"a", speed=1.5), W1)
    assert json.loads(req.body[1])["speed"] == 1.5
