"""XTTS v2 engine on a tiny random-weight checkpoint built at test time (noise, not speech)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile

from broker.tts import RequestError, SynthesisRequest
from engines.xtts import ModelDirError, XttsEngine, check_model_dir, parse_speakers
from tests.conftest import EN_VOICE, ROOT, Served, free_port, start_serve, stop_serve, wait_services
from tests.fixtures.tiny_xtts import build_tiny_xtts_checkpoint
from tests.mdp_peers import RawClient

PT_TEXT = "Olá, aventureiros. Bem-vindos à taverna do Dragão Dourado."
SPEAKERS = ["Tiny Speaker A", "Tiny Speaker B"]


@pytest.fixture(scope="module")
def tiny_xtts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight XTTS v2 checkpoint: a test fixture, never a voice."""
    return build_tiny_xtts_checkpoint(tmp_path_factory.mktemp("xtts"))


@pytest.fixture(scope="module")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s stereo 44.1 kHz reference clip for cloning (a chirp with noise)."""
    rate = 44100
    t = np.arange(3 * rate) / rate
    mono = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.02 * np.random.default_rng(1).standard_normal(len(t))
    path = tmp_path_factory.mktemp("ref") / "guard.wav"
    soundfile.write(str(path), np.stack([mono, mono], axis=1).astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def engine(tiny_xtts: Path, reference_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> XttsEngine:
    return XttsEngine(tiny_xtts, "cpu", {"guard": reference_wav}, stream_chunk_size=4, cache_dir=tmp_path_factory.mktemp("cache"))


def test_incomplete_model_dir_names_the_missing_file(tmp_path: Path, tiny_xtts: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_xtts / "config.json").read_bytes())
    with pytest.raises(ModelDirError, match="missing model.pth, vocab.json"):
        check_model_dir(partial)


def test_cuda_without_gpu_is_a_clear_error(tiny_xtts: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU"):
        XttsEngine(tiny_xtts, "cuda")


def test_languages_speakers_and_request_checks(engine: XttsEngine) -> None:
    assert len(engine.languages()) == 17 and {"en", "pt", "zh", "ja"} <= set(engine.languages())
    assert engine.voices() == SPEAKERS + ["guard"]
    assert engine.default_speaker == SPEAKERS[0] and engine.service == "xtts" and engine.native_rate == 24000
    with pytest.raises(RequestError, match="does not speak 'sw'") as err:
        engine.check(SynthesisRequest(text="x", language="sw"))
    assert err.value.code == "bad_request"
    with pytest.raises(RequestError, match="no speaker 'nobody'"):
        engine.check(SynthesisRequest(text="x", language="pt-BR", voice="nobody"))
    engine.check(SynthesisRequest(text="x", language="pt-BR", voice="guard"))


def test_sentence_limit_is_the_models_per_language_limit(engine: XttsEngine) -> None:
    assert engine.max_chars("pt-BR") == 203 and engine.max_chars("en") == 250 and engine.max_chars("ja") == 71


def test_streaming_yields_several_chunks_per_sentence(engine: XttsEngine) -> None:
    chunks = list(engine.speak(PT_TEXT, SynthesisRequest(text=PT_TEXT, language="pt-BR", voice="Tiny Speaker B")))
    assert len(chunks) == 4 and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert np.isfinite(np.concatenate(chunks)).all()


def test_clone_latents_are_cached_on_disk(tiny_xtts: Path, reference_wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    XttsEngine(tiny_xtts, "cpu", {"guard": reference_wav}, cache_dir=cache)
    [cached] = list(cache.glob("*.pt"))

    def recompute(self: XttsEngine, path: Path) -> None:
        raise AssertionError("latents recomputed despite the cache")

    monkeypatch.setattr(XttsEngine, "_compute_latents", recompute)
    again = XttsEngine(tiny_xtts, "cpu", {"guard": reference_wav}, cache_dir=cache)
    chunks = list(again.speak("Olá.", SynthesisRequest(text="Olá.", language="pt", voice="guard")))
    assert chunks and list(cache.glob("*.pt")) == [cached]
    # A different reference file is a different key.
    other = tmp_path / "other.wav"
    data, rate = soundfile.read(str(reference_wav))
    soundfile.write(str(other), data[: rate * 2], rate)
    monkeypatch.undo()
    XttsEngine(tiny_xtts, "cpu", {"guard": other}, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2


def test_speaker_argument_parsing() -> None:
    assert parse_speakers(["guard=a.wav", "king=/x/b.wav"]) == {"guard": "a.wav", "king": "/x/b.wav"}
    with pytest.raises(Exception, match="NAME=PATH"):
        parse_speakers(["guard"])


# --------------------------------------------------------------------------
# Through the broker, real processes
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xtts_served(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path, reference_wav: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-xtts")
    workers = (
        f'[[workers]]\nvoice = "{EN_VOICE}"\ndevice = "cpu"\n'
        f'[[workers]]\nengine = "xtts"\nmodel_dir = "{tiny_xtts}"\ndevice = "cpu"\nstream_chunk_size = 4\n'
        f'speakers = {{ guard = "{reference_wav}" }}\n'
    )
    s = start_serve(tmp, workers)
    try:
        wait_services(s.frontend, [f"piper.{EN_VOICE}", "xtts"])
        yield s
    finally:
        assert stop_serve(s) == 0, s.log_text()[-3000:]


def test_portuguese_routes_to_xtts_and_english_to_piper(xtts_served: Served) -> None:
    c = xtts_served.client()
    pt = c.request(b"pt", {"text": PT_TEXT, "language": "pt-BR"})
    en = c.request(b"en", {"text": "Hello there."})
    en_x = c.request(b"enx", {"text": "Hello there.", "engine": "xtts", "voice": "guard", "format": "f32le"})
    c.wait(pt, en, en_x)
    for s in (pt, en, en_x):
        s.check_invariants()
        assert s.names()[-1] == b"end"
    assert pt.json_of(b"start")["engine"] == "xtts" and pt.json_of(b"start")["voice"] == SPEAKERS[0]
    assert pt.json_of(b"start")["sample_rate"] == 24000
    assert en.json_of(b"start")["engine"] == "piper"
    assert en_x.json_of(b"start")["engine"] == "xtts" and en_x.json_of(b"start")["voice"] == "guard"
    assert len(pt.audio()) >= 4
    c.close()


def test_unsupported_language_addressed_to_xtts_is_an_error(xtts_served: Served) -> None:
    c = xtts_served.client()
    s = c.request(b"sw", {"text": "Habari.", "language": "sw"}, service=b"xtts")
    c.wait(s)
    assert s.names() == [b"error"] and "does not speak 'sw'" in s.json_of(b"error")["message"]
    c.close()


def test_long_text_streams_sentence_after_sentence_with_heartbeats(xtts_served: Served) -> None:
    c = xtts_served.client()
    text = " ".join(f"Frase número {i}, que conta a história da velha taverna." for i in range(10))
    s = c.request(b"long", {"text": text, "language": "pt", "voice": "Tiny Speaker B", "sample_rate": 16000, "chunk_ms": 20})
    c.wait(s, timeout=120)
    s.check_invariants()
    end = s.json_of(b"end")
    assert end["sentences"] > 1 and s.json_of(b"start")["sample_rate"] == 16000
    assert max(len(p) for _, p in s.audio()) == 320 * 2
    st = json.loads(c.call(b"tts.status", b"{}")[3])["services"]["xtts"]
    assert st["failures"] == 0 and len(st["workers"]) == 1  # never expired while synthesising
    c.close()


def test_cancel_xtts_mid_stream(xtts_served: Served) -> None:
    c = xtts_served.client()
    text = " ".join(f"Frase número {i}, que conta a história." for i in range(20))
    s = c.request(b"c", {"text": text, "language": "pt"})
    while not s.audio():
        assert c.recv(60) is not None
    c.cancel(b"c")
    c.wait(s, timeout=10)
    assert s.json_of(b"error")["code"] == "cancelled"
    after = c.request(b"after", {"text": "Olá.", "language": "pt"})
    c.wait(after, timeout=30)
    assert after.names()[-1] == b"end"
    c.close()


def test_standalone_xtts_worker_behind_standalone_broker(tiny_xtts: Path, tmp_path: Path) -> None:
    """The issue's acceptance: pt-BR streamed in several chunks at a requested 22,050 Hz."""
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    log = (tmp_path / "procs.log").open("wb")
    procs = [
        subprocess.Popen([sys.executable, "-m", "broker", "--frontend", fe, "--backend", be], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
        subprocess.Popen(
            [sys.executable, "-m", "engines.xtts", "--backend", be, "--model-dir", str(tiny_xtts), "--device", "cpu", "--stream-chunk-size", "4"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ),
    ]
    try:
        wait_services(fe, ["xtts"])
        c = RawClient(fe)
        s = c.request(b"pt", {"text": PT_TEXT, "language": "pt-BR", "sample_rate": 22050})
        c.wait(s, timeout=60)
        s.check_invariants()
        start, end = s.json_of(b"start"), s.json_of(b"end")
        assert start["sample_rate"] == 22050 and start["engine"] == "xtts" and start["worker"]["pid"] == procs[1].pid
        assert len(s.audio()) >= 4
        # The first chunk left the worker before synthesis finished: it streamed.
        assert end["worker_ttfa_ms"] < end["synth_ms"]
        # Two sentences of 14336 samples at 24 kHz each (the fixture always runs to its token cap), resampled.
        assert end["segments"] == 2 and abs(end["samples"] / 22050 - 2 * 14336 / 24000) < 0.01
        c.close()
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        assert [p.wait(30) for p in procs] == [0, 0]


def test_legacy_config_keys(tmp_path: Path, tiny_xtts: Path) -> None:
    from broker.config import ConfigError, load_config

    p = tmp_path / "c.toml"
    p.write_text(f'use_xtts_fallback = true\nxtts_model_path = "{tiny_xtts}"\nxtts_use_gpu = false\n')
    cfg = load_config(p)
    assert [(w.engine, w.device) for w in cfg.workers] == [("piper", "auto"), ("xtts", "cpu")]
    p.write_text("use_xtts_fallback = true\n")
    with pytest.raises(ConfigError, match="xtts_model_path"):
        load_config(p)
    p.write_text('[[workers]]\nengine = "xtts"\n')
    with pytest.raises(ConfigError, match="needs model_dir"):
        load_config(p)
