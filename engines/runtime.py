"""The MDP/0.2 worker runtime shared by every engine.

The socket loop runs on the main thread and never waits on synthesis: jobs run
on long-lived synthesis threads, which push ready-made reply bodies through an
inproc PUSH/PULL pipe, so heartbeats keep flowing however long a sentence takes
(onnxruntime and torch release the GIL while they compute). Cancel is a flag a
synthesis thread checks between pieces of audio.

A worker holds up to ``slots`` jobs (announced in its capabilities; 1 unless
the engine or its configuration says more). Its synthesis threads (the
engine's ``threads``) advance them one piece of audio at a time, earliest
playback deadline first (``engines/schedule.py``), each job on at most one
thread at a time, so a job's replies stay in order. A second thread (Piper
has one) takes only first pieces: a new line starts at once, and the piece in
progress on the first thread is interrupted if its listener has audio enough
to wait for the new line and for the rest of that piece (``Pacing.interrupt``), so
the new line's first audio has the cores to itself. An engine whose runs can
take a share of the cores (``Engine.parallel``: Piper's frame mode, on half)
has a third thread for later pieces while it holds several jobs: two streams'
windows run at once on a core each (``FrameStreamer.narrow``), so neither
listener waits behind the other's long window, and the second thread stays
free to start a line. Each job is busy from the
broker's REQUEST until its FINAL has been sent, and after losing the broker the
worker re-registers only once the synthesis threads have let go of every old
job, so no job of a lost connection shares the model with a new one.

Everything that touches a torch model — loading it too — should run on one
thread (``run_worker`` loads on the first synthesis thread; XTTS has one):
torch keeps an OpenMP thread team per calling thread, and a second team
contending for the same cores made the tiny XTTS model's first chunk 60 %
slower here (65 ms instead of 40 ms).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import zmq

from broker import mdp, tts
from broker.caps import EngineCaps
from broker.keys import CurveKeys, secure_connect
from engines.alignment import Alignment, to_timing
from engines.audio import ChunkEncoder
from engines.base import Engine
from engines.host_cores import BUSY, IDLE, STARTING, HostCores
from engines.schedule import PRIORITY_STEP_S, SLACK, UNPACED, HasPlayback, Pacing, Playback, next_up
from engines.text import split_sentences

log = logging.getLogger("engines.runtime")

_EVERY, _STARTS, _TURNS = "every", "starts", "turns"
"""What a synthesis thread takes (:meth:`WorkerRuntime._synthesis_loop`): every piece, a job's
first piece only, or a later piece while the worker holds several jobs."""

_PARTIAL = b"P"
_FINAL = b"F"

IDLE_RELEASE_S = 30.0
"""Seconds with nothing to do after which a worker gives back the memory serving grew
(``Engine.release_memory``). Long enough that a scene's lines, seconds apart, find it warm:
giving back costs a short run (~30 ms for a Piper voice on 2 cores) that a line arriving then waits for,
and the next long window grows the arena again (~+17 % on a 512-frame window); first audio is
otherwise unchanged (measured in one process)."""

RELAY_PAUSE_S = 0.003
"""Seconds a synthesis thread rests after a stream's first audio, before its next piece.

