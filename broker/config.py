"""The TOML configuration of ``tts-broker serve``, validated with pydantic.

Every key is documented in README.md ("Configuration reference"). Unknown
keys are errors, so a typo is reported with its location instead of being
silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engines import registry as engines
from engines.registry import EngineOptions
from models.registry import VoiceNotFound, coqui_xtts_v2_dir

from .core import CoreSettings
from .routing import Step, parse_step
from .tts import normalize_language


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    frontend: str = "tcp://127.0.0.1:5555"
    """Endpoint clients connect to."""
    backend: str = "tcp://127.0.0.1:5556"
    """Endpoint workers connect to."""
    heartbeat_ms: int = Field(default=250, ge=10, le=60_000)
    liveness: int = Field(default=3, ge=1, le=100)
    request_timeout_ms: int = Field(default=10_000, ge=1, le=3_600_000)
    max_text_chars: int = Field(default=5000, ge=1, le=100_000)
    max_message_bytes: int = Field(default=1 << 20, ge=1024)
    max_queue: int = Field(default=1000, ge=1)
    max_inflight_per_client: int = Field(default=64, ge=1)
    client_hwm: int = Field(default=10_000, ge=10)
    """Messages queued toward one client before it counts as stalled and its streams are cancelled."""
    default_language: str = Field(default="en", pattern=r"^[a-z]{2,3}$")
    """A primary language subtag."""
    stuck_timeout_ms: int = Field(default=10_000, ge=100)
    """A busy worker that sends nothing back for this long is failed over."""
    max_failovers: int = Field(default=3, ge=0, le=100)
    """A request that has failed this many workers ends with ``internal``."""
    service_grace_ms: int = Field(default=5000, ge=0, le=3_600_000)
    """A service whose last worker left is remembered this long (for a supervised restart);
    after it, its requests route as if it had never registered."""


class RoutingConfig(_Strict):
    chains: dict[str, list[str]] = Field(default_factory=dict)
    """Fallback chain per language: ``{ en = ["piper:en_US-joe-medium", "xtts"] }``."""

    @field_validator("chains")
    @classmethod
    def _steps(cls, chains: dict[str, list[str]]) -> dict[str, list[str]]:
        for lang, steps in chains.items():
            if not steps:
                raise ValueError(f"chain for {lang!r} is empty")
            for spec in steps:
                parse_step(spec)  # raises ValueError with the bad step named
        return chains

    def parsed(self) -> dict[str, tuple[Step, ...]]:
        return {normalize_language(lang): tuple(parse_step(x) for x in steps) for lang, steps in self.chains.items()}


class WorkerConfig(BaseModel):
    """One ``[[workers]]`` table: the keys every engine has, plus its engine's own (``engines/registry.py``)."""

    model_config = ConfigDict(extra="allow")

    engine: str = "piper"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    count: int = Field(default=1, ge=0, le=64)
    """Worker processes to run for this entry."""
    slots: Optional[int] = Field(default=None, ge=1, le=64)
    """Requests each worker holds at once, spoken in turns by playback deadline; unset: the
    engine's own default (Piper 4, XTTS 1)."""
    _options: EngineOptions = PrivateAttr()

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        engines.get(v)  # raises ValueError naming the known ones
        return v

    @model_validator(mode="after")
    def _engine_keys(self) -> "WorkerConfig":
        spec = engines.get(self.engine)
        try:
            self._options = spec.options.model_validate(self.model_extra or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where + ': ' if where else ''}{first['msg']} (for {self.engine} workers)") from None
        # Every option, defaults included, reads as an attribute: ``w.voice``, ``w.model_dir``.
        self.__pydantic_extra__ = self._options.model_dump()
        return self

    @property
    def options(self) -> EngineOptions:
        return self._options

    @property
    def voice_names(self) -> list[str]:
        """Voices this entry will serve, known before its workers register."""
        return engines.get(self.engine).voices(self._options)


class Config(_Strict):
    engine_modules: list[str] = Field(default_factory=list)
    """Modules that register further engines (``engines/registry.py``), imported before ``workers`` is read."""
    broker: BrokerConfig = BrokerConfig()
    routing: RoutingConfig = RoutingConfig()
    workers: list[WorkerConfig] = Field(default_factory=lambda: [WorkerConfig()])
    voice_dirs: list[str] = Field(default_factory=list)
    """Extra directories searched for ``NAME.onnx`` voices."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    use_xtts_fallback: bool = False
    """The original plan's keys: add an XTTS worker on ``xtts_model_path``…"""
    xtts_model_path: Optional[str] = None
    """…or, when unset, on the model Coqui TTS already downloaded (``models.registry.coqui_xtts_v2_dir``)…"""
    xtts_use_gpu: bool = False
    """…on CUDA when true, else on the CPU."""

    @model_validator(mode="before")
    @classmethod
    def _load_engines(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engine_modules"), list):
            try:
                engines.load_modules([str(m) for m in data["engine_modules"]])
            except ImportError as exc:
                raise ValueError(f"engine_modules: cannot import {exc.name!r}") from None
        return data

    @model_validator(mode="after")
    def _legacy_xtts(self) -> "Config":
        if self.use_xtts_fallback and not any(w.engine == "xtts" for w in self.workers):
            try:
                model_dir = self.xtts_model_path or str(coqui_xtts_v2_dir())
            except VoiceNotFound as exc:
                raise ValueError(f"use_xtts_fallback: {exc}") from None
            device = "cuda" if self.xtts_use_gpu else "cpu"
            self.workers.append(WorkerConfig(engine="xtts", model_dir=model_dir, device=device))
        return self

    def core_settings(self) -> CoreSettings:
        b = self.broker
        return CoreSettings(
            heartbeat_s=b.heartbeat_ms / 1000,
            liveness=b.liveness,
            request_timeout_s=b.request_timeout_ms / 1000,
            max_text_chars=b.max_text_chars,
            max_queue=b.max_queue,
            max_inflight_per_client=b.max_inflight_per_client,
            default_language=b.default_language,
            known_voices=frozenset(v for w in self.workers if w.count > 0 for v in w.voice_names),
            chains=self.routing.parsed(),
            stuck_timeout_s=b.stuck_timeout_ms / 1000,
            max_failovers=b.max_failovers,
            service_grace_s=b.service_grace_ms / 1000,
        )


def load_config(path: Optional[str | Path]) -> Config:
    """Read and validate a TOML file; ``None`` gives the defaults (one Piper worker, bundled voice)."""
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
