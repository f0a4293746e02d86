"""Dispatch, queueing, heartbeats, worker expiry, MMI, status and opaque services."""

from __future__ import annotations

import json

import pytest

from broker import mdp, tts
from broker.core import Action
from tests.core_rig import (
    C1,
    C2,
    DISCONNECT,
    EXPIRY,
    HEARTBEAT,
    Rig,
    SVC_EN,
    TIMEOUT,
    W1,
    W2,
    audio,
    caps,
    error_code,
    events,
    job_key,
    ready,
    requests_to,
    start,
    to_client,
)

# --------------------------------------------------------------------------
# Dispatch and queueing
# --------------------------------------------------------------------------


def test_request_goes_to_the_idle_worker() -> None:
    rig = Rig()
    assert rig.worker(W1) == []
    out = rig.request(C1, b"r1", text="Hi.", language="en-US")
    [req] = requests_to(out, W1)
    assert req.body[0] == b"r1"
    sent = json.loads(req.body[1])
    assert sent["text"] == "Hi."
    assert sent["language"] == "en"  # the engine's own code
    assert to_client(out, C1) == []
    assert rig.core.workers[W1].jobs


def test_lru_dispatch_across_two_workers() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.1)
    out = rig.request(C1, b"a", now=1.0)
    k_a = job_key(out, W1)  # W1 idle longest
    out = rig.serve(W1, k_a, b"a", now=1.5)
    assert requests_to(out, W1) == []
    # Now W2 has been idle longest; W1 just went to the back.
    out = rig.request(C1, b"b", now=2.0)
    k_b = job_key(out, W2)
    assert requests_to(out, W1) == []
    out = rig.request(C1, b"c", now=2.1)
    k_c = job_key(out, W1)
    # W2 finishes before W1, so it is the next to be chosen.
    rig.serve(W2, k_b, b"b", now=2.2)
    rig.serve(W1, k_c, b"c", now=2.3)
    out = rig.request(C2, b"d", now=2.4)
    job_key(out, W2)


def test_request_queues_until_a_worker_is_free() -> None:
    rig = Rig()
    rig.worker(W1)
    k_a = job_key(rig.request(C1, b"a", now=0.0), W1)
    out = rig.request(C2, b"b", now=0.1)
    assert out == []
    assert [j.rid for j in rig.core.waiting] == [b"b"]
    out = rig.serve(W1, k_a, b"a", now=0.5)
    # The same call ends a and hands b to the now free worker.
    [(final, rid, ev)] = events(out, C1)
    assert final and rid == b"a" and isinstance(ev, tts.End)
    [req] = requests_to(out, W1)
    assert req.body[0] == b"b"
    assert not rig.core.waiting


def test_waiting_requests_are_served_in_fifo_order() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.request(C1, b"b", now=0.1)
    rig.request(C2, b"c", now=0.2)
    out = rig.serve(W1, k, b"a", now=1.0)
    [req] = requests_to(out, W1)
    assert req.body[0] == b"b"
    out = rig.serve(W1, req.address, b"b", now=1.1)
    [req] = requests_to(out, W1)
    assert req.body[0] == b"c"


def test_a_waiting_request_goes_before_those_of_lower_priority_and_behind_its_own() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=caps(request_keys=sorted(tts.SynthesisRequest.model_fields)))
    k = job_key(rig.request(C1, b"a"), W1)
    rig.request(C1, b"low", now=0.1, priority=-1)
    rig.request(C1, b"normal", now=0.2)
    rig.request(C2, b"high", now=0.3, priority=2)
    rig.request(C2, b"normal-2", now=0.4, priority=0)
    rig.request(C2, b"high-2", now=0.5, priority=2)
    assert [j.rid for j in rig.core.waiting] == [b"high", b"high-2", b"normal", b"normal-2", b"low"]
    served, rid = [], b"a"
    for t in range(5):
        [req] = requests_to(rig.serve(W1, k, rid, now=1.0 + t), W1)
        k, rid = req.address, req.body[0]
        served.append(rid)
    assert served == [b"high", b"high-2", b"normal", b"normal-2", b"low"]
    assert json.loads(req.body[1])["priority"] == -1  # forwarded to a worker that understands it


