"""``/metrics`` after known traffic, parsed with ``prometheus_client``'s own parser (issue 15).

A real ``serve`` with two Piper workers of the bundled voice and
``[metrics] listen``; the test sends N requests that end, one the broker
refuses (blank text), one it cancels
after its first audio, and one whose worker it kills with SIGKILL after the
first audio (it fails over to the other worker and ends). Every counter and
histogram count must equal what was sent; the audio seconds must equal what
the client received.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import FAILOVER_REASONS, failover_reason
from tests.conftest import EN_VOICE, PT_VOICE, Served, free_port, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawClient, RawStream

SERVICE = f"piper.{EN_VOICE}"
N = 3
STORY = " ".join(f"Chapter {i}: the caravan crossed the river at dawn, and the guards counted every wagon twice." for i in range(1, 12))
RATE = 22050


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    port = free_port()
    workers = f'[metrics]\nlisten = "127.0.0.1:{port}"\n[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n'
    s = start_serve(tmp_path_factory.mktemp("metrics"), workers, "request_timeout_ms = 8000")
    try:
        wait_services(s.frontend, [SERVICE])
        wait_workers(s, 2)
        yield s, f"http://127.0.0.1:{port}/metrics"
    finally:
        rc = stop_serve(s)
        assert rc == 0, s.log_text()[-3000:]
        assert "Traceback" not in s.log_text(), s.log_text()[-3000:]


def wait_workers(s: Served, n: int, timeout: float = 120) -> list[int]:
    c = s.client()
    try:
        deadline = time.monotonic() + timeout
        while True:
            workers = json.loads(c.call(b"tts.status", b"{}")[3])["services"].get(SERVICE, {"workers": []})["workers"]
            if len(workers) == n and not any(w["busy"] for w in workers):
                return [w["pid"] for w in workers]
            assert time.monotonic() < deadline, workers
            time.sleep(0.1)
    finally:
        c.close()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items: value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(samples: dict[tuple, float], **labels: str) -> float:
    return sum(v for k, v in samples.items() if all((name, value) in k for name, value in labels.items()))


def first_audio_pid(c: RawClient, s: RawStream) -> int:
    while not s.audio():
        assert c.recv(60) is not None
    return s.json_of(b"start")["worker"]["pid"]


def test_metrics_count_exactly_what_happened(metered: tuple[Served, str]) -> None:
    served, url = metered
    before = scrape(url)
    assert total(before.get("tts_broker_requests_total", {})) == 0
    c = served.client()
    received = 0
    try:
        for i in range(N):
            s = c.request(f"n{i}".encode(), {"text": f"Line number {i}, spoken plainly."})
            c.wait(s)
            s.check_invariants()
            assert s.names()[-1] == b"end"
            received += len(s.pcm()) // 2
        # One refused at admission.
        s = c.request(b"blank", {"text": "   "})
        c.wait(s)
        assert s.json_of(b"error")["code"] == "bad_request"
        # One cancelled after its first audio.
        s = c.request(b"cancel-me", {"text": STORY})
        first_audio_pid(c, s)
        c.cancel(b"cancel-me")
        c.wait(s)
        assert s.names()[-1] == b"error" and s.json_of(b"error")["code"] == "cancelled"
        received += len(s.pcm()) // 2
        # One failed over: its worker killed after its first audio.
        s = c.request(b"failover", {"text": STORY})
        os.kill(first_audio_pid(c, s), signal.SIGKILL)
        c.wait(s, timeout=120)
        s.check_invariants()
        assert s.names()[-1] == b"end" and s.json_of(b"end")["failovers"] == 1
        received += len(s.pcm()) // 2
    finally:
        c.close()
    wait_workers(served, 2)  # the killed worker restarted by serve's supervisor

    m = scrape(url)
    requests = m["tts_broker_requests_total"]
    assert total(requests, service="tts", outcome="end") == N + 1
    assert total(requests, service="tts", outcome="cancelled") == 1
    assert total(requests, service="tts", outcome="bad_request") == 1
    assert total(requests) == N + 3, requests
    fa = m["tts_broker_first_audio_seconds_count"]
    assert total(fa, engine="piper", voice=EN_VOICE) == N + 2 == total(fa), fa
    # The histogram is consistent: +Inf bucket == count, buckets never decrease.
    buckets = sorted(((float(dict(k)["le"]), v) for k, v in m["tts_broker_first_audio_seconds_bucket"].items()), key=lambda x: x[0])
    assert buckets[-1] == (float("inf"), N + 2)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert total(m["tts_broker_first_audio_seconds_sum"]) > 0
    assert total(m["tts_broker_realtime_factor_count"], engine="piper") == N + 1  # the requests that ended
    failovers = m["tts_broker_failovers_total"]
    assert total(failovers) == 1, failovers
    assert all(dict(k)["reason"] in FAILOVER_REASONS for k, v in failovers.items() if v)
    assert total(m["tts_broker_audio_seconds_total"], engine="piper") == pytest.approx(received / RATE, abs=1e-6)
    assert total(m["tts_broker_worker_restarts_total"], service=SERVICE) == 1
    assert total(m["tts_broker_workers"], service=SERVICE) == 2
    assert total(m["tts_broker_queue_depth"]) == 0 and total(m["tts_broker_inflight"]) == 0
    assert total(m["tts_broker_stalled_clients_total"]) == 0
    # Status and MMI calls (wait_services, wait_workers) are not requests.
    assert "tts.status" not in str(requests) and "mmi" not in str(requests)


def test_a_stalled_client_is_counted(tmp_path: Path, tiny_pt_voice: Path) -> None:
    """A client that stops reading fills its queue (``client_hwm``) and is counted once."""
    port = free_port()
    workers = f'[metrics]\nlisten = "127.0.0.1:{port}"\n[[workers]]\nvoice = "{tiny_pt_voice}"\ndevice = "cpu"\n'
    served = start_serve(tmp_path, workers, "client_hwm = 10")
    url = f"http://127.0.0.1:{port}/metrics"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        wait_services(served.frontend, [f"piper.{PT_VOICE}"])
        assert total(scrape(url).get("tts_broker_stalled_clients_total", {})) == 0
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 1024)
        sock.connect(served.frontend)
        text = " ".join(["Uma frase curta para encher a fila."] * 120)
        deadline = time.monotonic() + 120
        i = 0
        # Never read: ask until the broker's queue toward this client overflows.
        while total(scrape(url).get("tts_broker_stalled_clients_total", {})) == 0:
            assert time.monotonic() < deadline, "the stalled client was never counted"
            sock.send_multipart([b"MDPC02", b"\x01", b"tts", f"s{i}".encode(), json.dumps({"text": text, "language": "pt", "chunk_ms": 10}).encode()])
            i += 1
            time.sleep(0.5)
        assert "client" in served.log_text() and "cancelling its" in served.log_text()
        time.sleep(0.5)
        assert total(scrape(url)["tts_broker_stalled_clients_total"]) >= 1
    finally:
        sock.close()
        assert stop_serve(served) == 0, served.log_text()[-3000:]


@pytest.mark.parametrize(
    "why, label",
    [
        ("heartbeat lost", "heartbeat_lost"), ("unreachable", "unreachable"), ("worker disconnected", "disconnected"),
        ("nothing for 10s while busy (stuck)", "stuck"), ("engine error internal: boom", "engine_error"),
        ("protocol error: bad frame", "protocol_error"), ("sent a malformed reply: x", "protocol_error"), ("who knows", "other"),
    ],
)
def test_failover_reasons_are_a_bounded_set(why: str, label: str) -> None:
    assert failover_reason(why) == label


def test_a_finished_request_is_counted_by_the_next_scrape_even_before_the_loop_settles() -> None:
    """The core reports a request's end before its FINAL is sent; the count is deferred off that
    path (:meth:`BrokerMetrics.settle`), and a scrape must not lag what a client was told."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from broker.metrics import BrokerMetrics

    m = BrokerMetrics()
    stream = SimpleNamespace(engines=["piper"], first_audio=1.02, created=1.0, voice=EN_VOICE, rate=22050, samples=22050)
    job = SimpleNamespace(service=b"tts", stream=stream, rid=b"r1")
    m.request_done(job, "completed", [b"r1", b"end", b'{"rtf": 0.05}'], 2.0)  # type: ignore[arg-type]
    assert m.requests.labels("tts", "end")._value.get() == 0  # noted, not yet counted
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert [s.value for s in families["tts_broker_requests"].samples if s.name.endswith("_total")] == [1.0]
    first = families["tts_broker_first_audio_seconds"].samples
    assert [s.value for s in first if s.name.endswith("_count")] == [1.0]
    assert [s.value for s in families["tts_broker_audio_seconds"].samples if s.name.endswith("_total")] == [1.0]
    m.settle()  # the loop's settle after the scrape's finds nothing left: counted once
    assert m.requests.labels("tts", "end")._value.get() == 1
