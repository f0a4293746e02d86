"""The TOML configuration of ``tts-broker serve``, validated with pydantic.

Every key is documented in README.md ("Configuration reference"). Unknown
keys are errors, so a typo is reported with its location instead of being
silently ignored.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from engines import registry as engines
from engines.registry import EngineOptions
from models.registry import VoiceNotFound, coqui_xtts_v2_dir

from . import keys
from .core import CoreSettings
from .routing import Step, parse_step
from .tts import normalize_language


log = logging.getLogger("broker.config")


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


class SecurityConfig(_Strict):
    """``[security]``: CurveZMQ on both sockets, who may connect, and the plain-text guard.

    Paths are read relative to the working directory, like every other path
    of the configuration (``model_dir``, ``voice_dirs``)."""

    curve: bool = False
    """Both ROUTER sockets are CURVE servers; only the certificates in the key directories get in."""
    broker_key: Optional[str] = None
    """The broker's secret certificate (``NAME.key_secret``)."""
    client_keys: Optional[str] = None
    """Directory of public certificates (``*.key``) allowed on the frontend."""
    worker_keys: Optional[str] = None
    """Directory of public certificates (``*.key``) allowed on the backend."""
    worker_services: dict[str, list[str]] = Field(default_factory=dict)
    """Certificate name (``gpu1`` for ``gpu1.key``) -> services it may register (``fnmatch``
    patterns: ``"piper.*"``); a certificate not listed may register any engine service."""
    allow_insecure: bool = False
    """Without CURVE, allow binding an address other hosts can reach (plain text, no access control)."""

    @model_validator(mode="after")
    def _curve_files(self) -> "SecurityConfig":
        if not self.curve:
            return self
        for key in ("broker_key", "client_keys", "worker_keys"):
            if getattr(self, key) is None:
                raise ValueError(f"{key} is required with curve = true")
        try:
            keys.key_pair(self.broker_key)  # type: ignore[arg-type]
        except keys.CertificateError as exc:
            raise ValueError(f"broker_key: {exc}") from None
        for key in ("client_keys", "worker_keys"):
            if not Path(getattr(self, key)).is_dir():
                raise ValueError(f"{key}: {getattr(self, key)} is not a directory")
        return self

    @field_validator("worker_services")
    @classmethod
    def _patterns(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, services in v.items():
            if any(not s.strip() for s in services):
                raise ValueError(f"{name}: an empty service name")
        return v


class MetricsConfig(_Strict):
    """``[metrics]``: Prometheus text exposition at ``http://LISTEN/metrics``; absent or unset: off."""

    listen: Optional[str] = None
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) the metrics HTTP server binds."""

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            split_host_port(v)
        return v

    def address(self) -> Optional[tuple[str, int]]:
        return None if self.listen is None else split_host_port(self.listen)


class GatewaysConfig(_Strict):
    """``[gateways]``: the Wyoming and OpenAI-compatible HTTP gateways (``broker/gateways``), each run by
    ``serve`` as a supervised process of its own, a client of this broker. Absent or unset: off."""

    wyoming: Optional[str] = None
    """``tcp://HOST:PORT`` (or ``unix://PATH``) the Wyoming gateway listens on, e.g. ``tcp://127.0.0.1:10200``."""
    http: Optional[str] = None
    """``HOST:PORT`` the HTTP gateway (and its web page) listens on, e.g. ``127.0.0.1:8000``."""

    @field_validator("wyoming")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            wyoming_uri(v)
        return v

    @field_validator("http")
    @classmethod
    def _host_port(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            split_host_port(v)
        return v


def wyoming_uri(text: str) -> str:
    """``tcp://HOST:PORT`` or ``unix://PATH`` (what the ``wyoming`` package's servers take); ValueError otherwise."""
    scheme, sep, rest = text.partition("://")
    if sep and scheme == "tcp":
        split_host_port(rest)
        return text
    if sep and scheme == "unix" and rest:
        return text
    raise ValueError(f"{text!r} is not tcp://HOST:PORT or unix://PATH")


def split_host_port(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ("127.0.0.1", 9464); ``"[::1]:9464"`` -> ("::1", 9464); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


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
    threads: Optional[int] = Field(default=None, ge=1, le=256)
    """CPU threads each worker's inference runs on (onnxruntime's pool for Piper, torch's for
    XTTS); unset: every core for a lone worker and for Piper's, which share them when there are
    several (``engines/host_cores.py``); other engines' workers get the cores shared out among
    the workers this ``serve`` starts (:func:`broker.supervisor.cpu_threads`)."""
    curve_key: Optional[str] = None
    """This entry's workers' secret certificate, with ``[security] curve = true``; unset: the
    key pair ``serve`` makes for its own workers at each start (certificate name ``serve-local``)."""
    broker_key: Optional[str] = None
    """The broker's public certificate for these workers; unset: the broker's own (from ``[security] broker_key``)."""
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
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    gateways: GatewaysConfig = GatewaysConfig()
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

    @model_validator(mode="after")
    def _gateways_plain(self) -> "Config":
        if self.security.curve and (self.gateways.wyoming or self.gateways.http):
            raise ValueError(
                "gateways: serve does not run gateways with [security] curve = true; run `tts-broker wyoming` / "
                "`tts-broker http` with --curve-key and --broker-key instead"
            )
        return self

    @model_validator(mode="after")
    def _worker_keys(self) -> "Config":
        for i, w in enumerate(self.workers):
            if not self.security.curve:
                if w.curve_key or w.broker_key:
                    # Not an error, so that one file can switch CURVE on and off; but said.
                    log.warning("workers.%d: curve_key / broker_key ignored: [security] curve is false", i)
                continue
            try:
                if w.curve_key is not None:
                    keys.key_pair(w.curve_key)
                if w.broker_key is not None:
                    keys.public_key(w.broker_key)
            except keys.CertificateError as exc:
                raise ValueError(f"workers.{i}: {exc}") from None
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