def test_new_worker_takes_waiting_request_on_ready() -> None:
    rig = Rig()
    assert rig.request(C1, b"a") == []
    out = rig.worker(W1, now=1.0)
    [req] = requests_to(out, W1)
    assert req.body[0] == b"a"


def test_queued_request_times_out_while_workers_are_busy() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.request(C1, b"a", now=0.0)
    rig.request(C2, b"b", now=1.0)
    for t in (2.0, 4.0, 6.0, 8.0, 10.5):
        rig.keepalive(t)
        assert to_client(rig.core.tick(t), C2) == []
    rig.keepalive(11.0)
    out = rig.core.tick(11.0)
    assert error_code(out, C2) == tts.TIMEOUT
    assert not rig.core.waiting
    assert (C2, b"b") not in rig.core.by_client


def test_queued_request_unavailable_without_live_worker() -> None:
    rig = Rig()
    assert rig.request(C1, b"a", now=0.0) == []
    assert rig.core.tick(9.99) == []
    out = rig.core.tick(TIMEOUT)
    assert error_code(out, C1) == tts.UNAVAILABLE
    assert not rig.core.jobs


def test_queued_request_unavailable_after_workers_died() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.core.on_worker(W1, DISCONNECT, 0.5)
    assert rig.request(C1, b"a", now=1.0) == []
    out = rig.core.tick(1.0 + TIMEOUT)
    assert error_code(out, C1) == tts.UNAVAILABLE


def test_opaque_request_times_out_with_error_body() -> None:
    rig = Rig()
    rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"ping"], 0.0)
    [r] = to_client(rig.core.tick(TIMEOUT), C1)
    assert r.final and r.service == "echo"
    assert r.body[0] == b"error"
    assert json.loads(r.body[1])["code"] == tts.TIMEOUT


# --------------------------------------------------------------------------
# Heartbeats and worker expiry
# --------------------------------------------------------------------------


def test_heartbeats_sent_on_tick() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.5)
    assert rig.core.tick(0.9) == []
    out = rig.core.tick(1.0)
    assert out == [Action(True, W1, mdp.HEARTBEAT_FRAMES)]
    assert rig.core.tick(1.2) == []
    out = rig.core.tick(1.5)
    assert out == [Action(True, W2, mdp.HEARTBEAT_FRAMES)]
    # Due again one interval after the last one.
    rig.keepalive(2.0)
    assert rig.core.tick(1.9) == []
    out = rig.core.tick(2.0)
    assert out == [Action(True, W1, mdp.HEARTBEAT_FRAMES)]


def test_worker_expires_after_heartbeat_times_liveness() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.core.on_worker(W1, HEARTBEAT, 1.0)  # alive until 1.0 + 3.0
    rig.core.tick(3.99)
    assert W1 in rig.core.workers
    rig.core.tick(4.0)
    assert W1 not in rig.core.workers
    assert not rig.core.services[SVC_EN].idle
    # A message after expiry: unknown worker, told to re-register.
    out = rig.core.on_worker(W1, HEARTBEAT, 4.1)
    assert out == [Action(True, W1, mdp.DISCONNECT_FRAMES)]


def test_any_worker_message_counts_as_liveness() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(k, b"a"), 2.5)
    rig.core.tick(5.0)
    assert W1 in rig.core.workers


def test_dead_worker_job_requeued_when_nothing_was_sent() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k_a = job_key(rig.request(C1, b"a", now=0.0), W1)
    k_b = job_key(rig.request(C1, b"b", now=0.0), W2)
    assert rig.request(C2, b"c", now=0.5) == []  # waits
    rig.keepalive(2.0, W2)
    out = rig.core.tick(EXPIRY)  # W1 silent since 0.0
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []
    # a goes back to the FRONT of the queue, ahead of c.
    assert [j.rid for j in rig.core.waiting] == [b"a", b"c"]
    out = rig.serve(W2, k_b, b"b", now=3.5)
    [req] = requests_to(out, W2)
    assert req.address == k_a and req.body[0] == b"a"
    out = rig.serve(W2, k_a, b"a", now=4.0)
    assert [(f, rid, type(ev)) for f, rid, ev in events(out, C1)] == [(True, b"a", tts.End)]


