"""A worker holding several jobs (``slots``): the runtime speaks them in turns, earliest
playback deadline first, each job's replies, cancel and sequence numbers its own.

The broker here is a bare ROUTER speaking MDP/0.2 by hand, so only the worker runtime is
under test; the engine is a fixture that makes 0.1 s of silence per piece, slowly enough
that a second request arrives while the first is still being spoken."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import zmq

from broker import mdp, tts
from broker.tts import SynthesisRequest
from engines.base import Engine
from engines.host_cores import BUSY, STARTING, HostCores
from engines import runtime
from engines.runtime import RELAY_PAUSE_S, WorkerRuntime
from engines.schedule import PRIORITY_STEP_S, Pacing, Playback, next_up
from tests.conftest import free_port

RATE = 16000


class _Pieces(Engine):
    """A test engine: ``N pieces`` speaks N pieces of 0.1 s of silence, each after a short pause."""

    engine = "piper"
    native_rate = RATE
    service = "pieces"
    slots = 2

    def languages(self) -> list[str]:
        return ["en"]

    def voices(self) -> list[str]:
        return ["pieces"]

    def voice_for(self, request: SynthesisRequest) -> str:
        return "pieces"

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        for _ in range(int(text.split()[0])):
            time.sleep(0.01)
            yield np.zeros(RATE // 10, dtype=np.float32)


class _Broker:
    """The broker side of one worker, by hand."""

    def __init__(self, engine: Engine | None = None, idle_release_s: float = 10.0, host: HostCores | None = None) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.runtime = WorkerRuntime(
            engine or _Pieces(), self.endpoint, heartbeat_s=0.5, liveness=20, idle_release_s=idle_release_s, host=host
        )
        self.thread = threading.Thread(target=self.runtime.run)
        self.thread.start()
        assert self.sock.poll(10_000)
        self.worker, *ready = self.sock.recv_multipart()
        self.ready = mdp.decode_worker(ready)

    def request(self, key: bytes, text: str, **fields: object) -> None:
        body = [key, json.dumps({"text": text, "format": "s16le", "chunk_ms": 100, **fields}).encode()]
        self.sock.send_multipart([self.worker, *mdp.WorkerRequest(key, body).frames()])

    def cancel(self, key: bytes) -> None:
        self.sock.send_multipart([self.worker, *mdp.WorkerRequest(key, [tts.WORKER_CANCEL]).frames()])

    def replies(self) -> Iterator[tuple[bytes, bool, tts.Event]]:
        """(job, final, event) as they come; heartbeats answered, skipped."""
        while True:
            assert self.sock.poll(20_000), "the worker went quiet"
            _, *frames = self.sock.recv_multipart()
            cmd = mdp.decode_worker(frames)
            if isinstance(cmd, mdp.WorkerHeartbeat):
                self.sock.send_multipart([self.worker, *mdp.HEARTBEAT_FRAMES])
                continue
            assert isinstance(cmd, mdp.WorkerReply), cmd
            _, event = tts.decode_event(cmd.body)
            yield cmd.address, cmd.final, event

    def close(self) -> None:
        self.runtime.stop()
        self.thread.join(10)
        self.sock.close(linger=0)


@pytest.fixture
def broker() -> Iterator[_Broker]:
    b = _Broker()
    yield b
    b.close()


def test_the_worker_announces_its_slots(broker: _Broker) -> None:
    assert isinstance(broker.ready, mdp.WorkerReady)
    assert broker.ready.capabilities is not None and broker.ready.capabilities["slots"] == 2


def test_a_short_line_is_spoken_while_a_long_one_is_still_going(broker: _Broker) -> None:
    broker.request(b"A", "60 pieces")
    log: list[tuple[bytes, bool, tts.Event]] = []
    for reply in broker.replies():
        log.append(reply)
        if reply[0] == b"A" and isinstance(reply[2], tts.Audio):
            broker.request(b"B", "2 pieces")  # A has audio in hand; B has none
            break
    for reply in broker.replies():
        log.append(reply)
        if sum(final for _, final, _ in log) == 2:
            break
    order = [(job, type(ev).__name__) for job, _, ev in log]
    b_end = order.index((b"B", "End"))
    assert order[-1] == (b"A", "End") and b_end < len(order) - 1, "B waited for the whole of A"
    assert any(job == b"A" and kind == "Audio" for job, kind in order[b_end:]), "A did not go on after B"
    for job, pieces in ((b"A", 60), (b"B", 2)):
        seqs = [ev.seq for j, _, ev in log if j == job and isinstance(ev, tts.Audio)]
        assert seqs == list(range(pieces)), f"job {job!r}: {seqs}"


def test_a_stream_of_higher_priority_is_fed_a_second_ahead_before_a_new_line_starts(broker: _Broker) -> None:
    """Priority 1 counts as a second less in hand (``engines/schedule.py``): the new line, due
    when it arrives, waits until the narrator's listener has a second more than that."""
    broker.request(b"A", "60 pieces", priority=1)
    log: list[tuple[bytes, bool, tts.Event]] = []
    for reply in broker.replies():
        log.append(reply)
        if reply[0] == b"A" and isinstance(reply[2], tts.Audio) and reply[2].seq == 0:
            broker.request(b"B", "2 pieces")
        if sum(final for _, final, _ in log) == 2:
            break
    order = [(job, type(ev).__name__) for job, _, ev in log]
    before_b = order[: order.index((b"B", "Audio"))].count((b"A", "Audio"))
    assert before_b >= 11, f"B started when A had sent {before_b} pieces of 0.1 s"  # 1 s more than its first
    assert order[-1] == (b"A", "End"), "B waited for the whole of A"


