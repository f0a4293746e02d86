"""Random interleavings: the core never raises and keeps its invariants."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from typing import Any, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RULE_MARKER, RuleBasedStateMachine, invariant, precondition, rule

from broker import mdp, tts
from broker.core import ASSIGNED, CANCELLING, STREAMING, WAITING, OUTCOMES, Action, BrokerCore, CoreSettings
from broker.routing import Step
from tests.core_rig import (
    C1,
    CAPS_EN,
    CAPS_EN_AMY,
    CAPS_PT,
    CAPS_XTTS,
    DISCONNECT,
    EXPIRY,
    HB,
    HEARTBEAT,
    LIVENESS,
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
    audio,
    cancel,
    disconnected,
    end,
    error,
    job_key,
    mark,
    other_json,
    ready,
    reply,
    requests_to,
    start,
    start_json,
    to_client,
)

# --------------------------------------------------------------------------
# Random interleavings: the core never raises and keeps its invariants
# --------------------------------------------------------------------------


SM_SETTINGS = CoreSettings(
    heartbeat_s=HB,
    liveness=LIVENESS,
    request_timeout_s=TIMEOUT,
    max_text_chars=40,
    max_queue=3,
    max_inflight_per_client=4,
    stuck_timeout_s=5.0,  # reached by a few ticks, so stuck detection is exercised
    chains={"pt": (Step(SVC_PT), Step("xtts", "narrator"))},
)
SM_CLIENTS = [b"c1", b"c2"]
SM_RIDS = [b"r1", b"r2", b"r3"]
SM_WORKERS: dict[bytes, tuple[str, Optional[dict[str, Any]]]] = {
    b"we1": (SVC_EN, CAPS_EN),
    b"we2": (SVC_EN, CAPS_EN),
    b"wp1": (SVC_PT, CAPS_PT),
    b"wx1": (SVC_XTTS, CAPS_XTTS),
    b"wo1": ("echo", None),  # a plain MDP worker
}
SM_REQUEST_BODIES: list[list[bytes]] = [
    [b'{"text": "One. Two. Three."}'],
    [b'{"text": "Ola. Tudo bem?", "language": "pt-BR"}'],
    [b'{"text": "Hallo. Welt!", "language": "de"}'],
    [b'{"text": "Hi. Again. ...", "voice": "en_US-joe-medium"}'],
    [b'{"text": "Hello there.", "voice": "narrator"}'],
    [b'{"text": "Hi! Bye.", "engine": "xtts"}'],
    [b'{"text": "Hi. How are you?", "format": "f32le"}'],
    [b'{"text": "... Hi"}'],
    [b'{"text": "Hi.", "voice": "nobody"}'],
    [b'{"text": "' + b"x" * 41 + b'"}'],
    [b'{"text": "  "}'],
    [b"not json"],
    [b'{"text": "Hi.", "bogus": true}'],
    [],
    [b'{"text": "Hi."}', b"extra"],
]
# Replies a busy worker may send at random, valid or not. Not generated here
# (the model below does not predict their outcome; regression tests pin each):
# an unsolicited `error` with code `cancelled`
# (test_unsolicited_cancelled_error_is_relayed), a mark that does not advance
# (test_mark_that_does_not_advance_is_malformed), and a malformed mark while
# start is still held (test_malformed_first_mark_does_not_lose_the_held_start).
SM_REPLY_KINDS = (
    ["start"] * 4 + ["audio"] * 6 + ["mark"] * 3 + ["end"] * 3 + ["error", "other", "other"]
    + ["audio_odd", "wrong_rid", "end_partial", "start_final", "start_bad_json", "start_missing"]
    + ["start_no_json", "end_no_json", "error_no_json", "start_inf", "mark_past_end", "mark_bad_json"]
)
garbage_frames = st.lists(
    st.one_of(st.binary(max_size=12), st.sampled_from([b"MDPC02", b"MDPW02", b"\x01", b"\x03", b"\x04", b"tts", b""])),
    max_size=6,
)


def _is_bad_client(frames: list[bytes]) -> bool:
    try:
        mdp.decode_client(frames)
    except mdp.ProtocolError:
        return True
    return False


def sentence_ends(text: str) -> list[int]:
    """Where the simulated engines end their sentences: after . ! ? before a space or the end.

    A suffix of a text split at one of these offsets splits at the same places
    (shifted), so a resumed worker's marks land on the original's boundaries.
    """
    ends = [m.end() for m in re.finditer(r"[.!?]+(?=\s|$)", text)]
    if any(c.isalnum() for c in text[ends[-1] if ends else 0 :]):
        ends.append(len(text))
    return ends


def speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = BrokerCore(SM_SETTINGS)
        self.now = 0.0
        self.sent: Counter = Counter()
        """FINALs owed per (client, service, request id); request id None for opaque."""
        self.got: Counter = Counter()
        self.exempt: Counter = Counter()
        """Owed FINALs forgiven because the client was reported gone."""
        self.streams: dict[tuple[bytes, str, Optional[bytes]], dict[str, Any]] = {}
        """Open TTS streams as seen by clients (after their start): next audio seq, format, marks."""
        self.texts: dict[tuple[bytes, str, bytes], str] = {}
        """The text of each admitted TTS request, by stream key."""
        self.lost: Counter = Counter()
        """FINALs owed but never to come; must stay empty (every job gets its FINAL)."""
        self.dispatched: set[bytes] = set()
        self.given: dict[bytes, dict[str, Any]] = {}
        """What each simulated worker was last asked to say (text, sentence ends, format, rate)."""
        self.pcm_seq = 0

    # ------------------------------------------------------------ plumbing

    def _apply(self, out: list[Action]) -> None:
        assert isinstance(out, list)
        for a in out:
            assert isinstance(a, Action)
            if a.to_worker:
                cmd = mdp.decode_worker(a.frames, from_broker=True)
                if isinstance(cmd, mdp.WorkerRequest) and cmd.body != [tts.WORKER_CANCEL]:
                    self.dispatched.add(cmd.address)
                    self._worker_given(a.peer, cmd)
                continue
            r = mdp.decode_client_reply(a.frames)
            if r.service in ("tts.cancel", "tts.status") or r.service.startswith("mmi."):
                assert r.final
                continue
            if r.service == "echo":
                if r.final:
                    self._got((a.peer, "echo", None))
                continue
            rid, ev = tts.decode_event(r.body)
            key = (a.peer, r.service, rid)
            stream = self.streams.get(key)
            if r.final:
                assert isinstance(ev, (tts.End, tts.Error)), ev
                if isinstance(ev, tts.Error):
                    assert ev.code in tts.ERROR_CODES
                # A FINAL ends its id: nothing live may still answer to it.
                assert (a.peer, rid) not in self.core.by_client
                self.streams.pop(key, None)
                if isinstance(ev, tts.End):
                    self._check_end(key, stream, ev)
                self._got(key)
            elif isinstance(ev, tts.Start):
                # At most one start per stream, hence never after audio.
                assert stream is None, "second start in one stream"
                assert ev.worker.get("id")
                self.streams[key] = {"seq": 0, "format": ev.format, "rate": ev.sample_rate, "last_mark": 0, "marks": 0, "failovers": 0}
            else:
                assert stream is not None, f"{ev} before start"
                if isinstance(ev, tts.Audio):
                    # Gapless, across failovers too.
                    assert stream["seq"] == ev.seq, f"audio seq {ev.seq}, expected {stream['seq']}"
                    stream["seq"] += 1
                elif tts.event_name(ev) == "mark":
                    m = other_json(ev)
                    assert m["segment"] == stream["marks"]
                    assert m["end"] > stream["last_mark"], f"mark end {m['end']} does not advance past {stream['last_mark']}"
                    # Sentence accounting: every mark is a sentence end of the client's own text.
                    assert m["end"] in sentence_ends(self.texts[key]), (m, self.texts[key])
                    stream["last_mark"] = m["end"]
                    stream["marks"] += 1
                elif tts.event_name(ev) == "failover":
                    fo = other_json(ev)
                    assert fo["resume_at"] == stream["last_mark"]
                    assert fo["worker"].get("id") and fo["reason"]
                    stream["failovers"] += 1

    def _check_end(self, key: tuple, stream: Optional[dict[str, Any]], ev: tts.End) -> None:
        assert stream is not None, "end before start"
        text = self.texts[key]
        # The marks the client saw cover every speakable character: the text was said, once, in order.
        assert not speakable(text[stream["last_mark"] :]), (text, stream)
        assert ev.stats["chunks"] == stream["seq"]
        assert ev.stats["segments"] == stream["marks"]
        assert ev.stats["failovers"] >= stream["failovers"]

    def _worker_given(self, ident: bytes, cmd: mdp.WorkerRequest) -> None:
        """A worker got a job: check what the broker asks of it, and remember it."""
        job = self.core.jobs.get(cmd.address)
        if job is None or job.rid is None:
            self.given[ident] = {"key": cmd.address}
            return
        assert len(cmd.body) == 2 and cmd.body[0] == job.rid
        req = json.loads(cmd.body[1])
        key = (job.client, job.service.decode(), job.rid)
        assert job.request is not None
        original = self.texts[key] = job.request.text  # (may run before _tts records it)
        stream = self.streams.get(key)
        if stream is None:  # nothing promised yet: the request as the client sent it
            assert req["text"] == original
        else:  # resuming: the rest of the text, as announced
            assert req["text"] == original[stream["last_mark"] :]
            assert req["format"] == stream["format"] and req["sample_rate"] == stream["rate"]
        assert speakable(req["text"])
        # (Not core.workers[ident]: tick may hand a job to a worker it buries a moment
        # later, see test_tick_does_not_hand_a_job_to_a_worker_that_is_dead_too.)
        if SM_WORKERS[ident][0] == SVC_XTTS:
            assert req.get("voice") in (None, "narrator", "ana"), req  # never a Piper voice
        self.given[ident] = {
            "key": cmd.address,
            "text": req["text"],
            "ends": sentence_ends(req["text"]),
            "marked": 0,
            "format": req.get("format", "s16le"),
            "rate": req.get("sample_rate", 22050),
        }

    def _got(self, key: tuple) -> None:
        self.got[key] += 1
        assert self.got[key] + self.exempt[key] + self.lost[key] <= self.sent[key], f"unexpected FINAL for {key}"

    def _client(self, client: bytes, frames: list[bytes]) -> None:
        self._apply(self.core.on_client(client, frames, self.now))

    def _worker(self, ident: bytes, frames: list[bytes]) -> None:
        self._apply(self.core.on_worker(ident, frames, self.now))

    # --------------------------------------------------------------- rules

    # Hypothesis picks among the rules roughly uniformly, so the common events
    # get a rule each (some twice) and the rare ones share a rule.

    def _tts(self, client: bytes, rid: bytes, body: list[bytes], direct: bool) -> None:
        # Address the engine service only once it is known as TTS, so that
        # every reply on that name is a TTS event.
        service = SVC_EN if direct and self.core._is_tts_service(SVC_EN) else "tts"
        before = self.core.by_client.get((client, rid))
        # A reused id in flight is not a request of its own: it ends the one in flight.
        if 1 <= len(rid) <= tts.MAX_REQUEST_ID and before is None:
            self.sent[(client, service, rid)] += 1
        self._client(client, [b"MDPC02", b"\x01", service.encode(), rid, *body])
        job = self.core.by_client.get((client, rid))
        if job is not None and job is not before:
            assert job.request is not None
            self.texts[(client, service, rid)] = job.request.text

    @rule(client=st.sampled_from(SM_CLIENTS), rid=st.sampled_from(SM_RIDS), body=st.sampled_from(SM_REQUEST_BODIES[:8]), direct=st.booleans())
    def tts_request(self, client: bytes, rid: bytes, body: list[bytes], direct: bool) -> None:
        self._tts(client, rid, body, direct)

    @rule(client=st.sampled_from(SM_CLIENTS), rid=st.sampled_from(SM_RIDS + [b"", b"x" * 256]), body=st.sampled_from(SM_REQUEST_BODIES), direct=st.booleans())
    def tts_request_any(self, client: bytes, rid: bytes, body: list[bytes], direct: bool) -> None:
        self._tts(client, rid, body, direct)

    @rule(client=st.sampled_from(SM_CLIENTS), payload=st.lists(st.binary(max_size=8), min_size=1, max_size=3))
    def opaque_request(self, client: bytes, payload: list[bytes]) -> None:
        self.sent[(client, "echo", None)] += 1
        self._client(client, [b"MDPC02", b"\x01", b"echo", *payload])

    @rule(client=st.sampled_from(SM_CLIENTS), rid=st.sampled_from(SM_RIDS))
    def client_cancels(self, client: bytes, rid: bytes) -> None:
        self._client(client, cancel(rid))

    @rule(
        client=st.sampled_from(SM_CLIENTS),
        how=st.sampled_from(["mmi", "status", "garbage", "gone"]),
        service=st.sampled_from([b"mmi.service", b"mmi.nope"]),
        name=st.sampled_from([b"tts", b"echo", SVC_PT.encode(), b"\xff"]),
        frames=garbage_frames.filter(_is_bad_client),
    )
    def client_misc(self, client: bytes, how: str, service: bytes, name: bytes, frames: list[bytes]) -> None:
        if how == "mmi":
            self._client(client, [b"MDPC02", b"\x01", service, name])
        elif how == "status":
            self._client(client, [b"MDPC02", b"\x01", b"tts.status", b""])
        elif how == "garbage":
            assert self.core.on_client(client, frames, self.now) == []
        else:  # the server could not deliver to this client
            out = self.core.on_send_failed(False, client, self.now)
            assert to_client(out, client) == []
            for key in list(self.sent):
                if key[0] == client:
                    self.exempt[key] = self.sent[key] - self.got[key] - self.lost[key]
            for key in [k for k in self.streams if k[0] == client]:
                del self.streams[key]
            self._apply(out)
            assert not any(j.client == client for j in self.core.jobs.values())

    @rule(ident=st.sampled_from(sorted(SM_WORKERS)))
    def worker_ready(self, ident: bytes) -> None:
        if ident in self.core.workers:  # registered: it just checks in
            self._worker(ident, HEARTBEAT)
            return
        service, capabilities = SM_WORKERS[ident]
        self._worker(ident, ready(service, capabilities))
        assert ident in self.core.workers

    @rule(
        ident=st.sampled_from(sorted(SM_WORKERS)),
        how=st.sampled_from(["garbage", "stale", "reserved", "ready2", "heartbeat+", "disconnect", "unreachable"]),
        frames=garbage_frames,
    )
    def worker_misc(self, ident: bytes, how: str, frames: list[bytes]) -> None:
        if how == "garbage":
            self._worker(ident, frames)
        elif how == "unreachable":
            self._apply(self.core.on_send_failed(True, ident, self.now))
            assert ident not in self.core.workers
        elif how == "disconnect":
            self._worker(ident, DISCONNECT)
            assert ident not in self.core.workers
        else:
            known = ident in self.core.workers
            msg = {"stale": end(b"stale", b"r1"), "reserved": ready("tts", CAPS_EN), "heartbeat+": [*HEARTBEAT, b""], "ready2": ready(*SM_WORKERS[ident])}[how]
            out = self.core.on_worker(ident, msg, self.now)
            if how == "ready2" and not known:
                assert ident in self.core.workers  # a first READY after all
                self._apply(out)
                return
            assert disconnected(out, ident) and ident not in self.core.workers
            assert "tts" not in self.core.services
            self._apply(out)

    def _busy(self) -> list[bytes]:
        return sorted(i for i, w in self.core.workers.items() if w.jobs)

    def _job_of(self, ident: bytes) -> Any:
        """The job a worker of this machine holds (they announce one slot: the broker gives them one job)."""
        jobs = list(self.core.workers[ident].jobs.values())
        assert len(jobs) <= 1, "a one-slot worker holds several jobs"
        return jobs[0] if jobs else None

    def _holds(self, ident: bytes, job: Any) -> bool:
        w = self.core.workers.get(ident)
        return w is not None and w.jobs.get(job.key) is job

    def _reply(self, ident: bytes, kind: str, final: bool, nbytes: int) -> None:
        job = self._job_of(ident)
        assert job is not None
        k = job.key
        if job.rid is None:  # opaque: anything goes, relayed verbatim
            self._worker(ident, [b"MDPW02", b"\x04" if final else b"\x03", k, b"", b"x" * nbytes])
            return
        rid = job.rid
        given = self.given[ident]
        assert given["key"] == k, "the sim lost track of what its worker was asked"
        self.pcm_seq += 1
        if kind in ("mark", "end"):
            # An honest engine marks each sentence as it finishes it, all of them before its end.
            while given["marked"] < len(given["ends"]) and self._holds(ident, job):
                self._worker(ident, mark(k, rid, given["ends"][given["marked"]]))
                given["marked"] += 1
                if kind == "mark":
                    return
            if kind == "mark" or not self._holds(ident, job):
                return
        if kind.startswith("mark_") and job.stream.held_start is not None:
            return  # known bug: see test_malformed_first_mark_does_not_lose_the_held_start
        msg = {
            "start_ok": lambda: start(k, rid, fmt=given["format"], rate=given["rate"]),
            "start": lambda: start(k, rid, fmt="f32le" if final else "s16le"),
            "audio": lambda: audio(k, rid, b"\x00\x00\x00\x00" * nbytes, self.pcm_seq),
            "end": lambda: end(k, rid, {"engine": "sim"}),
            "error": lambda: error(k, rid, tts.INTERNAL, "sim"),
            "other": lambda: reply(k, rid, b"progress", b"x"),
            "audio_odd": lambda: audio(k, rid, b"\x00\x00\x00", self.pcm_seq),
            "wrong_rid": lambda: start(k, rid + b"?"),
            "end_partial": lambda: reply(k, rid, b"end", b"{}", final=False),
            "start_final": lambda: reply(k, rid, b"start", start_json(), final=True),
            "start_bad_json": lambda: reply(k, rid, b"start", b"{"),
            "start_missing": lambda: reply(k, rid, b"start", b'{"format": "s16le"}'),
            "start_no_json": lambda: reply(k, rid, b"start"),
            "end_no_json": lambda: reply(k, rid, b"end"),
            "error_no_json": lambda: reply(k, rid, b"error"),
            "start_inf": lambda: reply(k, rid, b"start", start_json().replace(b"22050", b"1e999")),
            "mark_past_end": lambda: mark(k, rid, len(given["text"]) + 1),
            "mark_bad_json": lambda: reply(k, rid, b"mark", b"[]"),
        }[kind]
        self._worker(ident, msg())

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), final=st.booleans(), nbytes=st.integers(0, 6))
    def worker_streams(self, data: st.DataObject, final: bool, nbytes: int) -> None:
        """A busy worker does the next sensible thing: start, audio, mark, or finish."""
        ident = data.draw(st.sampled_from(self._busy()), label="worker")
        job = self._job_of(ident)
        assert job is not None
        if job.rid is not None and job.state is ASSIGNED:
            kind = "start_ok"
        else:
            kind = data.draw(st.sampled_from(["audio", "audio", "audio", "mark", "mark", "other", "end", "end", "error"]), label="kind")
        self._reply(ident, kind, final, nbytes)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), kind=st.sampled_from(SM_REPLY_KINDS), final=st.booleans(), nbytes=st.integers(0, 6))
    def worker_reply(self, data: st.DataObject, kind: str, final: bool, nbytes: int) -> None:
        """A busy worker sends anything, valid or not."""
        self._reply(data.draw(st.sampled_from(self._busy()), label="worker"), kind, final, nbytes)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), how=st.sampled_from(["disconnect", "unreachable", "garbage", "error", "silent"]))
    def busy_worker_fails(self, data: st.DataObject, how: str) -> None:
        """A worker fails in the middle of a job: its job must fail over, invisibly or with a resume."""
        ident = data.draw(st.sampled_from(self._busy()), label="worker")
        job = self._job_of(ident)
        assert job is not None
        if how == "disconnect":
            self._worker(ident, DISCONNECT)
        elif how == "unreachable":
            self._apply(self.core.on_send_failed(True, ident, self.now))
        elif how == "garbage":
            self._worker(ident, [b"MDPW02", b"\x07"])
        elif how == "error":
            if job.rid is None:
                return
            self._worker(ident, error(job.key, job.rid, tts.INTERNAL, "sim crash"))
        else:  # falls silent: the others check in, and the tick buries it
            self.now += EXPIRY
            for other in list(self.core.workers):
                if other != ident:
                    self._worker(other, HEARTBEAT)
            self._apply(self.core.tick(self.now))
        if how != "error":
            assert ident not in self.core.workers
        assert not self._holds(ident, job)

    @rule(dt=st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.0, 2.0, 3.5, 11.0]), heartbeats=st.sampled_from([True, True, True, False]))
    def tick(self, dt: float, heartbeats: bool) -> None:
        self.now += dt
        if heartbeats:  # every worker checks in just before the tick
            for ident in list(self.core.workers):
                self._worker(ident, HEARTBEAT)
        self._apply(self.core.tick(self.now))

    # ---------------------------------------------------------- invariants

    @invariant()
    def structure(self) -> None:
        core = self.core
        held = [j for w in core.workers.values() for j in w.jobs.values()]
        assert len({id(j) for j in held}) == len(held), "a job is held by two workers"
        for ident, w in core.workers.items():
            assert w.identity == ident
            assert core.services[w.service.name] is w.service and w.service.workers.get(ident) is w
            in_idle = w in w.service.idle
            assert len(w.jobs) <= w.slots, f"worker {ident!r} holds more jobs than it has slots"
            assert (len(w.jobs) < w.slots) == in_idle, f"worker {ident!r} has a free slot but is not idle (or is full and idle)"
            for key, job in w.jobs.items():
                assert job.key == key and job.worker is w
                # A job its worker holds is live, or finished for the client and waiting for the worker to let go.
                assert (job.state is CANCELLING) == (core.jobs.get(job.key) is not job), job.state
                assert ident not in job.failed, "a job went back to a worker that failed it"
        for svc in core.services.values():
            assert len(set(map(id, svc.idle))) == len(svc.idle)
            for w in svc.idle:
                assert core.workers.get(w.identity) is w
        waiting_ids = {id(j) for j in core.waiting}
        assert len(waiting_ids) == len(core.waiting)
        for j in core.waiting:
            assert j.worker is None and j.state is WAITING
            assert core.jobs.get(j.key) is j
            assert id(j) not in {id(h) for h in held}, "job both waiting and on a worker"
            assert j.stream is None or j.stream.held_start is None
            if j.rid is not None:  # opaque: see test_requeued_opaque_job_gets_a_fresh_deadline
                assert j.deadline > self.now, "a waiting job outlived its deadline"
            # No idle worker of its chain that has not failed it (computed without
            # _idle_worker_for, which takes the worker it finds off the idle deque).
            for step in core._chain(j):
                svc = core.services.get(step.service)
                if svc is not None:
                    assert not any(w.identity not in j.failed for w in svc.idle), "a waiting job has an idle worker that could serve it"
        for key, j in core.jobs.items():
            assert j.key == key and j.state in (WAITING, ASSIGNED, STREAMING)
            assert (id(j) in waiting_ids) != (j.worker is not None)
            if j.worker is not None:
                assert j.worker.jobs.get(j.key) is j and core.workers.get(j.worker.identity) is j.worker
            if j.rid is not None:
                assert core.by_client.get((j.client, j.rid)) is j
                assert j.stream is not None and (j.stream.held_start is None or not j.stream.started)
                assert j.stream.base <= j.stream.delivered <= len(j.request.text)  # type: ignore[union-attr]
        assert all(core.jobs.get(j.key) is j for j in core.by_client.values())
        fresh = [j for j in core.waiting if j.key not in self.dispatched]
        assert len(fresh) <= core.s.max_queue
        for client in SM_CLIENTS:
            live = sum(1 for j in core.jobs.values() if j.client == client)
            assert core.inflight.get(client, 0) == live
            assert live <= core.s.max_inflight_per_client
        assert core.counters["failovers"] >= sum(j.failovers for j in core.jobs.values())

    @invariant()
    def outcomes_add_up(self) -> None:
        """Every request is in flight or landed in exactly one outcome counter."""
        c = self.core.counters
        assert c["requests"] == sum(c[o] for o in OUTCOMES) + len(self.core.jobs), c
        assert c["requests"] == sum(self.sent.values())

    @invariant()
    def finals_accounted(self) -> None:
        jobs = self.core.jobs
        for client in SM_CLIENTS:
            owed = sum(self.sent[k] - self.got[k] - self.exempt[k] - self.lost[k] for k in self.sent if k[0] == client)
            live = sum(1 for j in jobs.values() if j.client == client)
            assert owed == live, f"client {client!r} is owed {owed} FINALs but has {live} live jobs"

    def teardown(self) -> None:
        # Every worker falls silent; after enough time everything is finished.
        self.now += EXPIRY + 0.01
        self._apply(self.core.tick(self.now))
        self.finals_accounted()
        assert not self.core.workers
        self.now += TIMEOUT + 0.01
        self._apply(self.core.tick(self.now))
        self.finals_accounted()
        core = self.core
        assert not core.jobs and not core.waiting and not core.by_client and not core.inflight
        for key, n in self.sent.items():
            assert self.got[key] + self.exempt[key] + self.lost[key] == n, f"{key}: sent {n}, FINALs {self.got[key]}, forgiven {self.exempt[key]}"
        assert not self.streams


BrokerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_broker_random_interleavings = BrokerMachine.TestCase


# Hypothesis' stateful runner enables a random subset of rules per example
# ("swarm testing"), which rarely lets a worker stream a whole job. This
# second driver replays the same rules with fixed weights that favour the
# full request → start → audio → mark → end path, with enough worker deaths
# and errors to fail jobs over mid-stream, and checks the same invariants.
SEQUENCE_WEIGHTS = {
    "tts_request": 8,
    "tts_request_any": 3,
    "opaque_request": 2,
    "client_cancels": 2,
    "client_misc": 1,
    "worker_ready": 4,
    "worker_misc": 2,
    "worker_streams": 12,
    "worker_reply": 2,
    "busy_worker_fails": 2,
    "tick": 4,
}
_WEIGHTED_RULES = [name for name, weight in SEQUENCE_WEIGHTS.items() for _ in range(weight)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_broker_random_sequences(data: st.DataObject) -> None:
    m = BrokerMachine()
    m.structure()
    m.finals_accounted()
    for _ in range(data.draw(st.integers(5, 120), label="steps")):
        name = data.draw(st.sampled_from(_WEIGHTED_RULES), label="rule")
        r = getattr(getattr(BrokerMachine, name), RULE_MARKER)
        if not all(p(m) for p in r.preconditions):
            continue
        kwargs = {arg: data.draw(strategy, label=arg) for arg, strategy in r.arguments.items()}
        r.function(m, **kwargs)
        m.structure()
        m.finals_accounted()
    m.teardown()


def test_failover_tries_the_failed_workers_service_before_earlier_chain_steps() -> None:
    """Another worker of the same voice first, then the rest of the chain (even an earlier step)."""
    s = replace(SETTINGS, chains={"en": (Step(SVC_EN), Step(SVC_EN_AMY))})
    rig = Rig(s)
    rig.worker(W2, SVC_EN_AMY, CAPS_EN_AMY, now=0.0)
    rig.worker(W3, SVC_EN_AMY, CAPS_EN_AMY, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.1), W2)  # joe has no worker yet: amy serves
    rig.worker(W1, SVC_EN, CAPS_EN, now=0.2)  # now joe, the first step, is idle too
    out = rig.core.on_worker(W2, DISCONNECT, 0.3)
    [req] = requests_to(out, W3)
    assert req.address == k and requests_to(out, W1) == []


def test_engine_service_names_need_capabilities() -> None:
    rig = Rig()
    out = rig.core.on_worker(W1, ready("piper.fake", None), 0.0)
    assert [a.frames for a in out if a.to_worker and a.peer == W1] == [mdp.DISCONNECT_FRAMES]
    assert W1 not in rig.core.workers


def test_engines_in_end_stats_are_the_ones_that_spoke() -> None:
    rig = Rig()
    rig.worker(W1)
    rig.worker(W2, now=0.0)
    k = job_key(rig.request(C1, b"a", now=0.1), W1)
    rig.core.on_worker(W1, start(k, b"a"), 0.2)  # held: no audio yet
    out = rig.core.on_worker(W1, DISCONNECT, 0.3)  # invisible failover
    [req] = requests_to(out, W2)
    out = rig.serve(W2, req.address, b"a", 0.4)
    [final] = to_client(out, C1)
    assert json.loads(final.body[2])["engines"] == ["piper"]
