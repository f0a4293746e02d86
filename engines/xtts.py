"""XTTS v2 engine (coqui-tts): one resident model per worker process, true streaming.

Run standalone with::

    python -m engines.xtts --backend tcp://BROKER:5556 --model-dir DIR [--device auto|cpu|cuda]
        [--speaker NAME=ref.wav ...] [--default-speaker NAME]

The model directory is a local XTTS v2 checkpoint (``model.pth``,
``config.json``, ``vocab.json``, optional ``speakers_xtts.pth``), loaded once
through the library's own ``Xtts.load_checkpoint``; nothing is downloaded.

Text is split into sentences by the worker runtime, within the model's
per-language character limit (``max_chars``), and each sentence is streamed
with ``inference_stream``.

Speakers are the built-in ones of ``speakers_xtts.pth`` and named clones of
reference WAVs. A clone's conditioning latents are computed once and cached in
memory and on disk, keyed by the reference audio's content hash and the
model's fingerprint, so a repeated NPC voice costs nothing after its first use.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import soundfile
import soxr

from broker.tts import BAD_REQUEST, RequestError, SynthesisRequest, normalize_language
from engines.base import Engine
from models.registry import XTTS_FILES as REQUIRED_FILES
from models.registry import cache_dir as models_cache_dir
from models.registry import file_digest

log = logging.getLogger("engines.xtts")

NATIVE_RATE = 24000
"""XTTS v2 decodes at 24 kHz."""
_COND_RATE = 22050
"""Rate the conditioning encoders expect, in Hertz."""


class ModelDirError(RuntimeError):
    """The model directory is missing or incomplete."""


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelDirError(f"XTTS model directory {model_dir} does not exist")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ModelDirError(f"XTTS model directory {model_dir} is incomplete: missing {', '.join(missing)}")


def pick_torch_device(device: str) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU")
    if device not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"unknown device {device!r}: use auto, cpu or cuda")
    chosen = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    log.info("XTTS device: %s (requested %s, CUDA %s)", chosen, device, "available" if has_cuda else "not available")
    return chosen


class XttsEngine(Engine):
    engine = "xtts"
    native_rate = NATIVE_RATE

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        speakers: Mapping[str, str | Path] = {},
        default_speaker: Optional[str] = None,
        stream_chunk_size: int = 20,
        cache_dir: Optional[str | Path] = None,
        threads: Optional[int] = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        check_model_dir(self.model_dir)
        import torch
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        self.torch = torch
        if threads is not None:  # torch's intra-op pool, for this process (``[[workers]] threads``)
            torch.set_num_threads(threads)
        self.device = pick_torch_device(device)
        t0 = time.monotonic()
        log.info("loading XTTS v2 from %s …", self.model_dir)
        config = XttsConfig()
        config.load_json(str(self.model_dir / "config.json"))
        model = Xtts(config)
        model.load_checkpoint(config, checkpoint_dir=str(self.model_dir), eval=True, use_deepspeed=False)
        self.model = model.to(self.device)
        self.config = config
        log.info("XTTS v2 loaded in %.1fs", time.monotonic() - t0)

        self.stream_chunk_size = stream_chunk_size
        self._languages = sorted({normalize_language(lang) for lang in config.languages})
        manager = model.speaker_manager
        self._builtin: dict[str, Any] = dict(manager.speakers) if manager is not None else {}
        self._clones = {name: Path(p) for name, p in speakers.items()}
        for name, path in self._clones.items():
            if not path.is_file():
                raise ModelDirError(f"reference WAV for speaker {name!r} not found: {path}")
        self._latents: dict[str, tuple[Any, Any]] = {}
        self._keys: dict[str, tuple[tuple[int, int], str]] = {}
        """Per clone: (size, mtime) of its reference when hashed, and its cache key."""
        self._fingerprint = file_digest(self.model_dir / "model.pth", limit=1 << 20)[:16]
        self.cache_dir = Path(cache_dir) if cache_dir else models_cache_dir("xtts-latents")
        names = self.voices()
        if not names:
            raise ModelDirError("no speakers: the checkpoint has no speakers_xtts.pth and no --speaker was given")
        self.default_speaker = default_speaker or names[0]
        if self.default_speaker not in names:
            raise ModelDirError(f"default speaker {self.default_speaker!r} is not one of {names}")
        # Warm the clones now, so the first request of each NPC is as fast as the rest.
        for name in self._clones:
            self._conditioning(name)

    # ------------------------------------------------------------ identity

    @property
    def service(self) -> str:
        return "xtts"

    def languages(self) -> list[str]:
        return self._languages

    def voices(self) -> list[str]:
        return sorted(self._builtin) + sorted(n for n in self._clones if n not in self._builtin)

    def voice_for(self, request: SynthesisRequest) -> str:
        return request.voice or self.default_speaker

    def capabilities(self) -> dict[str, Any]:
        return {**super().capabilities(), "device": self.device}

    # -------------------------------------------------------------- speakers

    def _conditioning(self, name: str) -> tuple[Any, Any]:
        """(gpt_cond_latent, speaker_embedding) of a speaker, computed at most once per reference file."""
        if name in self._builtin:
            s = self._builtin[name]
            return s["gpt_cond_latent"], s["speaker_embedding"]
        path = self._clones[name]
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        known = self._keys.get(name)
        if known is None or known[0] != stamp:  # hash a reference only when it is new or changed
            known = self._keys[name] = (stamp, f"{file_digest(path)[:32]}-{self._fingerprint}")
        key = known[1]
        if key in self._latents:
            return self._latents[key]
        cached = self.cache_dir / f"{key}.pt"
        if cached.is_file():
            d = self.torch.load(cached, weights_only=True)
            latents = (d["gpt_cond_latent"], d["speaker_embedding"])
            log.info("speaker %s: conditioning latents from cache %s", name, cached.name)
        else:
            t0 = time.monotonic()
            latents = self._compute_latents(path)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            self.torch.save({"gpt_cond_latent": latents[0].cpu(), "speaker_embedding": latents[1].cpu()}, tmp)
            tmp.replace(cached)
            log.info("speaker %s: conditioning latents computed in %.2fs and cached", name, time.monotonic() - t0)
        self._latents[key] = latents
        return latents

    def _compute_latents(self, path: Path) -> tuple[Any, Any]:
        """Clone a voice from a WAV read with soundfile (no codec stack needed)."""
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if rate != _COND_RATE:
            mono = soxr.resample(mono, rate, _COND_RATE)
        cfg = self.config
        mono = np.clip(mono[: _COND_RATE * cfg.max_ref_len], -1.0, 1.0)
        wav = self.torch.from_numpy(np.ascontiguousarray(mono))[None, :].to(self.device)
        with self.torch.inference_mode():
            embedding = self.model.get_speaker_embedding(wav, _COND_RATE)
            latent = self.model.get_gpt_cond_latents(wav, _COND_RATE, length=cfg.gpt_cond_len, chunk_length=cfg.gpt_cond_chunk_len)
        return latent, embedding

    # ------------------------------------------------------------- synthesis

    def check(self, request: SynthesisRequest) -> None:
        if normalize_language(request.language) not in self._languages:
            raise RequestError(BAD_REQUEST, f"XTTS does not speak {request.language!r}; it speaks {', '.join(self._languages)}")
        if request.voice is not None and request.voice not in self.voices():
            raise RequestError(BAD_REQUEST, f"XTTS has no speaker {request.voice!r}; speakers: {', '.join(self.voices())}")

    def max_chars(self, language: str) -> int:
        """The model's per-request limit for the language (e.g. 203 characters for Portuguese)."""
        return int(self.model.tokenizer.char_limits.get(normalize_language(language), 250))

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        latent, embedding = self._conditioning(self.voice_for(request))
        try:
            with self.torch.inference_mode():
                chunks = self.model.inference_stream(
                    text,
                    normalize_language(request.language),
                    latent,
                    embedding,
                    stream_chunk_size=self.stream_chunk_size,
                    speed=request.speed,
                )
                for chunk in chunks:
                    yield chunk.detach().float().cpu().numpy().reshape(-1)
        finally:
            if self.device == "cuda":
                self.torch.cuda.empty_cache()


def parse_speakers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--speaker takes NAME=PATH.wav, got {item!r}")
        out[name] = path
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from engines.cli import run_worker, worker_arguments

    parser = argparse.ArgumentParser(prog="python -m engines.xtts", description="XTTS v2 engine worker for tts-broker")
    worker_arguments(parser)
    parser.add_argument("--model-dir", required=True, help="local XTTS v2 checkpoint directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--speaker", action="append", default=[], metavar="NAME=WAV", help="a cloned speaker (repeatable)")
    parser.add_argument("--default-speaker", help="speaker used when a request names none")
    parser.add_argument("--stream-chunk-size", type=int, default=20, help="GPT tokens per streamed audio chunk")
    parser.add_argument("--cache-dir", help="where conditioning latents are cached (default ~/.cache/tts-broker/xtts-latents)")
    args = parser.parse_args(argv)
    speakers = parse_speakers(args.speaker)
    run_worker(
        args,
        lambda: XttsEngine(args.model_dir, args.device, speakers, args.default_speaker, args.stream_chunk_size, args.cache_dir, args.threads),
    )


if __name__ == "__main__":
    main()
