"""Piper engine: one ONNX voice, loaded once per worker process.

Run standalone (possibly on another host) with::

    python -m engines.piper --backend tcp://BROKER:5556 --voice en_US-joe-medium
"""

from __future__ import annotations

import argparse
import logging
from typing import Iterator, Optional, Sequence

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig

from broker.tts import SynthesisRequest
from engines.base import Engine
from models.registry import DEFAULT_PIPER_VOICE, resolve_piper_voice

log = logging.getLogger("engines.piper")

CUDA = "CUDAExecutionProvider"


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


def pick_device(device: str) -> bool:
    """Return True for CUDA. ``auto`` uses CUDA only where onnxruntime offers it."""
    available = onnxruntime.get_available_providers()
    if device == "cpu":
        return False
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(f"device 'cuda' requested but onnxruntime offers only {available} (install onnxruntime-gpu on a machine with a GPU)")
        return True
    if device == "auto":
        return CUDA in available
    raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")


class PiperEngine(Engine):
    engine = "piper"

    def __init__(self, voice: str = DEFAULT_PIPER_VOICE, device: str = "auto", voice_dirs: Sequence[str] = ()) -> None:
        files = resolve_piper_voice(voice, voice_dirs)
        use_cuda = pick_device(device)
        log.info("loading Piper voice %s from %s (device %s)", files.name, files.model, "cuda" if use_cuda else "cpu")
        self.voice = PiperVoice.load(files.model, files.config, use_cuda=use_cuda)
        providers = self.voice.session.get_providers()
        if use_cuda and CUDA not in providers:
            # onnxruntime falls back to CPU silently when CUDA fails to initialise.
            if device == "cuda":
                raise DeviceError(f"CUDA requested but the ONNX session got {providers}")
            log.warning("CUDA was available but the session fell back to %s", providers)
        log.info("Piper voice %s ready: providers %s, %d Hz", files.name, providers, files.sample_rate)
        self.files = files
        self.providers = providers
        self.native_rate = self.voice.config.sample_rate
        # The first inference pays for onnxruntime's lazy set-up; pay it now.
        for _ in self.voice.synthesize("Ready."):
            pass

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
        return {**super().capabilities(), "voice": self.files.name, "device": "cuda" if CUDA in self.providers else "cpu"}

    def speak(self, text: str, request: SynthesisRequest) -> Iterator[np.ndarray]:
        config = SynthesisConfig(length_scale=(self.voice.config.length_scale or 1.0) / request.speed)
        # espeak may split a sentence further; each piece is one model run.
        for chunk in self.voice.synthesize(text, config):
            yield chunk.audio_float_array


def main(argv: Optional[list[str]] = None) -> None:
    from engines.cli import worker_arguments, run_worker

    parser = argparse.ArgumentParser(prog="python -m engines.piper", description="Piper engine worker for tts-broker")
    worker_arguments(parser)
    parser.add_argument("--voice", default=DEFAULT_PIPER_VOICE, help="bundled voice name, voice-dir name, or path to a .onnx")
    parser.add_argument("--voice-dir", action="append", default=[], help="directory with NAME.onnx voices (repeatable)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    run_worker(args, lambda: PiperEngine(args.voice, args.device, args.voice_dir))


if __name__ == "__main__":
    main()
