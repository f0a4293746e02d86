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
  (FIFO, bounded by ``max_queue``) or assigned to exactly one worker. A worker
  holds at most one job. A job leaves the broker exactly once, through
  :meth:`_finish`, which sends the client its FINAL (or nothing, when the
  client is gone).
* Workers are kept per service; idle ones sit in the service's ``idle`` deque
  in least-recently-used order (dispatch takes from the left, a worker that
  finishes goes to the right).
* A cancelled job stays attached to its worker until the worker's FINAL
  arrives, so a worker is never handed new work while it may still be
  speaking the old one. Its PARTIALs are dropped.
* A worker is alive while any command from it arrived within
  ``heartbeat * liveness``. A dead or disconnected worker's job goes back to
  the front of the queue if nothing of it reached the client yet; otherwise it
  ends with ``error`` (mid-stream resumption belongs to the fallback layer).
* TTS jobs (service ``tts`` or an engine service) speak the event protocol of
  ``broker/tts.py``: the broker owns their sequence numbers and adds its own
  statistics. Jobs for any other service are relayed opaquely, per RFC 18.

Transitions of a job::

    new ──► waiting ──► running ──► (FINAL from worker) ──► done
              │  ▲         │ │
              │  └─────────┘ └──(cancel / client gone)──► cancelling ──► done
              └──(expired / cancelled)──► done
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from . import mdp, tts

log = logging.getLogger("broker")

MMI_SERVICE = "mmi.service"
ENGINE_SERVICE_PREFIXES = ("piper.", "xtts")
"""Service names reserved for engine workers: requests to them are TTS requests."""


class Action(NamedTuple):
    """Send ``frames`` to ``peer`` on the frontend (``to_worker`` False) or backend."""

    to_worker: bool
    peer: bytes
    frames: list[bytes]


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


@dataclass(eq=False)
class Job:
    key: bytes
    """Address the broker gives the worker for this job (RFC 18 'client address')."""
    client: bytes
    service: bytes
    """Service name the client addressed, echoed in every reply."""
    body: list[bytes]
    """Body sent to the worker."""
    deadline: float
    created: float
    rid: Optional[bytes] = None
    """TTS request id; None for an opaque (non-TTS) job."""
    request: Optional[tts.SynthesisRequest] = None
    target: Optional[str] = None
    """Only this service may serve it (client addressed an engine service, or an opaque job)."""
    worker: Optional["Worker"] = None
    cancelled: bool = False
    replied: bool = False
    """Something reached the client already."""
    started: bool = False
    """The client has had its ``start`` event."""
    seq: int = 0
    samples: int = 0
    width: int = 2
    rate: int = 0
    first_audio: Optional[float] = None
    engines: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Worker:
    identity: bytes
    service: "Service"
    expires: float
    heartbeat_due: float
    caps: Optional[dict[str, Any]] = None
    job: Optional[Job] = None
    served: int = 0

    @property
    def label(self) -> str:
        ident = self.identity
        if ident and all(0x21 <= b <= 0x7E for b in ident):
            return ident.decode()
        return ident.hex()


@dataclass(eq=False)
class Service:
    name: str
    caps: Optional[dict[str, Any]] = None
    """Capabilities of the engine workers serving it; None for an opaque service."""
    workers: dict[bytes, Worker] = field(default_factory=dict)
    idle: deque[Worker] = field(default_factory=deque)
    failures: int = 0
    last_failure: str = ""

    @property
    def is_tts(self) -> bool:
        return self.caps is not None


def _sort_key(svc: Service) -> tuple[int, str]:
    engine = svc.caps.get("engine") if svc.caps else None
    return (0 if engine == "piper" else 1, svc.name)


