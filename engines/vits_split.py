"""Frame-level streaming for Piper (VITS) voices: the ONNX graph cut in three.

A VITS voice is a *frontend* (text encoder, duration predictor, alignment,
prior sampling: all of the sentence at once, so prosody stays whole) feeding a
*flow* (a normalising flow over latent frames) feeding a *vocoder* (HiFi-GAN,
~5/6 of the decoding time). Flow and vocoder are both local in time: each
output frame depends on a bounded window of input frames, their *receptive
fields*. So the frontend runs once per sentence, and flow and vocoder run on
overlapping windows of its output; each window's margins are decoded and
thrown away, and the kept parts concatenate to the whole-sentence decode
(``tests/test_vits_split.py`` checks it). Each part's margin is its own
receptive field, measured on the graph when it is cut: the costly vocoder's is
small (11 latent frames each side on the bundled voice), the cheap flow's
(~1/5 of the decoding time per frame) larger (30). One 32-frame margin around
flow and vocoder together, as before, decoded about three times as many margin
frames through the vocoder.

The vocoder is cut again, before each upsampling after the first, into *stages*
whose margins are counted in their own input's samples: most of its field
(10 of the 11 frames) lies in its first stage, at the latent rate, which does
~1/5 of its work; the later stages, at 8 and 64 samples per frame, need under
a frame's worth each. A seam then decodes ~2.3 frames' worth of vocoder work
each side instead of 11 (``Split.seam_frames``). Those two stages run in pieces
of a few dozen frames (:data:`PIECE`), kept as they end, so a window cut short
for a new line goes on from where it was (``FrameStreamer._vocode``).

The seams are found from the graph, not from names: the prior's noise is the
last ``RandomNormalLike``, and the first ``Add`` after it makes ``z_p``, the
flow's input; the vocoder begins at the ``Conv`` that feeds its first
upsampling ``ConvTranspose``. Every tensor a later part reads from an earlier
one becomes an output of the earlier one. The graphs are cut with
``onnx.utils.Extractor``, the frontend made cheaper by ``engines/vits_graph.py``
(same outputs, ~25 % less time), and cached on disk, keyed by the voice file's
content.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import onnxruntime

from engines.onnx_sessions import VoiceSessions
from engines.schedule import SLACK, UNPACED, Pacing
from models.registry import cache_dir, file_digest

log = logging.getLogger("engines.vits_split")

SCHEDULE = (8, 32, 128, 512)
"""Window sizes in latent frames: the first as small as the margins allow, then growing fourfold
(the last repeats). Only the first window is on the way to first audio; each later one must only
be decoded before the audio already out runs out (a window costs ~0.05 of its own duration here),
so they grow as fast as that allows, which spends the margins on few windows: a 47-word sentence
decodes 1.07× its frames through the vocoder (1.5× with (8, 24, 64, 128, 256) and one 32-frame
margin around flow and vocoder together; 1.2× with this schedule and that margin)."""
PIECE = 64
"""Latent frames per run of a vocoder stage whose margin is under a frame (``FrameStreamer._vocode``):
a run cut short loses at most this much of that stage's work (~20 ms of a window on one core)."""
MERGE = 0.5
"""A remainder shorter than this fraction of the next window is decoded with the current one."""
SUSTAIN = 0.75
"""Part of the decoder's time that windows may spend keeping listeners fed; the rest is left for
each sentence's frontend, the relay and the noise of a shared machine."""
_SPLIT_VERSION = 5
"""Part of the cache key: bumped whenever the split graphs change (2: frontend rewritten; 3: the
decoder cut into flow and vocoder, each with its measured receptive field; 4: the vocoder cut
into stages; 5: the whole vocoder kept beside them, for GPUs)."""
HOP = 256
"""Output samples per latent frame (Piper voices upsample 8·8·4)."""


NOTHING = np.zeros(0, dtype=np.float32)
"""What an interrupted window yields: no audio, a turn given back."""

_GAIN_VERSION = 4
"""Part of the gain's cache key: bumped whenever its calibration changes (2: loudness-matched;
3: sixteen sentences; 4: each sentence's ratio from one decode)."""


