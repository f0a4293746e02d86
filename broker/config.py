"""The TOML configuration of ``tts-broker serve``, validated with pydantic.

Every key is documented in README.md ("Configuration reference"). Unknown
keys are errors, so a typo is reported with its location instead of being
silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.registry import DEFAULT_PIPER_VOICE

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


class WorkerConfig(_Strict):
    engine: Literal["piper", "xtts"] = "piper"
    voice: str = DEFAULT_PIPER_VOICE
    """Piper: bundled voice name, voice-directory name, or path to a ``.onnx``."""
    model_dir: Optional[str] = None
    """XTTS: local checkpoint directory (model.pth, config.json, vocab.json[, speakers_xtts.pth])."""
    speakers: dict[str, str] = Field(default_factory=dict)
    """XTTS: cloned speakers, name → reference WAV."""
    default_speaker: Optional[str] = None
    """XTTS: speaker used when a request names none (default: the first)."""
    stream_mode: Literal["auto", "frames", "sentence"] = "auto"
    """Piper: decode by frames (first audio in constant time), by sentence, or whichever is faster here."""
    stream_chunk_size: int = Field(default=20, ge=1, le=400)
    """XTTS: GPT tokens per streamed chunk (smaller: sooner first audio, more overhead)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    count: int = Field(default=1, ge=0, le=64)
    """Worker processes to run for this entry."""

    @model_validator(mode="after")
    def _engine_keys(self) -> "WorkerConfig":
        if self.engine == "xtts" and not self.model_dir:
            raise ValueError("an xtts worker needs model_dir")
        given = self.model_fields_set
        if self.engine == "piper" and given & {"model_dir", "speakers", "default_speaker", "stream_chunk_size"}:
            raise ValueError("model_dir, speakers, default_speaker and stream_chunk_size are for xtts workers")
        if self.engine == "xtts" and given & {"voice", "stream_mode"}:
            raise ValueError("voice and stream_mode are for piper workers (xtts speakers go in speakers)")
        return self

    @property
    def voice_names(self) -> list[str]:
        """Voices this entry will serve, known before its workers register."""
        if self.engine == "xtts":
            return list(self.speakers) + ([self.default_speaker] if self.default_speaker else [])
        return [Path(self.voice).name.removesuffix(".onnx")]


class Config(_Strict):
    broker: BrokerConfig = BrokerConfig()
    routing: RoutingConfig = RoutingConfig()
    workers: list[WorkerConfig] = Field(default_factory=lambda: [WorkerConfig()])
    voice_dirs: list[str] = Field(default_factory=list)
    """Extra directories searched for ``NAME.onnx`` voices."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    use_xtts_fallback: bool = False
    """The original plan's keys: add an XTTS worker on ``xtts_model_path``…"""
    xtts_model_path: Optional[str] = None
    xtts_use_gpu: bool = False
    """…on CUDA when true, else on the CPU."""

    @model_validator(mode="after")
    def _legacy_xtts(self) -> "Config":
        if self.use_xtts_fallback:
            if not self.xtts_model_path:
                raise ValueError("use_xtts_fallback needs xtts_model_path (no model is ever downloaded)")
            if not any(w.engine == "xtts" for w in self.workers):
                device = "cuda" if self.xtts_use_gpu else "cpu"
                self.workers.append(WorkerConfig(engine="xtts", model_dir=self.xtts_model_path, device=device))
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
