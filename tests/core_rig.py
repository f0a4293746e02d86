"""The core test rig: message builders, action inspection and :class:`Rig`, shared by every ``test_core_*`` file.

BrokerCore is driven with no sockets and no clock: time is passed explicitly."""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, Optional

from broker import mdp, tts
from broker.core import Action, BrokerCore, CoreSettings

# The core logs every refusal and failure; keep test output quiet.
logging.getLogger("broker").setLevel(logging.CRITICAL)

HB = 1.0
LIVENESS = 3
EXPIRY = HB * LIVENESS
TIMEOUT = 10.0
SETTINGS = CoreSettings(heartbeat_s=HB, liveness=LIVENESS, request_timeout_s=TIMEOUT, max_text_chars=500, stuck_timeout_s=1000.0)

SVC_EN = "piper.en_US-joe-medium"
SVC_EN_AMY = "piper.en_US-amy-medium"
SVC_PT = "piper.pt_BR-faber-medium"


def caps(language: str = "en", voice: str = "en_US-joe-medium", engine: str = "piper", **extra: Any) -> dict[str, Any]:
    return {"protocol": "tts/1", "engine": engine, "languages": [language], "voices": [voice], "sample_rate": 22050, "pid": 123, **extra}


CAPS_EN = caps()
CAPS_EN_AMY = caps(voice="en_US-amy-medium")
CAPS_PT = caps("pt", "pt_BR-faber-medium")
SVC_XTTS = "xtts"
CAPS_XTTS = caps("en", "narrator", engine="xtts", languages=["en", "pt"], voices=["narrator", "ana"], sample_rate=24000)


# --------------------------------------------------------------------------
# Message builders
# --------------------------------------------------------------------------


def ready(service: str = SVC_EN, capabilities: Optional[dict[str, Any]] = CAPS_EN) -> list[bytes]:
    return mdp.WorkerReady(service, capabilities).frames()


def tts_request(rid: bytes, service: str = "tts", text: str = "Hello there.", **fields: Any) -> list[bytes]:
    return [b"MDPC02", b"\x01", service.encode(), rid, json.dumps({"text": text, **fields}).encode()]


def cancel(rid: bytes) -> list[bytes]:
    return [b"MDPC02", b"\x01", b"tts.cancel", rid]


def reply(key: bytes, rid: bytes, event: bytes, *frames: bytes, final: Optional[bool] = None) -> list[bytes]:
    if final is None:
        final = event in (b"end", b"error")
    return [b"MDPW02", b"\x04" if final else b"\x03", key, b"", rid, event, *frames]


def start_json(fmt: str = "s16le", rate: int = 22050, **extra: Any) -> bytes:
    return json.dumps({"sample_rate": rate, "format": fmt, "engine": "piper", "voice": "en_US-joe-medium", "worker": {"pid": 123}, "channels": 1, **extra}).encode()


def start(key: bytes, rid: bytes, **kw: Any) -> list[bytes]:
    return reply(key, rid, b"start", start_json(**kw))


def audio(key: bytes, rid: bytes, pcm: bytes, seq: int = 0) -> list[bytes]:
    return reply(key, rid, b"audio", struct.pack(">I", seq), pcm)


def mark(key: bytes, rid: bytes, end: Any) -> list[bytes]:
    """A worker finished a sentence ending at ``end`` (characters into the text it was given)."""
    return reply(key, rid, b"mark", json.dumps({"end": end}).encode())


def end(key: bytes, rid: bytes, stats: Optional[dict[str, Any]] = None) -> list[bytes]:
    return reply(key, rid, b"end", json.dumps(stats or {}).encode())


def error(key: bytes, rid: bytes, code: str = "internal", message: str = "boom") -> list[bytes]:
    return reply(key, rid, b"error", json.dumps({"code": code, "message": message}).encode())


HEARTBEAT = [b"MDPW02", b"\x05"]
DISCONNECT = [b"MDPW02", b"\x06"]


# --------------------------------------------------------------------------
# Action inspection
# --------------------------------------------------------------------------


def to_client(actions: list[Action], client: bytes) -> list[mdp.ClientReply]:
    return [mdp.decode_client_reply(a.frames) for a in actions if not a.to_worker and a.peer == client]


def to_worker(actions: list[Action], worker: bytes) -> list[mdp.WorkerCommand]:
    return [mdp.decode_worker(a.frames, from_broker=True) for a in actions if a.to_worker and a.peer == worker]


