"""``python -m bench.gpu``: the CUDA paths, each against the CPU in the same run.

* XTTS: the tiny random-weight test checkpoint (real weights cannot be
  fetched here), first audio in-process and through the broker, on ``cuda``
  and on ``cpu``. With tiny weights this checks the device path (model,
  latents and streaming on the GPU, through a real worker) rather than how
  fast real XTTS is.
* Piper: the bundled voice on onnxruntime's CUDA provider, where
  onnxruntime-gpu is installed (otherwise the result says which providers
  onnxruntime offers): the 47-word sentence by frames and by sentence
  in-process on ``cuda`` and ``cpu``; whether the GPU's frame windows decode
  like its whole sentence, and like the CPU's (same latents, noise off); and
  a real ``engines.piper --device cuda`` worker behind a real broker, one per
  stream mode, on the long sentence, a passage and a short line.

Prints one JSON object and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from . import ttfa
from .common import machine_info


def piper_cuda(reps: int, log: Path | None = None, gpu: str = "cuda") -> dict[str, Any]:
    """``gpu`` is the device measured against the CPU (``cpu`` only to try this code on a machine without one)."""
    import numpy as np
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if gpu == "cuda" and "CUDAExecutionProvider" not in providers:
        return {"skipped": f"onnxruntime {onnxruntime.__version__} offers {providers} (onnxruntime-gpu not installed)"}
    from broker.tts import SynthesisRequest
    from engines.piper import PiperEngine

    out: dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "text": ttfa.LONG_SENTENCE}
    heard: dict[str, dict[str, np.ndarray]] = {}
    ids = None
    for device in (gpu, "cpu"):
        engine = PiperEngine(device=device, stream_mode="frames")
        request = SynthesisRequest(text=ttfa.LONG_SENTENCE)
        requests = {mode: request.model_copy(update={"stream": mode}) for mode in ("frames", "sentence")}
        assert engine.frames is not None, "the bundled voice should split for frame streaming"
        ids = ids or engine.voice.phonemes_to_ids(engine.voice.phonemize(ttfa.LONG_SENTENCE)[0])
        # Without noise the frontend is deterministic, so devices can be compared on the same latents.
        latents = engine.frames.latents({
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),
        })
        heard[device] = {
            "whole": engine.frames.decode(latents, 0, engine.frames.frames(latents)),
            "windows": np.concatenate(list(engine.frames.stream(latents))),
        }
        rows: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in requests}
        for _ in range(reps):
            for mode, r in requests.items():
                rows[mode].append(ttfa._in_process(lambda r=r: engine.speak(ttfa.LONG_SENTENCE, r), engine.native_rate))
        out[device] = {"providers": engine.providers}
        for mode, r in rows.items():
            out[device].update(_medians(f"long_{mode}", r))

    def diff(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        n = min(len(a), len(b))
        return {"samples": [len(a), len(b)], "max_abs": float(np.max(np.abs(a[:n] - b[:n])))}

    # Frame streaming decodes windows with margins: on the GPU too they must give the whole decode's audio
    # (the CPU's test bar is 1e-4), and the GPU's audio should be the CPU's up to float rounding.
    out["exactness"] = {
        f"{gpu}_windows_vs_{gpu}_whole": diff(heard[gpu]["windows"], heard[gpu]["whole"]),
        f"{gpu}_whole_vs_cpu_whole": diff(heard[gpu]["whole"], heard["cpu"]["whole"]),
    }
    out["broker"] = _piper_cuda_broker(reps, log, gpu)
    return out


def _piper_cuda_broker(reps: int, log: Path | None, gpu: str) -> dict[str, Any]:
    """A real ``engines.piper --device cuda`` worker behind a real broker, one per stream mode."""
    from broker.client import TtsClient

    from .common import endpoint, processes

    texts = {"long": ttfa.LONG_SENTENCE, "passage": ttfa.TEXT, "short": "Halt! Who goes there?"}
    out: dict[str, Any] = {}
    for mode in ("frames", "sentence"):
        fe, be = endpoint(), endpoint()
        rows: dict[str, list[tuple[float, float, float]]] = {case: [] for case in texts}
        with processes(["-m", "broker", "--frontend", fe, "--backend", be, "--log-level", "INFO"],
                       ["-m", "engines.piper", "--backend", be, "--device", gpu, "--stream-mode", mode, "--log-level", "INFO"], log=log):
            with TtsClient(fe, timeout=60) as client:
                assert client.wait_ready(timeout=180), "Piper CUDA worker did not come up"
                status = client.status()
                ttfa._through_broker(client, "Warm up.")
                for _ in range(reps):
                    for case, text in texts.items():
                        rows[case].append(ttfa._through_broker(client, text))
        out[mode] = {"workers": [w for svc in status["services"].values() for w in svc["workers"]]}
        for case, r in rows.items():
            out[mode].update(_medians(case, r), **{f"{case}_ttfa_all_ms": [round(t[0] * 1000, 1) for t in r]})
    return out


def _medians(prefix: str, rows: list[tuple[float, float, float]]) -> dict[str, float]:
    """Median first audio (ms) and real-time factor of ``(ttfa s, total s, audio s)`` rows."""
    return {
        f"{prefix}_ttfa_ms": round(statistics.median(t[0] for t in rows) * 1000, 1),
        f"{prefix}_rtf": round(statistics.median(t[1] / t[2] for t in rows), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    p.add_argument("--only", choices=["xtts", "piper"], help="run one engine's paths (default: both)")
    p.add_argument("--log", help="append the broker's and worker's logs here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    results: dict[str, Any] = {
        "machine": machine_info(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = [(f"xtts_{d}", lambda d=d: ttfa.run_xtts(reps=a.reps, device=d)) for d in ("cuda", "cpu")] if a.only != "piper" else []
    if a.only != "xtts":
        steps.append(("piper", lambda: piper_cuda(a.reps, Path(a.log) if a.log else None)))
    for name, run in steps:
        results[name] = run()
        out.write_text(json.dumps(results, indent=1) + "\n")  # after each step: a failure keeps the rest
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
