"""Side by side with wyoming-piper on the same voice: ``tts-broker serve`` as it ships against
wyoming-piper 2.5.2 (streaming on, its default), both started here, measured in the same run.

Each request is timed at its client from just before it is sent: first audio, last audio,
and underruns (a chunk that arrives after the audio before it would have finished playing,
playback starting at the first chunk in real time). Single requests alternate between the two
servers, which side goes first alternating too; server CPU is the servers' process trees' CPU
time across each request. Then the loads: four passages sent at once, and the table scene (a
six-sentence narration, three short NPC lines 0.3, 0.6 and 0.9 s after it), each against its
own solo figures from the same run. Ratios are ours / wyoming-piper's: below 1 is better.
"""

from __future__ import annotations

import math
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psutil
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import read_event, write_event
from wyoming.tts import Synthesize, SynthesizeVoice

from broker.client import TtsClient
from broker.tts import SAMPLE_WIDTH, Audio
from engines.runtime import IDLE_RELEASE_S

from .common import ROOT, endpoint, percentile, processes
from .peer_env import VOICE, WYOMING_DATA, wyoming_python
from .ttfa import LONG_SENTENCE, SETTLE_S, TEXT

SHORT = "Halt! Who goes there?"
NARRATION = (
    "The torchlight flickers across the damp stone walls. "
    "Somewhere below, a door groans open, and the party holds its breath. "
    "The old wizard raises his staff and speaks a single word of power. "
    "Rain hammers the roof of the tavern while the bard tunes his lute. "
    "A cold wind blows from the north, carrying the smell of smoke. "
    "Far away, a bell tolls seven times."
)
NPC_LINES = ("Halt! Who goes there?", "Put down your weapons, strangers.", "The king will see you now.")
NPC_DELAYS_S = (0.3, 0.6, 0.9)


@dataclass
class Heard:
    """One request as its client saw it (seconds from just before it was sent)."""

    first: float
    last: float
    """When its last chunk arrived."""
    underruns: int
    """Chunks that arrived after the audio before them would have played out, on a clock
    started at the first chunk."""
    audio_s: float
    heard_end: float
    """When its listener hears its last sample: played in real time from the first chunk, waiting
    at each underrun for the chunk that ran late."""
    headroom: float | None = None
    """Its closest call: the least audio its listener had in hand when a burst of chunks began to
    arrive (:data:`PAUSE_S`), the first excepted (negative at an underrun; None when it came in one
    burst). Underruns only count the calls that failed; this shows how near the others came."""


PAUSE_S = 0.015
"""A chunk that arrives this long after the one before it starts a burst: the chunks of one
decoder window (or sentence) arrive together, under a few ms apart (under load, at most ~10 ms
between two chunks of four passages' first windows), and the next window takes longer than
this to decode. Within a burst the audio in hand only grows."""


class _Player:
    """Counts underruns: playback starts at the first chunk and runs in real time."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first: float | None = None
        self.last = t0
        self.played = 0.0
        self.underruns = 0
        self.heard_end = t0
        self.headroom: float | None = None

    def chunk(self, seconds: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            if now > self.first + self.played:
                self.underruns += 1
            if now - self.last > PAUSE_S:
                self.headroom = min(self.headroom if self.headroom is not None else math.inf, self.first + self.played - now)
        self.played += seconds
        self.heard_end = max(self.heard_end, now) + seconds
        self.last = now

    def heard(self) -> Heard:
        assert self.first is not None, "no audio"
        return Heard(self.first - self.t0, self.last - self.t0, self.underruns, self.played, self.heard_end - self.t0, self.headroom)


class Ours:
    """A ZeroMQ client keeps its connection: one client per calling thread, connected (and
    used once) before it is timed, as wyoming-piper's TCP connection is made before its clock starts."""

    name = "ours"

    def __init__(self, frontend: str) -> None:
        self.frontend = frontend
        self._local = threading.local()
        self._clients: list[TtsClient] = []

    def _client(self) -> TtsClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = TtsClient(self.frontend, timeout=120)
            self._clients.append(client)
            client.wait_ready(timeout=120)
        return client

    def speak(self, text: str) -> Heard:
        client = self._client()
        t0 = time.perf_counter()
        player = _Player(t0)
        stream = client.speak(text)
        for event in stream:
            if isinstance(event, Audio):
                start = stream.start
                assert start is not None
                player.chunk(len(event.pcm) / (SAMPLE_WIDTH[start.format] * start.channels) / start.sample_rate)
        return player.heard()

    def close(self) -> None:
        for client in self._clients:
            client.close()


