"""``/metrics``: what the broker did, in Prometheus's text format, with ``prometheus_client``.

Nothing here runs per audio chunk. Counters and histograms are updated when
a request ends (the core's single exit, through :class:`broker.core.CoreObserver`),
on each failover, on a stalled client (the server) and on a worker restart
(``serve``'s supervisor); the live figures — workers per service, queue
depth, requests in flight — are read from the core only when Prometheus
scrapes (:class:`_Live`), so the hot path pays nothing for them.

A request's end is only noted when the core reports it (the core reports it
before the client's FINAL is sent, and counting it costs about 16 µs: 1 % of
a broker round trip); the server counts what was noted once the FINAL is on
its way (:meth:`BrokerMetrics.settle`), and so does every scrape, first, so
that ``/metrics`` never lags what a client has already been told.

Names are stable and documented in README.md ("Deploying across machines").
Label values come from bounded sets only: a service label is ``tts`` or a
service some worker registered (else ``other``), an outcome is ``end`` or one
of PROTOCOL.md's error codes, a failover reason one of :data:`FAILOVER_REASONS`.

The registry is private to the broker (not ``prometheus_client.REGISTRY``),
so a process embedding the broker keeps its own metrics apart, and the HTTP
server is ``prometheus_client``'s own, on a daemon thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import tts

if TYPE_CHECKING:
    from .core import BrokerCore, Job

log = logging.getLogger("broker.metrics")

FIRST_AUDIO_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)
"""Seconds: 5 ms steps below 30 ms, where a Piper frame stream's first audio lands, up to 5 s."""
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
"""Synthesis time / audio time: above 1, a listener would hear gaps."""

FAILOVER_REASONS = ("heartbeat_lost", "disconnected", "unreachable", "stuck", "engine_error", "protocol_error", "other")
"""Values of the ``reason`` label, from the core's failover texts (:func:`failover_reason`)."""
_REASON_PREFIXES = (
    ("heartbeat lost", "heartbeat_lost"),
    ("worker disconnected", "disconnected"),
    ("unreachable", "unreachable"),
    ("nothing for", "stuck"),
    ("engine error", "engine_error"),
    ("protocol error", "protocol_error"),
    ("sent a malformed reply", "protocol_error"),
    ("second READY", "protocol_error"),
    ("reply for a job", "protocol_error"),
    ("unexpected", "protocol_error"),
)


def failover_reason(why: str) -> str:
    """The bounded label for one of the core's failover texts (which carry messages and numbers)."""
    for prefix, label in _REASON_PREFIXES:
        if why.startswith(prefix):
            return label
    return "other"


