"""Invalid worker messages and failover."""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Any

import pytest

from broker import mdp, tts
from broker.core import Action
from tests.core_rig import (
    C1,
    C2,
    CAPS_EN,
    CAPS_EN_AMY,
    CAPS_XTTS,
    DISCONNECT,
    EXPIRY,
    HEARTBEAT,
    Rig,
    SETTINGS,
    SVC_EN,
    SVC_EN_AMY,
    SVC_XTTS,
    TIMEOUT,
    W1,
    W2,
    W3,
    _busy_worker,
    _stream_on,
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
    other_json,
    ready,
    reply,
    requests_to,
    sent_request,
    start,
    start_json,
    to_client,
)

# --------------------------------------------------------------------------
# Invalid worker messages
# --------------------------------------------------------------------------




INVALID_WORKER_MESSAGES = {
    "garbage": lambda k: [b"hello"],
    "empty": lambda k: [],
    "unknown command": lambda k: [b"MDPW02", b"\x09"],
    "heartbeat with body": lambda k: [b"MDPW02", b"\x05", b"x"],
    "second READY": lambda k: ready(),
    "REQUEST from worker": lambda k: [b"MDPW02", b"\x02", k, b"", b"a"],
    "reply for a job it does not hold": lambda k: end(b"other-key", b"a"),
    "reply with wrong request id": lambda k: start(k, b"zzz"),
    "audio before start": lambda k: audio(k, b"a", b"\x00\x00"),
    "malformed start JSON": lambda k: reply(k, b"a", b"start", b"{not json"),
    "start missing fields": lambda k: reply(k, b"a", b"start", b'{"sample_rate": 22050}'),
    "start unknown format": lambda k: start(k, b"a", fmt="mp3"),
    "start non-numeric rate": lambda k: reply(k, b"a", b"start", start_json().replace(b"22050", b'"fast"')),
    "start as FINAL": lambda k: reply(k, b"a", b"start", start_json(), final=True),
    "audio as FINAL": lambda k: reply(k, b"a", b"audio", struct.pack(">I", 0), b"\x00" * 8, final=True),
    "end as PARTIAL": lambda k: reply(k, b"a", b"end", b"{}", final=False),
    "end not JSON": lambda k: reply(k, b"a", b"end", b"]"),
    "error not JSON": lambda k: reply(k, b"a", b"error", b"]"),
    "unknown event as FINAL": lambda k: reply(k, b"a", b"progress", b"x", final=True),
    "only a request id": lambda k: [b"MDPW02", b"\x03", k, b"", b"a"],
    "start JSON is a string naming a field": lambda k: reply(k, b"a", b"start", b'"format"'),
    "start JSON is a list": lambda k: reply(k, b"a", b"start", b"[]"),
    "start worker not an object": lambda k: reply(k, b"a", b"start", start_json().replace(b'{"pid": 123}', b"[1]")),
    "end JSON is a list": lambda k: reply(k, b"a", b"end", b"[]"),
    "end JSON is null": lambda k: reply(k, b"a", b"end", b"null"),
    "error JSON is a list": lambda k: reply(k, b"a", b"error", b"[]"),
    "error JSON is a string": lambda k: reply(k, b"a", b"error", b'"code"'),
}


@pytest.mark.parametrize("make", INVALID_WORKER_MESSAGES.values(), ids=INVALID_WORKER_MESSAGES.keys())
def test_invalid_worker_message_disconnects_before_reply(make) -> None:  # type: ignore[no-untyped-def]
    rig, k = _busy_worker()
    rig.worker(W2, now=0.0)
    rig.request(C2, b"b", now=0.0)  # W2 takes b
    rig.request(C2, b"c", now=0.0)  # waits
    out = rig.core.on_worker(W1, make(k), 0.5)
    assert disconnected(out, W1)
    assert W1 not in rig.core.workers
    # Nothing reached the client (start is held): the job is waiting again, at the front.
    assert to_client(out, C1) == []
    assert [j.rid for j in rig.core.waiting] == [b"a", b"c"]
    assert rig.core.waiting[0].key == k and rig.core.waiting[0].failed == {W1}


