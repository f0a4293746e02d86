"""``broker/routing.py`` on its own: pure functions of the services the broker knows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from broker.routing import Step, chain_for, parse_step, route_language
from broker.tts import SynthesisRequest


@dataclass
class Svc:
    """What routing reads of a service (the protocol ``broker.routing._Service``)."""

    name: str
    engine: Optional[str]
    languages: tuple[str, ...] = ()
    voices: frozenset[str] = field(default_factory=frozenset)
    is_tts: bool = True


EN = Svc("piper.en_US-joe-medium", "piper", ("en",), frozenset({"en_US-joe-medium"}))
EN_AMY = Svc("piper.en_US-amy-medium", "piper", ("en",), frozenset({"en_US-amy-medium"}))
PT = Svc("piper.pt_BR-faber-medium", "piper", ("pt",), frozenset({"pt_BR-faber-medium"}))
XTTS = Svc("xtts", "xtts", ("en", "pt", "es"), frozenset({"narrator", "ana"}))
ECHO = Svc("echo", None, is_tts=False)
ALL = {s.name: s for s in (XTTS, PT, EN_AMY, EN, ECHO)}


def chain(services: dict, target: Optional[str] = None, chains: Optional[dict] = None, **req: object) -> list[Step]:
    return chain_for(SynthesisRequest(text="Hi.", **req), target, services, chains or {}, "en")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec, step",
    [
        ("piper:en_US-joe-medium", Step("piper.en_US-joe-medium")),
        ("xtts", Step("xtts")),
        ("xtts:narrator", Step("xtts", "narrator")),
    ],
)
def test_parse_step(spec: str, step: Step) -> None:
    assert parse_step(spec) == step


@pytest.mark.parametrize("spec", ["piper", "piper:", "espeak:x", ""])
def test_bad_steps_are_named(spec: str) -> None:
    with pytest.raises(ValueError, match="chain step"):
        parse_step(spec)


def test_language_falls_back_to_the_default_only_when_nobody_speaks_it() -> None:
    assert route_language("pt-BR", ALL.values(), {}, "en") == "pt"
    assert route_language("fr-CA", ALL.values(), {}, "en") == "en"
    assert route_language("fr", ALL.values(), {"fr": (Step("xtts"),)}, "en") == "fr"
    assert route_language("es", [EN], {}, "en") == "en"


def test_default_chain_is_piper_voices_by_name_then_xtts() -> None:
    assert chain(ALL, language="en") == [Step(EN_AMY.name), Step(EN.name), Step("xtts")]
    assert chain(ALL, language="pt") == [Step(PT.name), Step("xtts")]


def test_plain_services_are_never_in_a_chain() -> None:
    assert all(st.service != "echo" for st in chain(ALL, language="en"))


def test_engine_and_voice_narrow_the_chain() -> None:
    assert chain(ALL, language="en", engine="xtts") == [Step("xtts")]
    assert chain(ALL, language="en", voice="en_US-joe-medium") == [Step(EN.name)]
    assert chain(ALL, language="en", voice="ana") == [Step("xtts")]
    assert chain(ALL, language="en", voice="nobody") == []


def test_configured_chain_is_used_as_is_and_its_step_voice_must_agree() -> None:
    chains = {"pt": (Step(PT.name), Step("xtts", "narrator"))}
    assert chain(ALL, chains=chains, language="pt-BR") == [Step(PT.name), Step("xtts", "narrator")]
    assert chain(ALL, chains=chains, language="pt", voice="narrator") == [Step("xtts", "narrator")]
    assert chain(ALL, chains=chains, language="pt", voice="ana") == []


def test_a_target_service_is_the_whole_chain() -> None:
    assert chain(ALL, target=PT.name, language="en") == [Step(PT.name)]


def test_a_language_whose_services_are_gone_routes_to_the_default() -> None:
    assert chain({EN.name: EN}, language="pt") == [Step(EN.name)]
