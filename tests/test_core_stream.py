"""Stream rewriting, cancel and lost clients."""

from __future__ import annotations

import pytest

from broker import mdp, tts
from tests.core_rig import (
    C1,
    C2,
    DISCONNECT,
    EXPIRY,
    Rig,
    SVC_EN,
    W1,
    W2,
    audio,
    cancel,
    disconnected,
    end,
    error,
    error_code,
    events,
    job_key,
    mark,
    names,
    only_final,
    reply,
    requests_to,
    start,
    to_client,
    to_worker,
)

# --------------------------------------------------------------------------
# Stream rewriting
# --------------------------------------------------------------------------


def test_broker_rewrites_sequence_and_injects_worker_id() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", now=1.0), W1)
    # start is held until the first audio chunk.
    assert to_client(rig.core.on_worker(W1, start(k, b"a", model="tiny"), 1.1), C1) == []
    seqs = []
    for t, worker_seq in zip((1.25, 1.3, 1.4), (7, 7, 1000)):
        out = rig.core.on_worker(W1, audio(k, b"a", b"\x01\x00" * 5, worker_seq), t)
        evs = events(out, C1)
        if t == 1.25:
            (final, rid, ev), *evs = evs
            assert not final and rid == b"a"
            assert isinstance(ev, tts.Start)
            assert ev.worker == {"pid": 123, "id": "w1"}
            assert ev.sample_rate == 22050 and ev.format == "s16le" and ev.engine == "piper"
            assert ev.extra == {"model": "tiny"}
        [(final, rid, ev)] = evs
        assert not final and isinstance(ev, tts.Audio)
        assert ev.pcm == b"\x01\x00" * 5
        seqs.append(ev.seq)
    assert seqs == [0, 1, 2]


def test_start_is_held_until_the_first_audio() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    assert to_client(rig.core.on_worker(W1, start(k, b"a"), 0.1), C1) == []
    out = rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.2)
    # Both PARTIALs, start immediately before the audio.
    assert names(out, C1) == ["start", "audio"]
    assert [a.peer for a in out] == [C1, C1]
    assert names(rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.3), C1) == ["audio"]


@pytest.mark.parametrize(
    "first, expected",
    [
        (lambda k: reply(k, b"a", b"progress", b"x"), ["start", "progress"]),
        (lambda k: mark(k, b"a", 3), ["start", "mark"]),
        (lambda k: end(k, b"a"), ["start", "end!"]),
    ],
    ids=["unknown event", "mark", "end"],
)
def test_held_start_is_released_before_the_first_other_event(first, expected) -> None:  # type: ignore[no-untyped-def]
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a", text="Hi. Bye."), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    out = rig.core.on_worker(W1, first(k), 0.2)
    assert names(out, C1) == expected
    # Released once only.
    if not expected[-1].endswith("!"):
        assert names(rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.3), C1) == ["audio"]


def test_end_gains_broker_statistics() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", now=1.0), W1)
    rig.core.on_worker(W1, start(k, b"a", rate=16000), 1.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00" * 800), 1.25)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00" * 800), 1.3)
    out = rig.core.on_worker(W1, end(k, b"a", {"engine_ms": 5}), 1.5)
    [(final, rid, ev)] = events(out, C1)
    assert final and rid == b"a" and isinstance(ev, tts.End)
    assert ev.stats["engine_ms"] == 5  # the worker's own keys survive
    assert ev.stats["samples"] == 1600
    assert ev.stats["audio_s"] == 0.1
    assert ev.stats["ttfa_ms"] == pytest.approx(250.0)
    assert ev.stats["engines"] == ["piper"]
    assert ev.stats["chunks"] == 2
    assert ev.stats["segments"] == 0 and ev.stats["failovers"] == 0
    # The worker is free again and the job is gone.
    assert not rig.core.workers[W1].jobs
    assert rig.core.services[SVC_EN].idle[0].identity == W1
    assert not rig.core.jobs and not rig.core.by_client and not rig.core.inflight


