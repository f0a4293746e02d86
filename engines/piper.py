"""Piper engine: one ONNX voice, loaded once per worker process.

Two ways to stream a sentence: *sentence* mode runs the whole voice once per
sentence (piper-tts's own path: first audio after the whole sentence), *frames*
mode runs the voice split in two (``engines/vits_split.py``): the frontend once,
then the decoder window by window, so first audio comes in constant time
whatever the sentence's length. Both use piper-tts's phonemes and ids. A worker
able to stream by frames also runs the whole voice rewritten for speed
(``engines/vits_graph.py``; same outputs).

Run standalone (possibly on another host) with::

    python -m engines.piper --backend tcp://BROKER:5556 --voice en_US-joe-medium
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig
from piper.config import PiperConfig
from piper.voice import ESPEAK_DATA_DIR

from broker.tts import TIMING_KINDS, SynthesisRequest
from engines.alignment import BOS, EOS, Alignment, WordMap, align_piece, segment, symbol_samples
from engines.audio import soft_limit
from engines.base import Engine
from engines.schedule import UNPACED, Pacing, Playback
from engines.onnx_sessions import VoiceSessions
from engines.vits_split import NOTHING, FrameStreamer, optimised_model, with_durations
from models.registry import DEFAULT_PIPER_VOICE, resolve_piper_voice

log = logging.getLogger("engines.piper")

_SHORT_IDS = 40
"""Phoneme ids (a few words: "Halt!" is 15, "Who goes there?" 33) up to which frame mode runs the
whole voice at once, unless a listener is waiting for the stream's first audio. One run is the
least work, but its first sample comes when the whole piece is decoded; windows give the first
of it sooner for more work in all (the split's three graphs, and the first window's margins). In
one process on 2 cores, first audio / all of it: "Halt!" 30.5 / 30.5 ms whole, 21.7 / 46.1 ms in
windows; "Who goes there?" 44.5 / 44.5 and 23.4 / 61.8 ms. So a line that starts with a few
words is windowed for its listener, and a short sentence later in a stream, with audio in hand,
is run whole."""
_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Roll for initiative!",
    "Where did the dragon go?",
    "In the flickering torchlight the old cartographer unrolled a brittle map across the oak table.",
    "The innkeeper wiped his hands on his apron and leaned closer.",
    "Three goblins burst through the door, shrieking.",
    "Nothing moves in the silent hall; only dust drifts in the pale light.",
    "Tell me, traveller, what brings you so far from home?",
    "The caravan left the city at dawn, its wagons heavy with salt and cloth.",
    "Somewhere in the dark, water drips onto stone, slow and steady.",
    "The captain of the watch demands to know your business in the city.",
    "Beneath the ice lies a frozen lake, and beneath the lake, something waits.",
    "Ash falls like snow over the burned village.",
    "The old man laughs, coughs, and points a crooked finger toward the hills.",
    "Every candle in the chapel goes out at once.",
    "You hear the clink of armour as soldiers march past the alley.",
)
"""Sentences whose loudness frame mode matches (median per sentence); not the tests' narration set.