That audio still has a way to go (this worker's socket thread, the broker, a gateway, the
client), one process wake-up after another. On a small machine the engine's next window
would hold every core meanwhile (onnxruntime's pool spins within a run), and each wake-up
waited for a time slice: measured per request as the client's first audio less the broker's
own ``ttfa_ms``, the relay of a passage's first audio took 9.0 ms through the Wyoming
gateway, 10.6 ms through the HTTP one and 6.0 ms to the ZeroMQ client, and 4.6 / 5.0 / 2.2 ms
with this rest (2 cores; two brokers, with and without it, 14 interleaved repetitions). A
listener then has a whole first window of audio in hand (about 90 ms for Piper), so the rest
costs it nothing. It is taken once per stream, and only by a stream that is the worker's only
job: with others in flight their pieces hold the cores anyway, and resting there only delays
them (four passages at once, side by side: 51 underrun chunks against 20 without it over two
runs of 12 rounds, though a third gave 12 and 14)."""


def trim_heap() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``):
    what a library frees stays in the process otherwise. Nothing where the C library has none."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class _Cancelled(Exception):
    pass


@dataclass(eq=False)
class _Job(HasPlayback):
    address: bytes
    rid: bytes
    raw: bytes
    request: Optional[tts.SynthesisRequest]
    """``raw`` read (None if invalid: its first step says why, in an ``error`` event)."""
    generation: int
    playback: Playback
    cancel: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    """Set once the synthesis threads have let go of it (its FINAL is in the pipe)."""
    steps: Optional[Iterator[None]] = None
    """Its synthesis, advanced one piece of audio per ``next()``."""
    busy: bool = False
    """A synthesis thread is advancing it now (guarded by the runtime's condition)."""
    pacing: Pacing = UNPACED
    """What its engine is told about its listener (set when it arrives)."""


def synthesis_executor() -> ThreadPoolExecutor:
    """The thread on which a worker loads its model and runs its first synthesis loop."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth")


class WorkerRuntime:
    """Connects one engine to a broker's backend and serves it until stopped."""

    def __init__(
        self,
        engine: Engine,
        backend: str,
        *,
        heartbeat_s: float = 0.25,
        liveness: int = 3,
        max_text_chars: int = 100_000,
        slots: Optional[int] = None,
        idle_release_s: float = IDLE_RELEASE_S,
        context: Optional[zmq.Context] = None,
        synthesis_thread: Optional[ThreadPoolExecutor] = None,
        curve: Optional[CurveKeys] = None,
        host: Optional[HostCores] = None,
    ) -> None:
        self.engine = engine
        self.host = host
        """The workers this one shares the machine's cores with (``engines/host_cores.py``); None: alone."""
        self.curve = curve
        """CURVE keys for a broker with ``[security] curve = true``; None: plain ZeroMQ."""
        self.backend = backend
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_text_chars = max_text_chars
        self.slots = slots or engine.slots
        """Jobs held at once (the engine's default unless configured)."""
        self.ctx = context or zmq.Context.instance()
        self._stop_asked = False
        """Set by :meth:`stop`; a plain flag, not an Event (see there)."""
        self._synth = synthesis_thread or synthesis_executor()
        self._generation = 0
        self._jobs: dict[bytes, _Job] = {}
        """Jobs held, by the address the broker gave each (socket thread only)."""
        self._work = threading.Condition()
        """Guards ``_active``, each job's ``busy`` and ``_stopping``; notified when any changes."""
        self._active: list[_Job] = []
        """Jobs handed to the synthesis threads and not yet let go."""
        self._stopping = False
        self._host_state = IDLE
        """What this worker last told the others on its cores (``_publish_state``)."""
        self._running = 0
        """Synthesis threads still in their loop (the last one out closes the pipe's sending end)."""
        self._start_cost = 0.1
        """Seconds a job's first piece takes (a moving average): what starting a new job costs the others."""
        self._grown = False
        """A job has run since the engine last gave back its memory."""
        self.idle_release_s = idle_release_s
        self._retrying = False  # reconnected, and no broker has answered since
        self._sock: Optional[zmq.Socket] = None
        self._pipe_addr = f"inproc://worker-pipe-{id(self)}"
        self._pipe = self.ctx.socket(zmq.PULL)
        self._pipe.bind(self._pipe_addr)
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, -1)
        self._push.connect(self._pipe_addr)
        self._push_lock = threading.Lock()
        """One sending end for every synthesis thread, so one job's replies arrive in order
        whichever thread made each; libzmq sockets may change threads behind a lock."""
        self.identity = f"{engine.service}/{os.getpid()}/{os.urandom(3).hex()}"

    # ----------------------------------------------------------- connection

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._generation += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, f"{self.identity}/{self._generation}".encode())
        secure_connect(sock, self.curve)
        sock.connect(self.backend)
        caps = EngineCaps.model_validate(
            {
                **self.engine.capabilities(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "request_keys": sorted(tts.SynthesisRequest.model_fields),
                "slots": self.slots,
            }
        )
        sock.send_multipart(mdp.WorkerReady(self.engine.service, caps.as_dict()).frames())
        self._sock = sock
        now = time.monotonic()
        self._broker_expires = now + self.heartbeat_s * self.liveness
        self._heartbeat_due = now + self.heartbeat_s
        # While no broker answers, the retries (one per liveness period) are logged at DEBUG only.
        log.log(logging.DEBUG if self._retrying else logging.INFO, "worker %s: READY for %s at %s", self.identity, self.engine.service, self.backend)

    def _reconnect(self, why: str) -> None:
        log.log(logging.DEBUG if self._retrying else logging.WARNING, "worker %s: %s; reconnecting", self.identity, why)
        self._retrying = True
        self._stop_jobs(timeout=None)
        self._jobs.clear()
        self._drain_pipe()
        self._connect()

    def _send(self, frames: list[bytes]) -> None:
        assert self._sock is not None
        self._sock.send_multipart(frames, copy=False)
        self._heartbeat_due = time.monotonic() + self.heartbeat_s

    # ------------------------------------------------------------- the loop

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM, installed by the CLI)."""
        roles = [_EVERY] + [_STARTS] * (max(1, self.engine.threads) - 1) + ([_TURNS] if self.engine.parallel else [])
        self._running = len(roles)
        self._synth.submit(self._synthesis_loop, _EVERY)
        for n, role in enumerate(roles[1:], 1):
            threading.Thread(target=self._synthesis_loop, args=(role,), name=f"synth-{role}-{n}", daemon=True).start()
        if self.host is not None:
            threading.Thread(target=self._watch_host, name="host-cores", daemon=True).start()
        self._connect()
        poller = zmq.Poller()
        poller.register(self._pipe, zmq.POLLIN)
        try:
            while not self._stop_asked:
                if self.host is not None:
                    self.host.renew()
                sock = self._sock
                assert sock is not None
                poller.register(sock, zmq.POLLIN)
                ready = dict(poller.poll(self.heartbeat_s * 1000))
                poller.unregister(sock)
                if self._pipe in ready:
                    self._drain_pipe()
                if sock in ready:
                    while self._sock is sock:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_broker(frames)
                now = time.monotonic()
                if now >= self._broker_expires:
                    self._reconnect("broker silent for too long")
                elif now >= self._heartbeat_due:
                    self._send(mdp.HEARTBEAT_FRAMES)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return within a heartbeat interval. It only sets a flag: the CLI calls
        it from SIGTERM's handler, and a second SIGTERM (the supervisor's, a few ms after the one a
        worker gets when the thread that started it ends) can land while the first handler is
        still inside it; an ``Event.set`` there took its lock twice and wedged the worker."""
        self._stop_asked = True

    def _stop_jobs(self, timeout: Optional[float]) -> None:
        """Cancel the jobs in hand and wait for the synthesis thread to let go (it checks between pieces)."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.released.wait(left):
                log.warning("worker %s: synthesis did not stop within %g s", self.identity, timeout)
                return

    def _shutdown(self) -> None:
        self._stop_jobs(timeout=5)
        with self._work:
            self._stopping = True
            self._work.notify_all()
        if self.host is not None:
            self.host.close()
        self._synth.shutdown(wait=False)
        if self._sock is not None:
            try:
                self._sock.send_multipart(mdp.DISCONNECT_FRAMES, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._sock.close(linger=100)
            self._sock = None
        self._pipe.close(linger=0)
        log.info("worker %s: stopped", self.identity)

    def _drain_pipe(self) -> None:
        """Forward what the synthesis thread produced; drop what belongs to a lost connection."""
        while True:
            try:
                msg = self._pipe.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            gen, address, kind, body = int(msg[0]), msg[1], msg[2], msg[3:]
            job = self._jobs.get(address)
            if job is None or gen != job.generation:
                continue
            final = kind == _FINAL
            self._send(mdp.WorkerReply(address, body, final).frames())
            if final:
                del self._jobs[address]

    # ------------------------------------------------ workers sharing the cores

    def _publish_state(self) -> None:
        """Tell the workers on the same cores what this one does now (under ``_work``)."""
        if self.host is not None:
            starting = any(j.playback.first is None and not j.cancel.is_set() for j in self._active)
            state = STARTING if starting else BUSY if self._active else IDLE
            if state != self._host_state:
                self.host.set(state)
                if state == STARTING:
                    self.host.announce_start()
                self._host_state = state

    def _elsewhere(self) -> int:
        """Other workers on the same cores that hold a job now (``Pacing.others_on_host``)."""
        return self.host.others()[0] if self.host is not None else 0

    def _others_starting(self) -> bool:
        return self.host is not None and self.host.others()[1] > 0

    def _watch_host(self) -> None:
        """When another worker on the same cores starts a line, cut short this one's run in
        progress where its listener can wait, as for a line of its own (:meth:`_cut_runs`); while
        that worker starts, ``_synthesis_loop`` feeds only listeners about to run dry."""
        assert self.host is not None
        while not self._stopping:
            try:
                woken = self.host.wait_start(0.5)
            except (OSError, ValueError):  # closed by _shutdown
                return
            if woken:
                with self._work:
                    self._cut_runs(lead=0.0, deadline=time.monotonic())

    def _on_broker(self, frames: list[bytes]) -> None:
        self._broker_expires = time.monotonic() + self.heartbeat_s * self.liveness
        if self._retrying:
            self._retrying = False
            log.info("worker %s: broker at %s answered", self.identity, self.backend)
        try:
            cmd = mdp.decode_worker(frames, from_broker=True)
        except mdp.ProtocolError as exc:
            log.warning("worker %s: dropped invalid message from broker: %s", self.identity, exc)
            return
        if isinstance(cmd, mdp.WorkerHeartbeat):
            return
        if isinstance(cmd, mdp.WorkerDisconnect):
            self._reconnect("broker sent DISCONNECT")
            return
        assert isinstance(cmd, mdp.WorkerRequest)
        if cmd.body == [tts.WORKER_CANCEL]:
            job = self._jobs.get(cmd.address)
            if job is not None:
                log.info("worker %s: job %s cancelled", self.identity, cmd.address.hex())
                job.cancel.set()
            return
        rid = cmd.body[0] if cmd.body else b"?"
        if len(self._jobs) >= self.slots or cmd.address in self._jobs:
            self._send(mdp.WorkerReply(cmd.address, tts.error_body(rid, tts.INTERNAL, "worker is busy"), True).frames())
            return
        if len(cmd.body) != 2:
            self._send(mdp.WorkerReply(cmd.address, tts.error_body(rid, tts.BAD_REQUEST, "expected request id and JSON"), True).frames())
            return
        arrived = time.monotonic()
        try:  # read here, not on its first step: its priority orders it among the jobs held
            request: Optional[tts.SynthesisRequest] = tts.parse_request(cmd.body[1], self.max_text_chars)
        except tts.RequestError:
            request = None
        urgency = PRIORITY_STEP_S * (request.priority or 0) if request is not None else 0.0
        job = _Job(cmd.address, rid, cmd.body[1], request, self._generation, Playback(arrived, urgency_s=urgency))
        job.pacing = Pacing(job.playback, lambda: list(self._active), lambda: self._start_cost, elsewhere=self._elsewhere)
        self._jobs[cmd.address] = job
        with self._work:
            self._active.append(job)
            self._publish_state()
            self._work.notify_all()  # a thread that takes only some pieces must not swallow the wake-up

    # ------------------------------------------------------------ synthesis

    def _synthesis_loop(self, role: str) -> None:
        """A synthesis thread: advance the jobs no other thread holds, earliest deadline first, until stopped.

        The first thread (:data:`_EVERY`) takes every job; the others (:data:`_STARTS`) only a
        job's first piece, so a new line starts while the first thread is in another stream's
        long window, and at most one long window is in flight (each concurrent run grows
        onnxruntime's arena). A :attr:`~engines.base.Engine.parallel` engine has one more
        (:data:`_TURNS`) that takes later pieces while the worker holds several jobs, each run
        then on a share of the cores: two streams' windows at once, and the start thread still
        free for a new line."""
        work = self._work

        def takeable(job: _Job) -> bool:
            if job.busy:
                return False
            if job.cancel.is_set():
                return True
            now = time.monotonic()
            if job.playback.first is None:
                # As next_up has it: no start while a listener has less audio than a start takes.
                return role != _TURNS and not any(
                    j.playback.first is not None and j.playback.lead(now) < self._start_cost for j in self._active
                )
            if role == _STARTS or (role == _TURNS and (len(self._active) < 2 or self._elsewhere())):
                return False  # (another worker's runs take the cores a second run here would)
            # While another thread starts a line, the cores are its: only a listener about to
            # run dry is fed meanwhile.
            starting = self._others_starting() or any(j.busy and j.playback.first is None for j in self._active)
            return not starting or job.playback.lead(now) < SLACK * self._start_cost

        try:
            while True:
                with work:
                    idle = False
                    while not self._stopping and not any(takeable(j) for j in self._active):
                        if role == _EVERY and self._grown and not self._active:
                            idle = not work.wait(self.idle_release_s) and not self._active
                            if idle:
                                self._grown = False
                                break
                            continue
                        # A job held back for another's start becomes takeable as its audio runs down.
                        work.wait(0.01 if not all(j.busy for j in self._active) else None)
                    if self._stopping:
                        return
                    if not idle:
                        free = [j for j in self._active if takeable(j)]
                        # A cancelled job goes first: its next step only says so.
                        now = time.monotonic()
                        job = next((j for j in free if j.cancel.is_set()), None) or next_up(free, now, self._start_cost)
                        job.busy = True
                        self._grown = True
                        if job.steps is None:
                            job.steps = self._steps(job)
                        starting = job.playback.first is None
                        if starting:  # its first audio should not share the cores with another's long window
                            self._make_way(job, now)
                if idle:  # outside the lock: a job that arrives meanwhile is queued, not blocked
                    self._release_memory()
                    continue
                try:
                    next(job.steps)
                    done = False
                except StopIteration:
                    done = True
                with work:
                    job.busy = False
                    if done:
                        self._active.remove(job)
                        job.released.set()
                    elif role == _STARTS and job.playback.first is not None:
                        # Started here: its next piece is another thread's, which may be in a long one.
                        self._make_way(job, time.monotonic())
                    if starting and job.playback.first is not None:
                        self._start_cost += 0.25 * (time.monotonic() - now - self._start_cost)
                    self._publish_state()
                    work.notify_all()
        except Exception:  # a bug here must not leave the socket thread waiting for ever
            log.exception("worker %s: synthesis loop failed", self.identity)
            with work:
                self._stopping = True
                for held in self._active:
                    held.released.set()
            raise
        finally:
            with work:
                # Jobs no thread holds now: nobody else would ever release them.
                for job in self._active:
                    if not job.busy:
                        job.released.set()
                self._running -= 1
                last = self._running == 0
                work.notify_all()
            if last:
                self._push.close()

    def _release_memory(self) -> None:
        """The engine's idle hand-back, then the heap's; a failure here costs memory, not service."""
        try:
            self.engine.release_memory()
        except Exception:
            log.exception("worker %s: giving back memory failed", self.identity)
        trim_heap()
        log.debug("worker %s: idle, memory given back", self.identity)

    def _make_way(self, job: _Job, now: float) -> None:
        """Interrupt another thread's piece of a later-due job that ``job``'s listener cannot
        wait for, where that job's own listener can wait (``Pacing.interrupt``)."""
        self._cut_runs(job.playback.lead(now), job.playback.deadline, job)

    def _cut_runs(self, lead: float, deadline: float, new: Optional[_Job] = None) -> None:
        """For a line whose listener has ``lead`` seconds in hand and is due at ``deadline`` (``new``,
        or another worker's: :meth:`_watch_host`), interrupt the pieces in progress of jobs due
        later whose listeners can wait (under ``_work``)."""
        for other in self._active:
            if other.busy and other is not new and other.playback.first is not None and other.playback.deadline > deadline:
                if other.pacing.interrupt(self._start_cost, lead):
                    why = f"job {new.address.hex()}" if new is not None else "another worker's new line"
                    log.debug("worker %s: job %s makes way for %s", self.identity, other.address.hex(), why)

    def _steps(self, job: _Job) -> Iterator[None]:
        """One job's synthesis, yielding after each piece of audio the engine makes."""
        head = [str(job.generation).encode(), job.address]

        def emit(kind: bytes, body: list[bytes]) -> None:
            with self._push_lock:
                self._push.send_multipart([*head, kind, *body], copy=False)

        t0 = job.playback.arrived
        try:
            request = job.request or tts.parse_request(job.raw, self.max_text_chars)
            self.engine.check(request)
            rate = request.sample_rate or self.engine.native_rate
            encoder = ChunkEncoder(self.engine.native_rate, rate, request.format, request.chunk_ms)
            # Kinds asked for that the engine can tell; the others are not invented.
            kinds = [k for k in request.timings or () if k in self.engine.timings]
            start = tts.Start(
                sample_rate=rate,
                format=request.format,
                engine=self.engine.engine,
                voice=self.engine.voice_for(request),
                worker={"pid": os.getpid(), "host": socket.gethostname(), "service": self.engine.service},
                timings=kinds if request.timings else None,
            )
            emit(_PARTIAL, start.body(job.rid))
            seq = samples = sentences = 0
            first: Optional[float] = None
            width = tts.SAMPLE_WIDTH[request.format]
            pacing = job.pacing
            pacing.chunk_s = encoder.held_s

            def send(chunks: Iterator[bytes]) -> None:
                nonlocal seq, samples, first
                starting = first is None
                for pcm in chunks:
                    if job.cancel.is_set():
                        raise _Cancelled
                    emit(_PARTIAL, tts.Audio(seq, pcm).body(job.rid))
                    now = time.monotonic()
                    first = first or now
                    job.playback.sent(len(pcm) / width / rate, now)
                    seq += 1
                    samples += len(pcm) // width
                if starting and first is not None and len(self._active) == 1:
                    time.sleep(RELAY_PAUSE_S)

            for lo, hi in split_sentences(request.text, self.engine.max_chars(request.language)):
                clock = samples  # the stream's clock at this sentence: earlier ones were flushed whole
                native = 0  # engine samples of this sentence so far
                for audio in self.engine.speak_paced(request.text[lo:hi], request, pacing):
                    if isinstance(audio, Alignment):  # before the audio it describes
                        if kinds:
                            at = lambda n, off=native: clock + encoder.position(off + n)  # noqa: E731
                            emit(_PARTIAL, to_timing(audio, kinds, request.text[lo:hi], lo, at).body(job.rid))
                        continue
                    native += len(audio)
                    send(encoder.push(audio))
                    yield  # let a job whose listener needs audio sooner go first
                    if job.cancel.is_set():
                        raise _Cancelled
                send(encoder.end_segment())
                # Everything before `hi` has been sent: a failover resumes here.
                emit(_PARTIAL, tts.Mark(hi).body(job.rid))
                sentences += 1
            elapsed = time.monotonic() - t0
            audio_s = samples / rate
            stats = {
                "worker_samples": samples,
                "sentences": sentences,
                "synth_ms": round(elapsed * 1000, 2),
                "worker_ttfa_ms": round((first - t0) * 1000, 2) if first else None,
                "rtf": round(elapsed / audio_s, 4) if audio_s else None,
            }
            emit(_FINAL, tts.End(stats).body(job.rid))
        except _Cancelled:
            emit(_FINAL, tts.error_body(job.rid, tts.CANCELLED, "cancelled"))
        except tts.RequestError as exc:
            emit(_FINAL, tts.error_body(job.rid, exc.code, exc.message))
        except Exception as exc:  # an engine bug must not kill the worker
            log.exception("worker %s: synthesis failed", self.identity)
            emit(_FINAL, tts.error_body(job.rid, tts.INTERNAL, f"{type(exc).__name__}: {exc}"))
