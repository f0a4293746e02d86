"""The broker's live voices, read from ``tts.status``, and voice choice → request options.

Both gateways list voices (Wyoming ``info``, HTTP ``/v1/voices``) and turn a
client's voice name and language into the broker's ``voice`` / ``engine`` /
``language`` options. The broker's status names services, not voices, so a
voice is derived from each TTS service with live workers:

* ``piper.<voice>`` (any ``ENGINE.NAME`` service) → voice ``<voice>``, asked
  for with ``voice``;
* a service named after its engine (``xtts``) → voice ``xtts``, asked for with
  ``engine`` (the broker picks the engine's default speaker).

A voice carries the languages its workers speak, and a request for it is sent
in one of them (a Piper voice asked for in another language would find no
worker): the client's language if the voice speaks it, else the voice's first.
A name that is not listed (an XTTS speaker or clone, a voice whose workers are
restarting) is passed to the broker as ``voice`` unchanged: the broker knows
every speaker and answers ``bad_request`` naming the known voices otherwise.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..client import AsyncTtsClient
from ..tts import normalize_language


@dataclass(frozen=True)
class Voice:
    name: str
    engine: str
    languages: tuple[str, ...]
    workers: int
    service: str

    @property
    def by_engine(self) -> bool:
        """True for a service named after its engine (``xtts``): asked for with ``engine``."""
        return self.name == self.service

    def options(self, language: Optional[str] = None) -> dict[str, Any]:
        """Broker request options for this voice, in ``language`` if it speaks it."""
        opts: dict[str, Any] = {"engine": self.engine} if self.by_engine else {"voice": self.name}
        if language and normalize_language(language) in self.languages:
            opts["language"] = language
        elif self.languages:
            opts["language"] = self.languages[0]
        elif language:
            opts["language"] = language
        return opts

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.name, "name": self.name, "engine": self.engine, "languages": list(self.languages), "workers": self.workers}


def voices_from_status(status: dict[str, Any]) -> list[Voice]:
    """Every voice of a TTS service that has live workers, by name."""
    voices = []
    for service, svc in status.get("services", {}).items():
        if not svc.get("tts") or not svc.get("worker_count", len(svc.get("workers", []))):
            continue
        engine = svc.get("engine") or service.split(".", 1)[0]
        name = service.split(".", 1)[1] if "." in service else service
        voices.append(Voice(name, engine, tuple(svc.get("languages") or ()), svc.get("worker_count", 0), service))
    return sorted(voices, key=lambda v: v.name)


class VoiceCatalog:
    """The broker's voices, cached for ``ttl`` seconds so that a request does not wait for a status call.

    A request uses the cached list and, when it is stale, refreshes it in the
    background, ``delay`` seconds later: after that request's first audio, which its
    status call would otherwise meet at the broker and here. Only the very first lookup
    waits for the broker."""

    def __init__(self, client: AsyncTtsClient, ttl: float = 2.0, delay: float = 0.5) -> None:
        self.client = client
        self.ttl = ttl
        self.delay = delay
        self._voices: Optional[list[Voice]] = None
        self._status: dict[str, Any] = {}
        self._at = 0.0
        self._refresh: Optional[asyncio.Task[None]] = None

    async def status(self) -> dict[str, Any]:
        """A fresh ``tts.status`` (also refreshes the cached voices)."""
        status = await self.client.status()
        self._status, self._voices, self._at = status, voices_from_status(status), time.monotonic()
        return status

    async def voices(self, fresh: bool = False) -> list[Voice]:
        if fresh or self._voices is None:
            await self.status()
        elif time.monotonic() - self._at > self.ttl and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self._quiet_refresh())
        return list(self._voices or ())

    async def _quiet_refresh(self) -> None:
        await asyncio.sleep(self.delay)
        try:
            await self.status()
        except Exception:  # noqa: BLE001 - a broker that does not answer now: the old list stays
            pass

    async def options(self, voice: Optional[str], language: Optional[str]) -> dict[str, Any]:
        """Broker options for a client's voice name and language (either may be None)."""
        if not voice:
            return {"language": language} if language else {}
        for v in await self.voices():
            if v.name == voice:
                return v.options(language)
        opts: dict[str, Any] = {"voice": voice}
        if language:
            opts["language"] = language
        return opts