class Wyoming:
    """A Wyoming client (the ``wyoming`` package's framing, a fresh connection per request, made before
    the clock starts, as Home Assistant does): wyoming-piper, or our Wyoming gateway."""

    name = "wyoming"

    def __init__(self, port: int, server: str = "wyoming-piper") -> None:
        self.port = port
        self.server = server

    def speak(self, text: str) -> Heard:
        with socket.create_connection(("127.0.0.1", self.port)) as sock, sock.makefile("rwb") as io:
            t0 = time.perf_counter()
            player = _Player(t0)
            write_event(Synthesize(text=text, voice=SynthesizeVoice(name=VOICE)).event(), io)
            io.flush()
            while (event := read_event(io)) is not None:
                if AudioChunk.is_type(event.type):
                    chunk = AudioChunk.from_event(event)
                    player.chunk(len(chunk.audio) / (chunk.width * chunk.channels) / chunk.rate)
                elif AudioStop.is_type(event.type):
                    return player.heard()
                elif not AudioStart.is_type(event.type):
                    raise RuntimeError(f"{self.server} answered {event.type}: {event.data}")
            raise RuntimeError(f"{self.server} closed the connection mid-stream")


def _cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its descendants so far."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a server: the biggest process (the engine) and all of them."""
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    rss = [p.memory_info().rss / 2**20 for p in procs]
    return {"largest_mb": round(max(rss), 1), "total_mb": round(sum(rss), 1)}


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 120, name: str = "wyoming-piper") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on {port} in time")


