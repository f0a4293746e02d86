"""Which engine services may serve a TTS request, in order of preference.

A *chain* is an ordered list of steps; a step is an engine service, optionally
with the voice (XTTS speaker) to use there. The broker tries the steps in
order, and within a step the least recently used live worker. Pure functions
of the services the broker knows: no state, no I/O.

How a chain is chosen (PROTOCOL.md repeats this for client authors):

1. A request addressed to an engine service has the one-step chain of that service.
2. Otherwise its language is the primary subtag of ``language``; if no chain is
   configured for it and no known engine speaks it, ``default_language`` is used.
3. A configured chain for that language (``[routing.chains]``) is used as is;
   without one, the default chain is every Piper service speaking the language
   (by name), then every XTTS service speaking it.
4. ``engine`` keeps only the steps of that engine; ``voice`` keeps only the
   steps that can speak that voice (a Piper voice name, or an XTTS speaker),
   and a step's own voice must then equal it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Protocol

from engines import registry as engines

from . import tts


class _Service(Protocol):
    """What routing reads of a service: what its live workers, together, can do."""

    name: str
    is_tts: bool
    engine: Optional[str]
    languages: tuple[str, ...]
    voices: frozenset[str]


@dataclass(frozen=True)
class Step:
    service: str
    voice: Optional[str] = None
    """Voice to request at this step; None: the request's own (or the engine's default)."""


def parse_step(spec: str) -> Step:
    """``piper:en_US-joe-medium`` → service ``piper.en_US-joe-medium``; ``xtts`` or ``xtts:narrator`` → ``xtts``.

    Each engine says how its steps read (``engines/registry.py``)."""
    try:
        return Step(*engines.parse_step(spec))
    except ValueError as exc:
        raise ValueError(f"chain step {spec!r}: {exc}") from None


def _speaks(svc: _Service, lang: str) -> bool:
    return svc.is_tts and lang in svc.languages


def route_language(language: str, services: Iterable[_Service], chains: Mapping[str, tuple[Step, ...]], default: str) -> str:
    lang = tts.normalize_language(language)
    if lang in chains or any(_speaks(s, lang) for s in services):
        return lang
    return default


def chain_for(
    request: tts.SynthesisRequest,
    target: Optional[str],
    services: Mapping[str, _Service],
    chains: Mapping[str, tuple[Step, ...]],
    default_language: str,
) -> list[Step]:
    if target is not None:
        return [Step(target)]
    lang = route_language(request.language, services.values(), chains, default_language)
    if lang in chains:
        steps = list(chains[lang])
    else:
        tts_services = [s for s in services.values() if _speaks(s, lang)]
        steps = [Step(s.name) for s in sorted(tts_services, key=lambda s: (engines.rank(s.engine), s.name))]
    out = []
    for step in steps:
        svc = services.get(step.service)
        if request.engine is not None and (svc is None or svc.engine != request.engine):
            continue
        if request.voice is not None:
            if svc is None or request.voice not in svc.voices or step.voice not in (None, request.voice):
                continue
        out.append(step)
    return out
