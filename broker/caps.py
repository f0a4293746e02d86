"""What an engine worker says it can do: the capabilities frame of its READY.

Capabilities are worker input like any other, so they are validated field by
field when the worker registers: a READY whose ``protocol`` is ``tts/1`` must
describe an engine the broker can route to, or the worker is disconnected.
Routing reads ``engine``, ``languages``, ``voices`` and ``slots``; ``pid`` and
``host`` are shown in ``tts.status``; other keys (sample rate, device, …) are
kept as informative, so that newer workers can announce more without
breaking older brokers.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TTS_PROTOCOL = "tts/1"
MAX_NAMES = 1024
"""Most languages or voices one worker may announce."""
BASE_REQUEST_KEYS = frozenset({"text", "language", "voice", "engine", "format", "sample_rate", "chunk_ms", "speed", "stream"})
"""The request keys every ``tts/1`` worker understands: those of workers that do not announce theirs."""


class EngineCaps(BaseModel):
    """The JSON object in frame 3 of an engine worker's READY."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    protocol: Literal["tts/1"]
    engine: str = Field(min_length=1, max_length=64)
    languages: list[str] = Field(min_length=1, max_length=MAX_NAMES)
    """Primary language subtags the engine speaks, e.g. ``["en"]``."""
    voices: list[str] = Field(default_factory=list, max_length=MAX_NAMES)
    """Voice names a request may ask for (Piper voice, XTTS speakers)."""
    pid: Optional[int] = None
    host: Optional[str] = Field(default=None, max_length=255)
    slots: int = Field(default=1, ge=1, le=64)
    """Jobs the worker holds at once: the broker sends it up to this many REQUESTs before their FINALs."""
    request_keys: Optional[list[str]] = Field(default=None, max_length=MAX_NAMES)
    """Request keys this worker understands. A newer broker sends it only these, and
    refuses a request that needs another; absent: :data:`BASE_REQUEST_KEYS`."""

    def understands(self) -> frozenset[str]:
        return frozenset(self.request_keys) if self.request_keys is not None else BASE_REQUEST_KEYS

    def as_dict(self) -> dict[str, Any]:
        """The READY frame's object: the inverse of :func:`parse_caps`."""
        return self.model_dump(exclude_none=True)

    @field_validator("languages", "voices")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not 1 <= len(name) <= 200:
                raise ValueError("names are 1-200 characters")
        return v


class CapsError(ValueError):
    """A ``tts/1`` capabilities object that does not validate."""


def parse_caps(obj: Optional[dict[str, Any]]) -> Optional[EngineCaps]:
    """The engine capabilities in a READY, or None for a plain (opaque) MDP worker.

    Only an object that claims ``"protocol": "tts/1"`` is an engine's; anything
    else in frame 3 is a plain worker's own metadata and is not routed on.
    """
    if obj is None or obj.get("protocol") != TTS_PROTOCOL:
        return None
    try:
        return EngineCaps.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "capabilities"
        raise CapsError(f"{where}: {first['msg']}") from None
