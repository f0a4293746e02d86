"""What every benchmark shares: processes, endpoints, histograms, machine facts."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def endpoint() -> str:
    """A free loopback endpoint, never one this process has handed out before: the kernel may
    offer a port again once the probe socket is closed, and the security set's metrics broker
    was once given its engine's backend port (it exited, and the bench waited for ever)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return f"tcp://127.0.0.1:{port}"


def histogram() -> HdrHistogram:
    """Microseconds from 1 µs to 10 minutes, 3 significant digits."""
    return HdrHistogram(1, 600_000_000, 3)


def summary(h: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/max in the histogram's unit (microseconds here)."""
    return {
        "count": h.get_total_count(),
        "p50": h.get_value_at_percentile(50),
        "p90": h.get_value_at_percentile(90),
        "p99": h.get_value_at_percentile(99),
        "max": h.get_max_value(),
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of a few raw values (nearest rank), for lists too short for a histogram."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def cdf(h: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, value) pairs for a latency CDF plot."""
    return [(p, h.get_value_at_percentile(p)) for p in (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)]


@contextlib.contextmanager
def processes(*argvs: list[str], log: Path | None = None) -> Iterator[list[subprocess.Popen]]:
    """Start processes (``python -m ...`` relative to the repository); stop them all afterwards."""
    out = log.open("ab") if log else subprocess.DEVNULL
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT) for argv in argvs]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def machine_info() -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    import zmq

    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": platform.processor() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "packages": {p: version(p) for p in ("pyzmq", "piper-tts", "onnxruntime", "coqui-tts", "torch", "numpy", "soxr")},
        "loadavg_start": os.getloadavg(),
    }