@pytest.mark.parametrize("make", INVALID_WORKER_MESSAGES.values(), ids=INVALID_WORKER_MESSAGES.keys())
def test_invalid_worker_message_mid_stream_fails_over(make) -> None:  # type: ignore[no-untyped-def]
    rig, k = _busy_worker()
    rig.core.on_worker(W1, start(k, b"a", fmt="f32le", rate=16000), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00" * 8), 0.2)
    msg = make(k)
    if msg == audio(k, b"a", b"\x00\x00"):
        msg = audio(k, b"a", b"\x00\x00\x00")  # not a whole f32 sample
    out = rig.core.on_worker(W1, msg, 0.5)
    assert disconnected(out, W1)
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []  # no internal error: the job waits for another worker
    [job] = rig.core.waiting
    assert job.key == k and job.failed == {W1} and job.failovers == 1
    assert job.deadline == 0.5 + TIMEOUT
    # The next worker resumes it in the format the client was promised.
    out = rig.worker(W2, now=0.6)
    [req] = requests_to(out, W2)
    sent = sent_request(req)
    assert sent["text"] == "Hello there." and sent["format"] == "f32le" and sent["sample_rate"] == 16000
    out = rig.core.on_worker(W2, start(k, b"a", fmt="f32le", rate=16000), 0.7)
    [(final, _, ev)] = events(out, C1)
    assert not final and tts.event_name(ev) == "failover"  # type: ignore[union-attr]
    assert other_json(ev)["resume_at"] == 0


def test_second_start_is_rejected() -> None:
    rig, k = _busy_worker()
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    out = rig.core.on_worker(W1, start(k, b"a"), 0.2)
    assert disconnected(out, W1) and to_client(out, C1) == []
    assert rig.core.waiting[0].key == k


INVALID_MARKS = {
    "not JSON": lambda k: reply(k, b"a", b"mark", b"{"),
    "no end": lambda k: reply(k, b"a", b"mark", b"{}"),
    "end not an integer": lambda k: mark(k, b"a", "4"),
    "end a float": lambda k: mark(k, b"a", 4.0),
    "end negative": lambda k: mark(k, b"a", -1),
    "end past the text": lambda k: mark(k, b"a", len("Hello there.") + 1),
    "two frames": lambda k: reply(k, b"a", b"mark", b'{"end": 3}', b"x"),
    "as FINAL": lambda k: reply(k, b"a", b"mark", b'{"end": 3}', final=True),
}


@pytest.mark.parametrize("make", INVALID_MARKS.values(), ids=INVALID_MARKS.keys())
def test_invalid_mark_is_a_malformed_reply(make) -> None:  # type: ignore[no-untyped-def]
    rig, k = _busy_worker()
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.2)
    out = rig.core.on_worker(W1, make(k), 0.3)
    assert disconnected(out, W1) and to_client(out, C1) == []
    assert rig.core.waiting[0].key == k


def test_mark_before_start_is_a_malformed_reply() -> None:
    rig, k = _busy_worker()
    out = rig.core.on_worker(W1, mark(k, b"a", 3), 0.1)
    assert disconnected(out, W1) and to_client(out, C1) == []


def test_idle_worker_reply_is_rejected() -> None:
    rig = Rig()
    rig.worker(W1)
    out = rig.core.on_worker(W1, end(b"k", b"a"), 0.1)
    assert disconnected(out, W1)
    assert W1 not in rig.core.workers
    assert not rig.core.services[SVC_EN].idle


def test_unknown_worker_is_told_to_disconnect() -> None:
    rig = Rig()
    assert rig.core.on_worker(W1, HEARTBEAT, 0.0) == [Action(True, W1, mdp.DISCONNECT_FRAMES)]
    assert rig.core.on_worker(W1, end(b"k", b"a"), 0.0) == [Action(True, W1, mdp.DISCONNECT_FRAMES)]
    assert rig.core.on_worker(W1, [b"junk"], 0.0) == [Action(True, W1, mdp.DISCONNECT_FRAMES)]
    # A DISCONNECT from a stranger needs no answer.
    assert rig.core.on_worker(W1, DISCONNECT, 0.0) == []


