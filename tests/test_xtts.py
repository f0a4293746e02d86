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


def test_the_engine_runs_on_the_threads_it_is_given(tiny_xtts: Path) -> None:
    """``[[workers]] threads`` sets torch's intra-op pool (for the worker process it runs in)."""
    import torch

    before = torch.get_num_threads()
    try:
        XttsEngine(tiny_xtts, "cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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


def test_legacy_config_keys(tmp_path: Path, tiny_xtts: Path, coqui_caches: tuple[Path, Path]) -> None:
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
    # An xtts worker already configured: the legacy keys add none, so no model is looked for.
    p.write_text(f'use_xtts_fallback = true\n[[workers]]\nengine = "xtts"\nmodel_dir = "{tiny_xtts}"\n')
    assert [w.engine for w in load_config(p).workers] == ["xtts"]


# --------------------------------------------------------------------------
# use_xtts_fallback without xtts_model_path: the model Coqui TTS downloaded
# --------------------------------------------------------------------------

COQUI_XTTS = "tts_models--multilingual--multi-dataset--xtts_v2"
HUB_REPO = "models--tts-hub--XTTS-v2"
CHECKPOINT = ("model.pth", "config.json", "vocab.json", "speakers_xtts.pth")


@pytest.fixture
def coqui_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Empty TTS_HOME and HF_HUB_CACHE (both win over every other variable), so the user's own caches never count."""
    tts_home, hub = tmp_path / "tts_home", tmp_path / "hf_hub"
    monkeypatch.setenv("TTS_HOME", str(tts_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return tts_home, hub


def _place(src: Path, dest: Path, *, without: str = "") -> Path:
    """The tiny checkpoint's files at ``dest`` (symbolic links, as in the Hugging Face cache), less ``without``."""
    dest.mkdir(parents=True)
    for name in CHECKPOINT:
        if name != without:
            (dest / name).symlink_to(src / name)
    return dest


def _place_in_hub(src: Path, hub: Path, *, without: str = "", commit: str = "0123abcd" * 5) -> Path:
    """What snapshot_download leaves: refs/main naming a commit, the files under snapshots/COMMIT."""
    (hub / HUB_REPO / "refs").mkdir(parents=True)
    (hub / HUB_REPO / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return _place(src, hub / HUB_REPO / "snapshots" / commit, without=without)


def _fallback_config(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "fallback.toml"
    p.write_text(f"use_xtts_fallback = true\n{extra}")
    return p


def test_fallback_without_path_uses_the_model_in_coqui_tts_home(
    tmp_path: Path, tiny_xtts: Path, coqui_caches: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from broker.config import load_config

    tts_home, _ = coqui_caches
    model = _place(tiny_xtts, tts_home / "tts" / COQUI_XTTS)
    with caplog.at_level("INFO", logger="models.registry"):
        cfg = load_config(_fallback_config(tmp_path))
    assert [(w.engine, w.device) for w in cfg.workers] == [("piper", "auto"), ("xtts", "cpu")]
    assert cfg.workers[1].model_dir == str(model)
    [line] = [r.getMessage() for r in caplog.records if r.name == "models.registry"]
    assert line.startswith(f"XTTS v2 model: {model} (Coqui TTS model folder, from $TTS_HOME")


def test_fallback_without_path_uses_the_hugging_face_snapshot_coqui_tts_0_28_made(
    tmp_path: Path, tiny_xtts: Path, coqui_caches: tuple[Path, Path]
) -> None:
    """coqui-tts 0.28 fetches xtts_v2 into the HF hub cache; its own folder keeps only the licence agreement."""
    from broker.config import load_config

    tts_home, hub = coqui_caches
    (tts_home / "tts" / COQUI_XTTS).mkdir(parents=True)
    (tts_home / "tts" / COQUI_XTTS / "tos_agreed.txt").write_text("I have read, understood and agreed to the Terms and Conditions.")
    snapshot = _place_in_hub(tiny_xtts, hub)
    cfg = load_config(_fallback_config(tmp_path, "xtts_use_gpu = true\n"))
    assert [(w.engine, w.device, w.model_dir) for w in cfg.workers[1:]] == [("xtts", "cuda", str(snapshot))]
    # Both complete: Coqui TTS's own folder comes first.
    (tts_home / "tts" / COQUI_XTTS).rename(tmp_path / "tos-only")
    first = _place(tiny_xtts, tts_home / "tts" / COQUI_XTTS)
    assert load_config(_fallback_config(tmp_path)).workers[1].model_dir == str(first)
    # An explicit path wins over any cache.
    assert load_config(_fallback_config(tmp_path, 'xtts_model_path = "/explicit"\n')).workers[1].model_dir == "/explicit"


def test_empty_caches_fail_at_start_up_naming_every_place(tmp_path: Path, coqui_caches: tuple[Path, Path]) -> None:
    tts_home, hub = coqui_caches
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(_fallback_config(tmp_path))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr  # as every other configuration error
    assert "xtts_model_path is not set" in r.stderr and "nothing is ever downloaded" in r.stderr
    assert f"{tts_home / 'tts' / COQUI_XTTS} (Coqui TTS model folder, from $TTS_HOME): does not exist" in r.stderr
    assert f"{hub / HUB_REPO} (Hugging Face hub cache, from $HF_HUB_CACHE): does not exist" in r.stderr
    assert "started worker" not in r.stderr and not tts_home.exists() and not hub.exists()  # nothing spawned, nothing written


def test_incomplete_cached_models_are_named_with_their_missing_files(
    tmp_path: Path, tiny_xtts: Path, coqui_caches: tuple[Path, Path]
) -> None:
    from broker.config import ConfigError, load_config

    tts_home, hub = coqui_caches
    coqui = _place(tiny_xtts, tts_home / "tts" / COQUI_XTTS, without="vocab.json")
    snapshot = _place_in_hub(tiny_xtts, hub, without="speakers_xtts.pth")
    with pytest.raises(ConfigError) as err:
        load_config(_fallback_config(tmp_path))
    assert f"{coqui} (Coqui TTS model folder, from $TTS_HOME): missing vocab.json\n" in str(err.value)
    assert f"{snapshot} (Hugging Face hub cache, from $HF_HUB_CACHE): missing speakers_xtts.pth\n" in str(err.value)
    # A repository folder whose download never recorded refs/main.
    (hub / HUB_REPO / "refs" / "main").unlink()
    with pytest.raises(ConfigError) as err:
        load_config(_fallback_config(tmp_path))
    assert f"{hub / HUB_REPO} (Hugging Face hub cache, from $HF_HUB_CACHE): has no refs/main snapshot" in str(err.value)
    # A dangling link (the blob it points to is gone) is a missing file too.
    (coqui / "vocab.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(ConfigError) as err:
        load_config(_fallback_config(tmp_path))
    assert f"{coqui} (Coqui TTS model folder, from $TTS_HOME): missing vocab.json\n" in str(err.value)


_MIRROR_CHECK = r"""
import importlib, json, os, sys, tempfile
from pathlib import Path
import huggingface_hub.constants as hf
from trainer.io import get_user_data_dir
from models.registry import coqui_xtts_v2_dir

VARS = ("TTS_HOME", "XDG_DATA_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
for names in json.loads(sys.argv[1]):
    root = Path(tempfile.mkdtemp())
    for v in VARS:
        os.environ.pop(v, None)
    os.environ["HOME"] = str(root / "home")
    for v in names:
        os.environ[v] = str(root / v.lower())
    importlib.reload(hf)  # its paths are read from the environment at import
    coqui = get_user_data_dir("tts") / "tts_models--multilingual--multi-dataset--xtts_v2"
    hub = Path(hf.HF_HUB_CACHE) / "models--tts-hub--XTTS-v2"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("c0ffee")
    for where in (coqui, hub / "snapshots" / "c0ffee"):
        where.mkdir(parents=True)
        for f in ("model.pth", "config.json", "vocab.json", "speakers_xtts.pth"):
            (where / f).touch()
        found = coqui_xtts_v2_dir()
        assert found.resolve() == where.resolve(), (names, str(found), str(where))
        for f in where.iterdir():
            f.unlink()
print("mirrored")
"""


def test_lookup_mirrors_coqui_tts_and_huggingface_hub() -> None:
    """The places looked at are those the installed coqui-tts and huggingface_hub compute, whatever the environment."""
    pytest.importorskip("trainer.io")
    cases = [
        [],
        ["TTS_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"],
        ["XDG_DATA_HOME", "HF_HOME", "XDG_CACHE_HOME"],
        ["HUGGINGFACE_HUB_CACHE", "HF_HOME"],
        ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TTS_HOME"],
    ]
    r = subprocess.run([sys.executable, "-c", _MIRROR_CHECK, json.dumps(cases)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "mirrored" in r.stdout, r.stderr[-3000:]


def test_fallback_worker_loads_the_cached_model(tmp_path: Path, tiny_xtts: Path, coqui_caches: tuple[Path, Path]) -> None:
    """``use_xtts_fallback = true`` and nothing else: the XTTS worker comes up on the model in TTS_HOME and speaks."""
    tts_home, _ = coqui_caches
    model = _place(tiny_xtts, tts_home / "tts" / COQUI_XTTS)
    s = start_serve(tmp_path, f'[[workers]]\nvoice = "{EN_VOICE}"\ncount = 0\n', top="use_xtts_fallback = true")
    try:
        wait_services(s.frontend, ["xtts"])
        c = s.client()
        pt = c.request(b"pt", {"text": "Olá.", "language": "pt"})
        c.wait(pt, timeout=60)
        assert pt.names()[-1] == b"end" and pt.json_of(b"start")["engine"] == "xtts"
        c.close()
    finally:
        assert stop_serve(s) == 0, s.log_text()[-3000:]
    log = s.log_text()
    assert f"XTTS v2 model: {model} (Coqui TTS model folder, from $TTS_HOME; xtts_model_path not set)" in log
    assert f"loading XTTS v2 from {model}" in log
