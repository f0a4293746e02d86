"""The engine registry: a third engine, defined in the tests only, needs no broker change."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from broker.config import ConfigError, load_config
from broker.routing import Step, parse_step
from tests.conftest import ROOT, start_serve, stop_serve, wait_services

TONE = "tests.fixtures.tone_engine"


def test_the_tone_engine_touches_no_broker_file() -> None:
    tracked = subprocess.run(["git", "ls-files", "broker"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked, "not a git checkout"
    for path in tracked:
        assert not re.search(r"\btone\b|tone_engine", (ROOT / path).read_text(encoding="utf-8", errors="replace")), path


def test_config_reads_an_engines_own_keys(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'engine_modules = ["{TONE}"]\n[[workers]]\nengine = "tone"\npitch_hz = 880.0\n')
    cfg = load_config(cfg_file)
    assert cfg.workers[0].pitch_hz == 880.0 and cfg.workers[0].voice_names == ["beep"]
    assert parse_step("tone:beep") == Step("tone", "beep")
    cfg_file.write_text(f'engine_modules = ["{TONE}"]\n[[workers]]\nengine = "tone"\nvoice = "x"\n')
    with pytest.raises(ConfigError, match="voice"):
        load_config(cfg_file)


def test_unknown_engine_module_is_a_config_error(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('engine_modules = ["no.such.module"]\n')
    with pytest.raises(ConfigError, match="engine_modules"):
        load_config(cfg_file)


def test_serve_supervises_and_routes_to_a_third_engine(tmp_path: Path) -> None:
    workers = '[[workers]]\nengine = "tone"\npitch_hz = 660.0\n'
    served = start_serve(tmp_path, workers, "", top=f'engine_modules = ["{TONE}"]')
    try:
        wait_services(served.frontend, ["tone"])
        c = served.client()
        s = c.request(b"t1", {"text": "one two three", "engine": "tone", "language": "pt-BR"})
        c.wait(s, timeout=30)
        s.check_invariants()
        assert s.names()[-1] == b"end" and s.json_of(b"start")["engine"] == "tone"
        assert len(s.pcm()) == 3 * int(16000 * 0.08) * 2
        st = json.loads(c.call(b"tts.status", b"{}")[3])
        assert st["services"]["tone"]["engine"] == "tone" and st["services"]["tone"]["languages"] == ["en", "pt"]
        c.close()
    finally:
        assert stop_serve(served) == 0, served.log_text()[-2000:]