@pytest.mark.parametrize("service", ["tts", "tts.cancel", "tts.status", "mmi.service", "mmi.x"])
@pytest.mark.parametrize("with_caps", [False, True])
def test_ready_for_reserved_service_is_refused(service: str, with_caps: bool) -> None:
    rig = Rig()
    out = rig.core.on_worker(W1, ready(service, CAPS_EN if with_caps else None), 0.0)
    assert out == [Action(True, W1, mdp.DISCONNECT_FRAMES)]
    assert W1 not in rig.core.workers
    assert service not in rig.core.services


@pytest.mark.parametrize(
    "bad",
    [
        {"languages": "en"},
        {"languages": []},
        {"languages": [1]},
        {"voices": [1, {"a": 1}]},
        {"voices": "joe"},
        {"engine": 5},
        {"engine": ""},
        {"pid": "123"},
    ],
)
def test_ready_with_invalid_tts_caps_is_disconnected(bad: dict[str, Any]) -> None:
    rig = Rig()
    out = rig.core.on_worker(W1, ready("odd", {**CAPS_EN, **bad}), 0.0)
    assert out == [Action(True, W1, mdp.DISCONNECT_FRAMES)]
    assert W1 not in rig.core.workers and "odd" not in rig.core.services


def test_non_string_voices_never_reach_routing() -> None:
    """Once broke the broker: a later request with an unknown voice got no FINAL (unhashable dict)."""
    rig = Rig()
    rig.core.on_worker(W2, ready(SVC_EN_AMY, {**CAPS_EN_AMY, "voices": [1, {"a": 1}]}), 0.0)
    rig.worker(W1)
    assert error_code(rig.request(C1, b"a", voice="nobody"), C1) == tts.BAD_REQUEST


def test_ready_without_tts_protocol_is_a_plain_worker() -> None:
    rig = Rig()
    rig.worker(W2, "odd2", {"protocol": "other", "languages": 5})
    assert not rig.core.services["odd2"].is_tts


def test_ready_of_another_kind_than_the_live_workers_is_refused() -> None:
    rig = Rig()
    rig.worker(W1)
    for capabilities in (None, caps(engine="xtts")):
        out = rig.core.on_worker(W2, ready(SVC_EN, capabilities), 0.0)
        assert out == [Action(True, W2, mdp.DISCONNECT_FRAMES)] and W2 not in rig.core.workers
    assert rig.core.services[SVC_EN].engine == "piper"


# --------------------------------------------------------------------------
# Failover: a failing worker's job moves to the next live worker of its chain
# --------------------------------------------------------------------------




