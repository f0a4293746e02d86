"""Configuration validation and the tts-broker command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from broker.config import ConfigError, load_config
from tests.conftest import ROOT, Served


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg.broker.frontend == "tcp://127.0.0.1:5555" and cfg.broker.backend == "tcp://127.0.0.1:5556"
    assert cfg.broker.heartbeat_ms == 250 and cfg.broker.liveness == 3
    assert [(w.engine, w.voice, w.count) for w in cfg.workers] == [("piper", "en_US-joe-medium", 1)]


@pytest.mark.parametrize(
    "text, where",
    [
        ("[broker]\nheartbeat_msec = 100\n", "broker.heartbeat_msec"),
        ("[broker]\nliveness = 0\n", "broker.liveness"),
        ("[[workers]]\nengine = \"espeak\"\n", "workers.0.engine"),
        ("[[workers]]\ndevice = \"tpu\"\n", "workers.0.device"),
        ("[[workers]]\nthreads = 0\n", "workers.0.threads"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_cfg(tmp_path, text))
    assert where in str(err.value)


def test_each_worker_gets_its_share_of_the_cores_unless_told_or_it_shares_them(tmp_path: Path) -> None:
    """One worker: no ``--threads`` (its pool spans every core); several: Piper's each get every
    core and share them (``engines/host_cores.py``), other engines' the cores shared out among
    them, at least one each; ``threads`` set: that, whatever the count."""
    from broker.supervisor import cpu_threads, worker_argv

    def threads(text: str, cores: int) -> list:
        cfg = load_config(_cfg(tmp_path, text))
        return [cpu_threads(cfg, w, cores) for w in cfg.workers]

    assert threads("", 8) == [None]
    assert threads("[[workers]]\ncount = 2\n", 8) == [None]
    assert threads("[[workers]]\nengine = \"xtts\"\nmodel_dir = \"/tmp\"\ncount = 2\n", 8) == [4]
    assert threads("[[workers]]\n[[workers]]\nengine = \"xtts\"\nmodel_dir = \"/tmp\"\n", 2) == [None, 1]
    assert threads("[[workers]]\ncount = 2\nthreads = 3\n", 2) == [3]
    cfg = load_config(_cfg(tmp_path, "[[workers]]\ncount = 2\nthreads = 3\n"))
    argv = worker_argv(cfg, cfg.workers[0])
    assert argv[argv.index("--threads") + 1] == "3"
    assert "--threads" not in worker_argv(load_config(None), load_config(None).workers[0])


def test_serve_rejects_bad_config_with_exit_2(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(_cfg(tmp_path, "[broker]\nbogus = 1\n"))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "broker.bogus" in r.stderr


def test_say_and_status(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "say.wav"
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "say", "Roll for initiative.", "-o", str(out), "--frontend", served.frontend],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "time to first audio" in r.stdout and "real-time factor" in r.stdout
    info = soundfile.info(str(out))
    assert info.samplerate == 22050 and info.channels == 1 and info.subtype == "PCM_16" and info.duration > 0.5
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "status", "--frontend", served.frontend],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and "piper.en_US-joe-medium" in r.stdout and "pid" in r.stdout


def test_say_reports_errors(served: Served, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "say", "x", "--voice", "nobody", "-o", str(tmp_path / "x.wav"), "--frontend", served.frontend],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "bad_request" in r.stderr


def test_demo_main_job(tmp_path: Path) -> None:
    out = tmp_path / "demo.wav"
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo", "-o", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "time to first audio" in r.stdout and "real-time factor" in r.stdout
    info = soundfile.info(str(out))
    assert info.samplerate == 22050 and info.duration > 3


def test_readme_configuration_reference_is_a_valid_config(tmp_path: Path) -> None:
    """The README's config reference must stay in step with the schema."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration reference", 1)[1]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = load_config(_cfg(tmp_path, block))
    assert cfg.broker.stuck_timeout_ms == 10000 and cfg.broker.client_hwm == 10000
    assert [w.engine for w in cfg.workers] == ["piper", "xtts"]
    assert cfg.core_settings().chains["pt"][1].voice == "narrator"
    documented = {line.split("=")[0].strip() for line in block.splitlines() if "=" in line and not line.startswith("#")}
    from broker.config import BrokerConfig, MetricsConfig, SecurityConfig, WorkerConfig

    for model in (BrokerConfig, WorkerConfig, SecurityConfig, MetricsConfig):
        assert set(model.model_fields) <= documented, set(model.model_fields) - documented