class BrokerMetrics:
    """The broker's metrics; one per process, kept across broker restarts (:meth:`attach` the new core)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._ended: deque[tuple[Job, str, Optional[list[bytes]]]] = deque()
        self._settling = threading.Lock()
        # Registered first, so a scrape runs its collect(), which settles the
        # noted ends, before the counters below are read.
        r.register(_Live(self))
        self.requests = Counter(
            "tts_broker_requests", "Requests ended, by service and outcome (end, or the error code).",
            ["service", "outcome"], registry=r,
        )
        self.first_audio = Histogram(
            "tts_broker_first_audio_seconds", "Request arrival at the broker to its first audio chunk relayed.",
            ["engine", "voice"], buckets=FIRST_AUDIO_BUCKETS, registry=r,
        )
        self.rtf = Histogram(
            "tts_broker_realtime_factor", "Synthesis time / audio time of each completed request (its last worker).",
            ["engine"], buckets=RTF_BUCKETS, registry=r,
        )
        self.failovers = Counter("tts_broker_failovers", "Requests failed over to another worker, by reason.", ["reason"], registry=r)
        self.audio_seconds = Counter(
            "tts_broker_audio_seconds", "Seconds of audio relayed to clients, by the engine that finished the request.",
            ["engine"], registry=r,
        )
        self.stalled = Counter("tts_broker_stalled_clients", "Clients whose queue filled (client_hwm) and whose streams were cancelled.", registry=r)
        self.restarts = Counter("tts_broker_worker_restarts", "Worker processes restarted by serve's supervisor.", ["service"], registry=r)
        self._core: Optional[BrokerCore] = None
        self._server: Optional[object] = None

    def attach(self, core: BrokerCore) -> None:
        """Read the live figures from ``core`` (a restarted broker has a new one) and hear its events."""
        core.observer = self
        self._core = core

    # ---------------------------------------------------- the core's events

    def _service(self, raw: bytes) -> str:
        service = raw.decode("ascii", "replace")
        core = self._core
        if service != tts.SERVICE and (core is None or service not in core.services):
            return "other"  # a name no worker registered: clients choose it, so it must not become a label
        return service

    def request_refused(self, service: bytes, code: str) -> None:
        self.requests.labels(self._service(service), code if code in tts.ERROR_CODES else "other").inc()

    def request_done(self, job: Job, outcome: str, final: Optional[list[bytes]], now: float) -> None:
        """Note one finished request, to be counted by :meth:`settle` (a finished job is never changed again)."""
        self._ended.append((job, outcome, final))

    def settle(self) -> None:
        """Count the requests noted as finished: the server calls it once the replies of a batch
        are sent, a scrape (from the HTTP thread) before it reads the counters."""
        if not self._ended:
            return
        with self._settling:  # only a holder pops, so the deque cannot empty under it
            while self._ended:
                self._count(*self._ended.popleft())

    def _count(self, job: Job, outcome: str, final: Optional[list[bytes]]) -> None:
        """Count one finished request; observe its first audio, RTF and audio (TTS jobs)."""
        self.requests.labels(self._service(job.service), _outcome(job, outcome, final)).inc()
        stream = job.stream
        if stream is None or not stream.engines:
            return
        if stream.first_audio is not None:
            self.first_audio.labels(stream.engines[0], stream.voice or "").observe(stream.first_audio - stream.created)
        engine = stream.engines[-1]
        if stream.rate:
            self.audio_seconds.labels(engine).inc(stream.samples / stream.rate)
        if final is not None and final[1:2] == [b"end"]:
            try:
                rtf = json.loads(final[2]).get("rtf")
            except (ValueError, IndexError, AttributeError):
                rtf = None
            if isinstance(rtf, (int, float)):
                self.rtf.labels(engine).observe(rtf)

    def failover(self, reason: str) -> None:
        self.failovers.labels(failover_reason(reason)).inc()

    # ------------------------------------------------ the server's, serve's

    def stalled_client(self) -> None:
        self.stalled.inc()

    def worker_restarted(self, service: str) -> None:
        self.restarts.labels(service).inc()

    # ----------------------------------------------------------------- HTTP

    def serve(self, host: str, port: int) -> int:
        """Serve ``GET /metrics`` on ``host:port`` (a daemon thread); return the port bound."""
        server, _ = start_http_server(port, host, registry=self.registry)
        self._server = server
        bound = server.server_address[1]
        log.info("metrics at http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
        return bound

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            threading.Thread(target=server.shutdown, daemon=True).start()  # type: ignore[attr-defined]


def _outcome(job: Job, outcome: str, final: Optional[list[bytes]]) -> str:
    """``end``, or the error code of the FINAL; a request that got no FINAL (client gone) is ``cancelled``."""
    if final is None:
        return tts.CANCELLED if outcome == "cancelled" else outcome
    if job.rid is None:  # opaque: the worker's own FINAL, or the broker's ["error", JSON]
        if final[:1] != [b"error"] or outcome == "completed":
            return "end"
        body = final[1:2]
    elif final[1:2] == [b"end"]:
        return "end"
    else:
        body = final[2:3]
    try:
        code = json.loads(body[0]).get("code")
    except (ValueError, IndexError, AttributeError):
        code = None
    return code if code in tts.ERROR_CODES else "other"


class _Live(Collector):
    """Gauges read from the core at scrape time (from the HTTP thread: only atomic reads), after
    the noted request ends are counted."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self.m.settle()
        workers = GaugeMetricFamily("tts_broker_workers", "Live workers per service.", labels=["service"])
        queue = GaugeMetricFamily("tts_broker_queue_depth", "Requests waiting for a worker.")
        inflight = GaugeMetricFamily("tts_broker_inflight", "Requests admitted and not yet ended.")
        core = self.m._core
        if core is not None:
            # list() of a dict's values is one C call under the GIL: a consistent copy
            # even while the broker thread adds or removes services.
            for svc in list(core.services.values()):
                workers.add_metric([svc.name], len(svc.workers))
            queue.add_metric([], len(core.waiting))
            inflight.add_metric([], len(core.jobs))
        yield workers
        yield queue
        yield inflight
