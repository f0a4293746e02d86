"""The broker's routing state machine, with no sockets and no clock.

Theory of operation
-------------------
The socket loop (``broker/server.py``) feeds this object four kinds of
events — a client message, a worker message, a tick, and a failed send — each
with the current time, and gets back a list of :data:`Action` tuples saying
which frames to send to which peer. Nothing here blocks, sleeps, reads the
clock or touches ZeroMQ, so every rule can be driven from a unit test.

Rules:

* Everything that affects routing lives in this file. The server must not
  keep state of its own about workers or requests.
* A *job* is one client request. It is either waiting in ``self.waiting``
  (in order of priority, then of arrival; bounded by ``max_queue``) or
  assigned to exactly one worker. A worker
  holds at most ``slots`` jobs (its capabilities say how many; 1 for a plain
  MDP worker), each known by the address the broker gave it. A job leaves the
  broker exactly once, through :meth:`_finish`, which sends the client its
  FINAL (or nothing, when the client is gone).
* Workers are kept per service; those with a free slot sit in the service's
  ``idle`` deque in least-recently-used order. Dispatch takes the least loaded
  of them (the leftmost on a tie); a worker that frees a slot goes to the right.
* A job finished early (cancelled, its client gone, its id reused) stays
  attached to its worker, in state CANCELLING, until the worker's FINAL
  arrives, so a worker is never handed new work while it may still be
  speaking the old one. Its PARTIALs are dropped.
* Each job has an explicit :class:`JobState`; ``JOB_TRANSITIONS`` lists the
  legal moves and ``WORKER_EVENTS`` the TTS events a worker may send in each
  state, so "audio before start" or "a second start" is one table lookup
  (:class:`JobStateError`, naming role, state and event).
* A service's languages and voices are those of its live workers, each of
  which gets only what it itself speaks (capabilities are validated per
  worker at READY, ``broker/caps.py``). A service whose last worker left is
  kept ``service_grace_s`` for a restart, then forgotten.
* Every request with a valid id counts once in ``requests`` and ends in
  exactly one of ``OUTCOMES``.
* A worker is alive while any command from it arrived within
  ``heartbeat * liveness``; a busy one is *stuck* when no reply to any of its
  jobs came for ``stuck_timeout``. A dead, disconnected, stuck or garbling
  worker *fails* every job it holds, an erring one the job it erred on
  (:meth:`_failover`); each job goes back to the front of the
  queue, excluded from the workers that already failed it, to be served by the
  next live worker of its chain (``broker/routing.py``), at most
  ``max_failovers`` times. A dead, stuck or garbling worker is also out of
  rotation (it must re-register); one that answered ``error`` stays in it.
* TTS failover is invisible before audio: the broker holds ``start`` until the
  first audio chunk, so a job that fails before it simply starts elsewhere.
  After audio, the job resumes at the first sentence not fully delivered: the
  worker marks each finished sentence with its end offset in the text, and the
  next worker gets the rest of the text, in the format and rate already
  announced, while the client gets a ``failover`` event and gapless sequence
  numbers.
* TTS jobs (service ``tts`` or an engine service) speak the event protocol of
  ``broker/tts.py``; what the client is sent of them (held start, sequence
  numbers, rebased marks, failover events, statistics) is rewritten by the
  job's :class:`broker.stream.Stream`. Jobs for any other service are relayed opaquely, per RFC 18: re-
  queued if their worker fails before replying, ended with an error after.

Transitions of a job (``JOB_TRANSITIONS``)::

    WAITING ──► ASSIGNED ──(start)──► STREAMING ──(FINAL from worker)──► DONE
       │  ▲        │ │                   │ │
       │  └─(failover)─────────────────── │ └──(cancel / client gone / id reused)──► CANCELLING ──► DONE
       │           └──(error before start; FINAL of an opaque job)──────────────────────────────► DONE
       └──(expired / cancelled)──► DONE
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Protocol

from engines import registry as engines

from . import mdp, tts
from .caps import BASE_REQUEST_KEYS, CapsError, EngineCaps, parse_caps
from .routing import Step, chain_for, route_language
from .stream import Stream

log = logging.getLogger("broker")

MMI_SERVICE = "mmi.service"
MAX_EMPTY_SERVICES = 256
"""Services with no live worker remembered at once; beyond this the oldest is forgotten
at once (a peer cycling READYs through new names must not grow the table)."""
MAX_STATUS_SERVICES = 256
MAX_STATUS_WORKERS = 64
"""Entries listed in ``tts.status``, so building it never stalls the loop."""
OUTCOMES = ("completed", "errors", "cancelled", "expired")
"""Each request ends in exactly one of these counters."""


class Action(NamedTuple):
    """Send ``frames`` to ``peer`` on the frontend (``to_worker`` False) or backend."""

    to_worker: bool
    peer: bytes
    frames: list[bytes]


class CoreObserver(Protocol):
    """Told what happened, for counting (``broker/metrics.py``); called once per request or failover, never per chunk.

    Observers only read: what they are given must not be changed, and they
    must not raise (the server's guard would drop the event being handled)."""

    def request_done(self, job: "Job", outcome: str, final: Optional[list[bytes]], now: float) -> None:
        """``job`` left the broker with ``outcome`` (one of ``OUTCOMES``); ``final`` is the FINAL body the client got, if any."""

    def request_refused(self, service: bytes, code: str) -> None:
        """A TTS request refused at admission with error ``code`` (it never became a job)."""

    def failover(self, reason: str) -> None:
        """A job failed over to another worker because of ``reason`` (the text ``tts.status`` shows)."""


@dataclass(frozen=True)
class CoreSettings:
    heartbeat_s: float = 0.25
    """Interval between heartbeats, in seconds (RFC 18 keeps broker and worker equal)."""
    liveness: int = 3
    """Missed heartbeats after which a peer is dead."""
    request_timeout_s: float = 10.0
    """How long a request may wait for a free worker, in seconds."""
    max_text_chars: int = 5000
    max_queue: int = 1000
    """Requests waiting for a worker, all clients together."""
    max_inflight_per_client: int = 64
    default_language: str = "en"
    known_voices: frozenset[str] = frozenset()
    """Voices that configured workers will serve, known before they register."""
    chains: Mapping[str, tuple[Step, ...]] = field(default_factory=dict)
    """Fallback chain per language (primary subtag); see ``broker/routing.py``."""
    stuck_timeout_s: float = 10.0
    """A busy worker that sends nothing back for this long is failed over, in seconds."""
    max_failovers: int = 3
    """A request that has failed this many workers ends with ``internal`` (a poison request
    must not take down every restarted worker in turn)."""
    service_grace_s: float = 5.0
    """A service whose last worker left is remembered this long, in seconds, so that its
    requests wait for a supervised restart; after it they route as if it never existed."""


class JobState(enum.Enum):
    """Where a job is; see the transition diagram in the module docstring."""

    WAITING = "waiting"
    """In ``BrokerCore.waiting``, for a worker."""
    ASSIGNED = "assigned"
    """Sent to a worker that has not said ``start`` yet (an opaque job stays here)."""
    STREAMING = "streaming"
    """Its worker said ``start``: audio, marks and the FINAL may follow."""
    CANCELLING = "cancelling"
    """Finished for the client, but its worker still holds it until the worker's FINAL."""
    DONE = "done"


WAITING, ASSIGNED, STREAMING, CANCELLING, DONE = JobState

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    WAITING: frozenset({ASSIGNED, DONE}),
    ASSIGNED: frozenset({STREAMING, WAITING, CANCELLING, DONE}),
    STREAMING: frozenset({WAITING, CANCELLING, DONE}),
    CANCELLING: frozenset({DONE}),
    DONE: frozenset(),
}
"""Legal moves of a job. WAITING → ASSIGNED is dispatch; back to WAITING is failover."""