def test_failover_after_audio_resumes_at_the_last_mark() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    text = "One. Two. Three."
    k = job_key(rig.request(C1, b"a", text=text, format="f32le", now=0.0), W1)
    evs = _stream_on(rig, W1, k, b"a", 0.2, fmt="f32le", rate=16000, marks=(4,))
    assert [type(ev).__name__ for _, _, ev in evs] == ["Start", "Audio", "Mark"]
    assert evs[0][2].worker["id"] == "w1"  # type: ignore[union-attr]
    assert other_json(evs[2][2]) == {"segment": 0, "end": 4}
    # W1 gets half way into "Two." and falls silent.
    assert names(rig.core.on_worker(W1, audio(k, b"a", b"\x00" * 8), 0.3), C1) == ["audio"]
    rig.keepalive(2.0, W2)
    assert to_client(rig.core.tick(0.3 + EXPIRY - 0.01), C1) == []
    assert W1 in rig.core.workers
    out = rig.core.tick(0.3 + EXPIRY)
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []
    [req] = requests_to(out, W2)
    assert req.address == k and req.body[0] == b"a"
    sent = sent_request(req)
    # The rest of the text, from the first sentence not fully delivered, as announced.
    assert sent["text"] == text[4:] == " Two. Three."
    assert sent["format"] == "f32le" and sent["sample_rate"] == 16000
    # W2's start is not forwarded: the client gets a failover event instead.
    out = rig.core.on_worker(W2, start(k, b"a", fmt="f32le", rate=16000, engine="piper"), 3.4)
    [(final, rid, ev)] = events(out, C1)
    assert not final and rid == b"a" and tts.event_name(ev) == "failover"
    fo = other_json(ev)
    assert fo == {"engine": "piper", "voice": "en_US-joe-medium", "worker": {"pid": 123, "id": "w2"}, "reason": "heartbeat lost", "resume_at": 4}
    # Sequence numbers go on without a gap; W2's marks are offset by resume_at.
    out = rig.core.on_worker(W2, audio(k, b"a", b"\x00" * 8, 0), 3.5)
    [(_, _, ev)] = events(out, C1)
    assert isinstance(ev, tts.Audio) and ev.seq == 2
    [(_, _, ev)] = events(rig.core.on_worker(W2, mark(k, b"a", 5), 3.6), C1)
    assert other_json(ev) == {"segment": 1, "end": 9}
    rig.core.on_worker(W2, audio(k, b"a", b"\x00" * 8, 1), 3.7)
    [(_, _, ev)] = events(rig.core.on_worker(W2, mark(k, b"a", 12), 3.8), C1)
    assert other_json(ev) == {"segment": 2, "end": 16}
    [(final, _, ev)] = events(rig.core.on_worker(W2, end(k, b"a"), 3.9), C1)
    assert final and isinstance(ev, tts.End)
    assert ev.stats["failovers"] == 1 and ev.stats["segments"] == 3 and ev.stats["chunks"] == 4
    assert ev.stats["samples"] == 8  # four chunks of two f32 samples
    assert ev.stats["engines"] == ["piper", "piper"]
    assert rig.core.counters["failovers"] == 1 and rig.core.counters["completed"] == 1
    assert rig.core.services[SVC_EN].failures == 1
    assert not rig.core.jobs and rig.core.workers[W2] in rig.core.services[SVC_EN].idle


def test_failover_after_audio_without_marks_resends_the_whole_text() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1)
    out = rig.core.on_send_failed(True, W1, 0.2)
    [req] = requests_to(out, W2)
    sent = sent_request(req)
    assert sent["text"] == "One. Two." and sent["format"] == "s16le" and sent["sample_rate"] == 22050
    [(_, _, ev)] = events(rig.core.on_worker(W2, start(k, b"a"), 0.3), C1)
    assert other_json(ev)["resume_at"] == 0 and other_json(ev)["reason"] == "unreachable"


def test_failover_before_audio_is_invisible() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    # W1 announces 16 kHz f32 and dies before any audio.
    assert to_client(rig.core.on_worker(W1, start(k, b"a", fmt="f32le", rate=16000), 0.1), C1) == []
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    assert to_client(out, C1) == []
    [req] = requests_to(out, W2)
    # The same request, untouched: nothing was promised to the client yet.
    assert req.address == k
    assert sent_request(req) == {"text": "One. Two.", "language": "en", "format": "s16le", "speed": 1.0}
    assert to_client(rig.core.on_worker(W2, start(k, b"a"), 0.3), C1) == []
    out = rig.core.on_worker(W2, audio(k, b"a", b"\x00\x00"), 0.4)
    evs = events(out, C1)
    assert names(out, C1) == ["start", "audio"]
    st_ = evs[0][2]
    assert isinstance(st_, tts.Start) and st_.worker["id"] == "w2"
    assert st_.format == "s16le" and st_.sample_rate == 22050
    assert evs[1][2].seq == 0  # type: ignore[union-attr]
    rig.core.on_worker(W2, mark(k, b"a", 9), 0.45)
    [(_, _, ev)] = events(rig.core.on_worker(W2, end(k, b"a"), 0.5), C1)
    assert ev.stats["failovers"] == 1 and ev.stats["segments"] == 1  # type: ignore[union-attr]


