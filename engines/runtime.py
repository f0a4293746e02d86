"""The MDP/0.2 worker runtime shared by every engine.

The socket loop runs on the main thread and never waits on synthesis: each
job runs on the one long-lived synthesis thread, which pushes ready-made
reply bodies through an inproc PUSH/PULL pipe, so heartbeats keep flowing however long a sentence
takes (onnxruntime and torch release the GIL while they compute). Cancel is a
flag the synthesis thread checks between pieces of audio.

A worker holds at most one job. It is busy from the broker's REQUEST until
the synthesis thread's FINAL has been sent, and after losing the broker it
re-registers only once the old thread has stopped, so two jobs never share a
model.

Everything that touches the model — loading it too — should run on that one
thread (``run_worker`` does so): torch keeps an OpenMP thread team per calling
thread, and a second team contending for the same cores made the tiny XTTS
model's first chunk 60 % slower here (65 ms instead of 40 ms).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import zmq

from broker import mdp, tts
from broker.caps import EngineCaps
from engines.audio import ChunkEncoder
from engines.base import Engine
from engines.text import split_sentences

log = logging.getLogger("engines.runtime")

_PARTIAL = b"P"
_FINAL = b"F"


class _Cancelled(Exception):
    pass


@dataclass(eq=False)
class _Job:
    address: bytes
    rid: bytes
    raw: bytes
    generation: int
    cancel: threading.Event = field(default_factory=threading.Event)
    done: Optional[Future[None]] = None


def synthesis_executor() -> ThreadPoolExecutor:
    """The single thread on which a worker loads and runs its model."""
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
        context: Optional[zmq.Context] = None,
        synthesis_thread: Optional[ThreadPoolExecutor] = None,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.max_text_chars = max_text_chars
        self.ctx = context or zmq.Context.instance()
        self.stop_event = threading.Event()
        self._synth = synthesis_thread or synthesis_executor()
        self._generation = 0
        self._job: Optional[_Job] = None
        self._retrying = False  # reconnected, and no broker has answered since
        self._sock: Optional[zmq.Socket] = None
        self._pipe_addr = f"inproc://worker-pipe-{id(self)}"
        self._pipe = self.ctx.socket(zmq.PULL)
        self._pipe.bind(self._pipe_addr)
        self.identity = f"{engine.service}/{os.getpid()}/{os.urandom(3).hex()}"

    # ----------------------------------------------------------- connection

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._generation += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, f"{self.identity}/{self._generation}".encode())
        sock.connect(self.backend)
        caps = EngineCaps.model_validate(
            {**self.engine.capabilities(), "pid": os.getpid(), "host": socket.gethostname(), "request_keys": sorted(tts.SynthesisRequest.model_fields)}
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
        self._stop_job(timeout=None)
        self._job = None
        self._drain_pipe()
        self._connect()

    def _send(self, frames: list[bytes]) -> None:
        assert self._sock is not None
        self._sock.send_multipart(frames, copy=False)
        self._heartbeat_due = time.monotonic() + self.heartbeat_s

    # ------------------------------------------------------------- the loop

    def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM, installed by the CLI)."""
        self._connect()
        poller = zmq.Poller()
        poller.register(self._pipe, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
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
        self.stop_event.set()

    def _stop_job(self, timeout: Optional[float]) -> None:
        """Cancel the job in hand and wait for its synthesis thread to let go (it checks between chunks)."""
        job = self._job
        if job is None:
            return
        job.cancel.set()
        if job.done is not None:
            try:
                job.done.result(timeout=timeout)
            except TimeoutError:
                log.warning("worker %s: synthesis did not stop within %g s", self.identity, timeout)

    def _shutdown(self) -> None:
        self._stop_job(timeout=5)
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
        """Forward what synthesis threads produced; drop what belongs to a lost connection."""
        while True:
            try:
                msg = self._pipe.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            gen, kind, body = int(msg[0]), msg[1], msg[2:]
            job = self._job
            if job is None or gen != job.generation:
                continue
            final = kind == _FINAL
            self._send(mdp.WorkerReply(job.address, body, final).frames())
            if final:
                self._job = None

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
        job = self._job
        if cmd.body == [tts.WORKER_CANCEL]:
            if job is not None and job.address == cmd.address:
                log.info("worker %s: job %s cancelled", self.identity, cmd.address.hex())
                job.cancel.set()
            return
        rid = cmd.body[0] if cmd.body else b"?"
        if job is not None:
            self._send(mdp.WorkerReply(cmd.address, tts.error_body(rid, tts.INTERNAL, "worker is busy"), True).frames())
            return
        if len(cmd.body) != 2:
            self._send(mdp.WorkerReply(cmd.address, tts.error_body(rid, tts.BAD_REQUEST, "expected request id and JSON"), True).frames())
            return
        job = _Job(cmd.address, rid, cmd.body[1], self._generation)
        self._job = job
        job.done = self._synth.submit(self._synthesize, job)

    # ------------------------------------------------------------ synthesis

    def _synthesize(self, job: _Job) -> None:
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, -1)
        push.connect(self._pipe_addr)
        gen = str(job.generation).encode()

        def emit(kind: bytes, body: list[bytes]) -> None:
            push.send_multipart([gen, kind, *body], copy=False)

        t0 = time.monotonic()
        try:
            request = tts.parse_request(job.raw, self.max_text_chars)
            self.engine.check(request)
            rate = request.sample_rate or self.engine.native_rate
            encoder = ChunkEncoder(self.engine.native_rate, rate, request.format, request.chunk_ms)
            start = tts.Start(
                sample_rate=rate,
                format=request.format,
                engine=self.engine.engine,
                voice=self.engine.voice_for(request),
                worker={"pid": os.getpid(), "host": socket.gethostname(), "service": self.engine.service},
            )
            emit(_PARTIAL, start.body(job.rid))
            seq = samples = sentences = 0
            first: Optional[float] = None
            width = tts.SAMPLE_WIDTH[request.format]

            def send(chunks: Iterator[bytes]) -> None:
                nonlocal seq, samples, first
                for pcm in chunks:
                    if job.cancel.is_set():
                        raise _Cancelled
                    emit(_PARTIAL, tts.Audio(seq, pcm).body(job.rid))
                    first = first or time.monotonic()
                    seq += 1
                    samples += len(pcm) // width

            for lo, hi in split_sentences(request.text, self.engine.max_chars(request.language)):
                for audio in self.engine.speak(request.text[lo:hi], request):
                    send(encoder.push(audio))
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
        finally:
            push.close()