WORKER_EVENTS: dict[JobState, frozenset[str]] = {
    ASSIGNED: frozenset({"start", "error"}),
    STREAMING: frozenset({"audio", "mark", "timing", "end", "error", "other"}),
}
"""TTS events a worker may send for a job in each state; anything else is a protocol error."""


class JobStateError(mdp.ProtocolError):
    """A peer's event that the job's state does not allow, naming role, state and event."""

    def __init__(self, role: str, state: JobState, event: str) -> None:
        super().__init__(f"{role} sent {event!r} to a job in state {state.value}")
        self.role, self.state, self.event = role, state, event


@dataclass(eq=False)
class Job:
    key: bytes
    """Address the broker gives the worker for this job (RFC 18 'client address')."""
    client: bytes
    service: bytes
    """Service name the client addressed, echoed in every reply."""
    body: list[bytes]
    """Body sent to the worker, for an opaque job; a TTS job's is built per worker (:meth:`BrokerCore._request_for`)."""
    deadline: float
    created: float
    rid: Optional[bytes] = None
    """TTS request id; None for an opaque (non-TTS) job."""
    request: Optional[tts.SynthesisRequest] = None
    stream: Optional[Stream] = None
    """What the client has been sent (TTS jobs only)."""
    target: Optional[str] = None
    """Only this service may serve it (client addressed an engine service, or an opaque job)."""
    state: JobState = WAITING
    worker: Optional["Worker"] = None
    replied: bool = False
    """Something reached the client already."""
    failed: set[bytes] = field(default_factory=set)
    """Workers that failed this job; never given it again."""
    failovers: int = 0
    last_error: Optional[tuple[str, str]] = None
    """The last engine error, reported if the chain runs out."""
    progress: float = 0.0
    """When the current worker last replied (or got the job)."""
    prefer: Optional[str] = None
    """Service to try first: the one whose worker just failed the job."""

    @property
    def priority(self) -> int:
        """The request's ``priority`` (0 when absent, and for an opaque job)."""
        return self.request.priority or 0 if self.request is not None else 0

    def move(self, state: JobState) -> None:
        if state not in JOB_TRANSITIONS[self.state]:
            raise JobStateError("broker", self.state, f"-> {state.value}")
        self.state = state

    def check_event(self, event: str) -> None:
        """One lookup instead of a "not before start" check per event."""
        if event not in WORKER_EVENTS.get(self.state, ()):
            raise JobStateError("worker", self.state, event)


@dataclass(eq=False)
class Worker:
    identity: bytes
    """ZeroMQ routing id: never shown to clients (it would let a peer claim the session)."""
    service: "Service"
    expires: float
    heartbeat_due: float
    label: str
    """Public id, assigned by the broker: what ``start`` and ``tts.status`` show."""
    caps: Optional[EngineCaps] = None
    """None for a plain MDP worker."""
    jobs: dict[bytes, Job] = field(default_factory=dict)
    """The jobs it holds, by key."""
    progress: float = 0.0
    """When it last replied to any job (or got one while holding none)."""
    served: int = 0
    certificate: Optional[str] = None
    """The CURVE certificate it authenticated with (``[security]``); None without CURVE."""

    @property
    def slots(self) -> int:
        return self.caps.slots if self.caps is not None else 1

    @property
    def has_room(self) -> bool:
        return len(self.jobs) < self.slots


