"""MDP/0.2 framing (broker/mdp.py): round trips and strict rejection."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import mdp

# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]

service_names = st.text(alphabet=PRINTABLE, min_size=1, max_size=mdp.MAX_SERVICE_NAME)
addresses = st.binary(min_size=1, max_size=64)
frames_ = st.binary(max_size=64)
bodies = st.lists(frames_, max_size=6)
nonempty_bodies = st.lists(frames_, min_size=1, max_size=6)

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
capabilities = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


@given(service_names, nonempty_bodies)
def test_client_request_round_trip(service: str, body: list[bytes]) -> None:
    cmd = mdp.ClientRequest(service, body)
    frames = cmd.frames()
    assert frames[:3] == [mdp.CLIENT, mdp.C_REQUEST, service.encode()]
    assert mdp.decode_client(frames) == cmd


@given(service_names, bodies, st.booleans())
def test_client_reply_round_trip(service: str, body: list[bytes], final: bool) -> None:
    cmd = mdp.ClientReply(service, body, final)
    frames = cmd.frames()
    assert frames[1] == (mdp.C_FINAL if final else mdp.C_PARTIAL)
    assert mdp.decode_client_reply(frames) == cmd
    assert mdp.client_reply_frames(service.encode(), body, final) == frames


@given(service_names, st.none() | capabilities)
def test_worker_ready_round_trip(service: str, caps: dict | None) -> None:
    cmd = mdp.WorkerReady(service, caps)
    frames = cmd.frames()
    assert len(frames) == (3 if caps is None else 4)
    assert mdp.decode_worker(frames) == cmd


@given(addresses, nonempty_bodies)
def test_worker_request_round_trip(address: bytes, body: list[bytes]) -> None:
    cmd = mdp.WorkerRequest(address, body)
    frames = cmd.frames()
    assert frames[:4] == [mdp.WORKER, mdp.W_REQUEST, address, b""]
    assert mdp.decode_worker(frames, from_broker=True) == cmd


@given(addresses, nonempty_bodies, st.booleans())
def test_worker_reply_round_trip(address: bytes, body: list[bytes], final: bool) -> None:
    cmd = mdp.WorkerReply(address, body, final)
    frames = cmd.frames()
    assert frames[1] == (mdp.W_FINAL if final else mdp.W_PARTIAL)
    assert mdp.decode_worker(frames) == cmd


@pytest.mark.parametrize("from_broker", [False, True])
def test_heartbeat_and_disconnect_round_trip(from_broker: bool) -> None:
    assert mdp.decode_worker(mdp.WorkerHeartbeat().frames(), from_broker=from_broker) == mdp.WorkerHeartbeat()
    assert mdp.decode_worker(mdp.WorkerDisconnect().frames(), from_broker=from_broker) == mdp.WorkerDisconnect()
    assert mdp.HEARTBEAT_FRAMES == [b"MDPW02", b"\x05"]
    assert mdp.DISCONNECT_FRAMES == [b"MDPW02", b"\x06"]


def test_wire_constants() -> None:
    assert (mdp.CLIENT, mdp.WORKER) == (b"MDPC02", b"MDPW02")
    assert (mdp.C_REQUEST, mdp.C_PARTIAL, mdp.C_FINAL) == (b"\x01", b"\x02", b"\x03")
    assert [mdp.W_READY, mdp.W_REQUEST, mdp.W_PARTIAL, mdp.W_FINAL, mdp.W_HEARTBEAT, mdp.W_DISCONNECT] == [
        bytes([i]) for i in range(1, 7)
    ]


def test_service_name_limits_accepted() -> None:
    longest = "s" * 255
    assert mdp.decode_client([b"MDPC02", b"\x01", longest.encode(), b"x"]).service == longest
    assert mdp.decode_worker([b"MDPW02", b"\x01", b"!~"]).service == "!~"


# --------------------------------------------------------------------------
# Malformed client messages
# --------------------------------------------------------------------------

BAD_CLIENT = {
    "empty": [],
    "header only": [b"MDPC02"],
    "too few frames (no body)": [b"MDPC02", b"\x01", b"tts"],
    "wrong header": [b"MDPC01", b"\x01", b"tts", b"x"],
    "worker header": [b"MDPW02", b"\x01", b"tts", b"x"],
    "client sending PARTIAL": [b"MDPC02", b"\x02", b"tts", b"x"],
    "client sending FINAL": [b"MDPC02", b"\x03", b"tts", b"x"],
    "unknown command": [b"MDPC02", b"\x09", b"tts", b"x"],
    "two-byte command": [b"MDPC02", b"\x01\x01", b"tts", b"x"],
    "empty service": [b"MDPC02", b"\x01", b"", b"x"],
    "service with space": [b"MDPC02", b"\x01", b"t ts", b"x"],
    "service with control byte": [b"MDPC02", b"\x01", b"tts\n", b"x"],
    "service non-ascii": [b"MDPC02", b"\x01", "tts\u00e9".encode(), b"x"],
    "service 256 bytes": [b"MDPC02", b"\x01", b"s" * 256, b"x"],
}


@pytest.mark.parametrize("frames", BAD_CLIENT.values(), ids=BAD_CLIENT.keys())
def test_decode_client_rejects(frames: list[bytes]) -> None:
    with pytest.raises(mdp.ProtocolError):
        mdp.decode_client(frames)


BAD_CLIENT_REPLY = {
    "too few": [b"MDPC02", b"\x03"],
    "wrong header": [b"MDPW02", b"\x03", b"tts"],
    "REQUEST is not a reply": [b"MDPC02", b"\x01", b"tts", b"x"],
    "bad service": [b"MDPC02", b"\x03", b"\x00"],
}


@pytest.mark.parametrize("frames", BAD_CLIENT_REPLY.values(), ids=BAD_CLIENT_REPLY.keys())
def test_decode_client_reply_rejects(frames: list[bytes]) -> None:
    with pytest.raises(mdp.ProtocolError):
        mdp.decode_client_reply(frames)


# --------------------------------------------------------------------------
# Malformed worker messages
# --------------------------------------------------------------------------

BAD_WORKER = {
    "empty": [],
    "header only": [b"MDPW02"],
    "wrong header": [b"MDPW01", b"\x05"],
    "client header": [b"MDPC02", b"\x05"],
    "unknown command": [b"MDPW02", b"\x07"],
    "zero command": [b"MDPW02", b"\x00", b"svc"],
    "REQUEST is broker-to-worker only": [b"MDPW02", b"\x02", b"addr", b"", b"x"],
    "HEARTBEAT with extra frame": [b"MDPW02", b"\x05", b""],
    "DISCONNECT with extra frame": [b"MDPW02", b"\x06", b"x"],
    "READY without service": [b"MDPW02", b"\x01"],
    "READY with 5 frames": [b"MDPW02", b"\x01", b"svc", b"{}", b"{}"],
    "READY empty service": [b"MDPW02", b"\x01", b""],
    "READY non-printable service": [b"MDPW02", b"\x01", b"s\x7fvc"],
    "READY service with space": [b"MDPW02", b"\x01", b"my svc"],
    "READY service 256 bytes": [b"MDPW02", b"\x01", b"s" * 256],
    "READY caps not JSON": [b"MDPW02", b"\x01", b"svc", b"{not json"],
    "READY caps not UTF-8": [b"MDPW02", b"\x01", b"svc", b"\xff\xfe\xfa"],
    "READY caps empty frame": [b"MDPW02", b"\x01", b"svc", b""],
    "READY caps a list": [b"MDPW02", b"\x01", b"svc", b"[1, 2]"],
    "READY caps a string": [b"MDPW02", b"\x01", b"svc", b'"tts/1"'],
    "READY caps null": [b"MDPW02", b"\x01", b"svc", b"null"],
    "PARTIAL too few frames": [b"MDPW02", b"\x03", b"addr", b""],
    "FINAL too few frames": [b"MDPW02", b"\x04", b"addr"],
    "PARTIAL empty address": [b"MDPW02", b"\x03", b"", b"", b"x"],
    "FINAL empty address": [b"MDPW02", b"\x04", b"", b"", b"x"],
    "PARTIAL missing delimiter": [b"MDPW02", b"\x03", b"addr", b"x", b"y"],
    "FINAL missing delimiter": [b"MDPW02", b"\x04", b"addr", b"rid", b"end", b"{}"],
}


@pytest.mark.parametrize("frames", BAD_WORKER.values(), ids=BAD_WORKER.keys())
def test_decode_worker_rejects(frames: list[bytes]) -> None:
    with pytest.raises(mdp.ProtocolError):
        mdp.decode_worker(frames)


BAD_TO_WORKER = {
    "READY from broker": [b"MDPW02", b"\x01", b"svc"],
    "PARTIAL from broker": [b"MDPW02", b"\x03", b"addr", b"", b"x"],
    "FINAL from broker": [b"MDPW02", b"\x04", b"addr", b"", b"x"],
    "REQUEST too few frames": [b"MDPW02", b"\x02", b"addr", b""],
    "REQUEST empty address": [b"MDPW02", b"\x02", b"", b"", b"x"],
    "REQUEST missing delimiter": [b"MDPW02", b"\x02", b"addr", b"x", b"y"],
    "HEARTBEAT with extra frame": [b"MDPW02", b"\x05", b"x"],
    "wrong header": [b"MDPC02", b"\x02", b"addr", b"", b"x"],
}


@pytest.mark.parametrize("frames", BAD_TO_WORKER.values(), ids=BAD_TO_WORKER.keys())
def test_decode_worker_from_broker_rejects(frames: list[bytes]) -> None:
    with pytest.raises(mdp.ProtocolError):
        mdp.decode_worker(frames, from_broker=True)


def test_protocol_error_is_value_error() -> None:
    assert issubclass(mdp.ProtocolError, ValueError)


def test_ready_with_deeply_nested_capabilities_is_protocol_error() -> None:
    with pytest.raises(mdp.ProtocolError):
        mdp.decode_worker([b"MDPW02", b"\x01", b"svc", b"[" * 100_000])


# --------------------------------------------------------------------------
# Total functions: arbitrary input either decodes or raises ProtocolError
# --------------------------------------------------------------------------

# Bias towards the real headers and command bytes so the interesting branches
# are actually reached, while still allowing anything.
any_frame = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"MDPC02", b"MDPW02", b"", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"tts", b"{}", b"[]"]),
)
any_frames = st.lists(any_frame, max_size=8)
plausible_frames = st.tuples(st.sampled_from([b"MDPC02", b"MDPW02"]), st.sampled_from([bytes([i]) for i in range(8)]), st.lists(any_frame, max_size=6)).map(
    lambda t: [t[0], t[1], *t[2]]
)


def _only_protocol_errors(fn, frames):  # type: ignore[no-untyped-def]
    try:
        result = fn(frames)
    except mdp.ProtocolError:
        return None
    return result


@settings(max_examples=400)
@given(any_frames | plausible_frames)
def test_decode_worker_is_total(frames: list[bytes]) -> None:
    result = _only_protocol_errors(mdp.decode_worker, frames)
    assert result is None or isinstance(
        result, (mdp.WorkerReady, mdp.WorkerReply, mdp.WorkerHeartbeat, mdp.WorkerDisconnect)
    )
    result = _only_protocol_errors(lambda f: mdp.decode_worker(f, from_broker=True), frames)
    assert result is None or isinstance(result, (mdp.WorkerRequest, mdp.WorkerHeartbeat, mdp.WorkerDisconnect))


@settings(max_examples=400)
@given(any_frames | plausible_frames)
def test_decode_client_is_total(frames: list[bytes]) -> None:
    result = _only_protocol_errors(mdp.decode_client, frames)
    assert result is None or isinstance(result, mdp.ClientRequest)
    if result is not None:
        # Whatever decodes re-encodes to the same frames.
        assert result.frames() == frames
    result = _only_protocol_errors(mdp.decode_client_reply, frames)
    assert result is None or isinstance(result, mdp.ClientReply)


@settings(max_examples=200)
@given(service_names, capabilities)
def test_ready_capabilities_survive_json(service: str, caps: dict) -> None:
    frames = [b"MDPW02", b"\x01", service.encode(), json.dumps(caps).encode()]
    assert mdp.decode_worker(frames).capabilities == caps
