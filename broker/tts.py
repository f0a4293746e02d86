"""The TTS layer on top of MDP/0.2: request validation and stream events.

A TTS request body is two frames, ``request id`` and a JSON object. Every reply
body starts with the same request id and an event name; the events are small
dataclasses with a symmetric ``body(request_id)`` / ``from_body(frames)`` pair
so encoder and decoder cannot drift apart. Units are stated on the fields.

The same event frames travel worker → broker and broker → client; the broker
rewrites what it owns: sequence numbers, the worker id in ``start``, ``mark``
offsets and ``timing`` samples and characters (rebased onto the client's stream
and text after a failover), the ``failover``
event it makes of a later worker's ``start``, and its statistics in ``end``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .mdp import ProtocolError

Frames = list[bytes]

SERVICE = "tts"
CANCEL_SERVICE = "tts.cancel"
STATUS_SERVICE = "tts.status"
RESERVED_SERVICES = frozenset({SERVICE, CANCEL_SERVICE, STATUS_SERVICE})
WORKER_CANCEL = b"tts.cancel"
"""Body of the broker → engine-worker REQUEST that cancels the worker's current job."""

MAX_REQUEST_ID = 255
"""Longest request id, in bytes."""

FORMATS = ("s16le", "f32le")
SAMPLE_WIDTH = {"s16le": 2, "f32le": 4}
"""Bytes per sample of each wire format."""

# Error codes (PROTOCOL.md lists what each means).
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNAVAILABLE = "unavailable"
CANCELLED = "cancelled"
TIMEOUT = "timeout"
INTERNAL = "internal"
OVERLOADED = "overloaded"
ERROR_CODES = (BAD_REQUEST, TOO_LARGE, UNAVAILABLE, CANCELLED, TIMEOUT, INTERNAL, OVERLOADED)

MIN_RATE = 8000
MAX_RATE = 48000
"""Output rates a request may ask for, in Hertz."""
MAX_CHUNK_MS = 1000
"""The longest chunk a request may ask for (``chunk_ms``), and the longest the default sends."""
MAX_PRIORITY = 10
"""A request's ``priority`` is an integer from ``-MAX_PRIORITY`` to ``MAX_PRIORITY``."""

TIMING_KINDS = ("phonemes", "words", "visemes")
"""What a ``timing`` event may carry, in this order."""
TimingKind = Literal["phonemes", "words", "visemes"]

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")