def test_failover_before_audio_client_sees_exactly_one_start() -> None:
    rig = Rig()
    for w in (W1, W2, W3):
        rig.worker(w, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    seen: list[Action] = []
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    seen += rig.core.on_worker(W1, DISCONNECT, 0.2)  # → W2
    seen += rig.core.on_worker(W2, start(k, b"a"), 0.3)
    seen += rig.core.on_worker(W2, [b"garbage"], 0.4)  # → W3
    seen += rig.core.on_worker(W3, start(k, b"a"), 0.5)
    seen += rig.core.on_worker(W3, audio(k, b"a", b"\x00\x00"), 0.6)
    seen += rig.core.on_worker(W3, end(k, b"a"), 0.7)
    assert names(seen, C1) == ["start", "audio", "end!"]
    assert events(seen, C1)[0][2].worker["id"] == "w3"  # type: ignore[union-attr]
    assert events(seen, C1)[-1][2].stats["failovers"] == 2  # type: ignore[union-attr]


def test_resumed_start_in_another_format_is_malformed() -> None:
    rig = Rig()
    for w in (W1, W2, W3):
        rig.worker(w, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4,))
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    job_key(out, W2)
    out = rig.core.on_worker(W2, start(k, b"a", rate=16000), 0.3)
    assert disconnected(out, W2) and to_client(out, C1) == []
    [req] = requests_to(out, W3)
    assert sent_request(req)["text"] == " Two." and sent_request(req)["sample_rate"] == 22050
    out = rig.core.on_worker(W3, start(k, b"a", fmt="f32le"), 0.4)
    assert disconnected(out, W3) and to_client(out, C1) == []
    [job] = rig.core.waiting
    assert job.failed == {W1, W2, W3} and job.failovers == 3


def test_resume_with_only_punctuation_left_ends_the_stream() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two. ... !"), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4, 9))
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    # Nothing speakable is left: no new worker, the stream ends now.
    assert requests_to(out, W2) == []
    rid, ev = only_final(out, C1)
    assert rid == b"a" and isinstance(ev, tts.End)
    assert ev.stats["segments"] == 2 and ev.stats["chunks"] == 1
    assert not rig.core.jobs and not rig.core.waiting
    assert rig.core.workers[W2] in rig.core.services[SVC_EN].idle


def test_resume_after_the_last_mark_ends_the_stream_even_without_workers() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4, 9))
    out = rig.core.tick(0.1 + EXPIRY)  # W1 dies before its end
    rid, ev = only_final(out, C1)
    assert isinstance(ev, tts.End) and ev.stats["segments"] == 2


def test_worker_error_fails_over_to_another_worker() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_worker(W1, error(k, b"a", tts.INTERNAL, "engine crashed"), 0.1)
    assert to_client(out, C1) == []
    assert not disconnected(out, W1)
    [req] = requests_to(out, W2)
    assert req.address == k and sent_request(req)["text"] == "Hello there."
    # W1 is not out of rotation: it is idle and takes the next job, but never a again.
    assert W1 in rig.core.workers and rig.core.workers[W1] in rig.core.services[SVC_EN].idle
    assert rig.core.jobs[k].failed == {W1}
    assert rig.core.counters["failovers"] == 1
    assert rig.core.services[SVC_EN].last_failure == "engine error internal: engine crashed"
    k_b = job_key(rig.request(C2, b"b", now=0.2), W1)
    # W2 errs too, and the only other worker already failed a: W2's answer stands.
    out = rig.core.on_worker(W2, error(k, b"a", tts.BAD_REQUEST, "cannot say that"), 0.3)
    assert requests_to(out, W1) == []
    _, ev = only_final(out, C1)
    assert ev == tts.Error(tts.BAD_REQUEST, "cannot say that")
    assert rig.core.counters["failovers"] == 1 and rig.core.counters["errors"] == 1
    assert k not in rig.core.jobs and k_b in rig.core.jobs