def test_dead_worker_job_requeued_to_an_idle_worker_at_once() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.0), W1)
    rig.worker(W2, now=1.0)
    out = rig.core.on_worker(W1, DISCONNECT, 1.5)
    [req] = requests_to(out, W2)
    assert req.address == k


def test_dead_worker_mid_stream_fails_over_instead_of_ending_the_job() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.0), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.1)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00"), 0.1)
    rig.keepalive(2.0, W2)
    out = rig.core.tick(0.1 + EXPIRY)
    assert W1 not in rig.core.workers
    assert to_client(out, C1) == []  # no internal error any more
    [req] = requests_to(out, W2)
    assert req.address == k
    assert rig.core.jobs[k].failed == {W1}
    assert rig.core.services[SVC_EN].failures == 1
    assert rig.core.services[SVC_EN].last_failure == "heartbeat lost"
    assert rig.core.counters["failovers"] == 1


def test_send_failure_to_worker_removes_it() -> None:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    assert rig.core.on_send_failed(True, W1, 0.1) == []
    assert W1 not in rig.core.workers
    assert rig.core.waiting[0].key == k
    assert rig.core.waiting[0].failed == {W1}
    assert rig.core.waiting[0].deadline == 0.1 + TIMEOUT


# --------------------------------------------------------------------------
# MMI and status
# --------------------------------------------------------------------------


def _mmi(rig: Rig, name: bytes, service: bytes = b"mmi.service") -> list[bytes]:
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", service, name], 0.0)
    [r] = to_client(out, C1)
    assert r.final and r.service == service.decode()
    return r.body


def test_mmi_service() -> None:
    rig = Rig()
    assert _mmi(rig, b"tts") == [b"404"]
    assert _mmi(rig, SVC_EN.encode()) == [b"404"]
    assert _mmi(rig, b"tts.cancel") == [b"200"]
    assert _mmi(rig, b"tts.status") == [b"200"]
    assert _mmi(rig, b"mmi.service") == [b"200"]
    assert _mmi(rig, b"\xff\xfe") == [b"404"]
    rig.worker(W1)
    assert _mmi(rig, b"tts") == [b"200"]
    assert _mmi(rig, SVC_EN.encode()) == [b"200"]
    assert _mmi(rig, b"echo") == [b"404"]
    rig.core.on_worker(W2, ready("echo", None), 0.0)
    assert _mmi(rig, b"echo") == [b"200"]
    # The TTS worker goes away: tts is no longer served.
    rig.core.on_worker(W1, DISCONNECT, 0.0)
    assert _mmi(rig, b"tts") == [b"404"]
    assert _mmi(rig, SVC_EN.encode()) == [b"404"]


def test_tts_not_served_by_opaque_worker_only() -> None:
    rig = Rig()
    rig.core.on_worker(W1, ready("echo", None), 0.0)
    assert _mmi(rig, b"tts") == [b"404"]


@pytest.mark.parametrize("service", [b"mmi.foo", b"mmi.discovery", b"mmi."])
def test_other_mmi_is_501(service: bytes) -> None:
    assert _mmi(Rig(), b"x", service) == [b"501"]


def test_status_service() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.request(C1, b"a")
    rig.request(C1, b"b")
    out = rig.core.on_client(C2, [b"MDPC02", b"\x01", b"tts.status", b"?"], 0.0)
    [r] = to_client(out, C2)
    st = json.loads(r.body[0])
    assert st["waiting"] == 1 and st["inflight"] == 2
    assert st["services"][SVC_EN]["workers"][0]["busy"] is True
    assert st["services"][SVC_EN]["workers"][0]["pid"] == 123
    assert st["services"][SVC_EN]["inflight"] == 1 and st["services"][SVC_EN]["idle"] == 0
    assert st["counters"]["failovers"] == 0


