"""Workers that hold several jobs (``slots`` in their capabilities): dispatch, demultiplexing, failure."""

from __future__ import annotations

from broker import tts
from broker.core import CoreSettings
from tests.core_rig import (
    SETTINGS,
    C1,
    C2,
    CAPS_EN,
    EXPIRY,
    SVC_EN,
    W1,
    W2,
    Rig,
    audio,
    caps,
    end,
    error,
    events,
    job_key,
    names,
    requests_to,
    start,
)

CAPS_3 = caps(slots=3)


def test_a_worker_gets_as_many_jobs_as_it_has_slots_and_the_rest_wait() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    keys = [job_key(rig.request(C1, rid), W1) for rid in (b"a", b"b", b"c")]
    assert len(set(keys)) == 3
    assert requests_to(rig.request(C1, b"d"), W1) == []  # full: the fourth waits
    assert [j.rid for j in rig.core.waiting] == [b"d"]
    assert not rig.core.services[SVC_EN].idle
    # A slot frees: the waiting job takes it at once.
    out = rig.serve(W1, keys[1], b"b", 0.5)
    assert names(out, C1) == ["end!"]
    [req] = requests_to(out, W1)
    assert req.body[0] == b"d" and not rig.core.waiting
    status = rig.core.status()["services"][SVC_EN]
    assert status["inflight"] == 3 and status["workers"][0]["jobs"] == 3 and status["workers"][0]["slots"] == 3


def test_interleaved_replies_reach_each_jobs_own_client() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    ka = job_key(rig.request(C1, b"a"), W1)
    kb = job_key(rig.request(C2, b"b"), W1)
    rig.core.on_worker(W1, start(ka, b"a"), 0.1)
    rig.core.on_worker(W1, start(kb, b"b"), 0.1)
    got_a, got_b = [], []
    for seq in range(3):
        got_a += events(rig.core.on_worker(W1, audio(ka, b"a", b"\x01\x00" * 4, seq), 0.2), C1)
        got_b += events(rig.core.on_worker(W1, audio(kb, b"b", b"\x02\x00" * 4, seq), 0.2), C2)
    assert [(rid, ev.seq) for _, rid, ev in got_a if isinstance(ev, tts.Audio)] == [(b"a", 0), (b"a", 1), (b"a", 2)]
    assert [(rid, ev.seq) for _, rid, ev in got_b if isinstance(ev, tts.Audio)] == [(b"b", 0), (b"b", 1), (b"b", 2)]
    assert names(rig.core.on_worker(W1, end(kb, b"b"), 0.3), C2) == ["end!"]
    assert list(rig.core.workers[W1].jobs) == [ka]  # the other job goes on


def test_a_reply_for_a_key_the_worker_does_not_hold_disconnects_it() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    job_key(rig.request(C1, b"a"), W1)
    rig.core.on_worker(W1, start(b"not-a-key", b"a"), 0.1)
    assert W1 not in rig.core.workers


def test_a_dead_worker_fails_over_every_job_it_held() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    keys = [job_key(rig.request(C1, rid), W1) for rid in (b"a", b"b")]
    rig.worker(W2, capabilities=CAPS_3, now=0.5)
    rig.keepalive(2.0, W2)
    out = rig.core.tick(EXPIRY + 0.1)
    assert W1 not in rig.core.workers
    assert sorted(r.address for r in requests_to(out, W2)) == sorted(keys)
    assert rig.core.counters["failovers"] == 2


def test_dispatch_spreads_jobs_over_the_least_loaded_worker() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    rig.worker(W2, capabilities=CAPS_3)
    targets = []
    for rid in (b"a", b"b", b"c", b"d"):
        out = rig.request(C1, rid)
        targets += [w for w in (W1, W2) if requests_to(out, w)]
    assert targets == [W1, W2, W1, W2]


def test_an_erring_job_frees_only_its_own_slot() -> None:
    rig = Rig()
    rig.worker(W1, capabilities=CAPS_3)
    rig.worker(W2, capabilities=CAPS_EN)
    ka = job_key(rig.request(C1, b"a"), W1)
    job_key(rig.request(C1, b"b"), W2)
    kc = job_key(rig.request(C1, b"c"), W1)
    out = rig.core.on_worker(W1, error(ka, b"a"), 0.2)
    assert W1 in rig.core.workers and list(rig.core.workers[W1].jobs) == [kc]
    assert rig.core.waiting and rig.core.waiting[0].key == ka  # W2 is full, W1 failed it: a waits
    assert requests_to(out, W1) == []


def test_stuck_means_no_reply_to_any_job() -> None:
    rig = Rig(CoreSettings(**{**SETTINGS.__dict__, "stuck_timeout_s": 2.0}))
    rig.worker(W1, capabilities=CAPS_3)
    ka = job_key(rig.request(C1, b"a"), W1)
    kb = job_key(rig.request(C1, b"b"), W1)
    rig.core.on_worker(W1, start(ka, b"a"), 0.0)
    # Job a speaks on while b waits its turn: the worker is not stuck.
    for i, t in enumerate((1.0, 2.0, 3.0)):
        rig.core.on_worker(W1, audio(ka, b"a", b"\x00\x00", i), t)
        rig.core.tick(t)
    assert W1 in rig.core.workers and kb in rig.core.workers[W1].jobs
    rig.core.tick(5.5)  # now nothing for 2.5 s from any job
    assert W1 not in rig.core.workers