def test_worker_error_waits_for_a_busy_worker_that_could_serve_it() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k_a = job_key(rig.request(C1, b"a"), W1)
    k_b = job_key(rig.request(C2, b"b"), W2)
    rig.request(C2, b"c", now=0.05)  # waits
    out = rig.core.on_worker(W1, error(k_a, b"a", tts.INTERNAL, "oops"), 0.1)
    assert to_client(out, C1) == []
    # a goes to the front, and W1 takes c instead (it may not take a again).
    assert [j.rid for j in rig.core.waiting] == [b"a"]
    assert requests_to(out, W1)[0].body[0] == b"c"
    out = rig.serve(W2, k_b, b"b", 0.2)
    [req] = requests_to(out, W2)
    assert req.address == k_a


def test_worker_error_after_audio_resumes_on_another_worker() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4,))
    out = rig.core.on_worker(W1, error(k, b"a", tts.INTERNAL, "CUDA out of memory"), 0.2)
    assert to_client(out, C1) == []
    [req] = requests_to(out, W2)
    assert sent_request(req)["text"] == " Two."
    [(_, _, ev)] = events(rig.core.on_worker(W2, start(k, b"a"), 0.3), C1)
    assert other_json(ev)["reason"] == "engine error internal: CUDA out of memory"
    assert other_json(ev)["resume_at"] == 4


def test_worker_error_after_audio_without_another_worker_ends_the_stream() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4,))
    out = rig.core.on_worker(W1, error(k, b"a", tts.INTERNAL, "boom"), 0.2)
    _, ev = only_final(out, C1)
    assert ev == tts.Error(tts.INTERNAL, "boom")
    assert not rig.core.jobs and not rig.core.waiting


def test_worker_cancelled_error_for_a_cancelled_job_frees_the_worker() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_client(C1, cancel(b"a"), 0.1)
    out = rig.core.on_worker(W1, error(k, b"a", tts.INTERNAL, "whatever"), 0.2)
    # No failover for a cancelled job, whatever its worker's last word.
    assert out == [] and not rig.core.jobs and not rig.core.waiting
    assert rig.core.counters["failovers"] == 0


def test_stuck_worker_is_disconnected_and_its_job_fails_over() -> None:
    rig = Rig(replace(SETTINGS, stuck_timeout_s=2.0))
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.0), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.5)
    # W1 keeps heartbeating (it is alive) but produces nothing more.
    for t in (1.0, 2.0, 2.5):
        rig.keepalive(t)
        out = rig.core.tick(t)
        assert not disconnected(out, W1) and requests_to(out, W2) == []
    rig.keepalive(2.5)
    assert not disconnected(rig.core.tick(2.5), W1)  # exactly stuck_timeout: not yet
    out = rig.core.tick(2.51)
    assert disconnected(out, W1)
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []
    [req] = requests_to(out, W2)
    assert req.address == k
    assert "stuck" in rig.core.services[SVC_EN].last_failure
    assert rig.core.counters["failovers"] == 1


def test_stuck_timer_restarts_with_every_reply() -> None:
    rig = Rig(replace(SETTINGS, stuck_timeout_s=2.0))
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.0), W1)
    rig.core.on_worker(W1, start(k, b"a"), 1.5)
    for i, t in enumerate((3.0, 4.5, 6.0)):
        rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00", i), t)
        assert not disconnected(rig.core.tick(t + 1.9), W1)
    assert W1 in rig.core.workers


def test_idle_worker_is_never_stuck() -> None:
    rig = Rig(replace(SETTINGS, stuck_timeout_s=2.0))
    rig.worker(W1, now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        rig.keepalive(t)
        assert not disconnected(rig.core.tick(t), W1)


def test_failed_over_job_reaches_a_worker_that_registers_with_a_new_identity() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    _stream_on(rig, W1, k, b"a", 0.1, marks=(4,))
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)  # the worker restarts...
    assert out == [] and [j.key for j in rig.core.waiting] == [k]
    # ...under its old identity it is not given the job it failed...
    assert requests_to(rig.worker(W1, now=0.3), W1) == []
    assert [j.key for j in rig.core.waiting] == [k]
    # ...but it is in rotation for everything else.
    job_key(rig.request(C2, b"b", now=0.4), W1)
    # A fresh process (new identity) takes the failed-over job.
    out = rig.worker(W3, now=0.5)
    [req] = requests_to(out, W3)
    assert req.address == k and sent_request(req)["text"] == " Two."


