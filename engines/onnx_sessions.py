"""The onnxruntime sessions of one Piper worker, built to share what they can.

A worker that streams by frames holds sixteen sessions over one voice: the whole graph (sentence
mode, short lines) and three sets (threads spinning, sleeping, and on half the cores) of the
split's parts, its frontend, flow and three vocoder stages (``engines/vits_split.py``). Built plainly, each session owns a copy of every
weight it reads and an arena grown to its own largest run: four copies of the voice's weights
(~60 MB on a medium voice), and four arenas that each keep ~150 MB after a 512-frame window. So
:class:`VoiceSessions` gives every session of a voice one shared copy of each weight
(``SessionOptions.add_initializer``: one ``OrtValue`` per weight, read in place by each session
whose graph has it) and, on the CPU, one arena (``session.use_env_allocators``: the process's
arena, registered once), which serves whichever runs are going on at the time.

Measured in one process on 2 cores, a frames engine after the same long sentences and passages:
RSS 502 MB busy against 745, 306 MB once idle release has run against 476; served, worker and
``serve`` right after load rounds 596-605 MB against 997-1,092; run times unchanged (interleaved
pairs: last audio 0.98-1.03x). The arena's growth stays onnxruntime's default (powers of two):
growing by exactly what is asked for fragmented it (723 MB busy against 558).

On a GPU the sessions are built as before, each with its own weights: the device holds them
there, and a shared host copy would only be kept alive for nothing (not measured: no GPU here).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnxruntime

CPU = "CPUExecutionProvider"
SHARED_MIN_BYTES = 64 * 1024
"""Weights at least this large are shared; smaller ones (shape constants, biases) stay each
session's own: they cost little, and sharing is kept to the tensors that matter."""


def session_options(spinning: bool = True, threads: Optional[int] = None) -> onnxruntime.SessionOptions:
    """Options for every session of a Piper worker (the whole voice and the three parts of the split).

    Memory patterns are off. With them onnxruntime plans each run's tensors as one block per
    input shape and caches that plan for every distinct shape it has seen, forever; a voice's
    inputs change length with every sentence (and its intermediate lengths with the predicted
    durations), so a worker's arena kept fragmenting and its RSS kept creeping up (issue 11:
    +0.5-0.9 MB/min over a 10-minute soak). Without them the arena grows to the largest shape
    it has served and stays there (``python -m bench.soak``; README, "Memory over time"), and
    runs take the same time (measured interleaved in one process, 2 cores).

    With ``spinning``, the intra-op pool's threads spin between the parallel parts of a run, and
    stop as soon as the run returns (``session.force_spinning_stop``): what a run on the way to a
    first audio wants. Woken from sleep instead, as each of a graph's hundreds of nodes needs
    them, a line's first window comes later (every session without spinning, served, 12
    interleaved pairs: first audio 1.06x for the 47-word sentence, 1.12x for the passage; four
    passages at once, 7 underrun chunks against 2). But a spinning thread burns its core while
    the other runs a node's serial part: with audio in hand, the same windows cost less CPU
    without it, in the same wall time. So the split has both sets (``vits_split.Parts``, chosen by
    ``FrameStreamer.parts``): spinning for first audio, sleeping for a lone stream's rest.
    Against spinning everywhere, three served A/B runs of 12-16 interleaved pairs: CPU per
    passage 0.926x, 0.932x, 0.928x; last audio 0.997x, 0.996x, 1.024x; first audio unchanged
    (the noise of such a run: ±5 % on last audio, ±15 % on first audio between identical
    arms). The second set costs ~30 MB of RSS idle, ~100 MB busy (before its weights and arena
    were shared: :class:`VoiceSessions`).

    ``threads``: the intra-op pool's size (``[[workers]] threads``); None: onnxruntime's
    default, every core.
    """
    opts = onnxruntime.SessionOptions()
    opts.enable_mem_pattern = False
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


@functools.cache
def _process_arena() -> None:
    """Registers the process's CPU arena, once: sessions opt into it (``session.use_env_allocators``)."""
    memory = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, onnxruntime.OrtMemType.DEFAULT)
    # -1: onnxruntime's defaults (no limit, growth by powers of two, its first chunk, its dead-bytes cap).
    onnxruntime.create_and_register_allocator(memory, onnxruntime.OrtArenaCfg(0, -1, -1, -1))


class VoiceSessions:
    """Builds the sessions of one voice on one device; on the CPU, sharing weights and arena."""

    def __init__(self, providers: Sequence[Any]) -> None:
        self.providers = list(providers)
        self.on_cpu = all((p[0] if isinstance(p, tuple) else p) == CPU for p in self.providers)
        """Whether every provider is the CPU's: only then do the sessions share weights and arena."""
        self._weights: dict[str, tuple[np.ndarray, onnxruntime.OrtValue]] = {}
        """Each shared weight by name: the array (which every session reading it holds on to) and its OrtValue."""

    def open(self, graph: bytes | Path, spinning: bool = True, threads: Optional[int] = None) -> onnxruntime.InferenceSession:
        """A session of ``graph`` (serialised, or a file) with :func:`session_options`."""
        opts = session_options(spinning, threads)
        shared = {}
        if self.on_cpu:
            _process_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
            shared = self._share(graph)
            for name, (_, value) in shared.items():
                opts.add_initializer(name, value)
        session = onnxruntime.InferenceSession(graph if isinstance(graph, bytes) else str(graph), opts, providers=self.providers)
        # The session reads these arrays in place: it keeps them alive, however long this object lives.
        session._shared_weights = shared  # type: ignore[attr-defined]
        return session

    def _share(self, graph: bytes | Path) -> dict[str, tuple[np.ndarray, onnxruntime.OrtValue]]:
        """The graph's large weights as shared values: those met before (same name, same
        content) reused, new ones kept. A name whose content differs from the kept one (a
        rewritten graph's) is left to the session's own copy."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load_model_from_string(graph) if isinstance(graph, bytes) else onnx.load(str(graph))
        values = {}
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.nbytes < SHARED_MIN_BYTES:
                continue
            kept = self._weights.get(tensor.name)
            if kept is None:
                array = np.array(array)  # its own memory, not the parsed graph's
                kept = self._weights[tensor.name] = (array, onnxruntime.OrtValue.ortvalue_from_numpy(array))
            elif kept[0].dtype != array.dtype or not np.array_equal(kept[0], array):
                continue
            values[tensor.name] = kept
        return values