@contextmanager
def _servers(
    workers: int | None, serve_args: tuple[str, ...] = (), serve_ports: tuple[int, ...] = ()
) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
    """Both servers up and warmed: (speakers by name, server pid by name). ``serve_args`` go to
    ``tts-broker serve`` (gateways: bench/gateways.py), which must then listen on ``serve_ports``."""
    frontend, backend = endpoint(), endpoint()
    argv = ["-m", "broker.cli", "serve", "--frontend", frontend, "--backend", backend, *serve_args]
    with ExitStack() as stack:
        if workers is not None:
            config = stack.enter_context(_config(workers))
            argv += ["--config", config]
        (ours_proc,) = stack.enter_context(processes(argv))
        port = int(endpoint().rsplit(":", 1)[1])
        log = stack.enter_context(tempfile.TemporaryFile())
        wy_proc = subprocess.Popen(
            [str(wyoming_python()), "-m", "wyoming_piper", "--voice", VOICE, "--data-dir", str(WYOMING_DATA),
             "--uri", f"tcp://127.0.0.1:{port}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: (wy_proc.terminate(), wy_proc.wait(10)))
        with TtsClient(frontend, timeout=300) as client:
            if not client.wait_ready(timeout=300):
                raise RuntimeError("tts-broker serve did not get a worker ready in time")
        for served_port in serve_ports:
            _wait_port(served_port, ours_proc, name="tts-broker serve")
        try:
            _wait_port(port, wy_proc)
        except RuntimeError as exc:
            log.seek(0)
            raise RuntimeError(f"{exc}; its log ends:\n{log.read()[-2000:].decode(errors='replace')}") from None
        ours = Ours(frontend)
        stack.callback(ours.close)
        speakers: dict[str, Any] = {"ours": ours, "wyoming": Wyoming(port)}
        for speaker in speakers.values():  # the first request of each pays for lazy set-up
            speaker.speak("Ready.")
            speaker.speak(TEXT)
        yield speakers, {"ours": ours_proc.pid, "wyoming": wy_proc.pid}


@contextmanager
def _config(workers: int) -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(f"[[workers]]\nengine = \"piper\"\ncount = {workers}\n")
        f.flush()
        yield f.name


def _at_once(speak: Callable[[str], Heard], jobs: list[tuple[float, str]]) -> list[Heard]:
    """Start each job ``delay`` s after the first, each on its own thread and connection."""
    results: list[Heard | BaseException | None] = [None] * len(jobs)
    t0 = time.perf_counter()

    def run(i: int, delay: float, text: str) -> None:
        time.sleep(max(0.0, t0 + delay - time.perf_counter()))
        try:
            results[i] = speak(text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, d, t)) for i, (d, t) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if not isinstance(r, Heard):
            raise RuntimeError(f"a concurrent request failed: {r!r}")
    return results  # type: ignore[return-value]


def _headroom(heard: list[Heard]) -> dict[str, float | None]:
    """The streams' closest calls in ms (:attr:`Heard.headroom`): the least, and the 10th percentile."""
    calls = [h.headroom * 1000 for h in heard if h.headroom is not None]
    if not calls:
        return {"min": None, "p10": None}
    return {"min": round(min(calls), 1), "p10": round(percentile(calls, 10), 1)}


def run(reps: int = 5, loads: int = 3, workers: int | None = None) -> dict[str, Any]:
    """Every case of the side-by-side; ``workers``: override serve's default worker count."""
    names = ("ours", "wyoming")
    single = {"long": LONG_SENTENCE, "passage": TEXT, "short": SHORT}
    rows: dict[str, dict[str, list[Heard]]] = {case: {n: [] for n in names} for case in single}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    together: dict[str, list[list[Heard]]] = {n: [] for n in names}
    table: dict[str, list[list[Heard]]] = {n: [] for n in names}
    npc_solo: dict[str, list[Heard]] = {n: [] for n in names}
    narration_solo: dict[str, list[Heard]] = {n: [] for n in names}
    with _servers(workers) as (speakers, pids):
        order = 0
        for rep in range(reps):
            # The short case is cheap and its figures close: three times the reps.
            for case in ("long", "passage", "short", "short", "short"):
                for name in names if order % 2 == 0 else names[::-1]:
                    before = _cpu_s(pids[name])
                    rows[case][name].append(speakers[name].speak(single[case]))
                    if case == "passage":
                        cpu[name].append(_cpu_s(pids[name]) - before)
                    time.sleep(SETTLE_S)
                order += 1
        for rep in range(loads):
            for name in names if rep % 2 == 0 else names[::-1]:
                together[name].append(_at_once(speakers[name].speak, [(0.0, TEXT)] * 4))
                time.sleep(SETTLE_S)
                narration_solo[name].append(speakers[name].speak(NARRATION))
                time.sleep(SETTLE_S)
                for line in NPC_LINES:
                    npc_solo[name].append(speakers[name].speak(line))
                    time.sleep(SETTLE_S)
                table[name].append(_at_once(speakers[name].speak, [(0.0, NARRATION), *zip(NPC_DELAYS_S, NPC_LINES)]))
                time.sleep(SETTLE_S)
        rss_busy = {name: _rss_mb(pid) for name, pid in pids.items()}
        # "After the run": idle, once an idle worker has given back what serving grew
        # (engines/runtime.IDLE_RELEASE_S); right after the last request too, for the record.
        time.sleep(IDLE_RELEASE_S + 1.5)
        rss = {name: _rss_mb(pid) for name, pid in pids.items()}

    out: dict[str, Any] = {"voice": VOICE, "reps": reps, "loads": loads, "workers": workers or "default", "rss": rss, "rss_busy": rss_busy}
    for case in single:
        for name in names:
            firsts = [h.first * 1000 for h in rows[case][name]]
            lasts = [h.last * 1000 for h in rows[case][name]]
            out[f"{case}_{name}_first_ms"] = {"p50": round(statistics.median(firsts), 1), "p90": round(percentile(firsts, 90), 1)}
            out[f"{case}_{name}_last_ms"] = round(statistics.median(lasts), 1)
            out[f"{case}_{name}_underruns"] = sum(h.underruns for h in rows[case][name])
    for name in names:
        out[f"cpu_per_passage_{name}_s"] = round(statistics.median(cpu[name]), 3)
        four = [h for run_ in together[name] for h in run_]
        firsts = [h.first * 1000 for h in four]
        walls = [max(h.last for h in run_) * 1000 for run_ in together[name]]
        out[f"four_{name}_first_ms"] = {"p50": round(statistics.median(firsts), 1), "p90": round(percentile(firsts, 90), 1)}
        out[f"four_{name}_wall_ms"] = round(statistics.median(walls), 1)
        out[f"four_{name}_underruns"] = sum(h.underruns for h in four)
        out[f"four_{name}_headroom_ms"] = _headroom(four)
        npc_alone = statistics.median(h.first for h in npc_solo[name])
        npc_table = [h.first for run_ in table[name] for h in run_[1:]]
        out[f"table_{name}_npc_first_ms"] = [round(x * 1000, 1) for x in npc_table]
        out[f"table_{name}_npc_solo_first_ms"] = round(npc_alone * 1000, 1)
        out[f"table_{name}_npc_first_vs_solo"] = round(max(npc_table) / npc_alone, 3)
        out[f"table_{name}_narration_vs_solo"] = round(
            statistics.median(run_[0].last for run_ in table[name]) / statistics.median(h.last for h in narration_solo[name]), 3
        )
        out[f"table_{name}_narration_heard_vs_solo"] = round(
            statistics.median(run_[0].heard_end for run_ in table[name]) / statistics.median(h.heard_end for h in narration_solo[name]), 3
        )
        scene = [h for run_ in table[name] for h in run_]
        out[f"table_{name}_underruns"] = sum(h.underruns for h in scene)
        out[f"table_{name}_headroom_ms"] = _headroom(scene)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    out["peer"] = {
        "peer_long_first_ratio": ratio(out["long_ours_first_ms"]["p50"], out["long_wyoming_first_ms"]["p50"]),
        "peer_passage_first_ratio": ratio(out["passage_ours_first_ms"]["p50"], out["passage_wyoming_first_ms"]["p50"]),
        "peer_short_first_p50_ratio": ratio(out["short_ours_first_ms"]["p50"], out["short_wyoming_first_ms"]["p50"]),
        "peer_short_first_p90_ratio": ratio(out["short_ours_first_ms"]["p90"], out["short_wyoming_first_ms"]["p90"]),
        "peer_long_last_ratio": ratio(out["long_ours_last_ms"], out["long_wyoming_last_ms"]),
        "peer_passage_last_ratio": ratio(out["passage_ours_last_ms"], out["passage_wyoming_last_ms"]),
        "peer_cpu_ratio": ratio(out["cpu_per_passage_ours_s"], out["cpu_per_passage_wyoming_s"]),
        "peer_four_first_p90_ratio": ratio(out["four_ours_first_ms"]["p90"], out["four_wyoming_first_ms"]["p90"]),
        "peer_four_wall_ratio": ratio(out["four_ours_wall_ms"], out["four_wyoming_wall_ms"]),
        "peer_four_underruns": out["four_ours_underruns"],
        "peer_table_npc_first_vs_solo": out["table_ours_npc_first_vs_solo"],
        "peer_table_narration_vs_solo": out["table_ours_narration_vs_solo"],
        "peer_table_narration_heard_vs_solo": out["table_ours_narration_heard_vs_solo"],
        "peer_table_underruns": out["table_ours_underruns"],
        "peer_four_headroom_p10_ms": out["four_ours_headroom_ms"]["p10"],
        "peer_table_headroom_p10_ms": out["table_ours_headroom_ms"]["p10"],
        "peer_rss_ratio": ratio(rss["ours"]["largest_mb"], rss["wyoming"]["largest_mb"]),
        "peer_rss_busy_ratio": ratio(rss_busy["ours"]["largest_mb"], rss_busy["wyoming"]["largest_mb"]),
    }
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 3, loads=1), indent=1))