def test_failover_is_not_sticky() -> None:
    """After a failover to XTTS, the recovered Piper worker serves the next request."""
    rig = Rig()
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.0)
    rig.worker(W2, SVC_XTTS, CAPS_XTTS, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_worker(W1, DISCONNECT, 0.1)
    job_key(out, W2)
    rig.serve(W2, k, b"a", 0.2)
    rig.worker(W3, SVC_EN, CAPS_EN, now=0.3)  # piper is back, as a new process
    # Both are idle; the chain puts piper first again.
    job_key(rig.request(C1, b"b", now=0.4), W3)


def test_all_workers_dead_job_waits_then_ends_unavailable() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two.", now=0.0), W1)
    _stream_on(rig, W1, k, b"a", 1.0, marks=(4,))
    out = rig.core.tick(1.0 + EXPIRY)  # W1 dies at 4.0
    assert to_client(out, C1) == []
    [job] = rig.core.waiting
    assert job.deadline == 1.0 + EXPIRY + TIMEOUT  # counted from the failover, not from the request
    assert to_client(rig.core.tick(1.0 + EXPIRY + TIMEOUT - 0.01), C1) == []
    out = rig.core.tick(1.0 + EXPIRY + TIMEOUT)
    assert error_code(out, C1) == tts.UNAVAILABLE
    assert not rig.core.jobs and not rig.core.waiting and not rig.core.by_client
    assert rig.core.counters["expired"] == 1


def test_failed_over_job_times_out_while_the_other_worker_stays_busy() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    job_key(rig.request(C2, b"b"), W2)
    rig.core.on_worker(W1, DISCONNECT, 1.0)
    for t in (2.0, 4.0, 6.0, 8.0, 10.0, 10.99):
        rig.keepalive(t)
        assert to_client(rig.core.tick(t), C1) == []
    rig.keepalive(11.0)
    assert error_code(rig.core.tick(11.0), C1) == tts.TIMEOUT
    assert k not in rig.core.jobs


def test_a_failed_over_job_stays_ahead_of_a_later_request_of_higher_priority() -> None:
    rig = Rig()
    keys = caps(request_keys=sorted(tts.SynthesisRequest.model_fields))
    rig.worker(W1, capabilities=keys, now=0.0)
    rig.worker(W2, capabilities=keys, now=0.0)
    job_key(rig.request(C1, b"a"), W1)
    job_key(rig.request(C1, b"b"), W2)
    rig.request(C2, b"c", now=0.1)
    rig.core.on_worker(W1, DISCONNECT, 0.3)
    rig.request(C2, b"urgent", now=0.4, priority=10)
    assert [j.rid for j in rig.core.waiting] == [b"a", b"urgent", b"c"]


def test_failed_over_job_keeps_its_place_at_the_front_of_the_queue() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k_a = job_key(rig.request(C1, b"a"), W1)
    k_b = job_key(rig.request(C1, b"b"), W2)
    rig.request(C2, b"c", now=0.1)
    rig.request(C2, b"d", now=0.1)
    rig.core.on_worker(W1, start(k_a, b"a"), 0.2)
    rig.core.on_worker(W1, audio(k_a, b"a", b"\x00\x00"), 0.2)
    rig.core.on_worker(W1, DISCONNECT, 0.3)
    assert [j.rid for j in rig.core.waiting] == [b"a", b"c", b"d"]
    out = rig.serve(W2, k_b, b"b", 0.4)
    [req] = requests_to(out, W2)
    assert req.address == k_a
