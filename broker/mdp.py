"""MDP/0.2 (ZeroMQ RFC 18) command framing, without sockets.

Every command that crosses the broker is a small frozen dataclass with a
``frames()`` method (encode) and a module-level ``decode_client`` /
``decode_worker`` function (decode). Decoding is strict: anything that is not
exactly one of the commands RFC 18 defines raises :class:`ProtocolError`, and
the caller decides what that costs the peer (the broker drops the message and,
for a worker, disconnects it).

Frames are shown here as they appear *after* the ROUTER identity frame, which
ZeroMQ adds on receive and strips on send; that frame is never part of a
command object.

One extension, used only by this project's engine workers: a READY may carry
a fourth frame, a UTF-8 JSON object describing what the worker can do
(:class:`WorkerReady.capabilities`). A plain three-frame READY is an ordinary
MDP/0.2 worker and is brokered as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

CLIENT = b"MDPC02"
WORKER = b"MDPW02"

# Client sub-protocol command codes.
C_REQUEST = b"\x01"
C_PARTIAL = b"\x02"
C_FINAL = b"\x03"

# Worker sub-protocol command codes.
W_READY = b"\x01"
W_REQUEST = b"\x02"
W_PARTIAL = b"\x03"
W_FINAL = b"\x04"
W_HEARTBEAT = b"\x05"
W_DISCONNECT = b"\x06"

MAX_SERVICE_NAME = 255
"""Longest service name accepted, in bytes (printable ASCII)."""


class ProtocolError(ValueError):
    """A message that is not a valid MDP/0.2 command."""


Frames = list[bytes]


def _service_name(raw: bytes) -> str:
    if not raw or len(raw) > MAX_SERVICE_NAME:
        raise ProtocolError("service name must be 1-255 bytes")
    if not all(0x21 <= b <= 0x7E for b in raw):
        raise ProtocolError("service name must be printable ASCII without spaces")
    return raw.decode("ascii")


# --------------------------------------------------------------------------
# Client sub-protocol
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRequest:
    """Client → broker: ``MDPC02, 0x01, service, body...``."""

    service: str
    body: Frames = field(default_factory=list)

    def frames(self) -> Frames:
        return [CLIENT, C_REQUEST, self.service.encode("ascii"), *self.body]


@dataclass(frozen=True)
class ClientReply:
    """Broker → client: ``MDPC02, 0x02 (PARTIAL) | 0x03 (FINAL), service, body...``."""

    service: str
    body: Frames
    final: bool

    def frames(self) -> Frames:
        return [CLIENT, C_FINAL if self.final else C_PARTIAL, self.service.encode("ascii"), *self.body]


def client_reply_frames(service: bytes, body: Frames, final: bool) -> Frames:
    """Encode a reply on the hot path without building a dataclass.

    The broker relays every audio chunk through here; ``service`` is already
    bytes because it was validated when the request arrived.
    """
    return [CLIENT, C_FINAL if final else C_PARTIAL, service, *body]


def decode_client(frames: Frames) -> ClientRequest:
    """Decode what a client may send the broker: only REQUEST.

    RFC 18 requires at least one body frame after the service name.
    """
    if len(frames) < 4:
        raise ProtocolError("client REQUEST needs at least 4 frames")
    if frames[0] != CLIENT:
        raise ProtocolError("not an MDP/0.2 client message (header is not MDPC02)")
    if frames[1] != C_REQUEST:
        raise ProtocolError("clients may only send REQUEST (0x01)")
    return ClientRequest(_service_name(frames[2]), list(frames[3:]))


def decode_client_reply(frames: Frames) -> ClientReply:
    """Decode a broker → client reply (used by clients and tests)."""
    if len(frames) < 3 or frames[0] != CLIENT:
        raise ProtocolError("not an MDP/0.2 client reply")
    if frames[1] not in (C_PARTIAL, C_FINAL):
        raise ProtocolError("reply command must be PARTIAL (0x02) or FINAL (0x03)")
    return ClientReply(_service_name(frames[2]), list(frames[3:]), frames[1] == C_FINAL)


# --------------------------------------------------------------------------
# Worker sub-protocol
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    """Worker → broker: ``MDPW02, 0x01, service[, capabilities JSON]``."""

    service: str
    capabilities: dict[str, Any] | None = None
    """This project's extension: what an engine worker serves (see PROTOCOL.md)."""

    def frames(self) -> Frames:
        out = [WORKER, W_READY, self.service.encode("ascii")]
        if self.capabilities is not None:
            out.append(json.dumps(self.capabilities, separators=(",", ":")).encode())
        return out


