"""The core's observer hook (metrics) and the worker certificate, sans I/O: exact calls, no sockets."""

from __future__ import annotations

from typing import Optional

from broker.core import Job
from broker.metrics import BrokerMetrics
from tests.core_rig import C1, W1, W2, Rig, audio, cancel, job_key, ready, start, tts_request


class Recorder:
    """A CoreObserver that keeps every call."""

    def __init__(self) -> None:
        self.done: list[tuple[bytes, str, Optional[bytes]]] = []
        self.refused: list[tuple[bytes, str]] = []
        self.failovers: list[str] = []

    def request_done(self, job: Job, outcome: str, final: Optional[list[bytes]], now: float) -> None:
        self.done.append((job.rid or b"", outcome, final[1] if final else None))

    def request_refused(self, service: bytes, code: str) -> None:
        self.refused.append((service, code))

    def failover(self, reason: str) -> None:
        self.failovers.append(reason)


def test_the_observer_hears_each_request_once_and_each_failover() -> None:
    rig = Rig()
    rec = rig.core.observer = Recorder()
    rig.worker(W1)
    rig.worker(W2)
    k = job_key(rig.request(C1, b"a"), W1)
    rig.serve(W1, k, b"a", 0.1)
    assert rec.done == [(b"a", "completed", b"end")]
    assert rig.core.on_client(C1, tts_request(b"b", text="   "), 0.2)  # refused at admission
    assert rec.refused == [(b"tts", "bad_request")]
    acts = rig.request(C1, b"c", 0.3)
    key = next(a.frames[2] for a in acts if a.to_worker)
    worker = W1 if any(a.peer == W1 for a in acts if a.to_worker) else W2
    rig.core.on_worker(worker, start(key, b"c"), 0.3)
    rig.core.on_worker(worker, audio(key, b"c", b"\x00\x00" * 10), 0.3)
    rig.core.on_send_failed(True, worker, 0.4)  # its worker is gone: failover, not an end
    assert rec.failovers == ["unreachable"] and len(rec.done) == 1
    rig.core.on_client(C1, cancel(b"c"), 0.5)
    assert rec.done[-1] == (b"c", "cancelled", b"error")
    assert rig.core.counters["requests"] == len(rec.done) + len(rec.refused) == 3


def test_metrics_labels_come_from_the_stream() -> None:
    rig = Rig()
    metrics = BrokerMetrics()
    metrics.attach(rig.core)
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a", 1.0), W1)
    rig.core.on_worker(W1, start(k, b"a"), 1.0)
    rig.core.on_worker(W1, audio(k, b"a", b"\x00\x00" * 2205), 1.018)
    rig.core.on_client(C1, cancel(b"a"), 1.5)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in metrics.registry.collect() for s in f.samples}
    assert got[("tts_broker_requests_total", (("outcome", "cancelled"), ("service", "tts")))] == 1
    assert got[("tts_broker_first_audio_seconds_count", (("engine", "piper"), ("voice", "en_US-joe-medium")))] == 1
    assert abs(got[("tts_broker_first_audio_seconds_sum", (("engine", "piper"), ("voice", "en_US-joe-medium")))] - 0.018) < 1e-9
    assert got[("tts_broker_first_audio_seconds_bucket", (("engine", "piper"), ("le", "0.015"), ("voice", "en_US-joe-medium")))] == 0
    assert got[("tts_broker_first_audio_seconds_bucket", (("engine", "piper"), ("le", "0.02"), ("voice", "en_US-joe-medium")))] == 1
    assert abs(got[("tts_broker_audio_seconds_total", (("engine", "piper"),))] - 0.1) < 1e-9
    assert got[("tts_broker_inflight", ())] == 0  # the job left the broker for the client (its worker still winds down)


def test_status_shows_the_certificate_a_worker_authenticated_with() -> None:
    rig = Rig()
    rig.core.on_worker(W1, ready(), 0.0, "gpu1")
    rig.worker(W2)
    workers = rig.core.status()["services"]["piper.en_US-joe-medium"]["workers"]
    assert sorted((w["id"], w["certificate"]) for w in workers) == [("w1", "gpu1"), ("w2", None)]
