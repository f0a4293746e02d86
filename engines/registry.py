"""Every engine the broker can route to and supervise, one :class:`EngineSpec` each.

The broker knows engines only through this table: which service names an
engine's workers register (and so which are reserved for TTS), how a routing
chain step names one, its ``[[workers]]`` configuration keys, and how the
supervisor starts a worker. Adding an engine is one module with an
:class:`engines.base.Engine` and a ``python -m`` entry point, plus one
:func:`register` call — no broker file changes. Engines outside this package
are loaded by naming their module in the config's ``engine_modules``.

This module must stay light: the broker imports it, so it never imports an
engine's model code (onnxruntime, torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.registry import DEFAULT_PIPER_VOICE


class EngineOptions(BaseModel):
    """An engine's own keys in a ``[[workers]]`` table (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    """The ``engine`` value in requests, capabilities and ``[[workers]]``."""
    module: str
    """Run as ``python -m MODULE`` to start one worker."""
    options: type[EngineOptions]
    service_prefix: str
    """Service names starting with this are reserved for this engine's workers."""
    service: Callable[[EngineOptions], str]
    """The service a worker with these options registers."""
    argv: Callable[[EngineOptions, list[str]], list[str]]
    """Engine-specific command-line arguments, given the options and the voice directories."""
    voices: Callable[[EngineOptions], list[str]]
    """Voices a worker with these options will offer, known before it registers."""
    step: Callable[[Optional[str]], tuple[str, Optional[str]]]
    """A chain step ``NAME:ARG`` (ARG None for plain ``NAME``) → (service, voice to request)."""
    rank: int = 50
    """Order among engines in a default chain (lower first)."""
    shares_cores: bool = False
    """Its workers take ``--host-cores`` (``engines/host_cores.py``) and, beside other workers of
    one config, get every core and decode on their share only while another is busy, instead of
    a fixed share (``broker.supervisor.shares_cores``)."""


_SPECS: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> None:
    _SPECS[spec.name] = spec


def get(name: str) -> EngineSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(_SPECS))}") from None


def names() -> list[str]:
    return sorted(_SPECS)


def service_prefixes() -> tuple[str, ...]:
    return tuple(s.service_prefix for s in _SPECS.values())


def rank(name: Optional[str]) -> int:
    spec = _SPECS.get(name or "")
    return spec.rank if spec is not None else 100


def load_modules(modules: list[str]) -> None:
    """Import engine modules named in a config, which register themselves."""
    for module in modules:
        importlib.import_module(module)


def parse_step(spec: str) -> tuple[str, Optional[str]]:
    """``piper:en_US-joe-medium`` → (``piper.en_US-joe-medium``, None); ``xtts:narrator`` → (``xtts``, ``narrator``)."""
    name, sep, arg = spec.partition(":")
    if name not in _SPECS:
        forms = ", ".join(f"{n}:…" for n in names())
        raise ValueError(f"unknown engine {name!r} (steps are {forms})")
    return _SPECS[name].step(arg if sep else None)


# ------------------------------------------------------------------ piper


class PiperOptions(EngineOptions):
    voice: str = DEFAULT_PIPER_VOICE
    """Bundled voice name, voice-directory name, or path to a ``.onnx``."""
    stream_mode: Literal["auto", "frames", "sentence"] = "auto"
    """Decode by frames (first audio in constant time), by sentence, or whichever is faster here."""


def _piper_step(voice: Optional[str]) -> tuple[str, Optional[str]]:
    if not voice:
        raise ValueError("piper steps name a voice, e.g. piper:en_US-joe-medium")
    return f"piper.{voice}", None


def _piper_voice(o: EngineOptions) -> str:
    assert isinstance(o, PiperOptions)
    return Path(o.voice).name.removesuffix(".onnx")


def _piper_argv(o: EngineOptions, voice_dirs: list[str]) -> list[str]:
    assert isinstance(o, PiperOptions)
    argv = ["--voice", o.voice, "--stream-mode", o.stream_mode]
    for d in voice_dirs:
        argv += ["--voice-dir", d]
    return argv


register(
    EngineSpec(
        name="piper",
        module="engines.piper",
        options=PiperOptions,
        service_prefix="piper.",
        shares_cores=True,
        service=lambda o: f"piper.{_piper_voice(o)}",
        argv=_piper_argv,
        voices=lambda o: [_piper_voice(o)],
        step=_piper_step,
        rank=0,
    )
)


# ------------------------------------------------------------------- xtts


class XttsOptions(EngineOptions):
    model_dir: Optional[str] = None
    """Local checkpoint directory (model.pth, config.json, vocab.json[, speakers_xtts.pth]); required."""
    speakers: dict[str, str] = Field(default_factory=dict)
    """Cloned speakers, name → reference WAV."""
    default_speaker: Optional[str] = None
    """Speaker used when a request names none (default: the first)."""
    stream_chunk_size: int = Field(default=20, ge=1, le=400)
    """GPT tokens per streamed chunk (smaller: sooner first audio, more overhead)."""

    @model_validator(mode="after")
    def _needs_model_dir(self) -> "XttsOptions":
        if not self.model_dir:
            raise ValueError("an xtts worker needs model_dir (no model is ever downloaded)")
        return self


def _xtts_argv(o: EngineOptions, voice_dirs: list[str]) -> list[str]:
    assert isinstance(o, XttsOptions)
    assert o.model_dir is not None
    argv = ["--model-dir", o.model_dir, "--stream-chunk-size", str(o.stream_chunk_size)]
    for name, wav in o.speakers.items():
        argv += ["--speaker", f"{name}={wav}"]
    if o.default_speaker:
        argv += ["--default-speaker", o.default_speaker]
    return argv


def _xtts_voices(o: EngineOptions) -> list[str]:
    assert isinstance(o, XttsOptions)
    return list(o.speakers) + ([o.default_speaker] if o.default_speaker else [])


register(
    EngineSpec(
        name="xtts",
        module="engines.xtts",
        options=XttsOptions,
        service_prefix="xtts",
        service=lambda o: "xtts",
        argv=_xtts_argv,
        voices=_xtts_voices,
        step=lambda speaker: ("xtts", speaker or None),
        rank=10,
    )
)