class _LoggedTime:
    """``engines.runtime``'s view of the time module, with its sleeps written to a shared log."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        self.log.append(f"rest {seconds}")
        time.sleep(seconds)


def test_a_lone_stream_rests_once_after_its_first_audio_before_the_engines_next_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELAY_PAUSE_S: the first audio's way to the listener gets the cores before the next
    piece is made, once per stream (each of two lines rests after its own first audio), and
    only by a stream that is the worker's only job."""
    log: list[str] = []

    class _Logged(_Pieces):
        def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
            for piece in super().speak(text, request):
                log.append(f"{text.split()[1]} piece")
                yield piece

    monkeypatch.setattr(runtime, "time", _LoggedTime(log))
    broker = _Broker(_Logged())
    try:
        for job, words in ((b"A", "3 first"), (b"B", "2 second")):
            broker.request(job, words)
            for address, final, event in broker.replies():
                assert address == job and not isinstance(event, tts.Error), event
                if final:
                    break
    finally:
        broker.close()
    rest = f"rest {RELAY_PAUSE_S}"
    assert log == ["first piece", rest, "first piece", "first piece", "second piece", rest, "second piece"]

    # A line that starts while another is in flight does not rest: the other's pieces would wait.
    log.clear()
    broker = _Broker(_Logged())
    try:
        broker.request(b"C", "30 long")
        finals = 0
        for address, final, event in broker.replies():
            if address == b"C" and isinstance(event, tts.Audio) and event.seq == 0:
                broker.request(b"D", "2 short")
            finals += final
            if finals == 2:
                break
    finally:
        broker.close()
    assert log.count(rest) == 1 and log.index(rest) == 1, log
    assert "short piece" in log


def test_a_request_beyond_the_slots_is_refused_and_cancel_touches_one_job(broker: _Broker) -> None:
    broker.request(b"A", "40 pieces")
    broker.request(b"B", "40 pieces")
    broker.request(b"C", "1 pieces")
    broker.cancel(b"B")
    finals: dict[bytes, tts.Event] = {}
    for job, final, event in broker.replies():
        if final:
            finals[job] = event
        if len(finals) == 3:
            break
    assert isinstance(finals[b"C"], tts.Error) and "busy" in finals[b"C"].message
    assert isinstance(finals[b"B"], tts.Error) and finals[b"B"].code == tts.CANCELLED
    assert isinstance(finals[b"A"], tts.End)