@dataclass(eq=False)
class Service:
    name: str
    is_tts: bool = False
    """Served by engine workers (TTS protocol), not relayed opaquely."""
    engine: Optional[str] = None
    languages: tuple[str, ...] = ()
    """What its live workers speak, together; kept while it has none, for routing during the grace period."""
    voices: frozenset[str] = frozenset()
    workers: dict[bytes, Worker] = field(default_factory=dict)
    idle: deque[Worker] = field(default_factory=deque)
    failures: int = 0
    last_failure: str = ""
    empty_since: Optional[float] = None
    """When its last worker left; None while it has one."""

    def refresh(self) -> None:
        """Derive languages and voices from the live workers (capabilities are each worker's own)."""
        caps = [w.caps for w in self.workers.values() if w.caps is not None]
        if caps:
            self.languages = tuple(dict.fromkeys(lang for c in caps for lang in c.languages))
            self.voices = frozenset(v for c in caps for v in c.voices)


class BrokerCore:
    """Routing state; see the module docstring for the rules."""

    def __init__(self, settings: CoreSettings = CoreSettings(), observer: Optional[CoreObserver] = None) -> None:
        self.s = settings
        self.observer = observer
        """Told of each finished request and each failover (metrics); None: nobody."""
        self.services: dict[str, Service] = {}
        self.workers: dict[bytes, Worker] = {}
        self.waiting: deque[Job] = deque()
        self.jobs: dict[bytes, Job] = {}
        """Every live job by key."""
        self.by_client: dict[tuple[bytes, bytes], Job] = {}
        """Live TTS jobs by (client, request id)."""
        self.inflight: dict[bytes, int] = {}
        self._keys = itertools.count(1)
        self._key_prefix = os.urandom(4)
        self._worker_ids = itertools.count(1)
        self._empty: dict[str, Service] = {}
        """Services with no live worker, oldest first."""
        self.now = 0.0
        """Time of the event being handled (every entry point sets it)."""
        self.counters = {"requests": 0, **{o: 0 for o in OUTCOMES}, "failovers": 0}
        """Every request counted in ``requests`` at admission ends in exactly one of ``OUTCOMES``."""

    # ------------------------------------------------------------------ time

    @property
    def expiry(self) -> float:
        return self.s.heartbeat_s * self.s.liveness

    def tick(self, now: float) -> list[Action]:
        """Heartbeat workers, bury the dead ones, expire waiting requests."""
        self.now = now
        out: list[Action] = []
        dead = [w for w in self.workers.values() if w.expires <= now]
        for w in dead:  # first out of rotation, all of them, so no job fails over to a dead worker
            if w in w.service.idle:
                w.service.idle.remove(w)
        for w in dead:
            log.warning("worker %s (%s) expired: no heartbeat for %.2fs", w.label, w.service.name, self.expiry)
            self._remove_worker(w, "heartbeat lost", now, out)
        for w in list(self.workers.values()):
            if any(j.rid is not None for j in w.jobs.values()) and now - w.progress > self.s.stuck_timeout_s:
                self._reject(w, f"nothing for {self.s.stuck_timeout_s:g}s while busy (stuck)", now, out)
            elif w.heartbeat_due <= now:
                w.heartbeat_due = now + self.s.heartbeat_s
                out.append(Action(True, w.identity, mdp.HEARTBEAT_FRAMES))
        for job in [j for j in self.waiting if j.deadline <= now]:
            self.waiting.remove(job)
            self._expire(job, out)
        forgot = False
        for svc in list(self._empty.values()):
            if svc.empty_since is None or svc.empty_since + self.s.service_grace_s > now:
                break  # oldest first: the rest are younger
            self._forget(svc)
            forgot = True
        if forgot:  # requests that waited for it may now route elsewhere (e.g. the default language)
            self._dispatch_waiting(out)
        return out

    def _forget(self, svc: Service) -> None:
        self._empty.pop(svc.name, None)
        if self.services.get(svc.name) is svc and not svc.workers:
            del self.services[svc.name]
            log.info("service %s forgotten: no worker came back within %gs", svc.name, self.s.service_grace_s)

    @staticmethod
    def _error_body(rid: Optional[bytes], code: str, message: str) -> list[bytes]:
        """An error FINAL body: the TTS event, or ``["error", JSON]`` for an opaque service."""
        if rid is not None:
            return tts.error_body(rid, code, message)
        return [b"error", json.dumps({"code": code, "message": message}).encode()]

    def _expire(self, job: Job, out: list[Action]) -> None:
        if job.rid is not None and not self._routable(job):
            code, msg = tts.UNAVAILABLE, "no live engine worker can serve this request"
            if job.last_error is not None:
                msg += f" (the last one answered {job.last_error[0]}: {job.last_error[1]})"
            self._finish(job, out, tts.error_body(job.rid, code, msg), "expired")
        else:
            msg = f"no worker became free within {self.s.request_timeout_s:g}s"
            self._finish(job, out, self._error_body(job.rid, tts.TIMEOUT, msg), "expired")

    # --------------------------------------------------------------- workers

    def on_worker(self, identity: bytes, frames: list[bytes], now: float, certificate: Optional[str] = None) -> list[Action]:
        """A worker's message; ``certificate`` is the CURVE certificate of its connection (kept at READY)."""
        self.now = now
        worker = self.workers.get(identity)
        job = worker.jobs.get(frames[2]) if worker is not None and len(frames) == 8 else None
        if (
            # The hot path, an audio chunk of the job the worker holds, checked
            # here without building a command object; anything else goes the long way.
            job is not None
            and len(frames) == 8
            and frames[5] == b"audio"
            and frames[1] == mdp.W_PARTIAL
            and frames[0] == mdp.WORKER
            and frames[2] == job.key
            and frames[3] == b""
            and frames[4] == job.rid
            and len(frames[6]) == 4
            and job.state is STREAMING
            and job.stream.audio_ok(frames[6], frames[7])  # type: ignore[union-attr]
        ):
            assert worker is not None and job.stream is not None
            worker.expires = now + self.expiry
            job.progress = worker.progress = now
            job.replied = True
            return [Action(False, job.client, mdp.client_reply_frames(job.service, body, False)) for body in job.stream.audio(frames[7], now)]
        out: list[Action] = []
        try:
            cmd = mdp.decode_worker(frames)
        except mdp.ProtocolError as exc:
            log.warning("invalid message from worker %s: %s; disconnecting it", identity.hex(), exc)
            if worker is not None:
                self._remove_worker(worker, f"protocol error: {exc}", now, out)
            out.append(Action(True, identity, mdp.DISCONNECT_FRAMES))
            return out

        if isinstance(cmd, mdp.WorkerReady):
            if worker is not None:
                self._reject(worker, "second READY", now, out)
            else:
                self._register(identity, cmd, now, out, certificate)
            return out
        if worker is None:
            if not isinstance(cmd, mdp.WorkerDisconnect):
                # A worker the broker does not know (e.g. the broker restarted):
                # RFC 18 says disconnect so that it re-registers.
                out.append(Action(True, identity, mdp.DISCONNECT_FRAMES))
            return out

        worker.expires = now + self.expiry
        if isinstance(cmd, mdp.WorkerHeartbeat):
            return out
        if isinstance(cmd, mdp.WorkerDisconnect):
            log.info("worker %s (%s) disconnected", worker.label, worker.service.name)
            self._remove_worker(worker, "worker disconnected", now, out)
            return out
        if isinstance(cmd, mdp.WorkerReply):
            job = worker.jobs.get(cmd.address)
            if job is None:
                self._reject(worker, "reply for a job it does not hold", now, out)
                return out
            if job.rid is None:
                self._relay_opaque(worker, job, cmd, out)
            else:
                self._relay_tts(worker, job, cmd, now, out)
            return out
        self._reject(worker, f"unexpected {type(cmd).__name__}", now, out)
        return out

    def _register(self, identity: bytes, cmd: mdp.WorkerReady, now: float, out: list[Action], certificate: Optional[str] = None) -> None:
        name = cmd.service

        def refuse(why: str) -> None:
            log.warning("worker %s refused for service %s: %s", identity.hex(), name[:80], why)
            out.append(Action(True, identity, mdp.DISCONNECT_FRAMES))

        if name in tts.RESERVED_SERVICES or name.startswith("mmi."):
            return refuse("reserved service name")
        try:
            caps = parse_caps(cmd.capabilities)
        except CapsError as exc:
            return refuse(f"invalid capabilities: {exc}")
        if caps is None and name.startswith(engines.service_prefixes()):
            return refuse("engine service without TTS capabilities")
        svc = self.services.get(name)
        if svc is not None and svc.workers and (svc.is_tts, svc.engine) != (caps is not None, caps and caps.engine):
            # One service, one kind of worker: a request must not depend on which one it lands on.
            theirs = svc.engine or "plain MDP"
            return refuse(f"its live workers are {theirs}, this one is {caps.engine if caps else 'plain MDP'}")
        if svc is None:
            svc = self.services[name] = Service(name)
        if not svc.workers:  # new, or coming back within its grace period: it takes this worker's kind
            svc.is_tts, svc.engine = caps is not None, caps.engine if caps else None
            svc.empty_since = None
            self._empty.pop(name, None)
        worker = Worker(identity, svc, now + self.expiry, now + self.s.heartbeat_s, f"w{next(self._worker_ids)}", caps, certificate=certificate)
        self.workers[identity] = worker
        svc.workers[identity] = worker
        svc.refresh()
        pid = caps.pid if caps else None
        log.info("worker %s up: service %s%s%s", worker.label, name, f" pid {pid}" if pid else "", f" certificate {certificate}" if certificate else "")
        self._worker_idle(worker, out)

    def _reject(self, worker: Worker, why: str, now: float, out: list[Action]) -> None:
        log.warning("worker %s (%s) sent %s; disconnecting it", worker.label, worker.service.name, why)
        self._remove_worker(worker, why, now, out)
        out.append(Action(True, worker.identity, mdp.DISCONNECT_FRAMES))

    def _remove_worker(self, worker: Worker, why: str, now: float, out: list[Action]) -> None:
        svc = worker.service
        self.workers.pop(worker.identity, None)
        svc.workers.pop(worker.identity, None)
        try:
            svc.idle.remove(worker)
        except ValueError:
            pass
        svc.refresh()
        if not svc.workers and self.services.get(svc.name) is svc:
            svc.empty_since = now
            self._empty[svc.name] = svc
            if len(self._empty) > MAX_EMPTY_SERVICES:
                self._forget(next(iter(self._empty.values())))
        jobs, worker.jobs = list(worker.jobs.values()), {}
        for job in jobs:
            self._failover(job, worker, why, now, out)
        self._dispatch_waiting(out)

    def _failover(self, job: Job, worker: Worker, why: str, now: float, out: list[Action], error: Optional[tuple[str, str]] = None) -> None:
        """``worker`` failed ``job``: put the job back for the next worker of its chain, or end it."""
        svc = worker.service
        if error is None or error[0] != tts.BAD_REQUEST:  # a refusal is not the worker's failure
            svc.failures += 1
            svc.last_failure = why
        job.worker = None
        job.failed.add(worker.identity)
        job.prefer = svc.name
        if job.state is CANCELLING:  # already finished; it only waited for its worker to let go
            job.move(DONE)
            return
        if job.rid is None:  # opaque: safe to resend only if nothing was relayed
            if job.replied:
                log.error("job %s: worker %s failed mid-reply: %s", job.key.hex(), worker.label, why)
                self._finish(job, out, self._error_body(None, tts.INTERNAL, f"worker failed mid-reply: {why}"), "errors")
            else:
                log.warning("job %s: worker %s lost (%s) before replying; re-queued", job.key.hex(), worker.label, why)
                job.deadline = now + self.s.request_timeout_s
                job.move(WAITING)
                self.waiting.appendleft(job)
            return
        if error is not None:
            job.last_error = error
            if not self._routable(job):
                # The engine refused and no other worker could try: its answer stands.
                self._finish(job, out, tts.error_body(job.rid, *error), "errors")
                return
        if job.failovers >= self.s.max_failovers:
            msg = f"gave up after {job.failovers} failovers; last: {why}"
            log.error("job %s: %s", job.key.hex(), msg)
            self._finish(job, out, tts.error_body(job.rid, *(error or (tts.INTERNAL, msg))), "errors")
            return
        stream, req = job.stream, job.request
        assert stream is not None and req is not None
        base = stream.resume_point()
        if not any(c.isalnum() for c in req.text[base:]):
            self._finish(job, out, tts.End(stream.stats(now, job.failovers)).body(job.rid), "completed")
            return
        job.failovers += 1
        stream.failover_reason = why
        job.deadline = now + self.s.request_timeout_s
        self.counters["failovers"] += 1
        if self.observer is not None:
            self.observer.failover(why)
        log.warning(
            "job %s: failover from worker %s (%s): %s at character %d",
            job.key.hex(), worker.label, svc.name, why, base,
        )
        job.move(WAITING)
        self.waiting.appendleft(job)

    def _worker_idle(self, worker: Worker, out: list[Action]) -> None:
        """A worker has a free slot: fill its slots with the oldest waiting jobs it can serve, else park it."""
        for job in list(self.waiting):
            if not worker.has_room or self.workers.get(worker.identity) is not worker:
                break
            if worker.identity in job.failed:
                continue
            step = next((st for st in self._chain(job) if st.service == worker.service.name), None)
            if step is not None and self._fits(job, worker, step):
                self.waiting.remove(job)
                self._assign(job, worker, step, out)
        self._park(worker)

    @staticmethod
    def _park(worker: Worker) -> None:
        """Keep ``idle`` exact: a live worker with a free slot is in it once, at the right; any other is not."""
        idle = worker.service.idle
        if worker in idle:
            idle.remove(worker)
        if worker.has_room and worker.service.workers.get(worker.identity) is worker:
            idle.append(worker)

    # ------------------------------------------------------------- relaying

    def _relay_opaque(self, worker: Worker, job: Job, cmd: mdp.WorkerReply, out: list[Action]) -> None:
        if job.state is not CANCELLING:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, cmd.body, cmd.final)))
            job.replied = True
        if cmd.final:
            self._job_done(worker, job, out, None, "completed")

    def _relay_tts(self, worker: Worker, job: Job, cmd: mdp.WorkerReply, now: float, out: list[Action]) -> None:
        if job.state is CANCELLING:
            if cmd.final:
                self._job_done(worker, job, out, None, "cancelled")
            return
        stream = job.stream
        assert stream is not None
        job.progress = worker.progress = now
        body = cmd.body
        send: list[list[bytes]] = []
        try:
            if body[:1] != [job.rid]:
                raise tts.EventError("reply does not carry the job's request id")
            _, event = tts.decode_event(body)
            name = tts.event_name(event)
            job.check_event(name if name in WORKER_EVENTS[STREAMING] | {"start"} else "other")
            if cmd.final != isinstance(event, (tts.End, tts.Error)):
                raise tts.EventError(f"event {name!r} sent as {'FINAL' if cmd.final else 'PARTIAL'}")
            if isinstance(event, tts.Start):
                job.move(STREAMING)
                send += stream.on_start(event, worker.label)
            elif isinstance(event, tts.Audio):
                if not stream.audio_ok(body[2], event.pcm):
                    raise tts.EventError("audio chunk of partial samples")
                send += stream.audio(event.pcm, now)
            elif isinstance(event, tts.Error) and event.code != tts.CANCELLED:
                # The engine could not do it: let the next worker try.
                log.warning("job %s: worker %s answered %s: %s", job.key.hex(), worker.label, event.code, event.message)
                del worker.jobs[job.key]
                self._failover(job, worker, f"engine error {event.code}: {event.message}", now, out, (event.code, event.message))
                self._worker_idle(worker, out)
                self._dispatch_waiting(out)
                return
            elif isinstance(event, tts.Error):  # cancelled, though nobody asked: say so
                send.append(body)
            elif isinstance(event, tts.Timing):
                send += stream.on_timing(event, body)  # held until the audio it describes
            else:
                if isinstance(event, tts.End):
                    body = stream.on_end(event, now, job.failovers)
                elif isinstance(event, tts.Mark):
                    body = stream.on_mark(event)
                send += stream.release_start()
                send.append(body)
        except mdp.ProtocolError as exc:
            msg = f"sent a malformed reply: {exc}"
            log.error("job %s: worker %s %s", job.key.hex(), worker.label, msg)
            self._reject(worker, msg, now, out)
            return
        job.replied = True
        for frames in send[:-1]:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, frames, False)))
        if cmd.final:
            self._job_done(worker, job, out, send[-1], "completed" if send[-1][1] == b"end" else "errors")
        elif send:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, send[-1], False)))

    def _job_done(self, worker: Worker, job: Job, out: list[Action], final: Optional[list[bytes]], outcome: str) -> None:
        del worker.jobs[job.key]
        job.worker = None
        worker.progress = self.now
        worker.served += 1
        self._finish(job, out, final, outcome)
        self._worker_idle(worker, out)

    def _finish(self, job: Job, out: list[Action], final: Optional[list[bytes]], outcome: str) -> None:
        """The single exit of a job: forget it, count its outcome, send the client its FINAL body.

        A job already finished (cancelled, its client gone) is not counted again."""
        held = job.worker is not None and job.worker.jobs.get(job.key) is job
        if self.jobs.pop(job.key, None) is None:
            if job.state is CANCELLING and not held:
                job.move(DONE)
            return
        self.counters[outcome] += 1
        if self.observer is not None:
            self.observer.request_done(job, outcome, final, self.now)
        if job.state is WAITING:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass
        # A job its worker still holds is done once the worker lets go (see the rules).
        job.move(CANCELLING if held else DONE)
        if job.rid is not None:
            self.by_client.pop((job.client, job.rid), None)
        n = self.inflight.get(job.client, 1) - 1
        if n > 0:
            self.inflight[job.client] = n
        else:
            self.inflight.pop(job.client, None)
        if final is not None:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, final, True)))

    # --------------------------------------------------------------- clients

    def on_client(self, identity: bytes, frames: list[bytes], now: float) -> list[Action]:
        self.now = now
        out: list[Action] = []
        try:
            req = mdp.decode_client(frames)
        except mdp.ProtocolError as exc:
            log.warning("dropped invalid message from client %s: %s", identity.hex(), exc)
            return out
        service, body = req.service, req.body
        if service == MMI_SERVICE:
            code = b"200" if self._mmi_service(body[0]) else b"404"
            out.append(Action(False, identity, mdp.client_reply_frames(frames[2], [code], True)))
        elif service.startswith("mmi."):
            out.append(Action(False, identity, mdp.client_reply_frames(frames[2], [b"501"], True)))
        elif service == tts.CANCEL_SERVICE:
            self._cancel(identity, body[0], out)
        elif service == tts.STATUS_SERVICE:
            out.append(Action(False, identity, mdp.client_reply_frames(frames[2], [json.dumps(self.status()).encode()], True)))
        elif service == tts.SERVICE or self._is_tts_service(service):
            self._tts_request(identity, frames[2], service, body, now, out)
        else:
            self._opaque_request(identity, frames[2], service, body, now, out)
        return out

    def _is_tts_service(self, name: str) -> bool:
        """Engine services speak the TTS protocol, even before their first worker registers."""
        svc = self.services.get(name)
        if svc is not None and svc.is_tts:
            return True
        return name.startswith(engines.service_prefixes())

    def _refuse(self, job: Job, why: str, out: list[Action]) -> None:
        log.warning("refused request from client %s: %s", job.client.hex(), why)
        self.counters["errors"] += 1
        body = self._error_body(job.rid, tts.OVERLOADED, why)
        if self.observer is not None:
            self.observer.request_done(job, "errors", body, self.now)
        out.append(Action(False, job.client, mdp.client_reply_frames(job.service, body, True)))

    def _tts_request(self, identity: bytes, service_raw: bytes, service: str, body: list[bytes], now: float, out: list[Action]) -> None:
        rid = body[0]
        if not 1 <= len(rid) <= tts.MAX_REQUEST_ID:
            log.warning("dropped TTS request with invalid id from client %s", identity.hex())
            return
        dup = self.by_client.get((identity, rid))
        if dup is not None:
            # One FINAL per id, and nothing after it: the stream in flight ends here,
            # and the second request is not a request of its own.
            log.warning("job %s: request id %r reused by client %s while in flight; ending it", dup.key.hex(), rid[:32], identity.hex())
            self._finish(dup, out, tts.error_body(rid, tts.BAD_REQUEST, "request id reused while its stream was in flight; both ended"), "errors")
            self._abandon(dup, out)
            return
        self.counters["requests"] += 1

        def fail(code: str, message: str) -> None:
            self.counters["errors"] += 1
            if self.observer is not None:
                self.observer.request_refused(service_raw, code)
            log.info("request %r from client %s refused: %s: %s", rid[:32], identity.hex(), code, message)
            out.append(Action(False, identity, mdp.client_reply_frames(service_raw, tts.error_body(rid, code, message), True)))

        try:
            if len(body) != 2:
                raise tts.RequestError(tts.BAD_REQUEST, f"a TTS request has 2 body frames (request id, JSON), got {len(body)}")
            request = tts.parse_request(body[1], self.s.max_text_chars)
            self._check_route(request, service)
        except tts.RequestError as exc:
            fail(exc.code, exc.message)
            return
        target = None if service == tts.SERVICE else service
        key = self._new_key()
        job = Job(key, identity, service_raw, [], now + self.s.request_timeout_s, now, rid, request, Stream(rid, len(request.text), now), target)
        # Known by its id before dispatch: a dispatch that ends it at once (_assign) must find it.
        self.by_client[(identity, rid)] = job
        if self._enqueue(job, out):
            log.debug("job %s: request %r from client %s", key.hex(), rid[:32], identity.hex())
        else:
            del self.by_client[(identity, rid)]

    def _opaque_request(self, identity: bytes, service_raw: bytes, service: str, body: list[bytes], now: float, out: list[Action]) -> None:
        # The worker sees an address that starts with the client's own and echoes it.
        key = identity + b"\x00" + self._new_key()
        self.counters["requests"] += 1
        self._enqueue(Job(key, identity, service_raw, body, now + self.s.request_timeout_s, now, target=service), out)

    def _new_key(self) -> bytes:
        return self._key_prefix + next(self._keys).to_bytes(8, "big")

    def _enqueue(self, job: Job, out: list[Action]) -> bool:
        """Admit a new job: dispatch it now, or queue it within the bounds; False if refused."""
        if self.inflight.get(job.client, 0) >= self.s.max_inflight_per_client:
            self._refuse(job, f"client has {self.s.max_inflight_per_client} requests in flight already", out)
            return False
        found = self._idle_worker_for(job)
        if found is None and len(self.waiting) >= self.s.max_queue:
            self._refuse(job, f"broker queue is full ({self.s.max_queue} requests waiting)", out)
            return False
        self.jobs[job.key] = job
        self.inflight[job.client] = self.inflight.get(job.client, 0) + 1
        if found is None:
            # Behind every waiting job of its priority or higher, and behind those a failed
            # worker put back at the front (their listeners may be hearing them already).
            at = next((i for i, w in enumerate(self.waiting) if not w.failed and w.priority < job.priority), len(self.waiting))
            self.waiting.insert(at, job)
        else:
            self._assign(job, *found, out)
        return True

    def _idle_worker_for(self, job: Job) -> Optional[tuple[Worker, Step]]:
        """The least recently used idle worker of the first chain step that has one.

        After a failover the failed worker's own service comes first: another
        worker of the same voice, then the rest of the chain.
        """
        steps = self._chain(job)
        if job.prefer is not None:
            steps = sorted(steps, key=lambda st: st.service != job.prefer)
        for step in steps:
            svc = self.services.get(step.service)
            if svc is None:
                continue
            fit = [w for w in svc.idle if w.identity not in job.failed and self._fits(job, w, step)]
            if fit:
                return min(fit, key=lambda w: len(w.jobs)), step  # least loaded; min keeps the LRU order on ties
        return None

    def _dispatch_waiting(self, out: list[Action]) -> None:
        for job in list(self.waiting):
            found = self._idle_worker_for(job)
            if found is not None:
                self.waiting.remove(job)
                self._assign(job, *found, out)

    def _assign(self, job: Job, worker: Worker, step: Step, out: list[Action]) -> None:
        job.move(ASSIGNED)
        job.worker = worker
        job.progress = self.now
        if not worker.jobs:
            worker.progress = self.now
        worker.jobs[job.key] = job
        self._park(worker)
        body = job.body
        if job.rid is not None:
            try:
                body = [job.rid, self._request_for(job, worker, step)]
            except Exception as exc:
                # A request the broker cannot forward is this job's failure, not the broker's:
                # end it, keep the worker, keep the loop.
                if isinstance(exc, tts.RequestError):
                    log.warning("job %s: refused for worker %s: %s", job.key.hex(), worker.label, exc.message)
                    final = tts.error_body(job.rid, exc.code, exc.message)
                else:
                    log.exception("job %s: cannot build the request for worker %s; ending it", job.key.hex(), worker.label)
                    final = tts.error_body(job.rid, tts.INTERNAL, "the broker could not forward this request")
                del worker.jobs[job.key]
                job.worker = None
                self._park(worker)
                self._finish(job, out, final, "errors")
                return
        out.append(Action(True, worker.identity, mdp.WorkerRequest(job.key, body).frames()))

    def _fits(self, job: Job, worker: Worker, step: Step) -> bool:
        """This worker itself (not just its service) speaks the job's language and voice."""
        caps, req = worker.caps, job.request
        if caps is None or req is None or job.target is not None:
            return True
        voice = step.voice or req.voice
        if voice is not None and voice in worker.service.voices and voice not in caps.voices:
            return False
        lang = route_language(req.language, self.services.values(), self.s.chains, self.s.default_language)
        return lang not in worker.service.languages or lang in caps.languages

    def _request_for(self, job: Job, worker: Worker, step: Step) -> bytes:
        """The request as this worker should read it.

        Its own language code (through the ``tts`` front door a language the
        engine does not speak becomes the routed language; a request addressed
        to an engine service keeps its own, and the engine refuses it); the
        step's voice; and, when resuming, the rest of the text in the format
        and rate the client was promised.
        """
        req = job.request
        assert req is not None
        update: dict[str, Any] = {}
        lang = tts.normalize_language(req.language)
        caps = worker.caps
        if job.target is None and caps is not None and lang not in caps.languages:
            lang = route_language(req.language, self.services.values(), self.s.chains, self.s.default_language)
        update["language"] = lang
        if step.voice is not None:
            update["voice"] = step.voice
        elif req.voice is not None and caps is not None and req.voice not in caps.voices:
            update["voice"] = None
        stream = job.stream
        if stream is not None and stream.started:
            update.update(text=req.text[stream.base :], format=stream.format, sample_rate=stream.rate)
        # Forward compatibility: send only the keys this worker understands; one the
        # client set that it does not is a request this worker cannot honour.
        keys = caps.understands() if caps is not None else BASE_REQUEST_KEYS
        missing = sorted(k for k in req.model_fields_set if k not in keys)
        if missing:
            raise tts.RequestError(
                tts.BAD_REQUEST,
                f"{', '.join(missing)}: not understood by the worker chosen ({worker.service.name}, an older engine)",
            )
        return req.model_copy(update=update).model_dump_json(include=set(keys), exclude_none=True).encode()

    # --------------------------------------------------------------- routing

    def _chain(self, job: Job) -> list[Step]:
        if job.request is None:  # opaque
            return [Step(job.target)] if job.target is not None else []
        return chain_for(job.request, job.target, self.services, self.s.chains, self.s.default_language)

    def _routable(self, job: Job) -> bool:
        """Some live worker that has not failed this job could serve it."""
        for step in self._chain(job):
            svc = self.services.get(step.service)
            if svc is not None and any(w not in job.failed for w in svc.workers):
                return True
        return False

    def _check_route(self, request: tts.SynthesisRequest, service: str) -> None:
        """Refuse at once what no engine could ever serve; the rest may wait for a worker."""
        known = [s for s in self.services.values() if s.is_tts]
        if service != tts.SERVICE or not known:
            return
        if request.engine is not None and not any(s.engine == request.engine for s in known):
            raise tts.RequestError(tts.BAD_REQUEST, f"unknown engine {request.engine!r}: no worker of it has registered")
        if request.voice is not None and request.voice not in self.s.known_voices:
            voices = sorted({v for s in known for v in s.voices} | self.s.known_voices)
            if request.voice not in voices:
                raise tts.RequestError(tts.BAD_REQUEST, f"unknown voice {request.voice!r}; known voices: {', '.join(voices)}")

    def _mmi_service(self, name: bytes) -> bool:
        try:
            service = name.decode("ascii")
        except UnicodeDecodeError:
            return False
        if service == tts.SERVICE:
            return any(s.workers for s in self.services.values() if s.is_tts)
        if service in (tts.CANCEL_SERVICE, tts.STATUS_SERVICE, MMI_SERVICE):
            return True
        svc = self.services.get(service)
        return svc is not None and bool(svc.workers)

    # ---------------------------------------------------- cancel and failure

    def _cancel(self, identity: bytes, rid: bytes, out: list[Action]) -> None:
        job = self.by_client.get((identity, rid))
        reply = b"cancelled" if job is not None else b"unknown"
        out.append(Action(False, identity, mdp.client_reply_frames(tts.CANCEL_SERVICE.encode(), [rid, reply], True)))
        if job is None:
            return
        log.info("job %s: cancelled by client", job.key.hex())
        self._finish(job, out, tts.error_body(rid, tts.CANCELLED, "cancelled by the client"), "cancelled")
        self._abandon(job, out)

    def _abandon(self, job: Job, out: list[Action]) -> None:
        """Tell the worker of a job finished early (state CANCELLING) to stop speaking it.

        The job stays on its worker until the worker's FINAL: see the rules. (A
        finished job that was waiting has left the queue in :meth:`_finish`.)"""
        if job.state is CANCELLING and job.worker is not None and job.worker.caps is not None:
            out.append(Action(True, job.worker.identity, mdp.WorkerRequest(job.key, [tts.WORKER_CANCEL]).frames()))

    def on_send_failed(self, to_worker: bool, peer: bytes, now: float) -> list[Action]:
        """The server could not deliver to ``peer`` (gone, or at its high-water mark)."""
        self.now = now
        out: list[Action] = []
        if to_worker:
            worker = self.workers.get(peer)
            if worker is not None:
                self._remove_worker(worker, "unreachable", now, out)
            return out
        jobs = [j for j in self.jobs.values() if j.client == peer]
        if jobs:
            log.warning("client %s unreachable: cancelling its %d job(s)", peer.hex(), len(jobs))
        for job in jobs:
            self._finish(job, out, None, "cancelled")
            self._abandon(job, out)
        return out

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Services and workers, bounded in size (engine services first, then live ones), and the counters."""
        services = {}
        ranked = sorted(self.services.values(), key=lambda svc: (not svc.is_tts, not svc.workers))
        for svc in ranked[:MAX_STATUS_SERVICES]:
            services[svc.name] = {
                "tts": svc.is_tts,
                "engine": svc.engine,
                "languages": list(svc.languages) if svc.is_tts else None,
                "workers": [
                    {
                        "id": w.label,
                        "pid": w.caps.pid if w.caps else None,
                        "host": w.caps.host if w.caps else None,
                        "busy": bool(w.jobs),
                        "jobs": len(w.jobs),
                        "slots": w.slots,
                        "served": w.served,
                        "certificate": w.certificate,
                    }
                    for w in itertools.islice(svc.workers.values(), MAX_STATUS_WORKERS)
                ],
                "worker_count": len(svc.workers),
                "idle": len(svc.idle),
                "inflight": sum(len(w.jobs) for w in svc.workers.values()),
                "failures": svc.failures,
                "last_failure": svc.last_failure,
            }
        return {
            "services": services,
            "service_count": len(self.services),
            "waiting": len(self.waiting),
            "inflight": len(self.jobs),
            "counters": dict(self.counters),
        }