@dataclass(frozen=True)
class WorkerRequest:
    """Broker → worker: ``MDPW02, 0x02, client address, empty, body...``."""

    address: bytes
    body: Frames

    def frames(self) -> Frames:
        return [WORKER, W_REQUEST, self.address, b"", *self.body]


@dataclass(frozen=True)
class WorkerReply:
    """Worker → broker: ``MDPW02, 0x03 (PARTIAL) | 0x04 (FINAL), client address, empty, body...``."""

    address: bytes
    body: Frames
    final: bool

    def frames(self) -> Frames:
        return [WORKER, W_FINAL if self.final else W_PARTIAL, self.address, b"", *self.body]


@dataclass(frozen=True)
class WorkerHeartbeat:
    """Either direction: ``MDPW02, 0x05``."""

    def frames(self) -> Frames:
        return [WORKER, W_HEARTBEAT]


@dataclass(frozen=True)
class WorkerDisconnect:
    """Either direction: ``MDPW02, 0x06``."""

    def frames(self) -> Frames:
        return [WORKER, W_DISCONNECT]


WorkerCommand = Union[WorkerReady, WorkerRequest, WorkerReply, WorkerHeartbeat, WorkerDisconnect]

HEARTBEAT_FRAMES: Frames = WorkerHeartbeat().frames()
DISCONNECT_FRAMES: Frames = WorkerDisconnect().frames()


def _addressed(frames: Frames, what: str) -> tuple[bytes, Frames]:
    if len(frames) < 5:
        raise ProtocolError(f"{what} needs at least 5 frames")
    if not frames[2]:
        raise ProtocolError(f"{what} has an empty client address")
    if frames[3] != b"":
        raise ProtocolError(f"{what} is missing the empty delimiter after the address")
    return frames[2], list(frames[4:])


def decode_worker(frames: Frames, *, from_broker: bool = False) -> WorkerCommand:
    """Decode a worker sub-protocol command.

    ``from_broker`` selects the direction: a broker receives READY, PARTIAL,
    FINAL, HEARTBEAT and DISCONNECT; a worker receives REQUEST, HEARTBEAT and
    DISCONNECT.
    """
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("not an MDP/0.2 worker message (header is not MDPW02)")
    cmd = frames[1]
    if cmd == W_HEARTBEAT or cmd == W_DISCONNECT:
        if len(frames) != 2:
            raise ProtocolError("HEARTBEAT/DISCONNECT take exactly 2 frames")
        return WorkerHeartbeat() if cmd == W_HEARTBEAT else WorkerDisconnect()
    if from_broker:
        if cmd != W_REQUEST:
            raise ProtocolError(f"a broker does not send worker command {cmd!r}")
        address, body = _addressed(frames, "REQUEST")
        return WorkerRequest(address, body)
    if cmd == W_READY:
        if len(frames) not in (3, 4):
            raise ProtocolError("READY takes 3 frames (4 with capabilities)")
        caps = None
        if len(frames) == 4:
            try:
                caps = json.loads(frames[3])
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ProtocolError(f"READY capabilities are not JSON: {exc}") from None
            if not isinstance(caps, dict):
                raise ProtocolError("READY capabilities must be a JSON object")
        return WorkerReady(_service_name(frames[2]), caps)
    if cmd == W_PARTIAL or cmd == W_FINAL:
        address, body = _addressed(frames, "PARTIAL/FINAL")
        return WorkerReply(address, body, cmd == W_FINAL)
    raise ProtocolError(f"unknown worker command {cmd!r}")