_CONTROLS = {c: " " for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n\r"}
"""C0 controls but tab and line breaks, DEL, and C1 controls: each becomes one space.

They are not text an engine can speak (a NUL even breaks some phonemizers), so
they are cleaned at admission rather than reported as engine faults; one space
each keeps every character offset (marks, failover resume points) valid."""


def clean_text(text: str) -> str:
    """``text`` with control characters replaced by spaces, same length."""
    return text.translate(_CONTROLS)


def _unencodable(obj: Any) -> Optional[str]:
    """Where in a parsed JSON value a string holds a lone surrogate (JSON allows ``\\ud800``; UTF-8 does not).

    Iterative: a JSON value may nest as deep as the parser allows."""
    stack: list[tuple[str, Any]] = [("body", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{where}: lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start} is not Unicode text"
        elif isinstance(value, dict):
            stack += ((f"{where} key", k) for k in value)
            stack += ((f"{where}.{k}" if where != "body" else k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack += ((f"{where}[{i}]", v) for i, v in enumerate(value))
    return None


class RequestError(Exception):
    """A request that cannot be served; becomes a FINAL ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def normalize_language(tag: str) -> str:
    """``pt-BR`` → ``pt``, ``en_US`` → ``en``: engines route on the primary subtag."""
    return re.split(r"[-_]", tag, maxsplit=1)[0].lower()


class SynthesisRequest(BaseModel):
    """The JSON object in frame 4 of a TTS request."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    text: str
    language: str = "en"
    voice: Optional[str] = Field(default=None, min_length=1, max_length=200)
    engine: Optional[str] = Field(default=None, min_length=1, max_length=64)
    """Restrict to one engine (``engines/registry.py``): ``piper``, ``xtts``, …"""
    format: Literal["s16le", "f32le"] = "s16le"
    sample_rate: Optional[int] = Field(default=None, ge=MIN_RATE, le=MAX_RATE)
    """Output rate in Hertz; default the engine's native rate."""
    chunk_ms: Optional[int] = Field(default=None, ge=10, le=MAX_CHUNK_MS)
    """Audio per chunk in milliseconds (the last chunk of a sentence may be shorter); absent,
    each chunk is the audio the engine has just made, at most 1000 ms (``engines/audio.py``)."""
    speed: float = Field(default=1.0, gt=0.25, le=4.0, allow_inf_nan=False)
    """Speaking rate multiplier: 2.0 speaks twice as fast."""
    stream: Optional[Literal["frames", "sentence"]] = None
    """Piper: decode by frames (first audio in constant time) or by sentence; default the worker's."""
    priority: Optional[int] = Field(default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    """Who goes first when not every stream can be served at once (absent: 0). A worker serves
    the stream whose listener would run out of audio first, each step counted as a second
    sooner (``engines/schedule.py``); a request waiting for a free worker goes before those of
    lower priority (``broker/core.py``)."""
    timings: Optional[list[TimingKind]] = None
    """Which ``timing`` events the stream should carry (``phonemes``, ``words``, ``visemes``);
    absent or empty: none, and the stream is exactly what it was before timings existed."""

    @field_validator("timings")
    @classmethod
    def _timing_kinds(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if not v:
            return None  # empty means none: one spelling of "no timings" reaches the worker
        if len(set(v)) != len(v):
            raise ValueError("timings lists a kind twice")
        return v

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        v = clean_text(v)
        if not v.strip():
            raise ValueError("text is empty")
        return v

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: Optional[str]) -> Optional[str]:
        from engines import registry  # here, not at the top: the registry's voices import this module

        if v is not None and v not in registry.names():
            raise ValueError(f"unknown engine; known: {', '.join(registry.names())}")
        return v

    @field_validator("language")
    @classmethod
    def _language_tag(cls, v: str) -> str:
        if not _LANGUAGE.match(v):
            raise ValueError("language must be a tag such as en, en-US, pt or pt-BR")
        return v

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def parse_request(raw: bytes, max_text_chars: int) -> SynthesisRequest:
    """Validate frame 4 of a request; raise :class:`RequestError` with a clear message."""
    try:
        obj = json_object(raw, "body")
    except ValueError as exc:
        raise RequestError(BAD_REQUEST, str(exc)) from None
    bad = _unencodable(obj)
    if bad is not None:
        raise RequestError(BAD_REQUEST, bad)
    text = obj.get("text")
    if isinstance(text, str) and len(text) > max_text_chars:
        raise RequestError(TOO_LARGE, f"text is {len(text)} characters; the limit is {max_text_chars}")
    try:
        return SynthesisRequest.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(BAD_REQUEST, f"{where}: {first['msg']}") from None


def check_request_id(rid: bytes) -> None:
    if not 1 <= len(rid) <= MAX_REQUEST_ID:
        raise RequestError(BAD_REQUEST, "request id must be 1-255 bytes")


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class EventError(ProtocolError):
    """An event body that does not decode: the one error every event decoder raises.

    The broker's relay catches exactly this (a peer's fault, ending in a
    failover); any other exception is the broker's own bug and is not
    mistaken for a worker sending garbage."""


def json_object(raw: bytes, what: str, loads: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
    """Parse a frame that must hold a JSON object; :class:`EventError` (never anything else) if not.

    ``loads`` is the codec (orjson for the large ``timing`` event; its errors are ValueErrors)."""
    try:
        obj = loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EventError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventError(f"{what} must be a JSON object")
    return obj


def _field(d: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """``d[key]`` if it is a ``kind`` (bool is not an int here); EventError otherwise."""
    value = d.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EventError(f"{what}.{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass
class Start:
    """First event of every stream (PARTIAL): how to play what follows."""

    sample_rate: int
    """Hertz."""
    format: str
    """``s16le`` or ``f32le``."""
    engine: str
    voice: str
    worker: dict[str, Any]
    """At least ``id`` (broker-side worker id) and ``pid`` (OS process id)."""
    channels: int = 1
    timings: Optional[list[str]] = None
    """Timing kinds the stream will carry; None (key absent) when the request asked for none,
    ``[]`` when it asked but the engine has no alignment (XTTS)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any further keys, passed through untouched."""

    name = b"start"

    def body(self, rid: bytes) -> Frames:
        d = {
            "sample_rate": self.sample_rate,
            "format": self.format,
            "engine": self.engine,
            "voice": self.voice,
            "worker": self.worker,
            "channels": self.channels,
            **({"timings": self.timings} if self.timings is not None else {}),
            **self.extra,
        }
        return [rid, self.name, _json(d)]

    @classmethod
    def from_body(cls, frames: Frames) -> "Start":
        d = json_object(frames[2], "start")
        start = cls(
            sample_rate=_field(d, "sample_rate", int, "start"),
            format=_field(d, "format", str, "start"),
            engine=_field(d, "engine", str, "start"),
            voice=_field(d, "voice", str, "start"),
            worker=_field(d, "worker", dict, "start"),
            channels=_field(d, "channels", int, "start") if "channels" in d else 1,
            timings=_kinds(d, "start") if "timings" in d else None,
        )
        start.extra = {k: v for k, v in d.items() if k not in _START_KEYS}
        return start


_START_KEYS = frozenset({"sample_rate", "format", "engine", "voice", "worker", "channels", "timings"})


def _kinds(d: dict[str, Any], what: str) -> list[str]:
    """``d["timings"]``: a list of known timing kinds (a worker announcing another is garbling)."""
    kinds = _field(d, "timings", list, what)
    if any(k not in TIMING_KINDS for k in kinds):
        raise EventError(f"{what}.timings must list kinds among {', '.join(TIMING_KINDS)}")
    return kinds


@dataclass
class Audio:
    """One chunk of PCM (PARTIAL)."""

    seq: int
    """Position in the stream: 0, 1, 2, … without gaps."""
    pcm: bytes
    """Little-endian samples in the format announced by ``start``."""

    name = b"audio"

    def body(self, rid: bytes) -> Frames:
        return [rid, self.name, struct.pack(">I", self.seq), self.pcm]

    @classmethod
    def from_body(cls, frames: Frames) -> "Audio":
        if len(frames) != 4 or len(frames[2]) != 4:
            raise EventError("audio event needs a 4-byte sequence frame and a PCM frame")
        return cls(struct.unpack(">I", frames[2])[0], frames[3])


@dataclass
class Mark:
    """A sentence has been sent in full (PARTIAL).

    Two forms: a worker's ``{"end"}`` counts in the text *it* was given; the
    broker's ``{"segment", "end"}`` to the client counts in the client's text."""

    end: int
    """Character offset where the next sentence starts."""
    segment: Optional[int] = None
    """Sentence number in the stream, 0, 1, …; only in the broker's form."""

    name = b"mark"

    def body(self, rid: bytes) -> Frames:
        d = {"end": self.end} if self.segment is None else {"segment": self.segment, "end": self.end}
        return [rid, self.name, _json(d)]

    @classmethod
    def from_body(cls, frames: Frames) -> "Mark":
        d = json_object(frames[2], "mark")
        return cls(_field(d, "end", int, "mark"), _field(d, "segment", int, "mark") if "segment" in d else None)


@dataclass
class Failover:
    """Another worker took over the stream (PARTIAL, broker → client only)."""

    engine: str
    voice: str
    worker: dict[str, Any]
    reason: str
    """Why the previous worker was failed."""
    resume_at: int
    """Character offset in the client's text where the new worker starts."""
    timings: Optional[list[str]] = None
    """Only when the request asked for timings: the kinds the stream carries from here on (the
    new worker's). Fewer than ``start`` announced (``[]`` after a failover to XTTS): those stopped."""

    name = b"failover"

    def body(self, rid: bytes) -> Frames:
        d = {"engine": self.engine, "voice": self.voice, "worker": self.worker, "reason": self.reason, "resume_at": self.resume_at}
        if self.timings is not None:
            d["timings"] = self.timings
        return [rid, self.name, _json(d)]

    @classmethod
    def from_body(cls, frames: Frames) -> "Failover":
        d = json_object(frames[2], "failover")
        fields = (_field(d, k, t, "failover") for k, t in (("engine", str), ("voice", str), ("worker", dict), ("reason", str), ("resume_at", int)))
        return cls(*fields, timings=_kinds(d, "failover") if "timings" in d else None)


@dataclass(slots=True)
class PhonemeTime:
    """One phoneme (or pause: ``^``, ``$``, a space, punctuation) of the voice's phonemizer."""

    start: int
    end: int
    """Half-open ``[start, end)`` in samples of the stream's clock (as :class:`Timing`)."""
    phoneme: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "phoneme": self.phoneme}


@dataclass(slots=True)
class WordTime:
    """One spoken word and where it is in the client's text."""

    start: int
    end: int
    text: str
    """The word as the client wrote it (``text[char[0]:char[1]]``)."""
    char: tuple[int, int]
    """Half-open character span in the client's ``text``."""

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "text": self.text, "char": list(self.char)}


@dataclass(slots=True)
class VisemeTime:
    """One mouth shape (``engines/visemes.py``: the 15 Oculus/Meta visemes)."""

    start: int
    end: int
    viseme: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "viseme": self.viseme}


def _span(d: Any, what: str) -> tuple[int, int]:
    if not isinstance(d, dict):
        raise EventError(f"{what} entries must be JSON objects")
    start, end = _field(d, "start", int, what), _field(d, "end", int, what)
    if not 0 <= start <= end:
        raise EventError(f"{what}: start {start} and end {end} must satisfy 0 <= start <= end")
    return start, end


def _span_ok(start: Any, end: Any) -> bool:
    """What :func:`_span` checks, as a test: two ints (not bools), ``0 <= start <= end``."""
    return type(start) is int and type(end) is int and 0 <= start <= end


def _listed(value: Any) -> list[Any]:
    if type(value) is not list:
        raise TypeError("not a list")
    return value


def _entries(d: dict[str, Any], key: str) -> Optional[list[Any]]:
    if key not in d:
        return None
    entries = d[key]
    if not isinstance(entries, list):
        raise EventError(f"timing.{key} must be a list")
    return entries


@dataclass
class Timing:
    """When each sound of one or more whole sentences is, sent before their first audio (PARTIAL).

    Offsets are samples of the stream's own clock: the output rate ``start``
    announced, counted from the stream's first sample. A worker counts from
    its own first sample and in the text it was given; the broker rebases both
    onto the client's stream and text (:meth:`shifted`), as it does ``mark``."""

    phonemes: Optional[list[PhonemeTime]] = None
    words: Optional[list[WordTime]] = None
    visemes: Optional[list[VisemeTime]] = None
    """Each kind is present only if the request asked for it."""

    name = b"timing"

    def body(self, rid: bytes) -> Frames:
        """Encoded with orjson, as :meth:`from_body` decodes: a long sentence's timings are
        ~25 kB of JSON, made by the worker and read by the broker and then the client on the way
        to the first audio. With the standard library's codec this took 1.19 ms and each read
        1.20 ms; with orjson 0.27 and 0.73 ms (the 47-word benchmark sentence, all three kinds)."""
        d = {k: [e.as_dict() for e in v] for k, v in (("phonemes", self.phonemes), ("words", self.words), ("visemes", self.visemes)) if v is not None}
        return [rid, self.name, orjson.dumps(d)]

    @classmethod
    def from_body(cls, frames: Frames) -> "Timing":
        """Decoded and checked entry by entry. A sentence's timings are a few hundred entries,
        decoded by the broker and again by the client on the way to the first audio: built
        first and checked after in one pass each (a third of the time of field-by-field checks);
        anything that fails is decoded again by :meth:`_checked`, for the error that names it."""
        d = json_object(frames[2], "timing", orjson.loads)
        try:
            timing = cls._trusting(d)
        except (KeyError, TypeError, ValueError):
            timing = None
        return timing if timing is not None and timing._well_formed() else cls._checked(d)

    @classmethod
    def _trusting(cls, d: dict[str, Any]) -> "Timing":
        timing = cls()
        if "phonemes" in d:
            timing.phonemes = [PhonemeTime(e["start"], e["end"], e["phoneme"]) for e in _listed(d["phonemes"])]
        if "visemes" in d:
            timing.visemes = [VisemeTime(e["start"], e["end"], e["viseme"]) for e in _listed(d["visemes"])]
        if "words" in d:
            timing.words = [WordTime(e["start"], e["end"], e["text"], tuple(_listed(e["char"]))) for e in _listed(d["words"])]  # type: ignore[arg-type]
        return timing

    def _well_formed(self) -> bool:
        return (
            all(_span_ok(p.start, p.end) and type(p.phoneme) is str for p in self.phonemes or ())
            and all(_span_ok(v.start, v.end) and type(v.viseme) is str for v in self.visemes or ())
            and all(_span_ok(w.start, w.end) and type(w.text) is str and len(w.char) == 2 and _span_ok(*w.char) for w in self.words or ())
        )

    @classmethod
    def _checked(cls, d: dict[str, Any]) -> "Timing":
        timing = cls()
        if (entries := _entries(d, "phonemes")) is not None:
            timing.phonemes = [PhonemeTime(*_span(e, "timing.phonemes"), _field(e, "phoneme", str, "timing.phonemes")) for e in entries]
        if (entries := _entries(d, "visemes")) is not None:
            timing.visemes = [VisemeTime(*_span(e, "timing.visemes"), _field(e, "viseme", str, "timing.visemes")) for e in entries]
        if (entries := _entries(d, "words")) is not None:
            timing.words = []
            for e in entries:
                start, end = _span(e, "timing.words")
                char = _field(e, "char", list, "timing.words")
                if len(char) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in char) or not 0 <= char[0] <= char[1]:
                    raise EventError("timing.words.char must be [start, end] character offsets")
                timing.words.append(WordTime(start, end, _field(e, "text", str, "timing.words"), (char[0], char[1])))
        return timing

    def shifted(self, samples: int, chars: int) -> "Timing":
        """The same timings ``samples`` later in the stream and ``chars`` later in the text."""
        return Timing(
            None if self.phonemes is None else [PhonemeTime(p.start + samples, p.end + samples, p.phoneme) for p in self.phonemes],
            None if self.words is None else [WordTime(w.start + samples, w.end + samples, w.text, (w.char[0] + chars, w.char[1] + chars)) for w in self.words],
            None if self.visemes is None else [VisemeTime(v.start + samples, v.end + samples, v.viseme) for v in self.visemes],
        )

    def last_char(self) -> int:
        """Largest character offset any word reaches (0 without words)."""
        return max((w.char[1] for w in self.words or ()), default=0)


@dataclass
class End:
    """Last event of a successful stream (FINAL): statistics."""

    stats: dict[str, Any]
    """``samples``, ``audio_s`` (seconds), ``ttfa_ms`` (milliseconds, broker-measured), ``engines``…"""

    name = b"end"

    def body(self, rid: bytes) -> Frames:
        return [rid, self.name, _json(self.stats)]

    @classmethod
    def from_body(cls, frames: Frames) -> "End":
        return cls(json_object(frames[2], "end"))


@dataclass
class Error:
    """Last event of a failed stream (FINAL)."""

    code: str
    message: str

    name = b"error"

    def body(self, rid: bytes) -> Frames:
        return [rid, self.name, _json({"code": self.code, "message": self.message})]

    @classmethod
    def from_body(cls, frames: Frames) -> "Error":
        d = json_object(frames[2], "error")
        return cls(str(d.get("code", INTERNAL)), str(d.get("message", "")))


@dataclass
class Other:
    """A PARTIAL event this version does not know; clients ignore it."""

    event: str
    frames: Frames


Event = Union[Start, Audio, Mark, Timing, Failover, End, Error, Other]
_DECODERS: dict[bytes, Any] = {c.name: c for c in (Start, Audio, Mark, Timing, Failover, End, Error)}


def event_name(event: Event) -> str:
    """``start``, ``audio``, …: the wire name of any event, known or not."""
    return event.event if isinstance(event, Other) else event.name.decode()


def decode_event(body: Frames) -> tuple[bytes, Event]:
    """Split a reply body into ``(request id, event)``; raise :class:`EventError` when malformed."""
    if len(body) < 2:
        raise EventError("event body needs a request id and an event name")
    rid, name = body[0], body[1]
    cls = _DECODERS.get(name)
    if cls is None:
        return rid, Other(name.decode("utf-8", "replace"), list(body[2:]))
    if cls is not Audio and len(body) != 3:
        raise EventError(f"{name.decode()} event needs exactly one JSON frame")
    return rid, cls.from_body(body)


def error_body(rid: bytes, code: str, message: str) -> Frames:
    return Error(code, message).body(rid)