def test_status_reports_failovers_and_service_failures() -> None:
    rig = Rig()
    rig.worker(W1, now=0.0)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, DISCONNECT, 0.1)  # a moves to W2
    st = rig.core.status()
    assert st["counters"]["failovers"] == 1
    svc = st["services"][SVC_EN]
    assert svc["failures"] == 1 and svc["last_failure"] == "worker disconnected"
    assert svc["inflight"] == 1 and svc["idle"] == 0
    assert [w["id"] for w in svc["workers"]] == ["w2"]
    rig.serve(W2, k, b"a", now=0.2)
    assert rig.core.status()["services"][SVC_EN]["inflight"] == 0


# --------------------------------------------------------------------------
# Opaque (plain MDP) services
# --------------------------------------------------------------------------


def test_plain_mdp_worker_is_relayed_verbatim() -> None:
    rig = Rig()
    out = rig.core.on_worker(W1, [b"MDPW02", b"\x01", b"echo"], 0.0)
    assert out == []
    assert not rig.core.services["echo"].is_tts
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"hello", b"\x00world"], 0.1)
    [req] = requests_to(out, W1)
    # RFC 18: the worker sees the client's address and echoes it.
    assert req.address.startswith(C1)
    assert req.body == [b"hello", b"\x00world"]
    out = rig.core.on_worker(W1, [b"MDPW02", b"\x03", req.address, b"", b"part", b"1"], 0.2)
    assert to_client(out, C1) == [mdp.ClientReply("echo", [b"part", b"1"], False)]
    out = rig.core.on_worker(W1, [b"MDPW02", b"\x04", req.address, b"", b"done"], 0.3)
    assert to_client(out, C1) == [mdp.ClientReply("echo", [b"done"], True)]
    assert not rig.core.jobs
    assert rig.core.workers[W1] in rig.core.services["echo"].idle


def test_plain_mdp_request_waits_for_its_service() -> None:
    rig = Rig()
    rig.worker(W2)  # a TTS worker must not take it
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"hello"], 0.0)
    assert out == []
    out = rig.core.on_worker(W1, [b"MDPW02", b"\x01", b"echo"], 1.0)
    [req] = requests_to(out, W1)
    assert req.body == [b"hello"]


def test_plain_mdp_job_requeued_when_its_worker_fails_before_replying() -> None:
    rig = Rig()
    rig.core.on_worker(W1, [b"MDPW02", b"\x01", b"echo"], 0.0)
    rig.core.on_worker(W2, [b"MDPW02", b"\x01", b"echo"], 0.0)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"hi"], 0.1)
    [req] = requests_to(out, W1)
    out = rig.core.on_worker(W1, DISCONNECT, 0.2)
    assert to_client(out, C1) == []
    [req2] = requests_to(out, W2)
    assert req2 == req
    out = rig.core.on_worker(W2, [b"MDPW02", b"\x04", req.address, b"", b"done"], 0.3)
    assert to_client(out, C1) == [mdp.ClientReply("echo", [b"done"], True)]


def test_plain_mdp_job_mid_stream_worker_loss_sends_final() -> None:
    rig = Rig()
    rig.core.on_worker(W1, [b"MDPW02", b"\x01", b"echo"], 0.0)
    out = rig.core.on_client(C1, [b"MDPC02", b"\x01", b"echo", b"hi"], 0.1)
    [req] = requests_to(out, W1)
    rig.core.on_worker(W1, [b"MDPW02", b"\x03", req.address, b"", b"p"], 0.2)
    out = rig.core.on_worker(W1, DISCONNECT, 0.3)
    assert not rig.core.jobs
    # Expected: a FINAL in the same shape as the opaque timeout / overloaded errors.
    [r] = to_client(out, C1)
    assert r.final and r.body[0] == b"error" and json.loads(r.body[1])["code"] == tts.INTERNAL