def test_f32_samples_counted_with_four_byte_width() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a", format="f32le"), W1)
    rig.core.on_worker(W1, start(k, b"a", fmt="f32le"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00" * 40), 0.2)
    [(_, _, ev)] = events(rig.core.on_worker(W1, end(k, b"a"), 0.3), C1)
    assert ev.stats["samples"] == 10


def test_end_without_audio_has_no_audio_stats() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    [(_, _, st_), (_, _, ev)] = events(rig.core.on_worker(W1, end(k, b"a"), 0.3), C1)
    assert isinstance(st_, tts.Start) and isinstance(ev, tts.End)
    assert ev.stats["samples"] == 0 and ev.stats["audio_s"] == 0.0 and ev.stats["chunks"] == 0


def test_end_without_audio_has_null_ttfa() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    [_, (_, _, ev)] = events(rig.core.on_worker(W1, end(k, b"a"), 0.3), C1)
    assert ev.stats["ttfa_ms"] is None


def test_ttfa_is_measured_at_the_first_audio_chunk() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a", now=0.0, text="Hi. Bye."), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, mark(k, b"a", 3), 0.2)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.5)
    [(_, _, ev)] = events(rig.core.on_worker(W1, end(k, b"a"), 0.6), C1)
    assert ev.stats["ttfa_ms"] == pytest.approx(500.0)


def test_worker_error_event_is_relayed_as_final_when_no_other_worker_exists() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_worker(W1, error(k, b"a", tts.BAD_REQUEST, "no such voice"), 0.2)
    _, ev = only_final(out, C1)
    assert ev == tts.Error(tts.BAD_REQUEST, "no such voice")
    assert not rig.core.workers[W1].jobs
    assert not disconnected(out, W1)
    assert not rig.core.jobs and not rig.core.waiting
    # An erring worker stays in rotation for other jobs.
    assert rig.core.workers[W1] in rig.core.services[SVC_EN].idle
    job_key(rig.request(C1, b"b", now=0.3), W1)


def test_unknown_partial_event_after_start_is_relayed() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.15)
    out = rig.core.on_worker(W1, reply(k, b"a", b"progress", b"50%"), 0.2)
    [(final, rid, ev)] = events(out, C1)
    assert not final and ev == tts.Other("progress", [b"50%"])


def test_audio_after_unknown_event_but_before_start_is_rejected() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_worker(W1, reply(k, b"a", b"progress", b"x"), 0.1)
    # An event before start is itself malformed now: the worker goes, the job waits.
    assert disconnected(out, W1) and to_client(out, C1) == []
    assert rig.core.waiting[0].key == k
    out = rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.2)
    # The client must never see audio before the start event that says how to play it.
    assert not any(isinstance(ev, tts.Audio) for _, _, ev in events(out, C1))
    assert disconnected(out, W1)


# --------------------------------------------------------------------------
# Cancel and lost clients
# --------------------------------------------------------------------------


def test_cancel_running_job() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a", now=0.0), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.2)
    out = rig.core.on_client(C1, cancel(b"a"), 0.3)
    replies = to_client(out, C1)
    ack = [r for r in replies if r.service == "tts.cancel"]
    stream = [r for r in replies if r.service == "tts"]
    assert len(ack) == 1 and ack[0].final and ack[0].body == [b"a", b"cancelled"]
    assert len(stream) == 1 and stream[0].final
    assert tts.decode_event(stream[0].body) == (b"a", tts.Error(tts.CANCELLED, "cancelled by the client"))
    assert requests_to(out, W1) == [mdp.WorkerRequest(k, [b"tts.cancel"])]
    # A new request cannot go to W1 while it may still be speaking.
    assert rig.request(C2, b"b", now=0.4) == []
    # Late PARTIALs of the cancelled job are dropped without penalty.
    assert rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00", 1), 0.5) == []
    assert rig.core.on_worker(W1, reply(k, b"a", b"progress"), 0.55) == []
    assert W1 in rig.core.workers
    # Its FINAL (whatever it is) frees the worker, which gets the waiting job.
    out = rig.core.on_worker(W1, error(k, b"a", tts.CANCELLED, "stopped"), 0.6)
    assert to_client(out, C1) == []
    [req] = requests_to(out, W1)
    assert req.body[0] == b"b"