class BrokerCore:
    """Routing state; see the module docstring for the rules."""

    def __init__(self, settings: CoreSettings = CoreSettings()) -> None:
        self.s = settings
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
        self.counters = {"requests": 0, "completed": 0, "errors": 0, "cancelled": 0, "expired": 0}

    # ------------------------------------------------------------------ time

    @property
    def expiry(self) -> float:
        return self.s.heartbeat_s * self.s.liveness

    def tick(self, now: float) -> list[Action]:
        """Heartbeat workers, bury the dead ones, expire waiting requests."""
        out: list[Action] = []
        for w in list(self.workers.values()):
            if w.expires <= now:
                log.warning("worker %s (%s) expired: no heartbeat for %.2fs", w.label, w.service.name, self.expiry)
                self._remove_worker(w, "heartbeat lost", now, out)
            elif w.heartbeat_due <= now:
                w.heartbeat_due = now + self.s.heartbeat_s
                out.append(Action(True, w.identity, mdp.HEARTBEAT_FRAMES))
        for job in [j for j in self.waiting if j.deadline <= now]:
            self.waiting.remove(job)
            self._expire(job, out)
        return out

    @staticmethod
    def _error_body(rid: Optional[bytes], code: str, message: str) -> list[bytes]:
        """An error FINAL body: the TTS event, or ``["error", JSON]`` for an opaque service."""
        if rid is not None:
            return tts.error_body(rid, code, message)
        return [b"error", json.dumps({"code": code, "message": message}).encode()]

    def _expire(self, job: Job, out: list[Action]) -> None:
        self.counters["expired"] += 1
        if job.rid is not None and not self._routable(job):
            self._finish(job, out, tts.error_body(job.rid, tts.UNAVAILABLE, "no live engine worker can serve this request"))
        else:
            msg = f"no worker became free within {self.s.request_timeout_s:g}s"
            self._finish(job, out, self._error_body(job.rid, tts.TIMEOUT, msg))

    # --------------------------------------------------------------- workers

    def on_worker(self, identity: bytes, frames: list[bytes], now: float) -> list[Action]:
        out: list[Action] = []
        worker = self.workers.get(identity)
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
                self._register(identity, cmd, now, out)
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
            job = worker.job
            if job is None or cmd.address != job.key:
                self._reject(worker, "reply for a job it does not hold", now, out)
                return out
            if job.rid is None:
                self._relay_opaque(worker, job, cmd, out)
            else:
                self._relay_tts(worker, job, cmd, now, out)
            return out
        self._reject(worker, f"unexpected {type(cmd).__name__}", now, out)
        return out

    def _register(self, identity: bytes, cmd: mdp.WorkerReady, now: float, out: list[Action]) -> None:
        name = cmd.service
        if name in tts.RESERVED_SERVICES or name.startswith("mmi."):
            log.warning("worker %s tried to register reserved service %s", identity.hex(), name)
            out.append(Action(True, identity, mdp.DISCONNECT_FRAMES))
            return
        caps = _valid_caps(cmd.capabilities)
        svc = self.services.get(name)
        if svc is None:
            svc = self.services[name] = Service(name, caps)
        elif caps is not None:
            svc.caps = caps
        worker = Worker(identity, svc, now + self.expiry, now + self.s.heartbeat_s, caps)
        self.workers[identity] = worker
        svc.workers[identity] = worker
        pid = caps.get("pid") if caps else None
        log.info("worker %s up: service %s%s", worker.label, name, f" pid {pid}" if pid else "")
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
        job, worker.job = worker.job, None
        if job is None:
            return
        svc.failures += 1
        svc.last_failure = why
        job.worker = None
        if job.cancelled:
            self._finish(job, out, None)
        elif not job.replied:
            log.warning("job %s: worker %s lost (%s) before any reply; re-queued", job.key.hex(), worker.label, why)
            self.waiting.appendleft(job)
            self._dispatch_waiting(now, out)
        else:
            msg = f"worker {worker.label} failed mid-stream: {why}"
            log.error("job %s: %s", job.key.hex(), msg)
            self._finish(job, out, self._error_body(job.rid, tts.INTERNAL, msg))

    def _worker_idle(self, worker: Worker, out: list[Action]) -> None:
        """A worker is free: give it the oldest waiting job it can serve, else park it."""
        for job in self.waiting:
            if self._can_serve(worker.service, job):
                self.waiting.remove(job)
                self._assign(job, worker, out)
                return
        worker.service.idle.append(worker)

    # ------------------------------------------------------------- relaying

    def _relay_opaque(self, worker: Worker, job: Job, cmd: mdp.WorkerReply, out: list[Action]) -> None:
        if not job.cancelled:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, cmd.body, cmd.final)))
            job.replied = True
        if cmd.final:
            self._job_done(worker, job, out, None)

    def _relay_tts(self, worker: Worker, job: Job, cmd: mdp.WorkerReply, now: float, out: list[Action]) -> None:
        if job.cancelled:
            if cmd.final:
                self._job_done(worker, job, out, None)
            return
        body = cmd.body
        try:
            if body[:1] != [job.rid]:
                raise ValueError("reply does not carry the job's request id")
            if body[1:2] == [b"audio"] and len(body) == 4:
                # The hot path: checked without decoding the event.
                if not job.started:
                    raise ValueError("audio before start")
                if len(body[3]) % job.width:
                    raise ValueError("audio chunk of partial samples")
                if job.first_audio is None:
                    job.first_audio = now
                job.samples += len(body[3]) // job.width
                body = [job.rid, b"audio", struct.pack(">I", job.seq), body[3]]
                job.seq += 1
            else:
                _, event = tts.decode_event(body)
                if isinstance(event, tts.Start):
                    if job.started:
                        raise ValueError("second start")
                    if event.format not in tts.SAMPLE_WIDTH:
                        raise ValueError(f"unknown format {event.format!r}")
                    job.width = tts.SAMPLE_WIDTH[event.format]
                    job.rate = int(event.sample_rate)
                    job.started = True
                    job.engines.append(event.engine)
                    event.worker = {**event.worker, "id": worker.label}
                    body = event.body(job.rid)
                elif isinstance(event, tts.End):
                    event.stats.update(self._stats(job, now))
                    body = event.body(job.rid)
                elif isinstance(event, tts.Audio):
                    raise ValueError("audio event must be 4 frames")
                if cmd.final != isinstance(event, (tts.End, tts.Error)):
                    raise ValueError(f"event {body[1]!r} sent as {'FINAL' if cmd.final else 'PARTIAL'}")
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            msg = f"worker {worker.label} sent a malformed reply: {exc}"
            log.error("job %s: %s", job.key.hex(), msg)
            worker.service.failures += 1
            worker.service.last_failure = msg
            # The worker's view of the job no longer matches ours: end the
            # client's stream and drop the worker, which must re-register.
            worker.job = None
            self._finish(job, out, tts.error_body(job.rid, tts.INTERNAL, msg))
            self._remove_worker(worker, msg, now, out)
            out.append(Action(True, worker.identity, mdp.DISCONNECT_FRAMES))
            return
        job.replied = True
        if cmd.final:
            worker.job = None
            worker.served += 1
            self._finish(job, out, body)
            self._worker_idle(worker, out)
        else:
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, body, False)))

    def _stats(self, job: Job, now: float) -> dict[str, Any]:
        return {
            "samples": job.samples,
            "audio_s": round(job.samples / job.rate, 4) if job.rate else 0.0,
            "chunks": job.seq,
            "ttfa_ms": round((job.first_audio - job.created) * 1000, 2) if job.first_audio is not None else None,
            "total_ms": round((now - job.created) * 1000, 2),
            "engines": job.engines,
        }

    def _job_done(self, worker: Worker, job: Job, out: list[Action], final: Optional[list[bytes]]) -> None:
        worker.job = None
        worker.served += 1
        self._finish(job, out, final)
        self._worker_idle(worker, out)

    def _finish(self, job: Job, out: list[Action], final: Optional[list[bytes]]) -> None:
        """The single exit of a job: forget it and send the client its FINAL body."""
        if self.jobs.pop(job.key, None) is None:
            return
        if job.rid is not None:
            self.by_client.pop((job.client, job.rid), None)
        n = self.inflight.get(job.client, 1) - 1
        if n > 0:
            self.inflight[job.client] = n
        else:
            self.inflight.pop(job.client, None)
        if final is not None and not job.cancelled:
            if len(final) > 1 and final[1] == b"error":
                self.counters["errors"] += 1
            else:
                self.counters["completed"] += 1
            out.append(Action(False, job.client, mdp.client_reply_frames(job.service, final, True)))

    # --------------------------------------------------------------- clients

    def on_client(self, identity: bytes, frames: list[bytes], now: float) -> list[Action]:
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
        return name.startswith(ENGINE_SERVICE_PREFIXES)

    def _refuse(self, job: Job, why: str, out: list[Action]) -> None:
        log.warning("refused request from client %s: %s", job.client.hex(), why)
        self.counters["errors"] += 1
        out.append(Action(False, job.client, mdp.client_reply_frames(job.service, self._error_body(job.rid, tts.OVERLOADED, why), True)))

    def _tts_request(self, identity: bytes, service_raw: bytes, service: str, body: list[bytes], now: float, out: list[Action]) -> None:
        rid = body[0]
        self.counters["requests"] += 1

        def fail(code: str, message: str) -> None:
            self.counters["errors"] += 1
            log.info("request %r from client %s refused: %s: %s", rid[:32], identity.hex(), code, message)
            out.append(Action(False, identity, mdp.client_reply_frames(service_raw, tts.error_body(rid, code, message), True)))

        try:
            tts.check_request_id(rid)
            if len(body) != 2:
                raise tts.RequestError(tts.BAD_REQUEST, f"a TTS request has 2 body frames (request id, JSON), got {len(body)}")
            if (identity, rid) in self.by_client:
                raise tts.RequestError(tts.BAD_REQUEST, "request id is already in flight on this connection")
            request = tts.parse_request(body[1], self.s.max_text_chars)
            self._check_route(request, service)
        except tts.RequestError as exc:
            if 1 <= len(rid) <= tts.MAX_REQUEST_ID:
                fail(exc.code, exc.message)
            else:
                log.warning("dropped TTS request with invalid id from client %s", identity.hex())
            return
        target = None if service == tts.SERVICE else service
        key = self._new_key()
        job = Job(key, identity, service_raw, [rid, request.to_json()], now + self.s.request_timeout_s, now, rid, request, target)
        if self._enqueue(job, out):
            self.by_client[(identity, rid)] = job
            log.debug("job %s: request %r from client %s", key.hex(), rid[:32], identity.hex())

    def _opaque_request(self, identity: bytes, service_raw: bytes, service: str, body: list[bytes], now: float, out: list[Action]) -> None:
        # The worker sees an address that starts with the client's own and echoes it.
        key = identity + b"\x00" + self._new_key()
        self._enqueue(Job(key, identity, service_raw, body, now + self.s.request_timeout_s, now, target=service), out)

    def _new_key(self) -> bytes:
        return self._key_prefix + next(self._keys).to_bytes(8, "big")

    def _enqueue(self, job: Job, out: list[Action]) -> bool:
        """Admit a new job: dispatch it now, or queue it within the bounds; False if refused."""
        if self.inflight.get(job.client, 0) >= self.s.max_inflight_per_client:
            self._refuse(job, f"client has {self.s.max_inflight_per_client} requests in flight already", out)
            return False
        for svc in self._candidates(job):
            if svc.idle:
                self._admitted(job)
                self._assign(job, svc.idle.popleft(), out)
                return True
        if len(self.waiting) >= self.s.max_queue:
            self._refuse(job, f"broker queue is full ({self.s.max_queue} requests waiting)", out)
            return False
        self._admitted(job)
        self.waiting.append(job)
        return True

    def _admitted(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.inflight[job.client] = self.inflight.get(job.client, 0) + 1

    def _assign(self, job: Job, worker: Worker, out: list[Action]) -> None:
        job.worker = worker
        worker.job = job
        body = job.body
        if job.rid is not None and worker.service.caps is not None:
            body = [job.rid, self._request_for(job, worker.service)]
        out.append(Action(True, worker.identity, mdp.WorkerRequest(job.key, body).frames()))

    def _request_for(self, job: Job, svc: Service) -> bytes:
        """The request as the chosen engine should read it: its own language code.

        Through the ``tts`` front door a language the engine does not speak
        becomes the default language (the routing rule); a request addressed
        to an engine service keeps its language, and the engine refuses it.
        """
        assert job.request is not None and svc.caps is not None
        lang = tts.normalize_language(job.request.language)
        if job.target is None and lang not in svc.caps.get("languages", ()):
            lang = self.s.default_language
        return job.request.model_copy(update={"language": lang}).to_json()

    # --------------------------------------------------------------- routing

    def _tts_services(self) -> list[Service]:
        return sorted((s for s in self.services.values() if s.is_tts), key=_sort_key)

    def _check_route(self, request: tts.SynthesisRequest, service: str) -> None:
        """Refuse at once what no engine could ever serve; the rest may wait for a worker."""
        known = self._tts_services()
        if service != tts.SERVICE or not known:
            return
        if request.engine is not None and not any(s.caps.get("engine") == request.engine for s in known):  # type: ignore[union-attr]
            raise tts.RequestError(tts.BAD_REQUEST, f"unknown engine {request.engine!r}: no worker of it has registered")
        if request.voice is not None and request.voice not in self.s.known_voices:
            voices = sorted({v for s in known for v in s.caps.get("voices", ())} | self.s.known_voices)  # type: ignore[union-attr]
            if request.voice not in voices:
                raise tts.RequestError(tts.BAD_REQUEST, f"unknown voice {request.voice!r}; known voices: {', '.join(voices)}")

    def _language_served(self, lang: str) -> bool:
        return any(lang in s.caps.get("languages", ()) for s in self._tts_services())  # type: ignore[union-attr]

    def _can_serve(self, svc: Service, job: Job) -> bool:
        if job.target is not None:
            return svc.name == job.target
        if svc.caps is None or job.request is None:
            return False
        req = job.request
        caps = svc.caps
        if req.engine is not None and caps.get("engine") != req.engine:
            return False
        if req.voice is not None and req.voice not in caps.get("voices", ()):
            return False
        lang = tts.normalize_language(req.language)
        if not self._language_served(lang):
            lang = self.s.default_language
        return lang in caps.get("languages", ())

    def _candidates(self, job: Job) -> list[Service]:
        if job.target is not None:
            svc = self.services.get(job.target)
            return [svc] if svc is not None else []
        return [s for s in self._tts_services() if self._can_serve(s, job)]

    def _routable(self, job: Job) -> bool:
        return any(s.workers for s in self._candidates(job))

    def _dispatch_waiting(self, now: float, out: list[Action]) -> None:
        for job in list(self.waiting):
            for svc in self._candidates(job):
                if svc.idle:
                    self.waiting.remove(job)
                    self._assign(job, svc.idle.popleft(), out)
                    break

    def _mmi_service(self, name: bytes) -> bool:
        try:
            service = name.decode("ascii")
        except UnicodeDecodeError:
            return False
        if service == tts.SERVICE:
            return any(s.workers for s in self._tts_services())
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
        self.counters["cancelled"] += 1
        self._finish(job, out, tts.error_body(rid, tts.CANCELLED, "cancelled by the client"))
        self._abandon(job, out)

    def _abandon(self, job: Job, out: list[Action]) -> None:
        """Stop whatever a finished job still occupies: its queue slot or its worker."""
        job.cancelled = True
        if job.worker is None:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass
            return
        # The job stays on its worker until the worker's FINAL: see the rules.
        if job.worker.caps is not None:
            out.append(Action(True, job.worker.identity, mdp.WorkerRequest(job.key, [tts.WORKER_CANCEL]).frames()))

    def on_send_failed(self, to_worker: bool, peer: bytes, now: float) -> list[Action]:
        """The server could not deliver to ``peer`` (gone, or at its high-water mark)."""
        out: list[Action] = []
        if to_worker:
            worker = self.workers.get(peer)
            if worker is not None:
                self._remove_worker(worker, "unreachable", now, out)
            return out
        jobs = [j for j in self.jobs.values() if j.client == peer and not j.cancelled]
        if jobs:
            log.warning("client %s unreachable: cancelling its %d job(s)", peer.hex(), len(jobs))
        for job in jobs:
            self.counters["cancelled"] += 1
            self._finish(job, out, None)
            self._abandon(job, out)
        return out

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        services = {}
        for svc in self.services.values():
            services[svc.name] = {
                "tts": svc.is_tts,
                "engine": svc.caps.get("engine") if svc.caps else None,
                "languages": svc.caps.get("languages") if svc.caps else None,
                "workers": [
                    {
                        "id": w.label,
                        "pid": (w.caps or {}).get("pid"),
                        "host": (w.caps or {}).get("host"),
                        "busy": w.job is not None,
                        "served": w.served,
                    }
                    for w in svc.workers.values()
                ],
                "idle": len(svc.idle),
                "failures": svc.failures,
                "last_failure": svc.last_failure,
            }
        return {"services": services, "waiting": len(self.waiting), "inflight": len(self.jobs), "counters": dict(self.counters)}


def _valid_caps(caps: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Accept a capabilities object only if it describes a TTS engine we can route to."""
    if caps is None or caps.get("protocol") != "tts/1":
        return None
    langs = caps.get("languages")
    if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
        return None
    voices = caps.get("voices", [])
    if not isinstance(voices, list):
        return None
    return caps