def requests_to(actions: list[Action], worker: bytes) -> list[mdp.WorkerRequest]:
    return [c for c in to_worker(actions, worker) if isinstance(c, mdp.WorkerRequest)]


def job_key(actions: list[Action], worker: bytes) -> bytes:
    """The address of the single job REQUEST that ``actions`` sent ``worker``."""
    reqs = [a.frames for a in actions if a.to_worker and a.peer == worker and a.frames[1] == mdp.W_REQUEST]
    assert len(reqs) == 1, f"expected one REQUEST to {worker!r}, got {actions}"
    return reqs[0][2]


def events(actions: list[Action], client: bytes) -> list[tuple[bool, bytes, tts.Event]]:
    """(final, request id, event) of every reply ``client`` got."""
    out = []
    for r in to_client(actions, client):
        rid, ev = tts.decode_event(r.body)
        out.append((r.final, rid, ev))
    return out


def names(actions: list[Action], client: bytes) -> list[str]:
    """Event names ``client`` got, in order; a FINAL is marked with a trailing ``!``."""
    out = []
    for final, _, ev in events(actions, client):
        name = tts.event_name(ev)
        out.append(name + ("!" if final else ""))
    return out


def other_json(ev: tts.Event) -> dict[str, Any]:
    """The JSON frame of a ``mark`` or ``failover`` event."""
    assert isinstance(ev, (tts.Mark, tts.Failover)), ev
    return json.loads(ev.body(b"")[2])


def sent_request(req: mdp.WorkerRequest) -> dict[str, Any]:
    """The synthesis request JSON a worker was given."""
    return json.loads(req.body[1])


def only_final(actions: list[Action], client: bytes, service: bytes = b"tts") -> tuple[bytes, tts.Event]:
    replies = to_client(actions, client)
    assert len(replies) == 1, replies
    assert replies[0].final
    assert replies[0].service == service.decode()
    return tts.decode_event(replies[0].body)


def error_code(actions: list[Action], client: bytes, service: bytes = b"tts") -> str:
    _, ev = only_final(actions, client, service)
    assert isinstance(ev, tts.Error), ev
    return ev.code


def disconnected(actions: list[Action], worker: bytes) -> bool:
    return any(a.to_worker and a.peer == worker and a.frames == mdp.DISCONNECT_FRAMES for a in actions)


class Rig:
    """A BrokerCore plus convenience: workers keep themselves alive on demand."""

    def __init__(self, settings: CoreSettings = SETTINGS) -> None:
        self.core = BrokerCore(settings)

    def worker(self, ident: bytes, service: str = SVC_EN, capabilities: Optional[dict[str, Any]] = CAPS_EN, now: float = 0.0) -> list[Action]:
        out = self.core.on_worker(ident, ready(service, capabilities), now)
        assert ident in self.core.workers
        return out

    def keepalive(self, now: float, *idents: bytes) -> None:
        for ident in idents or list(self.core.workers):
            assert self.core.on_worker(ident, HEARTBEAT, now) == []

    def request(self, client: bytes, rid: bytes, now: float = 0.0, **kw: Any) -> list[Action]:
        return self.core.on_client(client, tts_request(rid, **kw), now)

    def serve(self, ident: bytes, key: bytes, rid: bytes, now: float, chunks: int = 1) -> list[Action]:
        """Play a whole successful stream; return the actions of the final ``end``."""
        self.core.on_worker(ident, start(key, rid), now)
        for i in range(chunks):
            self.core.on_worker(ident, audio(key, rid, b"\x00\x00" * 10, i), now)
        return self.core.on_worker(ident, end(key, rid), now)


C1, C2 = b"client-1", b"client-2"
W1, W2, W3 = b"W1", b"W2", b"W3"


def _busy_worker() -> tuple[Rig, bytes]:
    rig = Rig()
    rig.worker(W1)
    k = job_key(rig.request(C1, b"a"), W1)
    return rig, k


def _stream_on(rig: Rig, ident: bytes, key: bytes, rid: bytes, now: float, fmt: str = "s16le", rate: int = 22050, marks: tuple[int, ...] = ()) -> list[tuple[bool, bytes, tts.Event]]:
    """``ident`` starts, sends one audio chunk and then a mark for each of ``marks``; the client's events."""
    evs = events(rig.core.on_worker(ident, start(key, rid, fmt=fmt, rate=rate), now), C1)
    evs += events(rig.core.on_worker(ident, audio(key, rid, b"\x00" * 8), now), C1)
    for m in marks:
        evs += events(rig.core.on_worker(ident, mark(key, rid, m), now), C1)
    return evs