def test_cancel_before_any_reply_keeps_worker_until_final() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    out = rig.core.on_client(C1, cancel(b"a"), 0.1)
    assert error_code([a for a in out if a.frames[2] == b"tts"], C1) == tts.CANCELLED
    assert rig.core.workers[W1].jobs  # still attached until FINAL
    assert rig.core.workers[W1] not in rig.core.services[SVC_EN].idle
    out = rig.core.on_worker(W1, end(k, b"a"), 0.2)
    assert out == []
    assert list(rig.core.services[SVC_EN].idle) == [rig.core.workers[W1]]


def test_cancelled_job_is_not_requeued_when_its_worker_dies() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.request(C1, b"a")
    rig.core.on_client(C1, cancel(b"a"), 0.1)
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    assert out == []
    assert not rig.core.waiting and not rig.core.jobs


def test_cancelled_job_mid_stream_is_simply_finished_when_its_worker_dies() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", text="One. Two."), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.1)
    rig.core.on_worker(W1, mark(k, b"a", 4), 0.1)
    rig.core.on_client(C1, cancel(b"a"), 0.2)
    rig.keepalive(2.0, W2)
    out = rig.core.tick(0.1 + EXPIRY)  # W1 dies while its job is being cancelled
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []  # the client already had its cancelled FINAL
    assert requests_to(out, W2) == []
    assert not rig.core.waiting and not rig.core.jobs
    assert rig.core.counters["failovers"] == 0


def test_cancel_waiting_job_removes_it() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.request(C1, b"b", now=0.1)
    out = rig.core.on_client(C1, cancel(b"b"), 0.2)
    assert error_code([a for a in out if a.frames[2] == b"tts"], C1) == tts.CANCELLED
    assert to_worker(out, W1) == []
    assert not rig.core.waiting
    # When W1 is free nothing is sent to it for b.
    out = rig.serve(W1, k, b"a", now=0.3)
    assert requests_to(out, W1) == []
    # And no later timeout for b either.
    rig.keepalive(20.0)
    assert to_client(rig.core.tick(20.0), C1) == []


def test_cancel_unknown_request() -> None:
    rig = Rig()
    out = rig.core.on_client(C1, cancel(b"nope"), 0.0)
    [r] = to_client(out, C1)
    assert r.final and r.service == "tts.cancel" and r.body == [b"nope", b"unknown"]


def test_cancel_only_affects_own_client() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.request(C1, b"a")
    out = rig.core.on_client(C2, cancel(b"a"), 0.1)
    assert [r.body for r in to_client(out, C2)] == [[b"a", b"unknown"]]
    assert to_client(out, C1) == [] and to_worker(out, W1) == []
    assert (C1, b"a") in rig.core.by_client


def test_client_send_failure_cancels_its_jobs_at_the_worker() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.worker(W2)
    k_a = job_key(rig.request(C1, b"a"), W1)
    k_b = job_key(rig.request(C2, b"b"), W2)
    rig.request(C1, b"c", now=0.1)  # waiting
    rig.core.on_worker(W1, start(k_a, b"a"), 0.2)
    out = rig.core.on_send_failed(False, C1, 0.3)
    # Nothing is sent to the lost client; its worker is told to stop.
    assert to_client(out, C1) == []
    assert requests_to(out, W1) == [mdp.WorkerRequest(k_a, [b"tts.cancel"])]
    assert to_worker(out, W2) == []
    assert not rig.core.waiting
    assert set(rig.core.jobs) == {k_b}
    assert C1 not in rig.core.inflight
    # W1's remaining output is dropped; its FINAL frees it.
    assert rig.core.on_worker(W1, audio(k_a, b"a", b"\x00\x00"), 0.4) == []
    assert rig.core.on_worker(W1, end(k_a, b"a"), 0.5) == []
    assert rig.core.workers[W1] in rig.core.services[SVC_EN].idle


def test_client_send_failure_for_unknown_client_is_harmless() -> None:
    assert Rig().core.on_send_failed(False, b"ghost", 0.0) == []
    assert Rig().core.on_send_failed(True, b"ghost", 0.0) == []
