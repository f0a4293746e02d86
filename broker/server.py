"""The thin socket loop around :class:`broker.core.BrokerCore`.

Two ROUTER sockets — clients on the frontend, workers on the backend — both
with ``ROUTER_MANDATORY`` so an undeliverable message raises instead of
vanishing; that failure is reported to the core, which cancels what the lost
peer was owed. Everything else is the core's decision.

With CURVE (``broker/security.py``) both sockets are CURVE servers, and the
backend's READYs are checked here, before the core sees them: the
certificate the connection authenticated with (ZAP's User-Id) must be one of
the worker keys and allowed the service (``worker_services``); the core is
told the certificate, for ``tts.status``. Metrics (``broker/metrics.py``)
hear the core's per-request events, counted once a batch's replies are sent;
the server adds only stalled clients.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import zmq
import zmq.backend

from . import mdp
from .core import Action, BrokerCore, CoreSettings
from .polling import poll_ms

if TYPE_CHECKING:
    from .metrics import BrokerMetrics
    from .security import CurveServer

log = logging.getLogger("broker")

_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


class BrokerServer:
    def __init__(
        self,
        frontend: str = "tcp://127.0.0.1:5555",
        backend: str = "tcp://127.0.0.1:5556",
        settings: CoreSettings = CoreSettings(),
        *,
        max_message_bytes: int = 1 << 20,
        client_hwm: int = 10_000,
        context: Optional[zmq.Context] = None,
        security: Optional[CurveServer] = None,
        metrics: Optional[BrokerMetrics] = None,
    ) -> None:
        self.core = BrokerCore(settings)
        self.security = security
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(self.core)
        self.ctx = context or (security.context if security is not None else zmq.Context.instance())
        self.frontend_ep = frontend
        self.backend_ep = backend
        self._stop_asked = False
        """Set by :meth:`stop`; a plain flag, not an Event, so a signal handler may set it."""
        self.frontend = self._router(max_message_bytes, client_hwm)
        # No ROUTER_HANDOVER: a peer connecting with a live worker's routing id
        # is refused rather than handed the worker's session (workers take a
        # fresh id for every connection, so they never need handover).
        self.backend = self._router(max_message_bytes, 10_000)
        if security is not None:
            from .security import BACKEND_DOMAIN, FRONTEND_DOMAIN

            security.secure(self.frontend, FRONTEND_DOMAIN)
            security.secure(self.backend, BACKEND_DOMAIN)
        # The Cython send underneath pyzmq's Python wrapper: half the cost per
        # frame, and an MDP message is up to eight frames.
        self._send_frontend = functools.partial(zmq.backend.Socket.send, self.frontend)
        self._send_backend = functools.partial(zmq.backend.Socket.send, self.backend)
        try:
            self.frontend.bind(frontend)
            self.backend.bind(backend)
        except zmq.ZMQError:
            # A half-bound broker must not hold the port a retry needs.
            self.frontend.close(linger=0)
            self.backend.close(linger=0)
            raise
        # Report the real endpoints when port 0 / wildcards were asked for.
        self.frontend_ep = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_ep = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "broker listening: clients %s, workers %s%s", self.frontend_ep, self.backend_ep, " (CURVE)" if security is not None else ""
        )

    def _router(self, max_message_bytes: int, hwm: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _apply(self, actions: list[Action], now: float) -> None:
        pending = actions
        while pending:
            failed: list[Action] = []
            stalled: set[bytes] = set()
            for to_worker, peer, frames in pending:
                send = self._send_backend if to_worker else self._send_frontend
                try:
                    # send_multipart, without its per-frame enum arithmetic: this
                    # loop runs for every audio chunk. pyzmq copies small frames
                    # (cheaper than tracking them) and shares large ones.
                    send(peer, _MORE)
                    for frame in frames[:-1]:
                        send(frame, _MORE)
                    send(frames[-1], _LAST)
                except zmq.ZMQError as exc:
                    # EHOSTUNREACH: the peer is gone. EAGAIN: it stopped reading
                    # and its queue is full. Either way it cannot be served.
                    side = "worker" if to_worker else "client"
                    log.warning("cannot send to %s %s: %s", side, peer.hex(), exc.strerror)
                    failed.append(Action(to_worker, peer, frames))
                    if not to_worker and exc.errno == zmq.EAGAIN:
                        stalled.add(peer)
            if stalled and self.metrics is not None:
                for _ in stalled:
                    self.metrics.stalled_client()
            pending = []
            for to_worker, peer, _ in {(a.to_worker, a.peer): a for a in failed}.values():
                pending += self._guarded("a failed send", self.core.on_send_failed, to_worker, peer, now)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        core = self.core
        # Ticks come every 50 ms at most (five per heartbeat at the default):
        # heartbeats still go out once per interval (the core tracks when each
        # is due), but a dead worker is noticed soon after its deadline.
        period = min(core.s.heartbeat_s / 5, 0.05)
        next_tick = time.monotonic() + period
        try:
            while not self._stop_asked:
                ready = dict(poller.poll(poll_ms(next_tick - time.monotonic())))
                if self.backend in ready:
                    if self.security is None:
                        self._drain(self.backend, core.on_worker)
                    else:
                        self._drain_authenticated()
                if self.frontend in ready:
                    self._drain(self.frontend, core.on_client)
                now = time.monotonic()
                if now >= next_tick:
                    self._apply(self._guarded("a tick", core.tick, now), now)
                    next_tick = now + period
                if self.metrics is not None:
                    try:
                        self.metrics.settle()  # once the FINALs went out: off the clients' way
                    except Exception:
                        log.exception("internal error counting finished requests; their figures are lost")
        finally:
            self.frontend.close(linger=0)
            self.backend.close(linger=0)
            log.info("broker stopped")

    def _drain(self, sock: zmq.Socket, handle) -> None:  # type: ignore[no-untyped-def]
        # Bounded so one busy side cannot starve the other or the heartbeats.
        # Asking EVENTS is cheaper than the exception of a recv that finds nothing.
        for _ in range(1000):
            if not sock.get(_EVENTS) & _POLLIN:
                return
            msg = sock.recv_multipart(zmq.NOBLOCK)
            now = time.monotonic()
            if len(msg) < 2:
                continue
            self._apply(self._guarded(f"a message from {msg[0].hex()}", handle, msg[0], msg[1:], now), now)

    def _drain_authenticated(self) -> None:
        """The backend under CURVE: as :meth:`_drain`, plus the certificate check of each READY.

        The routing-id frame is received as a ``zmq.Frame`` (copy=False), the
        only frame whose ``User-Id`` property is read, and only for a READY;
        the rest of the message is received as bytes like on the plain path."""
        sock, security = self.backend, self.security
        assert security is not None
        for _ in range(1000):
            if not sock.get(_EVENTS) & _POLLIN:
                return
            first = sock.recv(zmq.NOBLOCK, copy=False)
            if not first.more:
                continue
            msg = sock.recv_multipart(zmq.NOBLOCK)
            now = time.monotonic()
            identity = first.bytes
            if len(msg) >= 3 and msg[1] == mdp.W_READY and msg[0] == mdp.WORKER:
                name = security.worker_name(first.get("User-Id"))
                service = msg[2].decode("utf-8", "replace")
                if name is None or not security.may_register(name, service):
                    # Unknown after a reload, or not allowed this service: refused before the core.
                    log.warning(
                        "worker %s refused: certificate %s may not register service %s; disconnecting it",
                        identity.hex(), name or "(revoked)", service[:80],
                    )
                    self._apply([Action(True, identity, mdp.DISCONNECT_FRAMES)], now)
                    continue
                actions = self._guarded(f"a READY from {identity.hex()}", self.core.on_worker, identity, msg, now, name)
            else:
                actions = self._guarded(f"a message from {identity.hex()}", self.core.on_worker, identity, msg, now)
            self._apply(actions, now)

    @staticmethod
    def _guarded(what: str, handler: Callable[..., list[Action]], *args: Any) -> list[Action]:
        """Run one core entry point; an exception loses that one event, never the loop.

        The core is meant never to raise (it ends a job it cannot handle with
        ``internal``); this is the last line, so that a bug costs one message
        and a traceback in the log rather than a deaf broker."""
        try:
            return handler(*args)
        except Exception:
            log.exception("internal error handling %s; dropped", what)
            return []

    def stop(self) -> None:
        """Ask :meth:`run` to return (within a tick, 50 ms at most). Only a flag: ``python -m
        broker`` calls it from its signal handlers, which may run again inside themselves
        (``WorkerRuntime.stop``)."""
        self._stop_asked = True

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="broker", daemon=True)
        thread.start()
        return thread