def _publish(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all: to a private temporary name, then one atomic rename.

    Two workers of one voice start together on a cold cache and both write
    the same files; a reader must never see another's half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_entry(model: Path, cache: Path | None) -> Path:
    """Where the graphs derived from one voice file are kept."""
    return (cache or cache_dir("piper-split")) / f"{file_digest(model)[:24]}-v{_SPLIT_VERSION}"


@dataclass(frozen=True)
class Split:
    """A voice's graphs cut for frame streaming, and what it takes to run them window by window."""

    frontend: Path
    flow: Path
    vocoder: tuple[Path, ...]
    """The vocoder's stages, in order (``Stage``)."""
    whole_vocoder: Path
    """The vocoder in one graph: what a GPU runs (its stages would each copy their output to the
    host and back, for margins that cost a GPU little; the stages are measured on CPUs only)."""
    seam: list[str]
    """The frontend's outputs: every tensor flow or vocoder read from it (``z_p``, the frame mask…)."""
    z: str
    """The flow's output, the vocoder's input."""
    flow_margin: int
    """The flow's receptive field in latent frames each side: a flow window decoded with this many
    frames more on each side is exactly the whole decode's."""
    margin: int
    """The vocoder's receptive field in latent frames each side, likewise: the frames of ``z``
    that a window reads beyond its own, all stages' fields counted."""
    stages: tuple["Stage", ...]
    seam_frames: float
    """Vocoder work of one side's margins in latent frames' worth: each stage's margin in
    latent frames, weighted by that stage's share of the vocoder's time (timed when it is cut)."""


@dataclass(frozen=True)
class Stage:
    """A part of the vocoder between two upsamplings."""

    up: int
    """Output samples per input sample."""
    margin: int
    """Receptive field in input samples each side."""


def _spans(stages: Sequence[Stage], start: int, end: int, total: int) -> list[tuple[int, int]]:
    """Each stage's input span, in its own samples, that gives its output exactly for the latent
    frames ``[start, end)`` of a sentence of ``total`` (the first stage's in latent frames): found
    from the last stage back, each widened by its own margin and clipped to the sentence."""
    a, b, rate = start * HOP, end * HOP, HOP
    spans = []
    for stage in reversed(stages):
        rate //= stage.up
        a, b = max(0, a // stage.up - stage.margin), min(total * rate, -(-b // stage.up) + stage.margin)
        spans.append((a, b))
    return spans[::-1]


def split_model(model: Path, cache: Path | None = None) -> Split:
    """Frontend, flow and vocoder graphs for a voice (cut and measured once, then read from the cache)."""
    out = _cache_entry(model, cache)
    meta = out / "split.json"
    if not meta.is_file():
        _cut(model, out)
    info = json.loads(meta.read_text())
    stages = tuple(Stage(up, margin) for up, margin in info["stages"])
    return Split(
        out / "frontend.onnx",
        out / "flow.onnx",
        tuple(out / f"vocoder{k}.onnx" for k in range(len(stages))),
        out / "vocoder.onnx",
        info["seam"],
        info["z"],
        info["flow_margin"],
        info["margin"],
        stages,
        info["seam_frames"],
    )


def _cut(model: Path, out: Path) -> None:
    import onnx
    from onnx import shape_inference

    from engines.vits_graph import optimise

    log.info("splitting %s for frame streaming (once; cached in %s)", model.name, out)
    graph_model = shape_inference.infer_shapes(onnx.load(str(model)), data_prop=True)
    graph = graph_model.graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    noise = [n for n in graph.node if n.op_type == "RandomNormalLike"]
    if not noise:
        raise ValueError(f"{model}: no RandomNormalLike node; not a VITS voice")
    z_p = _first_add_after(noise[-1], consumers)
    z = _vocoder_input(graph)
    inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    outputs = [o.name for o in graph.output]
    seam = _seam(graph, z_p, outputs, inputs=())
    extractor = onnx.utils.Extractor(graph_model)
    front_graph = optimise(extractor.extract_model(inputs, seam), seam)
    # The vocoder reads z, and whatever else it needs of the frontend's outputs (a speaker's
    # embedding); the flow computes z alone from the frontend's outputs.
    vocoder_inputs = _seam(graph, z, outputs, inputs=seam)
    if set(vocoder_inputs) - set(seam) != {z}:
        raise ValueError(f"{model}: the vocoder reads more of the flow than z; cannot stream by frames")
    flow_graph = extractor.extract_model(seam, [z])
    vocoder_graph = extractor.extract_model(vocoder_inputs, outputs)
    # Stages: from z, and from the input of each upsampling after the first, to the next.
    bounds = [z, *[n.input[0] for n in graph.node if n.op_type == "ConvTranspose"][1:]]
    stage_graphs = [
        extractor.extract_model(_seam(graph, at, ends, inputs=seam), ends)
        for at, ends in zip(bounds, [*([b] for b in bounds[1:]), outputs])
    ]
    flow_margin = _receptive_field(flow_graph, z_p)[0]
    fields = [_receptive_field(g, at) for g, at in zip(stage_graphs, bounds)]
    stages = [Stage(up, margin) for margin, up in fields]
    if math.prod(s.up for s in stages) != HOP:
        raise ValueError(f"{model}: the vocoder does not upsample by {HOP}; cannot stream by frames")
    far = 1 << 20  # a window far inside a long sentence: every margin whole
    spans = _spans(stages, far, far, 2 * far)
    margin = far - spans[0][0]
    rates = [HOP // math.prod(s.up for s in stages[k:]) for k in range(len(stages))]
    shares = _time_shares(stage_graphs, bounds)
    seam_frames = sum(share * (far * rate - a) / rate for share, rate, (a, _) in zip(shares, rates, spans))
    log.info(
        "%s: receptive fields %d latent frames (flow), %d (vocoder: %s samples in %d stages, ~%.1f frames' worth of work)",
        model.name, flow_margin, margin, "/".join(str(s.margin) for s in stages), len(stages), seam_frames,
    )
    out.mkdir(parents=True, exist_ok=True)
    # The graphs first, the index last: a reader that finds the index finds whole graphs.
    _publish(out / "frontend.onnx", lambda p: onnx.save(front_graph, str(p)))
    _publish(out / "flow.onnx", lambda p: onnx.save(flow_graph, str(p)))
    _publish(out / "vocoder.onnx", lambda p: onnx.save(vocoder_graph, str(p)))
    for k, stage_graph in enumerate(stage_graphs):
        _publish(out / f"vocoder{k}.onnx", lambda p, g=stage_graph: onnx.save(g, str(p)))
    info = {
        "model": str(model), "seam": seam, "z": z, "flow_margin": flow_margin, "margin": margin,
        "stages": [[s.up, s.margin] for s in stages], "seam_frames": round(seam_frames, 3),
    }
    _publish(out / "split.json", lambda p: p.write_text(json.dumps(info)))


def _seam(graph, at: str, outputs: Sequence[str], inputs: Sequence[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """The tensors that the part of ``graph`` computing ``outputs`` from ``at`` on reads from
    before it: ``at`` itself, tensors computed before it, and those of ``inputs`` it reads."""
    producer = {o: n for n in graph.node for o in n.output}

    def ancestors(tensors: Sequence[str]) -> set[int]:
        seen: set[int] = set()
        todo = deque(tensors)
        while todo:
            node = producer.get(todo.popleft())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                todo.extend(node.input)
        return seen

    before = ancestors([at])
    after = ancestors(outputs) - before
    initializers = {i.name for i in graph.initializer}
    read = {i for n in graph.node if id(n) in after for i in n.input if i and i not in initializers}
    return sorted({i for i in read if id(producer.get(i)) in before or i in inputs} | {at})


def _vocoder_input(graph) -> str:  # type: ignore[no-untyped-def]
    """The tensor HiFi-GAN starts from: the input of the ``Conv`` before its first upsampling."""
    producer = {o: n for n in graph.node for o in n.output}
    upsample = next((n for n in graph.node if n.op_type == "ConvTranspose"), None)
    node = producer.get(upsample.input[0]) if upsample is not None else None
    while node is not None and node.op_type != "Conv":
        node = producer.get(node.input[0])
    if node is None:
        raise ValueError("no Conv before an upsampling ConvTranspose: cannot find the vocoder")
    return node.input[0]


def _receptive_field(part, along: str, frames: int = 160) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Input samples (latent frames, for the flow) of ``along`` on each side of an output that
    it depends on, found by changing one input sample and seeing which outputs change; and the
    output samples per input sample. Outputs beyond the field do not change at all (the same
    arithmetic on the same numbers), so the tolerance only has to rise above nothing."""
    session = onnxruntime.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _probe_feeds(session, along, frames)
    base = session.run(None, feeds)[0]
    feeds[along][..., frames // 2] += 1.0
    moved = np.abs(session.run(None, feeds)[0] - base)
    per_sample = moved.reshape(-1, moved.shape[-1]).max(axis=0)  # output time axis, in samples or frames
    per_frame = per_sample.reshape(frames, -1).max(axis=1)  # grouped by the input sample each output is at
    changed = np.flatnonzero(per_frame > 1e-7 * max(float(np.abs(base).max()), 1.0))
    return int(max(frames // 2 - changed.min(), changed.max() - frames // 2)), per_sample.size // frames


def _probe_feeds(
    session: onnxruntime.InferenceSession, along: str, frames: int, x: Optional[np.ndarray] = None
) -> dict[str, np.ndarray]:
    """Feeds for a probe run of a part: ``x`` (random, ``frames`` long, if None) for ``along``, and
    ones for every other input (a mask, an embedding); unknown dimensions 1, but time (the last)
    as long as ``x``'s."""
    if x is None:
        shape = [d if isinstance(d, int) else 1 for d in next(t for t in session.get_inputs() if t.name == along).shape]
        x = np.random.default_rng(0).standard_normal([*shape[:-1], frames]).astype(np.float32)
    feeds = {}
    for tensor in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in tensor.shape]
        if not isinstance(tensor.shape[-1], int):
            shape[-1] = x.shape[-1]
        feeds[tensor.name] = x if tensor.name == along else np.ones(shape, np.float32)
    return feeds


def _time_shares(stages: Sequence, inputs: Sequence[str], frames: int = 200) -> list[float]:  # type: ignore[type-arg]
    """Each stage's share of the vocoder's time, on a window of ``frames`` latent frames (the
    best of three runs each): what weighs the stages' margins in :attr:`Split.seam_frames`."""
    times = []
    x: Optional[np.ndarray] = None  # random for the first stage, then each stage's output
    for graph, name in zip(stages, inputs):
        session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = _probe_feeds(session, name, frames, x)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = session.run(None, feeds)[0]
            best = min(best, time.perf_counter() - t0)
        times.append(best)
        x = out
    return [t / sum(times) for t in times]


def optimised_model(model: Path, cache: Path | None = None) -> Path:
    """The whole voice with the frontend's rewrites (``engines/vits_graph.py``), made once and
    cached beside the split; the voice itself where they do not apply."""
    out = _cache_entry(model, cache)
    whole, meta = out / "whole.onnx", out / "whole.json"
    if not meta.is_file():
        import onnx

        from engines.vits_graph import optimise

        log.info("rewriting %s for speed (once; cached in %s)", model.name, out)
        plain = onnx.load(str(model))
        rewritten = optimise(plain, [o.name for o in plain.graph.output])
        out.mkdir(parents=True, exist_ok=True)
        if rewritten is not plain:
            _publish(whole, lambda p: onnx.save(rewritten, str(p)))
        _publish(meta, lambda p: p.write_text(json.dumps({"model": str(model), "rewritten": rewritten is not plain})))
    return whole if json.loads(meta.read_text())["rewritten"] else model


def with_durations(model: Path) -> tuple[bytes | str, Optional[str]]:
    """A voice graph (whole, or the split frontend) that also outputs its phoneme durations,
    and that output's name; the graph unchanged and None where it has no single ``Ceil``.

    The durations are the duration predictor's ``ceil(exp(logw) · length_scale)``, in latent
    frames per phoneme id, which the graph computes anyway (piper-tts's ``include_alignments``
    exposes the same tensor): made an output in memory, so the cached graphs stay as they are,
    and fetched only by a request that asks for timings (``engines/alignment.py``)."""
    import onnx
    from piper.patch_voice_with_alignment import add_alignment_output

    graph = onnx.load(str(model))
    try:
        name = add_alignment_output(graph)
    except ValueError as exc:
        log.warning("%s: no phoneme durations to expose (%s); no timings", model.name, exc)
        return str(model), None
    return graph.SerializeToString(), name


T = TypeVar("T")


def _interruptibly(
    pacing: Pacing, cost: float, work: Callable[[onnxruntime.RunOptions], T], options: Optional[onnxruntime.RunOptions] = None
) -> Optional[T]:
    """``work(options)``, onnxruntime runs that :meth:`Pacing.interrupt` may cut short (expected to
    take ``cost`` seconds); None if it did."""
    options = options or onnxruntime.RunOptions()
    try:
        with pacing.interruptible(lambda: setattr(options, "terminate", True), cost):
            return work(options)
    except Exception:
        if options.terminate:  # onnxruntime stops between nodes and reports it as a failure
            return None
        raise


def _first_add_after(node, consumers: dict) -> str:  # type: ignore[no-untyped-def]
    todo = deque(node.output)
    seen = set()
    while todo:
        tensor = todo.popleft()
        for c in consumers.get(tensor, ()):
            if c.op_type == "Add":
                return c.output[0]
            if c.name not in seen:
                seen.add(c.name)
                todo.extend(c.output)
    raise ValueError("no Add after the prior noise: cannot find z_p")


class Progress:
    """A sentence's decoding so far, carried from one of its windows to the next: the flow's
    output, as far as its windows have needed it (each window flows only frames not flowed
    before, plus the flow's margins), and the vocoder's work on a window cut short."""

    def __init__(self) -> None:
        self.z: Optional[np.ndarray] = None
        self.ready = 0
        """Latent frames of ``z`` computed so far, from the first."""
        self.window: Optional[_Window] = None
        """The window whose run was cut short, with what its stages had done: its next turn goes on
        from there (:meth:`FrameStreamer._vocode`)."""


@dataclass
class _Window:
    """A window's vocoder work so far, kept as each run of a stage ends."""

    keep: tuple[int, int]
    """The window's audio samples of the sentence: which window this is."""
    stage: int = 0
    """The stage in progress."""
    x: Optional[np.ndarray] = None
    """That stage's input over its span (from ``z`` for the first stage)."""
    out: list[np.ndarray] = field(default_factory=list)
    """That stage's output so far, in pieces, cut to the next stage's span."""

    def done(self) -> int:
        return sum(piece.shape[-1] for piece in self.out)


@dataclass(frozen=True)
class Parts:
    """The split's three sessions, built with one set of options (``onnx_sessions.session_options``)."""

    frontend: onnxruntime.InferenceSession
    flow: onnxruntime.InferenceSession
    vocoder: tuple[onnxruntime.InferenceSession, ...]
    """Its stages, in order (:attr:`FrameStreamer.stages`)."""


@dataclass
class FrameStreamer:
    """Runs a split voice: the frontend once per sentence, flow and vocoder window by window."""

    fast: Parts
    """Sessions whose threads spin: for runs on the way to a first audio (:meth:`parts`)."""
    lean: Parts
    """Sessions whose threads sleep when idle: for a lone stream's runs with audio in hand (less
    CPU, same wall time). The same as ``fast`` on a GPU, whose runs do not spin the CPU's threads."""
    seam: list[str]
    """The frontend's outputs (:attr:`Split.seam`)."""
    z: str
    """The flow's output, the vocoder's input."""
    cache: Path
    """The voice's cache entry (split graphs, gain)."""
    margin: int
    """The vocoder's receptive field, in latent frames each side (:attr:`Split.margin`)."""
    flow_margin: int
    """The flow's receptive field, in latent frames each side."""
    stages: tuple[Stage, ...] = ()
    """The vocoder's stages (:attr:`Split.stages`); none: one stage, with :attr:`margin`."""
    seam_frames: Optional[float] = None
    """Vocoder work of one side's margins, in latent frames' worth (:attr:`Split.seam_frames`);
    None: :attr:`margin`, as for one stage."""
    schedule: Sequence[int] = SCHEDULE
    front_cost_s: float = 0.001
    """Wall time of the frontend per phoneme id, measured as sentences are spoken (starts cautious)."""
    vocoder_cost_s: float = 0.0017
    """Wall time per latent frame through the vocoder, measured as windows are decoded (starts cautious)."""
    flow_cost_s: float = 0.0003
    """Wall time per latent frame through the flow, likewise. Measured apart from the vocoder's
    because the two parts' margins differ (:attr:`flow_margin`, :attr:`margin`): one cost per
    vocoded frame, the flow's share included, made a small first window look a fifth dearer per
    frame than a large one (its 30-frame flow lookahead), and the window after it then too dear
    to finish the sentence (the side-by-side passage's first sentence went in three windows
    instead of the two :meth:`_first_alone` plans for)."""
    rate: int = 22050
    """The voice's sample rate in Hertz (a latent frame lasts ``HOP / rate`` seconds)."""
    durations: Optional[str] = None
    """The frontend's output of phoneme-id durations in latent frames (:func:`with_durations`)."""
    narrow: Optional[Parts] = None
    """Sessions on half the cores: for a stream's runs with audio in hand while other jobs take
    turns, two of which then run at once (``Engine.parallel``). On 2 cores a run on one thread
    takes ~1.6x its time on two (in one process: a 128-frame window 100 ms against 62), and two
    at once about as long as both one after the other on two, so no work is saved, but no
    listener waits behind another stream's long window: four passages sent at once, served,
    0.83-0.91x the wall time in three A/B runs, with no underrun (README, "Several voices at
    once", for what it costs the table scene). A line's first run keeps :attr:`fast` (the
    runtime holds the others back meanwhile): with first runs narrow too, the table scene's
    worst NPC line's first audio came 1.2-1.7x later. None on a GPU, or on one thread: the runs
    of several jobs then take ``fast``, one at a time."""

    def cached_gain(self, calibrate: Callable[[], float]) -> float:
        """The voice's frame-mode gain: measured once (it costs a decode of a few sentences), then read."""
        path = self.cache / f"gain-v{_GAIN_VERSION}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["gain"])
        gain = calibrate()
        _publish(path, lambda p: p.write_text(json.dumps({"gain": gain})))
        return gain

    @classmethod
    def load(
        cls, model: Path, sessions: VoiceSessions, rate: int, cache: Path | None = None, threads: Optional[int] = None
    ) -> "FrameStreamer":
        split = split_model(model, cache)
        front_graph, durations = with_durations(split.frontend)

        on_gpu = not sessions.on_cpu
        vocoder = (split.whole_vocoder,) if on_gpu else split.vocoder

        def parts(spinning: bool, threads: Optional[int] = threads) -> Parts:
            def open_(graph: bytes | Path) -> onnxruntime.InferenceSession:
                return sessions.open(graph, spinning, threads)

            return Parts(open_(front_graph), open_(split.flow), tuple(open_(stage) for stage in vocoder))

        fast = parts(spinning=True)
        half = (threads or len(os.sched_getaffinity(0))) // 2
        return cls(
            fast,
            fast if on_gpu else parts(spinning=False),
            split.seam,
            split.z,
            split.frontend.parent,
            margin=split.margin,
            flow_margin=split.flow_margin,
            stages=() if on_gpu else split.stages,
            seam_frames=None if on_gpu else split.seam_frames,
            rate=rate,
            durations=durations,
            narrow=None if on_gpu or half < 1 else parts(True, half),
        )

    def latents(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The frontend's outputs (``z_p``, mask…) for one sentence."""
        front = self.front(feeds)
        assert front is not None  # nothing interrupts an unpaced run
        return front[0]

    def front(
        self, feeds: dict[str, np.ndarray], pacing: Pacing = UNPACED, durations: bool = False
    ) -> Optional[tuple[dict[str, np.ndarray], Optional[np.ndarray]]]:
        """:meth:`latents`, and if ``durations`` (and the graph has them) each phoneme id's
        duration in latent frames from the same run (they are sampled: a second run would differ);
        None if ``pacing.interrupt()`` cut the run short, for a new line starting meanwhile."""
        names = [*self.seam, *([self.durations] if durations and self.durations else [])]
        ids = int(feeds["input"].shape[-1])
        t0 = time.perf_counter()
        frontend = self.parts(pacing).frontend
        outs = _interruptibly(pacing, self.front_cost_s * ids, lambda options: frontend.run(names, feeds, options))
        if outs is None:
            return None
        self.front_cost_s += 0.25 * ((time.perf_counter() - t0) / ids - self.front_cost_s)
        return dict(zip(self.seam, outs)), (outs[-1].reshape(-1) if len(names) > len(self.seam) else None)

    def run_small(self, feeds: dict[str, np.ndarray], options: onnxruntime.RunOptions) -> None:
        """Every part on a short input with ``options``: what an idle worker runs to shrink
        their arenas (``PiperEngine.release_memory``)."""
        for parts in {id(p): p for p in (self.fast, self.lean, self.narrow) if p is not None}.values():
            latents = dict(zip(self.seam, parts.frontend.run(self.seam, feeds, options)))
            total = self.frames(latents)
            self._decode(lambda parts=parts: parts, latents, _spans(self._stages, 0, total, total), (0, total * HOP), Progress(), options)

    def parts(self, pacing: Pacing) -> Parts:
        """The sessions for a run of this job now: :attr:`fast` while its listener waits,
        :attr:`narrow` while other jobs take turns with it (their runs overlap this one), else
        :attr:`lean` (:attr:`narrow` too while another worker on the same cores holds a job:
        ``engines/host_cores.py``). Without ``narrow`` (a GPU, one thread), ``fast`` for the runs of several jobs
        too: a pool that sleeps loses the cores to one that spins (the table scene's narration, run lean
        beside its NPC lines' spinning first windows, ended 3-8 % later in four A/B runs out of four)."""
        if pacing.waiting():
            return self.fast
        return (self.narrow or self.fast) if pacing.sharing() > 1 or pacing.others_on_host() else self.lean

    def frames(self, latents: dict[str, np.ndarray]) -> int:
        return int(max(v.shape[-1] for v in latents.values()))

    @property
    def frame_cost_s(self) -> float:
        """Wall time per latent frame of a window's interior, through flow and vocoder."""
        return self.vocoder_cost_s + self.flow_cost_s

    def window_cost(self, frames: int, margins: int = 2) -> float:
        """Predicted wall time of a window of ``frames`` latent frames with ``margins`` sides
        inside the sentence (2; 1 for a sentence's last window, 0 for a whole sentence)."""
        return self.frame_cost_s * frames + margins * (self.vocoder_cost_s * self._seam_frames + self.flow_cost_s * self.flow_margin)

    @property
    def _seam_frames(self) -> float:
        return self.margin if self.seam_frames is None else self.seam_frames

    def decode(
        self,
        latents: dict[str, np.ndarray],
        start: int,
        end: int,
        pacing: Pacing = UNPACED,
        progress: Optional[Progress] = None,
        options: Optional[onnxruntime.RunOptions] = None,
    ) -> Optional[np.ndarray]:
        """Audio of latent frames ``[start, end)``, decoded with margins that are then dropped;
        None if ``pacing.interrupt()`` cut the run short: ``progress`` (the sentence's, from one
        window to the next) then keeps what it had done, and the same window goes on from there."""
        progress, total = progress or Progress(), self.frames(latents)
        spans = _spans(self._stages, start, end, total)
        lo, hi = spans[0]
        flow_to = total if self._flows_ahead(pacing, progress, lo, hi, total) else hi
        flow_lo, flow_hi = self._flow_span(progress, flow_to, total)
        # The vocoder's work in latent frames' worth: the window, and the part of a whole seam
        # that each side's margin is (less where it meets the sentence's edge).
        vocoded = end - start + self._seam_frames * ((start - lo) + (hi - end)) / max(1, self.margin)
        cost = self.vocoder_cost_s * vocoded + self.flow_cost_s * (flow_hi - flow_lo)
        keep = (start * HOP, end * HOP)
        resumed = progress.window is not None and progress.window.keep == keep
        run = _interruptibly(
            pacing, cost, lambda opts: self._decode(lambda: self.parts(pacing), latents, spans, keep, progress, opts, flow_to), options
        )
        if run is None:
            return None
        audio, flow_s, vocoder_s = run
        # Moving averages of each part's wall time per frame, as this machine runs them now
        # (other runs in flight included; on the narrow sessions while several jobs take turns,
        # which is what their windows then cost): what sizes the windows to come.
        if flow_hi > flow_lo:
            self.flow_cost_s += 0.25 * (flow_s / (flow_hi - flow_lo) - self.flow_cost_s)
        if not resumed:  # (a resumed window ran only a part of its vocoder work)
            self.vocoder_cost_s += 0.25 * (vocoder_s / vocoded - self.vocoder_cost_s)
        return audio

    def _decode(
        self,
        parts: Callable[[], Parts],
        latents: dict[str, np.ndarray],
        spans: Sequence[tuple[int, int]],
        keep: tuple[int, int],
        progress: Progress,
        options: onnxruntime.RunOptions,
        flow_to: int = 0,
    ) -> tuple[np.ndarray, float, float]:
        """The audio samples ``keep`` of a window whose stages run on ``spans`` (:func:`_spans`), and the wall times
        of the flow (0 when ``z`` was there already) and of the vocoder, margins included; ``z``
        flowed up to ``flow_to`` (at least as far as the window reads). Each run takes the sessions
        ``parts()`` gives then."""
        t0 = time.perf_counter()
        self._flow(parts(), latents, progress, max(flow_to, spans[0][1]), options)
        t1 = time.perf_counter()
        audio = self._vocode(parts, latents, progress, spans, keep, options)
        return audio, t1 - t0, time.perf_counter() - t1

    def _vocode(
        self,
        parts: Callable[[], Parts],
        latents: dict[str, np.ndarray],
        progress: Progress,
        spans: Sequence[tuple[int, int]],
        keep: tuple[int, int],
        options: onnxruntime.RunOptions,
    ) -> np.ndarray:
        """The window's audio, stage after stage over ``z`` (already flowed): each stage runs on its
        span, and its output is cut to the next stage's span (the window's own samples, after the
        last stage).

        A stage whose margin is under a latent frame (the later two) runs in pieces of
        :data:`PIECE` frames, each with its own margins; each piece's output, and each stage's,
        is kept in ``progress`` as it is done. A run cut short for a new line (``Pacing.interrupt``)
        then loses at most the piece in progress, and the window goes on from there at its next
        turn. (Thrown away and decoded again whole, as before, the narration's long windows in the
        table scene lost ~0.5 s of work to three NPC lines.) Each run takes the sessions ``parts()``
        gives then: a window begun on half the cores while other jobs took turns goes on with
        every core once they are done (:meth:`parts`)."""
        window = progress.window
        if window is None or window.keep != keep:
            window = progress.window = _Window(keep)
        assert progress.z is not None and progress.ready >= spans[0][1]
        rate = 1  # the stage's input samples per latent frame
        for k, (stage, (a, b)) in enumerate(zip(self._stages, spans)):
            if k >= window.stage:
                x = progress.z[..., a:b] if k == 0 else window.x
                assert x is not None
                inputs = self._stage_inputs[k]
                feeds = {name: latents[name] for name in inputs[1:]}
                na, nb = spans[k + 1] if k + 1 < len(spans) else keep
                up = stage.up
                step = PIECE * rate * up if stage.margin <= rate else nb - na
                for p in range(na + window.done(), nb, step):
                    q = min(nb, p + step)
                    pa, pb = max(a, p // up - stage.margin), min(b, -(-q // up) + stage.margin)
                    feeds[inputs[0]] = x[..., pa - a : pb - a]
                    window.out.append(parts().vocoder[k].run(None, feeds, options)[0][..., p - pa * up : q - pa * up])
                window.x, window.out, window.stage = np.concatenate(window.out, axis=-1), [], k + 1
            rate *= stage.up
        progress.window = None
        assert window.x is not None
        return window.x.reshape(-1)

    @property
    def _stages(self) -> tuple[Stage, ...]:
        return self.stages or (Stage(HOP, self.margin),)

    @functools.cached_property
    def _stage_inputs(self) -> list[list[str]]:
        """Each stage's inputs, the previous stage's output (``z`` for the first) first, then what it
        reads of the frontend's outputs (a speaker's embedding): asked of the sessions once."""
        inputs = []
        for k, session in enumerate(self.fast.vocoder):
            names = [i.name for i in session.get_inputs()]
            own = [n for n in names if n not in self.seam] if k else [self.z]
            if len(own) != 1:
                raise ValueError(f"vocoder stage {k} reads {names}: not one tensor from the stage before")
            inputs.append([*own, *(n for n in names if n in self.seam and n not in own)])
        return inputs

    def _flow_span(self, progress: Progress, end: int, total: int) -> tuple[int, int]:
        """The latent frames the flow runs on to have ``z`` up to ``end``: those not flowed yet,
        with the flow's margins (none when ``z`` is there already)."""
        if progress.ready >= end:
            return 0, 0
        return max(0, progress.ready - self.flow_margin), min(total, end + self.flow_margin)

    def _flows_ahead(self, pacing: Pacing, progress: Progress, lo: int, hi: int, total: int) -> bool:
        """Whether a window's flow run goes on to the sentence's end, where the listener's audio in
        hand allows it (with :data:`SLACK`; a share of it while other jobs take turns): each later
        window then runs the vocoder alone, and no more flow margins are decoded twice (two per
        window: ~60 flow frames, about half the time of the vocoder's 22). Not before the first audio,
        which it would delay, nor unpaced, whose windows keep their own flow seams."""
        if not pacing.paced or pacing.waiting() or progress.ready >= hi or hi + self.flow_margin >= total:
            return False
        alone = pacing.sharing() == 1 and not pacing.others_on_host()
        allowance = min(pacing.lead() / SLACK if alone else pacing.budget(), pacing.others_budget())
        cost = self.vocoder_cost_s * (hi - lo) + self.flow_cost_s * (total - max(0, progress.ready - self.flow_margin))
        return cost <= allowance

    def _flow(self, parts: Parts, latents: dict[str, np.ndarray], progress: Progress, end: int, options: onnxruntime.RunOptions) -> None:
        """Extend ``progress`` to ``z`` from the first latent frame up to ``end`` at least."""
        total = self.frames(latents)
        lo, hi = self._flow_span(progress, end, total)
        if hi > lo:
            feeds = {k: v[..., lo:hi] if v.shape[-1] == total else v for k, v in latents.items()}
            # Exact up to `end`, where the right margin is cut off; to the end where none was (a
            # sentence's last window then runs no flow again: "Halt!" flowed all its frames twice).
            keep = total if hi == total else end
            z = parts.flow.run([self.z], feeds, options)[0][..., progress.ready - lo : keep - lo]
            progress.z = z if progress.z is None else np.concatenate([progress.z, z], axis=-1)
            progress.ready = keep

    def stream(self, latents: dict[str, np.ndarray], pacing: Pacing = UNPACED) -> Iterator[np.ndarray]:
        """The sentence's audio, window after window.

        Windows follow the schedule, or are larger where ``pacing.budget()`` (seconds this
        stream may take now before its listener runs out of audio) allows: a window's cost is
        predicted from the decoder's measured time per frame, so a sentence spoken while audio
        is in hand is decoded in few windows, or one, with few margins to pay for. With other jobs
        taking turns, the first window's audio must last while those not yet started get their
        first windows, and no later window is so small that the jobs taking turns spend more on
        margins than their audio lasts (:meth:`_floor`)."""
        total = self.frames(latents)
        short = total <= self.schedule[0] + 2 * self.margin  # windows would decode more than the whole
        progress = Progress()
        for start, end in [(0, total)] if short else self.windows(total, pacing):
            while (audio := self.decode(latents, start, end, pacing, progress)) is None:
                yield NOTHING  # interrupted for a new line's first audio: this window goes on at its next turn
            yield audio

    def windows(self, total: int, pacing: Pacing = UNPACED) -> Iterator[tuple[int, int]]:
        """``[start, end)`` of each window over ``total`` latent frames."""
        start = step = 0
        while start < total:
            size = self.schedule[min(step, len(self.schedule) - 1)]
            floor, cap = 0, 1 << 30
            if pacing.paced:
                size = max(size, self._frames_for(pacing.budget()))
                if step == 1 and pacing.sharing() == 1 and SLACK * self.window_cost(total - start, margins=1) <= pacing.lead():
                    size = total - start  # the rest fits in the audio in hand: at once (what _first_alone plans for)
                # …but not so large that another listener runs out meanwhile, down to a floor
                # that still gains audio faster than the margins cost when several take turns.
                floor, cap = self._floor(step, total, pacing), self._frames_for(pacing.others_budget())
                size = max(floor, min(size, cap))
                # No larger than the schedule's largest: onnxruntime's arena grows to the largest
                # window it has decoded and keeps it (issue 11), ~150 MB more for whole sentences.
                size = min(size, self.schedule[-1])
            end = min(total, start + size)
            rest = total - end
            if rest < MERGE * self.schedule[min(step + 1, len(self.schedule) - 1)] and (rest + size <= cap or rest < floor):
                # The remainder goes with this window, if the others can wait for both, or if it
                # is under the floor: a window that small is not worth its margins. (Merged
                # whatever the others' audio, four passages at once had their last windows grow
                # by up to half the schedule's largest, ~250 ms of runs while another listener
                # had 220 ms in hand. Served A/B, 20 rounds: each stream's closest call, p10 60 ->
                # 175 ms, for a seam more per first sentence: 1.03x the CPU.)
                end = total
            yield start, end
            start, step = end, step + 1

    def _floor(self, step: int, total: int, pacing: Pacing) -> int:
        """The smallest window worth decoding now, whoever else is waiting."""
        jobs = pacing.sharing()
        later = max(self.schedule[1], self._sustainable(jobs))
        if step > 0:
            return later
        if jobs == 1:
            return self._first_alone(total, pacing.chunk_s)
        # A first window's audio must last while the jobs not yet started start (they go first)
        # and its own next window is decoded (four passages at once ran dry right after their
        # first windows when it did not), with SLACK: both costs are moving averages, and this
        # machine runs a stretch of seconds at 1.4 times its usual time now and then (a numpy
        # loop alone: 60 ms a pass, 85 ms in such a stretch). Four passages at once, 8 loads a
        # run: without it 10, 2, 17 and 22 underruns in the runs that met such a stretch; with
        # it 0, 0, 0 and 1, the four first audios ~30 ms later (p90 216 -> 299 ms, slow stretch).
        wait = SLACK * (pacing.starting() * pacing.start_cost() + self.window_cost(later)) / SUSTAIN
        return max(self.schedule[0], self._sent_frames(wait, pacing.chunk_s))

    def _sent_frames(self, seconds: float, chunk_s: float) -> int:
        """The fewest latent frames whose whole chunks of ``chunk_s`` seconds hold ``seconds`` of
        audio: the rest of a window's last chunk waits for the next window (``Pacing.chunk_s``).
        (Counted as frames alone, an NPC line's 8-frame first window sent 80 ms, and its next
        window came 0-50 ms before that ran out in the table scene's 30 lines of 30. Served A/B,
        20 rounds: the closest call of each stream, p10 / p50 25 / 39 -> 49 / 73 ms.)"""
        if chunk_s > 0:
            seconds = math.ceil(seconds / chunk_s - 1e-9) * chunk_s
        return math.ceil(seconds * self.rate / HOP)

    def _first_alone(self, total: int, held: float) -> int:
        """A lone line's first window: the schedule's first, for first audio, unless a few frames
        more (up to :meth:`first_max`) make its audio last, with :data:`SLACK`, while the second
        window decodes all the rest of the sentence: one seam of margins
        instead of two. The side-by-side passage's first sentence (264 frames) then goes in ~20
        and the rest instead of 8, 32 and the rest: in one process, three runs of 20-30
        interleaved pairs, CPU per passage 0.971x, 0.967x, 0.970x, last audio 0.97x, 0.964x,
        0.954x, first audio +2.6 to +6.6 ms. A long sentence, whose rest takes several windows
        whatever the first, keeps the smallest; so does a short one, whose second window
        finishes it anyway.

        The size is the smallest ``n`` with ``SLACK · window_cost(total - n, 1) ≤ n · frame_s - held``
        (the check :meth:`windows` makes at the second window, on the audio sent by then: up to
        ``held`` seconds of the window's end wait for the next window, ``Pacing.chunk_s``), and
        one frame more for the time its audio takes to leave before that check. (Served, the
        chunks' hold-back failed that check for the passage's first sentence in 5 requests of 6,
        which then went in three windows.)"""
        first = self.schedule[0]
        need = math.ceil((SLACK * self.window_cost(total, margins=1) + held) / (HOP / self.rate + SLACK * self.frame_cost_s)) + 1
        return need if first < need <= self.first_max() else first

    def first_max(self) -> int:
        """The largest first window :meth:`_first_alone` plans: the schedule's first two together.
        Growing the first window spares the sentence the schedule's second window, and that
        costs more than its seam of margins: in one process, the passage's first sentence (262
        frames) took 204 ms in windows of 8, 32 and the rest against 180 ms in 27 and the rest
        (162 ms whole; lean sessions, 15 interleaved runs). Its runs' fixed costs, two threads
        poorly used on few frames, and the flow's margins (~60 frames, now more than the
        vocoder's) make the 24 ms, ~38 frames' worth, so first audio is traded at most one for
        one against the sentence's work. (Bounded by the seam's modelled cost alone, the cap
        fell to ~23 frames once the vocoder was cut into stages, and the side-by-side passage
        went in three windows: last audio 1.066x in a served A/B.)"""
        return self.schedule[0] + self.schedule[1]

    def _sustainable(self, jobs: int) -> int:
        """The smallest later window with which ``jobs`` streams taking turns each gain audio
        faster than it plays, margins paid: ``jobs · window_cost(W) ≤ SUSTAIN · W · frame_s``.
        Smaller windows spend more on margins than the audio they add lasts, and every
        listener falls behind together (four passages at once did, with 32-frame windows)."""
        spare = SUSTAIN * HOP / self.rate - jobs * self.frame_cost_s
        if spare <= 0:
            return self.schedule[-1]
        return min(self.schedule[-1], math.ceil(jobs * self.window_cost(0) / spare))

    def _frames_for(self, seconds: float) -> int:
        """Latent frames one window can decode in ``seconds``, margins paid."""
        if seconds == float("inf"):
            return 1 << 30
        return int((seconds - self.window_cost(0)) / self.frame_cost_s)
