"""End to end: ``tts-broker serve`` processes, real Piper synthesis, independent MDP peers."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.asr import SENTENCE, assert_heard_like_piper
from tests.conftest import EN_VOICE, PT_VOICE, Served
from tests.mdp_peers import EchoWorker, RawClient

LONG = " ".join(
    f"Sentence number {i} describes the long and winding road through the ancient forest." for i in range(40)
)


def s16(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767


# The bundled voice's worker loads both ways of streaming (``stream_mode = "auto"``); a request
# may ask for either, and each must keep the same contract.
MODES = pytest.mark.parametrize("mode", ["frames", "sentence"])


@MODES
def test_english_speech_is_intelligible_with_stream_invariants(client: RawClient, mode: str) -> None:
    s = client.request(f"r1-{mode}".encode(), {"text": SENTENCE, "stream": mode})
    client.wait(s)
    s.check_invariants()
    assert s.names()[-1] == b"end"
    start = s.json_of(b"start")
    assert start["sample_rate"] == 22050 and start["format"] == "s16le" and start["channels"] == 1
    assert start["engine"] == "piper" and start["voice"] == EN_VOICE
    assert start["worker"]["id"] and isinstance(start["worker"]["pid"], int)
    audio = s16(s.pcm())
    assert len(audio) / 22050 > 2.0
    end = s.json_of(b"end")
    assert end["samples"] == len(audio) and end["engines"] == ["piper"]
    assert end["ttfa_ms"] is not None and end["chunks"] == len(s.audio())
    assert_heard_like_piper(SENTENCE, audio, 22050, again=lambda: s16(client.whole({"text": SENTENCE, "stream": mode}).pcm()))
    # No chunk_ms: the engine's pieces as they come (by frames its windows, by sentence the
    # sentence), at most a second each (PROTOCOL.md, "Chunks"): 0.2 s or more on average.
    sizes = [len(p) // 2 for _, p in s.audio()]
    assert max(sizes) <= 22050 and len(sizes) * 4410 <= len(audio)


def test_several_streams_in_flight_on_one_socket(client: RawClient) -> None:
    texts = {b"a": "First voice line.", b"b": "Second, somewhat longer voice line here.", b"c": "Third."}
    streams = {rid: client.request(rid, {"text": t}) for rid, t in texts.items()}
    client.wait(*streams.values())
    for s in streams.values():
        s.check_invariants()
        assert s.names()[-1] == b"end" and len(s.pcm()) > 0
    # Distinct texts give distinct audio: replies were not mixed up.
    assert len({s.pcm() for s in streams.values()}) == 3


@MODES
def test_f32le_at_16khz(client: RawClient, mode: str) -> None:
    options = {"text": SENTENCE, "format": "f32le", "sample_rate": 16000, "chunk_ms": 40, "stream": mode}
    s = client.request(f"f32-{mode}".encode(), options)
    client.wait(s)
    s.check_invariants()
    start = s.json_of(b"start")
    assert (start["format"], start["sample_rate"]) == ("f32le", 16000)
    for _, pcm in s.audio():
        assert len(pcm) % 4 == 0
    audio = np.frombuffer(s.pcm(), dtype="<f4")
    assert np.all(np.abs(audio) <= 1.0) and np.abs(audio).max() > 0.1
    sizes = [len(p) for _, p in s.audio()]
    assert max(sizes) == 640 * 4 and sizes.count(640 * 4) >= len(sizes) - 2  # 40 ms at 16 kHz, but each sentence's last
    assert 2.0 < len(audio) / 16000 < 10.0
    assert_heard_like_piper(SENTENCE, audio, 16000, again=lambda: np.frombuffer(client.whole(options).pcm(), dtype="<f4"))


@MODES
def test_cancel_ends_stream_and_frees_the_worker(client: RawClient, mode: str) -> None:
    rid = f"long-{mode}".encode()
    s = client.request(rid, {"text": LONG, "stream": mode})
    while not s.audio():
        assert client.recv(30) is not None
    client.cancel(rid)
    client.wait(s, timeout=5)
    assert s.names()[-1] == b"error" and s.json_of(b"error")["code"] == "cancelled"
    s.check_invariants()
    # The only English worker stopped speaking the long text: the next request is served
    # long before the ~2 minutes of audio the long text would take.
    nxt = client.request(f"after-{mode}".encode(), {"text": "Next."})
    client.wait(nxt, timeout=20)
    assert nxt.names()[-1] == b"end"
    # The cancel itself is acknowledged on tts.cancel.
    assert any(f[2] == b"tts.cancel" and f[3:] == [rid, b"cancelled"] for f in client.other)


@pytest.mark.parametrize(
    "body, code",
    [
        (b"not json", "bad_request"),
        (b"[1, 2]", "bad_request"),
        ({"language": "en"}, "bad_request"),
        ({"text": "   "}, "bad_request"),
        ({"text": "x" * 5001}, "too_large"),
        ({"text": "hi", "format": "mp3"}, "bad_request"),
        ({"text": "hi", "sample_rate": 100}, "bad_request"),
        ({"text": "hi", "voice": "no_such_voice"}, "bad_request"),
        ({"text": "hi", "engine": "espeak"}, "bad_request"),
        ({"text": "hi", "language": "english please"}, "bad_request"),
        ({"text": "hi", "colour": "blue"}, "bad_request"),
    ],
)
def test_bad_requests_get_a_clear_error(client: RawClient, body: object, code: str) -> None:
    s = client.request(b"bad", body)
    client.wait(s, timeout=10)
    assert s.names() == [b"error"] and s.events[0][0]
    err = s.json_of(b"error")
    assert err["code"] == code and err["message"]


def test_malformed_frames_do_not_hurt_the_broker(client: RawClient, served: Served) -> None:
    junk = [
        [b"hello"],
        [b"MDPC01", b"\x01", b"tts", b"x"],
        [b"MDPC02", b"\x02", b"tts", b"x"],
        [b"MDPC02", b"\x01", b"bad service", b"x"],
        [b"MDPC02", b"\x01", b"tts"],
        [b"MDPC02", b"\x01", b"tts", b"", b"{}"],
        [b"MDPC02", b"\x01", b"tts", b"x" * 300, b"{}"],
        [b"MDPC02", b"\x01", b"tts", b"rid", b"{}", b"extra"],
    ]
    for frames in junk:
        client.sock.send_multipart(frames)
    # A worker-side impostor sending garbage is disconnected, not obeyed.
    rogue = RawClient(served.backend)
    rogue.sock.send_multipart([b"MDPW02", b"\x04", b"nobody", b"", b"x"])
    assert rogue.sock.poll(5000) and rogue.sock.recv_multipart() == [b"MDPW02", b"\x06"]
    rogue.close()
    s = client.request(b"ok", {"text": "Still here."})
    client.wait(s)
    assert s.names()[-1] == b"end"
    # Of the junk, only the request with a valid id (but 3 body frames) is answered.
    answered = [f for f in client.other if f[2] == b"tts"]
    assert [(f[1], f[3], f[4], json.loads(f[5])["code"]) for f in answered] == [(b"\x03", b"rid", b"error", "bad_request")]


def test_routing_by_language(client: RawClient) -> None:
    pt = client.request(b"pt", {"text": "Olá, aventureiros. Bem-vindos à taverna.", "language": "pt-BR"})
    en = client.request(b"en", {"text": "Hello there.", "language": "en-US"})
    de = client.request(b"de", {"text": "Hallo.", "language": "de"})  # no German voice: default language
    client.wait(pt, en, de)
    for s in (pt, en, de):
        s.check_invariants()
    assert pt.json_of(b"start")["voice"] == PT_VOICE and pt.json_of(b"start")["sample_rate"] == 16000
    assert en.json_of(b"start")["voice"] == EN_VOICE
    assert de.json_of(b"start")["voice"] == EN_VOICE
    # The fixture voice speaks a 440 Hz tone: check it is what we got.
    audio = s16(pt.pcm())
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440) < 5


def test_engine_service_addressed_directly(client: RawClient) -> None:
    s = client.request(b"direct", {"text": "Direct to the engine."}, service=f"piper.{EN_VOICE}".encode())
    client.wait(s)
    s.check_invariants()
    assert s.json_of(b"start")["voice"] == EN_VOICE


def test_mmi(client: RawClient) -> None:
    assert client.call(b"mmi.service", b"tts")[3:] == [b"200"]
    assert client.call(b"mmi.service", f"piper.{EN_VOICE}".encode())[3:] == [b"200"]
    assert client.call(b"mmi.service", b"nonexistent")[3:] == [b"404"]
    assert client.call(b"mmi.other", b"x")[3:] == [b"501"]


def test_foreign_mdp_worker_is_brokered(client: RawClient, served: Served) -> None:
    worker = EchoWorker(served.backend, b"echo")
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while client.call(b"mmi.service", b"echo")[3] != b"200":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.send(b"echo", b"hello", b"world")
        partial = client.call(b"echo")  # the PARTIAL is the first reply on "echo"
        final = client.call(b"echo")
        assert partial[1] == b"\x02" and partial[3:] == [b"partial", b"hello", b"world"]
        assert final[1] == b"\x03" and final[3:] == [b"final", b"hello", b"world"]
    finally:
        worker.stop.set()
        worker.join()
    deadline = time.monotonic() + 10
    while client.call(b"mmi.service", b"echo")[3] != b"404":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_status_service(client: RawClient) -> None:
    st = json.loads(client.call(b"tts.status", b"{}")[3])
    svc = st["services"][f"piper.{EN_VOICE}"]
    assert svc["tts"] and svc["engine"] == "piper" and svc["languages"] == ["en"]
    assert len(svc["workers"]) == 1 and svc["workers"][0]["pid"]