class _Holding(_Pieces):
    """A test engine with two synthesis threads. ``hold`` sends 20 pieces (2 s of audio in hand),
    then one more that takes until the runtime interrupts it (``Pacing.interrupt``) and is made
    again afterwards; any other text is one piece."""

    threads = 2

    def __init__(self) -> None:
        self.interrupted = 0

    def speak_paced(self, text: str, request: SynthesisRequest, pacing: Pacing) -> Iterator[np.ndarray]:
        if text != "hold":
            yield np.zeros(RATE // 10, dtype=np.float32)
            return
        for _ in range(20):
            yield np.zeros(RATE // 10, dtype=np.float32)
        stopped = threading.Event()
        with pacing.interruptible(stopped.set, cost=0.05):
            cut = stopped.wait(30)
        if cut:
            self.interrupted += 1
            yield np.zeros(0, dtype=np.float32)
        yield np.zeros(RATE // 10, dtype=np.float32)


def test_a_new_line_starts_on_the_second_thread_and_interrupts_a_long_piece_that_can_wait() -> None:
    engine = _Holding()
    b = _Broker(engine)
    try:
        b.request(b"A", "hold")
        log = []
        for reply in b.replies():
            log.append(reply)
            if sum(1 for job, _, ev in log if isinstance(ev, tts.Audio)) == 20:
                b.request(b"B", "one")  # A is in its long piece, with 2 s of audio in hand
                break
        for reply in b.replies():
            log.append(reply)
            if sum(final for _, final, _ in log) == 2:
                break
    finally:
        b.close()
    order = [(job, type(ev).__name__) for job, _, ev in log]
    assert order.index((b"B", "End")) < order.index((b"A", "End")), "B waited for A's long piece"
    assert engine.interrupted == 1
    seqs = [ev.seq for job, _, ev in log if job == b"A" and isinstance(ev, tts.Audio)]
    assert seqs == list(range(21)), "a piece of A was lost or repeated"


@pytest.fixture
def host_map() -> Iterator[Path]:
    """A busy map for two workers sharing the cores: this test's worker (0) and another (1)."""
    path = HostCores.create(2)
    yield path
    path.unlink()


def test_another_worker_starting_a_line_interrupts_a_long_piece_that_can_wait_and_holds_the_rest(host_map: Path) -> None:
    """As for a line of its own: the other worker's first window gets the cores."""
    engine, other = _Holding(), HostCores(host_map, 1)
    b = _Broker(engine, host=HostCores(host_map, 0))
    try:
        b.request(b"A", "hold")
        _collect(b, lambda log: sum(1 for _, _, ev in log if isinstance(ev, tts.Audio)) == 20)  # 2 s in hand, in the long piece
        other.set(STARTING)
        other.announce_start()
        deadline = time.monotonic() + 20
        while not engine.interrupted:
            assert time.monotonic() < deadline, "the long piece was not cut short"
            time.sleep(0.01)
        # Held back while the other starts (its listener has ~2 s in hand): nothing but heartbeats.
        assert not b.sock.poll(300) or isinstance(mdp.decode_worker(b.sock.recv_multipart()[1:]), mdp.WorkerHeartbeat)
        other.set(BUSY)
        log = _collect(b, lambda log: log[-1][1])
    finally:
        b.close()
        other.close()
    assert [type(ev).__name__ for _, _, ev in log] == ["Audio", "Mark", "End"] and log[0][2].seq == 20  # the piece made again


class _Gated(_Pieces):
    """A test engine whose first piece waits for :attr:`gate`."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        assert self.gate.wait(30)
        yield from super().speak(text, request)


def test_a_worker_tells_the_others_on_its_cores_when_it_starts_a_line_holds_jobs_and_is_idle(host_map: Path) -> None:
    engine, other = _Gated(), HostCores(host_map, 1)
    b = _Broker(engine, host=HostCores(host_map, 0))
    woken = threading.Event()
    watcher = threading.Thread(target=lambda: other.wait_start(20) and woken.set())
    watcher.start()

    def until(expected: tuple[int, int]) -> None:
        deadline = time.monotonic() + 20
        while other.others() != expected:
            assert time.monotonic() < deadline, f"{other.others()} != {expected}"
            time.sleep(0.005)

    try:
        assert other.others() == (0, 0)
        b.request(b"A", "30 pieces")
        until((1, 1))  # starting a line: held, no audio yet
        watcher.join(20)
        assert woken.is_set(), "the start was not announced"
        engine.gate.set()
        until((1, 0))  # past its first audio
        _collect(b, lambda log: log[-1][1])
        until((0, 0))
    finally:
        engine.gate.set()
        b.close()
        other.close()


def test_a_parallel_engine_runs_one_piece_at_a_time_while_another_worker_on_its_cores_is_busy(host_map: Path) -> None:
    """Its second run would take the cores that worker's run is on."""
    engine, other = _Turns(parallel=True), HostCores(host_map, 1)
    other.set(BUSY)
    b = _Broker(engine, host=HostCores(host_map, 0))
    try:
        b.request(b"A", "10")
        b.request(b"B", "10")
        _collect(b, lambda log: sum(final for _, final, _ in log) == 2)
    finally:
        b.close()
        other.close()
    assert engine.most == 1


class _Turns(_Pieces):
    """A test engine with two synthesis threads: ``N`` speaks N pieces, 1 s of audio and then 0.1 s
    each, those after the first taking ``piece_s`` (asleep, as a model's run releases the GIL);
    it counts those in progress at once."""

    threads = 2
    slots = 3

    def __init__(self, parallel: bool, piece_s: float = 0.05) -> None:
        self.parallel, self.piece_s = parallel, piece_s
        self.lock = threading.Lock()
        self.running = self.most = 0

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        yield np.zeros(RATE, dtype=np.float32)  # 1 s: its listener has audio in hand
        for _ in range(int(text.split()[0]) - 1):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(self.piece_s)
            with self.lock:
                self.running -= 1
            yield np.zeros(RATE // 10, dtype=np.float32)


def _collect(b: _Broker, until: Callable[[list], bool]) -> list:
    """The worker's replies as they come, until ``until(replies so far)``."""
    log: list = []
    for reply in b.replies():
        log.append(reply)
        if until(log):
            return log
    raise AssertionError("unreachable: replies() asserts the worker keeps talking")


@pytest.mark.parametrize("parallel", [True, False])
def test_a_parallel_engine_advances_two_jobs_at_once_and_any_other_one_at_a_time(parallel: bool) -> None:
    engine = _Turns(parallel)
    b = _Broker(engine)
    try:
        b.request(b"A", "10")
        b.request(b"B", "10")
        log = _collect(b, lambda log: sum(final for _, final, _ in log) == 2)
    finally:
        b.close()
    assert engine.most == (2 if parallel else 1)
    for job in (b"A", b"B"):
        assert [ev.seq for j, _, ev in log if j == job and isinstance(ev, tts.Audio)] == list(range(19))  # 1 s, then nine of 0.1 s
        assert isinstance(next(ev for j, final, ev in log if j == job and final), tts.End)


def test_while_two_streams_are_in_long_pieces_a_new_line_still_starts_at_once() -> None:
    engine = _Turns(parallel=True, piece_s=0.6)
    b = _Broker(engine)
    try:
        b.request(b"A", "3")
        b.request(b"B", "3")
        # Both first pieces out (1 s in 100 ms chunks), then both in a later one.
        _collect(b, lambda log: all(sum(1 for j, _, ev in log if j == job and isinstance(ev, tts.Audio)) == 10 for job in (b"A", b"B")))
        time.sleep(0.1)
        assert engine.running == 2
        b.request(b"C", "1")
        after = _collect(b, lambda log: log[-1][0] == b"C" and log[-1][1])
    finally:
        b.close()
    assert isinstance(after[-1][2], tts.End)
    spoken = max(i for i, (job, _, ev) in enumerate(after) if job == b"C" and isinstance(ev, tts.Audio))
    assert [job for job, _, _ in after[: spoken + 1] if job != b"C"] == [], "the new line waited for another stream's piece"


def test_a_run_is_interrupted_only_for_a_listener_that_cannot_wait_and_by_one_that_can() -> None:
    playing = Playback(arrived=0.0, first=time.monotonic(), audio_s=2.0)  # 2 s in hand
    pacing = Pacing(playing, lambda: ())
    stops: list[int] = []
    assert not pacing.interrupt(wait=0.1, other_lead=0.0)  # no run in progress
    with pacing.interruptible(lambda: stops.append(1), cost=0.5):
        assert not pacing.interrupt(wait=0.1, other_lead=1.0)  # the other can wait out the run
        assert not pacing.interrupt(wait=1.0, other_lead=0.0)  # 2 s < SLACK·(1.0 + 0.5): this one cannot wait
        assert pacing.interrupt(wait=0.1, other_lead=0.0)
        assert not pacing.interrupt(wait=0.1, other_lead=0.0)  # cut once
    assert stops == [1]
    starved = Pacing(Playback(arrived=0.0, first=time.monotonic(), audio_s=0.1), lambda: ())
    with starved.interruptible(lambda: stops.append(2), cost=0.05):
        assert not starved.interrupt(wait=0.1, other_lead=0.0)
    assert stops == [1]


def test_earliest_deadline_first() -> None:
    class J:
        def __init__(self, playback: Playback) -> None:
            self.playback = playback

    streaming = J(Playback(arrived=0.0, first=1.0, audio_s=5.0))  # its listener runs dry at 6.0
    behind = J(Playback(arrived=0.0, first=1.0, audio_s=0.5))  # …at 1.5
    new = J(Playback(arrived=2.0))  # no audio yet: due now
    newer = J(Playback(arrived=3.0))
    assert next_up([streaming, new, newer]) is new
    assert next_up([streaming, newer, behind, new]) is behind
    assert next_up([streaming]) is streaming


def test_priority_moves_a_deadline_a_second_per_step() -> None:
    class J:
        def __init__(self, playback: Playback) -> None:
            self.playback = playback

    narrator = J(Playback(arrived=0.0, first=1.0, audio_s=1.5, urgency_s=PRIORITY_STEP_S))  # dry at 2.5, due at 1.5
    npc = J(Playback(arrived=0.0, first=1.0, audio_s=1.0))  # dry at 2.0
    assert next_up([npc, narrator]) is narrator
    ambient = J(Playback(arrived=1.2, urgency_s=-PRIORITY_STEP_S))  # a new line at -1: due at 2.2
    assert next_up([ambient, narrator, npc]) is narrator
    assert next_up([ambient, npc]) is npc
    assert next_up([ambient, J(Playback(arrived=0.0, first=1.0, audio_s=2.0))]) is ambient  # dry at 3.0


def test_a_new_job_waits_while_a_playing_one_has_less_audio_than_starting_takes() -> None:
    class J:
        def __init__(self, playback: Playback) -> None:
            self.playback = playback

    playing = J(Playback(arrived=0.0, first=1.0, audio_s=0.5))  # runs dry at 1.5
    new = J(Playback(arrived=1.2))
    assert next_up([playing, new], now=1.3, start_cost=0.1) is new  # 0.2 s in hand: start it
    assert next_up([playing, new], now=1.45, start_cost=0.1) is playing  # 0.05 s: feed the listener first


class _Paced:
    """A stand-in for the runtime's pacing: fixed budgets."""

    def __init__(self, own: float, others: float, sharing: int = 1) -> None:
        self.own, self.others, self.n = own, others, sharing

    paced = True
    chunk_s = 0.0

    def budget(self) -> float:
        return self.own

    def lead(self) -> float:
        return 2 * self.own * self.n

    def others_budget(self) -> float:
        return self.others

    def sharing(self) -> int:
        return self.n

    def start_cost(self) -> float:
        return 0.05

    def starting(self) -> int:
        return self.n - 1


def test_windows_grow_with_the_audio_in_hand_and_shrink_for_the_others() -> None:
    from engines.schedule import SLACK
    from engines.vits_split import HOP, SCHEDULE, SUSTAIN, FrameStreamer

    MARGIN = 11
    streamer = FrameStreamer(None, None, [], "z", None, margin=MARGIN, flow_margin=30)  # type: ignore[arg-type]  # windows() needs no graph
    streamer.vocoder_cost_s, streamer.flow_cost_s = 0.0008, 0.0002
    total = 1000
    alone = list(streamer.windows(total))  # no listener to pace for: the fixed schedule
    assert [e - s for s, e in alone][:4] == list(SCHEDULE)
    # A sentence begun with seconds of audio in hand: no small windows at all (capped for memory).
    ahead = list(streamer.windows(total, _Paced(own=10.0, others=float("inf"))))
    assert all(e - s == SCHEDULE[-1] for s, e in ahead[:-1])
    assert len(ahead) < len(alone)
    crowded = list(streamer.windows(total, _Paced(own=10.0, others=0.08)))  # another listener has 0.16 s
    assert all(e - s <= max(SCHEDULE[1], 80 - 2 * MARGIN) for s, e in crowded[1:-1])
    # The last window too: what is left joins it only if it is too small to be worth its margins.
    floor = streamer._floor(len(crowded) - 1, total, _Paced(own=10.0, others=0.08))
    assert crowded[-1][1] - crowded[-1][0] < max(SCHEDULE[1], 80 - 2 * MARGIN) + floor
    sharing = _Paced(own=0.0, others=float("inf"), sharing=3)
    sharing.chunk_s = 0.04
    shared = list(streamer.windows(total, sharing))
    # Its first audio must last while the two others start and its own next window is decoded,
    # with slack for a machine that runs slower for a while than its costs' averages say: the
    # audio of its whole chunks, since the rest of the last one waits for that next window.
    first_audio_s = math.floor(shared[0][1] * HOP / streamer.rate / sharing.chunk_s) * sharing.chunk_s
    assert first_audio_s >= SLACK * (2 * 0.05 + streamer.window_cost(shared[1][1] - shared[1][0])) / SUSTAIN
    assert shared[0][1] > alone[0][1]
    # Four listeners with little audio in hand: no later window so small that four of them, margins
    # paid, take longer to decode than the audio they add lasts.
    four = list(streamer.windows(total, _Paced(own=0.0, others=0.0, sharing=4)))
    assert all(4 * streamer.window_cost(e - s) < (e - s) * HOP / streamer.rate for s, e in four[1:-1])
    for windows in (alone, ahead, crowded, shared, four):
        assert windows[-1][1] == total and all(a[1] == b[0] for a, b in zip(windows, windows[1:]))


class _Remembers(_Pieces):
    """``_Pieces`` that counts the times it was asked to give back memory, and when."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Semaphore(0)
        self.while_busy: list[bool] = []
        self.runtime: WorkerRuntime | None = None

    def release_memory(self) -> None:
        assert self.runtime is not None
        self.while_busy.append(bool(self.runtime._active))
        self.released.release()


IDLE_S = 0.3


def test_an_idle_worker_gives_back_memory_once_per_idle_spell() -> None:
    engine = _Remembers()
    broker = _Broker(engine, idle_release_s=IDLE_S)
    engine.runtime = broker.runtime
    try:
        assert not engine.released.acquire(timeout=IDLE_S * 2), "released before serving anything"
        for spell in range(2):
            broker.request(b"%d" % spell, "3 pieces")
            for _, final, _ in broker.replies():
                if final:
                    break
            assert engine.released.acquire(timeout=IDLE_S * 10), f"idle spell {spell}: memory never given back"
            # Nothing served since: no second release in the same idle spell.
            assert not engine.released.acquire(timeout=IDLE_S * 2)
        assert engine.while_busy == [False, False]
    finally:
        broker.close()
