"""``[gateways]``, the gateway command lines, and the pieces the gateways are made of (no processes)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import Config, ConfigError, load_config
from broker.gateways.errors import HTTP_STATUS, http_status
from broker.gateways.http import ApiError, parse_speech
from broker.gateways.voices import voices_from_status
from broker.gateways.wav import streaming_header
from broker.supervisor import Supervisor, gateway_argvs
from broker import tts
from engines.text import whole_sentences
from tests.conftest import ROOT


def _load(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(p)


def test_gateways_are_off_by_default() -> None:
    cfg = load_config(None)
    assert cfg.gateways.wyoming is None and cfg.gateways.http is None
    assert gateway_argvs(cfg) == {}
    assert not any(s.gateway for s in Supervisor(cfg).slots)


def test_configured_gateways_run_under_the_supervisor_as_clients_of_the_frontend(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '[broker]\nfrontend = "tcp://*:7000"\n[gateways]\nwyoming = "tcp://127.0.0.1:10200"\nhttp = "127.0.0.1:8000"\n')
    argvs = gateway_argvs(cfg)
    assert argvs["wyoming"][argvs["wyoming"].index("--uri") + 1] == "tcp://127.0.0.1:10200"
    assert argvs["http"][argvs["http"].index("--listen") + 1] == "127.0.0.1:8000"
    for argv in argvs.values():
        assert argv[argv.index("--broker") + 1] == "tcp://127.0.0.1:7000"  # a bound wildcard reached on loopback
    gateway_slots = [s for s in Supervisor(cfg).slots if s.gateway]
    assert sorted(s.name for s in gateway_slots) == ["gateway.http", "gateway.wyoming"]


@pytest.mark.parametrize(
    "text, where",
    [
        ('[gateways]\nwyoming = "127.0.0.1:10200"\n', "gateways.wyoming"),
        ('[gateways]\nwyoming = "tcp://127.0.0.1"\n', "gateways.wyoming"),
        ('[gateways]\nhttp = "localhost"\n', "gateways.http"),
        ('[gateways]\nhttp = "127.0.0.1:99999"\n', "gateways.http"),
        ('[gateways]\nhttps = "127.0.0.1:8443"\n', "gateways.https"),
    ],
)
def test_bad_gateways_config_names_the_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert where in str(err.value)


def test_gateways_with_curve_are_refused_with_the_way_out(tmp_path: Path) -> None:
    import zmq.auth

    for sub in ("clients", "workers"):
        (tmp_path / sub).mkdir()
    zmq.auth.create_certificates(tmp_path, "broker")
    text = (
        f'[security]\ncurve = true\nbroker_key = "{tmp_path / "broker.key_secret"}"\n'
        f'client_keys = "{tmp_path / "clients"}"\nworker_keys = "{tmp_path / "workers"}"\n'
        '[gateways]\nhttp = "127.0.0.1:8000"\n'
    )
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert "--curve-key" in str(err.value)


def test_gateway_commands_listen_on_loopback_by_default() -> None:
    for cmd, flag, default in (("wyoming", "--uri", "tcp://127.0.0.1:10200"), ("http", "--listen", "127.0.0.1:8000")):
        out = subprocess.run([sys.executable, "-m", "broker.cli", cmd, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert flag in out and f"default {default}" in out


@pytest.mark.parametrize("cmd, args", [("wyoming", ["--uri", "10200"]), ("http", ["--listen", "8000"]), ("serve", ["--http", "nowhere"])])
def test_gateway_commands_refuse_a_bad_address(cmd: str, args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "broker.cli", cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error:" in r.stderr


@pytest.mark.parametrize("cmd, flag, address", [("wyoming", "--uri", "tcp://127.0.0.1:{}"), ("http", "--listen", "127.0.0.1:{}")])
def test_gateway_commands_name_an_address_already_taken(cmd: str, flag: str, address: str) -> None:
    """Another process on the port: exit 2 with one line naming the flag and the address, no traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = address.format(taken.getsockname()[1])
        r = subprocess.run([sys.executable, "-m", "broker.cli", cmd, flag, where], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"error: {flag}: cannot listen on {where}" in r.stderr and "address already in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def test_whole_sentences_is_the_spoken_prefix() -> None:
    assert whole_sentences("The door creaks ") == 0
    assert whole_sentences("The door creaks open. The guard") == len("The door creaks open. ")
    assert whole_sentences("Halt! Who goes there? ") == len("Halt! Who goes there? ")
    assert whole_sentences("He said \"stop.\" Then") == len("He said \"stop.\" ")


def test_voices_from_status_and_their_options() -> None:
    st = {"services": {
        "piper.pt_BR-faber-medium": {"tts": True, "engine": "piper", "languages": ["pt"], "workers": [{}], "worker_count": 1},
        "piper.en_US-joe-medium": {"tts": True, "engine": "piper", "languages": ["en"], "workers": [{}, {}], "worker_count": 2},
        "xtts": {"tts": True, "engine": "xtts", "languages": ["en", "pt"], "workers": [{}], "worker_count": 1},
        "piper.gone": {"tts": True, "engine": "piper", "languages": [], "workers": [], "worker_count": 0},
        "echo": {"tts": False, "engine": None, "languages": None, "workers": [{}], "worker_count": 1},
    }}
    voices = {v.name: v for v in voices_from_status(st)}
    assert list(voices) == ["en_US-joe-medium", "pt_BR-faber-medium", "xtts"]
    assert voices["pt_BR-faber-medium"].options(None) == {"voice": "pt_BR-faber-medium", "language": "pt"}
    assert voices["pt_BR-faber-medium"].options("en") == {"voice": "pt_BR-faber-medium", "language": "pt"}  # the voice's own
    assert voices["xtts"].options("pt-BR") == {"engine": "xtts", "language": "pt-BR"}
    assert voices["en_US-joe-medium"].workers == 2


def test_streaming_wav_header() -> None:
    h = streaming_header(22050)
    assert len(h) == 44 and h[:4] == b"RIFF" and h[8:12] == b"WAVE" and h[36:40] == b"data"
    assert struct.unpack("<IHHIIHH", h[16:36]) == (16, 1, 1, 22050, 44100, 2, 16)


def test_every_broker_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(tts.ERROR_CODES)
    assert http_status(tts.BAD_REQUEST) == 400 and http_status(tts.UNAVAILABLE) == 503 and http_status("new_code") == 502


def test_speech_request_validation_without_a_server() -> None:
    ok = parse_speech(b'{"model": "tts-1", "input": "Hi.", "voice": "alloy", "speed": 1}')
    assert ok.response_format == "wav" and ok.speed == 1.0
    with pytest.raises(ApiError) as err:
        parse_speech(b'{"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "opus"}')
    assert err.value.status == 400 and err.value.code == "unsupported_format" and "pcm, wav" in err.value.message
