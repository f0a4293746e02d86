"""``python -m bench.soak --minutes 30``: memory of a real ``serve`` under a long, mixed load.

Starts ``python -m broker.cli serve`` on free ports with the default configuration
(one Piper worker on the bundled ``en_US-joe-medium`` voice), then one client sends
requests back to back (never in parallel: memory is what is measured, not speed)
from a seeded random mix: short lines and paragraphs up to ~1000 characters,
``s16le``/``f32le``, native/16000/22050/48000 Hz, frame and sentence streaming,
a few speeds, and about one request in ten cancelled mid-stream. Every
``--interval`` seconds it reads VmRSS from ``/proc/<pid>/status`` for the serve
process (which runs the broker) and for each process below it (the workers).

The run stops at ``--minutes`` whatever happens (a watchdog kills everything a
minute and a half later if the load loop is stuck), and serve is always shut down.
The JSON written to ``--out`` holds every sample and, per process, the RSS at
minutes 2 and 10 and at the end, and the least-squares slope (MB/min) over the
first and the last third of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from broker.client import TtsClient, TtsError
from broker.tts import Audio

from .common import ROOT, endpoint, machine_info

log = logging.getLogger("bench.soak")

_WORDS = (
    "the a dragon knight tavern ancient door stone torch shadow river forest wizard sword shield "
    "quietly slowly suddenly north beyond beneath across whispering golden broken silver hidden "
    "map road village tower bridge candle storm cloak lantern goblin merchant ranger castle "
    "opens falls wanders carries remembers guards burns echoes follows waits returns"
).split()
_LINES = (
    "Roll for initiative!",
    "The door is locked.",
    "You hear footsteps behind you.",
    "Welcome back, traveller. What will it be tonight?",
    "Critical hit.",
    "The goblin flees into the dark, dropping a rusty key.",
    "Are you sure?",
    "Three silver coins, no more.",
)
_RATES = (None, None, 16000, 22050, 48000)
_FORMATS = ("s16le", "s16le", "f32le")


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 24))]
    if len(words) > 8 and rng.random() < 0.5:
        words[rng.randrange(2, len(words) - 2)] += ","
    return " ".join(words).capitalize() + rng.choice(".!?.")


def make_request(rng: random.Random) -> tuple[str, dict[str, Any], Optional[int]]:
    """(text, options, cancel after this many audio chunks or None) from the seeded mix."""
    kind = rng.random()
    if kind < 0.35:
        text = rng.choice(_LINES)
    elif kind < 0.70:
        text = _sentence(rng)
    else:  # a paragraph of up to ~1000 characters
        limit = rng.randint(200, 1000)
        parts = [_sentence(rng)]
        while len(" ".join(parts)) < limit:
            parts.append(_sentence(rng))
        text = " ".join(parts)[:1000]
    options: dict[str, Any] = {
        "format": rng.choice(_FORMATS),
        "sample_rate": rng.choice(_RATES),
        "chunk_ms": rng.choice((None, None, 20, 40, 100)),  # None: the engine's pieces, the default
        "speed": rng.choice((1.0, 1.0, 1.0, 0.8, 1.3)),
        "stream": rng.choice((None, None, "frames", "sentence")),
        "priority": rng.choice((None, None, None, -1, 1)),
    }
    cancel_after = rng.randint(1, 20) if rng.random() < 0.1 else None
    return text, options, cancel_after


# ---------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def vm_rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def label(pid: int, serve_pid: int) -> str:
    if pid == serve_pid:
        return "serve"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid{pid}"
    module = next((argv[i + 1].decode() for i, a in enumerate(argv[:-1]) if a == b"-m"), Path(argv[0].decode()).name)
    return f"{module}:{pid}"


# ------------------------------------------------------------------ summary


def slope(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares MB per minute of (minute, MB) points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    return round(sum((t - mx) * (v - my) for t, v in points) / sxx, 4) if sxx else None


def at_minute(points: list[tuple[float, float]], minute: float) -> Optional[float]:
    """The last sample taken at or before ``minute`` (None if the run was shorter)."""
    before = [v for t, v in points if t <= minute + 1e-6]
    return round(before[-1], 1) if before and points[-1][0] >= minute - 0.3 else None


def summarise(samples: list[dict[str, Any]], minutes: float) -> dict[str, Any]:
    series: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        for name, mb in s["rss_mb"].items():
            series.setdefault(name, []).append((s["minute"], mb))
    out: dict[str, Any] = {}
    for name, pts in series.items():
        end = pts[-1][0]
        third = end / 3
        out[name] = {
            "samples": len(pts),
            "first_mb": round(pts[0][1], 1),
            "min_2_mb": at_minute(pts, 2),
            "min_10_mb": at_minute(pts, 10),
            "end_mb": round(pts[-1][1], 1),
            "end_minute": round(end, 2),
            "max_mb": round(max(v for _, v in pts), 1),
            "slope_first_third_mb_per_min": slope([p for p in pts if p[0] <= third]),
            "slope_last_third_mb_per_min": slope([p for p in pts if p[0] >= end - third]),
            "slope_after_min_2_mb_per_min": slope([p for p in pts if p[0] >= 2]),
        }
    return out


# --------------------------------------------------------------------- run


def run(minutes: float, interval: float, seed: int, log_path: Path, config: Optional[str]) -> dict[str, Any]:
    fe, be = endpoint(), endpoint()
    argv = [sys.executable, "-m", "broker.cli", "serve", "--frontend", fe, "--backend", be]
    if config:
        argv += ["--config", config]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    serve = subprocess.Popen(argv, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    known: set[int] = set()  # every process seen below serve, to clean up orphans
    samples: list[dict[str, Any]] = []
    counts: dict[str, int] = {"requests": 0, "ok": 0, "cancelled": 0, "errors": 0, "chars": 0, "audio_bytes": 0}
    errors: dict[str, int] = {}
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + minutes * 60

    def sample() -> None:
        pids = descendants(serve.pid)
        known.update(pids)
        rss = {label(p, serve.pid): vm_rss_mb(p) for p in [serve.pid, *pids]}
        row = {
            "minute": round((time.monotonic() - t0) / 60, 3),
            "rss_mb": {k: round(v, 2) for k, v in rss.items() if v is not None},
            "requests": counts["requests"],
            "loadavg": os.getloadavg()[0],
        }
        samples.append(row)
        log.info("t=%5.1f min  requests %5d  rss %s", row["minute"], row["requests"],
                 "  ".join(f"{k} {v:.1f} MB" for k, v in row["rss_mb"].items()))

    def sampler() -> None:
        while not stop.wait(max(0.0, t0 + interval * (len(samples)) - time.monotonic())):
            if serve.poll() is not None:
                return
            sample()

    def watchdog() -> None:
        if not stop.wait(max(0.0, deadline - time.monotonic()) + 90):
            log.error("load loop stuck past the deadline: killing serve and exiting")
            _kill(serve, known)
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        with TtsClient(fe, timeout=60) as client:
            if not client.wait_ready(timeout=240):
                raise RuntimeError(f"the worker never came up; see {log_path}")
            ready_s = time.monotonic() - t0
            log.info("serve ready after %.1f s; soaking for %g min", ready_s, minutes)
            t0 = time.monotonic()  # minutes are counted from the first request
            deadline = t0 + minutes * 60
            threading.Thread(target=sampler, daemon=True).start()
            rng = random.Random(seed)
            while time.monotonic() < deadline and serve.poll() is None:
                text, options, cancel_after = make_request(rng)
                counts["requests"] += 1
                counts["chars"] += len(text)
                stream = client.speak(text, **options)
                chunks = 0
                try:
                    for event in stream:
                        if isinstance(event, Audio):
                            chunks += 1
                            counts["audio_bytes"] += len(event.pcm)
                            if cancel_after is not None and chunks == cancel_after:
                                stream.cancel()
                    counts["ok"] += 1
                except TtsError as exc:
                    key = "cancelled" if exc.code == "cancelled" else "errors"
                    counts[key] += 1
                    if key == "errors":
                        errors[exc.code] = errors.get(exc.code, 0) + 1
                        log.warning("request %d failed: %s", counts["requests"], exc)
            stop.set()
            sample()  # the last point, at the end of the load
    finally:
        stop.set()
        rc = _shutdown(serve, known)
    return {
        "minutes": minutes,
        "interval_s": interval,
        "seed": seed,
        "ready_s": round(ready_s, 1),
        "serve_exit": rc,
        "counts": counts,
        "errors": errors,
        "summary": summarise(samples, minutes),
        "samples": samples,
    }


def _kill(serve: subprocess.Popen, known: set[int]) -> None:
    for pid in [serve.pid, *known]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _shutdown(serve: subprocess.Popen, known: set[int]) -> Optional[int]:
    """SIGINT serve (a clean stop), then make sure nothing it started is left behind."""
    known.update(descendants(serve.pid))
    if serve.poll() is None:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            log.warning("serve did not stop within 30 s: killing it")
            serve.kill()
            serve.wait()
    time.sleep(1)
    for pid in known:
        if Path(f"/proc/{pid}").exists() and vm_rss_mb(pid) is not None:
            log.warning("process %d outlived serve: killing it", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return serve.returncode


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (hard stop)")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--config", help="TOML for serve (default: none, i.e. one worker on the bundled voice)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / f"soak-{time.strftime('%Y%m%d')}.json"))
    p.add_argument("--serve-log", default=str(ROOT / "out" / "soak-serve.log"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = {"machine": machine_info(), **run(a.minutes, a.interval, a.seed, Path(a.serve_log), a.config)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    log.info("wrote %s", a.out)
    print(json.dumps({"counts": result["counts"], "summary": result["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