Sixteen, because the median of eight still moved the gain by up to 0.8 dB between runs
(the duration noise differs per run); with sixteen, the median loudness difference over 40
other narration sentences stays within ±0.5 dB. Measured once per voice and cached."""
_LONG_SENTENCE = (
    "In the flickering torchlight the old cartographer unrolled a brittle map across the oak table, "
    "tracing with one trembling finger the forgotten road that wound past the drowned village."
)

CUDA = "CUDAExecutionProvider"


def _plug_espeak_leaks() -> None:
    """Stop piper-tts's espeak bridge leaking memory on every sentence (issue 11).

    Two leaks, both in ``piper.espeakbridge`` (piper-tts 1.8.0), each about 1 KB a call,
    measured by calling them 40,000 times (RSS +12 MB per 10,000 calls, for ever):

    * ``get_phonemes`` does ``PyList_Append(list, Py_BuildValue(...))`` and never drops the
      reference ``Py_BuildValue`` returned, so each clause's tuple and phoneme string outlive
      the call. Wrapped to drop that one reference, only after checking at run time that it
      is there, so a fixed piper-tts is left alone.
    * ``set_voice`` (espeak-ng's ``espeak_SetVoiceByName``), which piper calls before every
      text it phonemizes, leaks inside espeak-ng each time. Wrapped to skip setting the voice
      already set (phonemes checked identical).

    Needs espeak initialised: call after the first synthesis.
    """
    import ctypes
    import sys

    from piper import espeakbridge

    if getattr(espeakbridge, "tts_broker_plugged", False):  # once per process
        return
    espeakbridge.tts_broker_plugged = True  # type: ignore[attr-defined]
    get, set_voice = espeakbridge.get_phonemes, espeakbridge.set_voice
    current: list[str] = []

    def set_voice_once(name: str) -> None:
        if current != [name]:
            set_voice(name)
            current[:] = [name]

    espeakbridge.set_voice = set_voice_once

    probe = get("a.")
    control = [tuple(list(probe[0]))]  # a tuple owned by a list alone, for comparison
    if sys.getrefcount(probe[0]) != sys.getrefcount(control[0]) + 1:
        return  # no extra reference: nothing to plug
    decref = ctypes.pythonapi.Py_DecRef
    decref.argtypes, decref.restype = [ctypes.py_object], None
    decref(probe[0])

    def get_phonemes(text: str) -> list:
        clauses = get(text)
        for clause in clauses:
            decref(clause)
        return clauses

    espeakbridge.get_phonemes = get_phonemes


def _phonemize_serially(voice: PiperVoice) -> None:
    """espeak-ng keeps its state in globals: two synthesis threads must not phonemize at once
    (the models' runs may overlap). The voice's own ``synthesize`` calls ``phonemize`` on
    itself, so the instance attribute covers sentence mode too."""
    lock = threading.Lock()
    phonemize = voice.phonemize

    def serial(text: str) -> list[list[str]]:
        with lock:
            return phonemize(text)

    voice.phonemize = serial  # type: ignore[method-assign]


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


def pick_device(device: str) -> bool:
    """Return True for CUDA, which only ``cuda`` asks for.

    ``auto`` is the CPU even where onnxruntime offers CUDA: measured on an H200
    (``bench/results/gpu-h200-piper.json``), onnxruntime's CUDA provider pays 0.1-0.25 s of
    set-up for every new input length, and every sentence and frame window is one, so a
    worker's first audio was ~0.3 s on the GPU against ~25 ms for a short line on the CPU."""
    if device not in ("cuda", "auto", "cpu"):
        raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")
    available = onnxruntime.get_available_providers()
    if device != "cuda":
        if device == "auto" and CUDA in available:
            log.info("device auto: Piper runs on the CPU, where its first audio is sooner (--device cuda for the GPU)")
        return False
    if CUDA not in available:
        raise DeviceError(f"device 'cuda' requested but onnxruntime offers only {available} (install onnxruntime-gpu on a machine with a GPU)")
    # onnxruntime-gpu links CUDA's libraries but does not ship them: this finds them in the nvidia-*
    # pip packages (onnxruntime-gpu[cuda,cudnn], or torch's) before the system's, so a venv needs
    # no system-wide CUDA toolkit; without them the session would not get the CUDA provider.
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is not None:
        preload()
    return True


CUDA_OPTIONS = {
    # Every sentence, and every frame window, is a new input length. onnxruntime's default
    # (EXHAUSTIVE) benchmarks cuDNN's convolution algorithms for each new shape: measured on an
    # H200, frame streaming's first audio was 0.6 s in one process and 1.4 s through the broker
    # with it, 0.12 and 0.3 s with the heuristic (bench/results/gpu-h200-piper.json).
    "cudnn_conv_algo_search": "HEURISTIC",
    # TF32 rounds convolution inputs to 10 bits of mantissa: windows then no longer decode like the
    # whole sentence (max error 0.018 against 8e-6 on the CPU), and the durations can round to
    # another frame count than the CPU's. Full float32 keeps the GPU's audio piper-tts's.
    "use_tf32": "0",
}


def session_providers(use_cuda: bool) -> list[Any]:
    """onnxruntime's ``providers`` argument for every session of a voice, on one device."""
    return [(CUDA, CUDA_OPTIONS), "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


class PiperEngine(Engine):
    engine = "piper"
    timings = TIMING_KINDS
    """From the voice's own phoneme durations (``engines/alignment.py``); none if its graph hides them."""
    slots = 4
    """A window costs ~0.05 of the audio it makes on one core, so one worker keeps several
    real-time streams fed, each advanced a window at a time by deadline."""
    threads = 2
    """onnxruntime sessions take concurrent runs; espeak-ng does not, so phonemizing is
    serialised (``_phonemize_serially``)."""

    def __init__(
        self,
        voice: str = DEFAULT_PIPER_VOICE,
        device: str = "auto",
        voice_dirs: Sequence[str] = (),
        stream_mode: str = "auto",
        threads: Optional[int] = None,
    ) -> None:
        """``threads``: onnxruntime's intra-op threads for every session; None: every core."""
        files = resolve_piper_voice(voice, voice_dirs)
        use_cuda = pick_device(device)
        # A worker that may stream by frames runs the voice rewritten like the split frontend
        # (same outputs, less time) for sentence mode and short sentences too; one started with
        # stream_mode = "sentence" runs piper-tts's path untouched.
        self.model_path = files.model if stream_mode == "sentence" else optimised_model(files.model)
        log.info("loading Piper voice %s from %s (device %s)", files.name, self.model_path, "cuda" if use_cuda else "cpu")
        # One session, built with the worker's own options (no memory patterns: see
        # engines/onnx_sessions.session_options), that also outputs the phoneme durations (fetched
        # only for timings, ``engines/alignment.py``). Not ``PiperVoice.load``'s, then replaced:
        # the weights of a session built and dropped stayed in the heap (+65 MB of RSS). Its
        # weights and arena are shared with the split's sessions (``engines/onnx_sessions.py``).
        whole, self.durations_output = with_durations(self.model_path)
        self.sessions = VoiceSessions(session_providers(use_cuda))
        self.voice = PiperVoice(
            config=PiperConfig.from_dict(json.loads(files.config.read_text(encoding="utf-8"))),
            session=self.sessions.open(whole, threads=threads),
            espeak_data_dir=ESPEAK_DATA_DIR,
        )
        del whole
        providers = self.voice.session.get_providers()
        if use_cuda and CUDA not in providers:  # onnxruntime falls back to the CPU silently
            raise DeviceError(f"CUDA requested but the ONNX session got {providers}")
        log.info("Piper voice %s ready: providers %s, %d Hz", files.name, providers, files.sample_rate)
        self.files = files
        self.providers = providers
        self.native_rate = self.voice.config.sample_rate
        # The first inference pays for onnxruntime's lazy set-up; pay it now.
        for _ in self.voice.synthesize("Ready."):
            pass
        _plug_espeak_leaks()
        _phonemize_serially(self.voice)
        self._shortest = self.voice.phonemize("Ah.")[0]
        """Phonemes of the shortest run, for :meth:`release_memory`."""
        self.frames: Optional[FrameStreamer] = None
        self.frame_gain = 1.0
        self.stream_mode = "sentence"
        if stream_mode != "sentence":
            try:
                self.frames = FrameStreamer.load(files.model, self.sessions, files.sample_rate, threads=threads)
            except ValueError as exc:  # not a VITS graph we can cut
                if stream_mode == "frames":
                    raise
                log.warning("voice %s cannot stream by frames (%s); streaming by sentence", files.name, exc)
        self.words = WordMap(self.voice.phonemize)
        if self.durations_output is None or (self.frames is not None and self.frames.durations is None):
            self.timings = ()
        if self.frames is not None:
            self.frame_gain = self.frames.cached_gain(self._calibrate_gain)
            self.stream_mode = stream_mode if stream_mode != "auto" else self._faster_mode()
            self.parallel = self.stream_mode == "frames" and self.frames.narrow is not None
        log.info("Piper voice %s streams by %s", files.name, "frames" if self.stream_mode == "frames" else "sentence")

    # ---------------------------------------------------------- frame mode

    def _feeds(self, phonemes: list[str], speed: float) -> dict[str, np.ndarray]:
        cfg = self.voice.config
        ids = self.voice.phonemes_to_ids(phonemes)
        feeds = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([cfg.noise_scale, (cfg.length_scale or 1.0) / speed, cfg.noise_w_scale], dtype=np.float32),
        }
        if cfg.num_speakers > 1:  # as piper-tts does: its default speaker
            feeds["sid"] = np.array([cfg.default_speaker_id], dtype=np.int64)
        return feeds

    def _calibrate_gain(self) -> float:
        """Piper scales each sentence to full scale, which needs the whole sentence; frame mode
        uses instead one gain for the voice, chosen to match sentence mode's loudness (RMS):
        the median ratio over a few sentences. Sentence mode's audio is the same decode divided
        by its peak (piper-tts's ``normalize_audio``), so one decode of a sentence gives its
        ratio, ``1 / peak``, free of the difference between two draws of the voice's noise.
        Peaks the gain pushes past full scale are bent back by
        :func:`engines.audio.soft_limit`, not clipped."""
        assert self.frames is not None
        gains = []
        for sentence in _CALIBRATION:
            raw = np.concatenate(
                [a for ph in self.voice.phonemize(sentence) if ph for a in self.frames.stream(self.frames.latents(self._feeds(ph, 1.0)))]
            )
            gains.append(1.0 / max(float(np.abs(raw).max()), 1e-6))
        return float(np.median(gains))

    def _faster_mode(self) -> str:
        """``auto``: whichever gives first audio sooner for a long sentence on this machine."""
        def first(chunks: Iterator[np.ndarray]) -> float:
            t0 = time.perf_counter()
            next(iter(chunks))
            return time.perf_counter() - t0

        req = SynthesisRequest(text=_LONG_SENTENCE)
        sentence = min(first(self._speak_sentences(_LONG_SENTENCE, req)) for _ in range(2))
        # As served: a listener waits for it (the sessions and the first window are first audio's).
        frames = min(first(self._speak_frames(_LONG_SENTENCE, req, Pacing(Playback(time.monotonic()), lambda: ()))) for _ in range(2))
        log.info("first audio of a long sentence: %.0f ms by sentence, %.0f ms by frames", sentence * 1000, frames * 1000)
        return "frames" if frames < sentence else "sentence"

    # ------------------------------------------------------------- timings

    def _plan(self, text: str, pieces: list[list[str]]) -> list[tuple[list[str], list, list]]:
        """Per piece of a sentence: its symbols as the ids count them (``^``, known phonemes,
        ``$``), their phones, and each phone's word in ``text`` (``engines/alignment.py``)."""
        known = self.voice.config.phoneme_id_map
        symbols = [[BOS, *(p for p in ph if p in known), EOS] for ph in pieces]
        segs = [segment(sy) for sy in symbols]
        return list(zip(symbols, segs, self.words.assign(text, segs)))

    def _alignment(self, plan: tuple[list[str], list, list], frames: np.ndarray) -> Optional[Alignment]:
        """The piece's alignment from its ids' durations (latent frames of ``hop`` samples)."""
        symbols, segs, words = plan
        hop = self.voice.config.hop_length
        samples = symbol_samples(symbols, self.voice.config.phoneme_id_map, [int(f) * hop for f in np.asarray(frames).reshape(-1)])
        if samples is None:
            log.warning("phoneme durations do not fit the ids of %r; no timings for it", "".join(symbols))
            return None
        return align_piece(symbols, segs, words, samples)

    # ---------------------------------------------------------- frame mode

    def _speak_frames(self, text: str, request: SynthesisRequest, pacing: Pacing = UNPACED) -> Iterator[Union[np.ndarray, Alignment]]:
        assert self.frames is not None
        pieces = [ph for ph in self.voice.phonemize(text) if ph]
        timed = bool(request.timings) and bool(self.timings)
        plan = self._plan(text, pieces) if timed else []
        for i, phonemes in enumerate(pieces):
            feeds = self._feeds(phonemes, request.speed)
            # Audio in hand: one run of the whole voice is cheaper than three graphs, except beside
            # other jobs' runs on the split's half-core sessions: the whole voice runs on every core,
            # and there it made three threads on two cores (traced in the table scene: a short
            # sentence that takes ~30 ms alone took 133 ms).
            if feeds["input"].shape[1] <= _SHORT_IDS and not pacing.waiting() and self.frames.parts(pacing) is not self.frames.narrow:
                if timed:
                    audio, durations = self.voice.session.run([self.voice.session.get_outputs()[0].name, self.durations_output], feeds)
                    if (alignment := self._alignment(plan[i], durations)) is not None:
                        yield alignment
                else:
                    audio = self.voice.session.run(None, feeds)[0]
                yield soft_limit(audio.reshape(-1) * self.frame_gain)
                continue
            while (front := self.frames.front(feeds, pacing, durations=timed)) is None:
                yield NOTHING  # interrupted for a new line's first audio: again at its next turn
            latents, durations = front
            if durations is not None and (alignment := self._alignment(plan[i], durations)) is not None:
                yield alignment
            for audio in self.frames.stream(latents, pacing):
                yield soft_limit(audio * self.frame_gain)

    def _speak_sentences(self, text: str, request: SynthesisRequest) -> Iterator[Union[np.ndarray, Alignment]]:
        config = SynthesisConfig(length_scale=(self.voice.config.length_scale or 1.0) / request.speed)
        timed = bool(request.timings) and bool(self.timings)
        # Words need the whole sentence's phonemes before its first piece is spoken.
        plan = self._plan(text, [ph for ph in self.voice.phonemize(text) if ph]) if timed else []
        # espeak may split a sentence further; each piece is one model run.
        for i, chunk in enumerate(self.voice.synthesize(text, config, include_alignments=timed)):
            if timed and i < len(plan) and chunk.phoneme_id_samples is not None:
                if (alignment := self._alignment(plan[i], chunk.phoneme_id_samples // self.voice.config.hop_length)) is not None:
                    yield alignment
            yield chunk.audio_float_array

    def release_memory(self) -> None:
        """onnxruntime's arenas keep what the largest window or sentence needed (~150 MB for a
        512-frame window); a short run with arena shrinkage frees the rest. On the CPU every
        session of the voice shares one arena (``engines/onnx_sessions.py``), so one run of
        the whole voice frees it all (31 ms against 114 for a run of each session, the same
        RSS after); elsewhere each session runs."""
        options = onnxruntime.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0;gpu:0" if CUDA in self.providers else "cpu:0")
        feeds = self._feeds(self._shortest, 1.0)
        self.voice.session.run(None, feeds, options)
        if self.frames is not None and not self.sessions.on_cpu:
            self.frames.run_small(feeds, options)

    @property
    def service(self) -> str:
        return f"piper.{self.files.name}"

    def languages(self) -> list[str]:
        return [self.files.language]

    def voices(self) -> list[str]:
        return [self.files.name]

    def voice_for(self, request: SynthesisRequest) -> str:
        return self.files.name

    def capabilities(self) -> dict:
        return {
            **super().capabilities(),
            "voice": self.files.name,
            "device": "cuda" if CUDA in self.providers else "cpu",
            "stream": self.stream_mode,
        }

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        return self.speak_paced(text, request, UNPACED)

    def speak_paced(self, text: str, request: SynthesisRequest, pacing: Pacing) -> Iterator[np.ndarray]:
        """Frame mode decodes each window as large as the listener's audio in hand allows
        (``FrameStreamer.stream``): the first window of a request small, for first audio; a
        later sentence, with audio in hand, often in one piece, as sentence mode would."""
        mode = request.stream or self.stream_mode
        if mode == "frames" and self.frames is not None:
            return self._speak_frames(text, request, pacing)
        return self._speak_sentences(text, request)


def main(argv: Optional[list[str]] = None) -> None:
    from engines.cli import worker_arguments, run_worker

    parser = argparse.ArgumentParser(prog="python -m engines.piper", description="Piper engine worker for tts-broker")
    worker_arguments(parser)
    parser.add_argument("--voice", default=DEFAULT_PIPER_VOICE, help="bundled voice name, voice-dir name, or path to a .onnx")
    parser.add_argument("--voice-dir", action="append", default=[], help="directory with NAME.onnx voices (repeatable)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default) is the CPU, where first audio is sooner (README, GPU); cuda needs onnxruntime-gpu")
    parser.add_argument(
        "--stream-mode", default="auto", choices=["auto", "frames", "sentence"],
        help="frames: first audio in constant time (split graph); sentence: one model run per sentence; auto: the faster here",
    )
    args = parser.parse_args(argv)
    run_worker(args, lambda: PiperEngine(args.voice, args.device, args.voice_dir, args.stream_mode, args.threads))


if __name__ == "__main__":
    main()
