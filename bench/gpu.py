"""``python -m bench.gpu``: the CUDA paths, each against the CPU in the same run.

* XTTS: the tiny random-weight test checkpoint (real weights cannot be
  fetched here), first audio in-process and through the broker, on ``cuda``
  and on ``cpu``. With tiny weights this checks the device path (model,
  latents and streaming on the GPU, through a real worker) rather than how
  fast real XTTS is.
* Piper: the bundled voice on onnxruntime's CUDA provider, frame and sentence
  streaming in-process, where onnxruntime-gpu is installed; otherwise the
  result says which providers onnxruntime offers.

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


def piper_cuda(reps: int) -> dict[str, Any]:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return {"skipped": f"onnxruntime {onnxruntime.__version__} offers {providers} (onnxruntime-gpu not installed)"}
    from broker.tts import SynthesisRequest
    from engines.piper import PiperEngine

    out: dict[str, Any] = {"onnxruntime": onnxruntime.__version__}
    for device in ("cuda", "cpu"):
        engine = PiperEngine(device=device, stream_mode="frames")
        request = SynthesisRequest(text=ttfa.LONG_SENTENCE)
        rows: dict[str, list[float]] = {"frames": [], "sentence": []}
        for _ in range(reps):
            for mode in rows:
                mode_request = request.model_copy(update={"stream": mode})
                ttfa_s, _, _ = ttfa._in_process(lambda: engine.speak(ttfa.LONG_SENTENCE, mode_request), engine.native_rate)
                rows[mode].append(ttfa_s)
        out[device] = {
            "providers": engine.providers,
            **{f"long_{mode}_ttfa_ms": round(statistics.median(v) * 1000, 1) for mode, v in rows.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
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
    steps = [(f"xtts_{d}", lambda d=d: ttfa.run_xtts(reps=a.reps, device=d)) for d in ("cuda", "cpu")]
    for name, run in [*steps, ("piper", lambda: piper_cuda(a.reps))]:
        results[name] = run()
        out.write_text(json.dumps(results, indent=1) + "\n")  # after each step: a failure keeps the rest
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
