"""The OpenAI-compatible HTTP gateway under ``serve``, driven by httpx."""

from __future__ import annotations

import io
import os
import signal
import struct

import httpx
import numpy as np
import pytest
import soundfile

from tests.asr import SENTENCE, assert_heard_like_piper
from tests.conftest import EN_VOICE, STORY, Gatewayed
from tests.gateway_util import busy_pid, idle, status, wait_for


def speech(**body: object) -> dict[str, object]:
    return {"model": "tts-1", "voice": EN_VOICE, **body}


def test_pcm_streams_in_pieces_while_the_broker_is_still_speaking(gateways: Gatewayed) -> None:
    wait_for(gateways.served, idle)
    pieces: list[bytes] = []
    inflight_after_first = None
    with httpx.Client(base_url=gateways.http_url, timeout=60) as http:
        with http.stream("POST", "/v1/audio/speech", json=speech(input=STORY, response_format="pcm")) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"] == "audio/pcm" and r.headers["transfer-encoding"] == "chunked"
            assert r.headers["x-sample-rate"] == "24000"  # OpenAI's pcm
            for piece in r.iter_raw():
                if not pieces:
                    # The first audio is here and the broker has not finished: nothing was gathered.
                    inflight_after_first = status(gateways.served)["inflight"]
                pieces.append(piece)
    assert inflight_after_first == 1
    assert len(pieces) >= 5
    pcm = b"".join(pieces)
    assert len(pcm) % 2 == 0 and len(pcm) / 2 / 24000 > 20  # eight sentences of speech


def test_wav_has_a_streaming_header_soundfile_reads(gateways: Gatewayed) -> None:
    text = SENTENCE
    post = lambda: httpx.post(f"{gateways.http_url}/v1/audio/speech", json=speech(input=text, response_format="wav"), timeout=60)  # noqa: E731
    r = post()
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    body = r.content
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt " and body[36:40] == b"data"
    assert struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF  # length unknown when the header went out
    fmt, channels, rate, byte_rate, block, bits = struct.unpack("<HHIIHH", body[20:36])
    assert (fmt, channels, rate, byte_rate, block, bits) == (1, 1, 22050, 44100, 2, 16)
    audio, sr = soundfile.read(io.BytesIO(body), dtype="float32")
    info = soundfile.info(io.BytesIO(body))
    assert sr == 22050 and info.channels == 1 and info.subtype == "PCM_16"
    assert len(audio) == (len(body) - 44) // 2
    assert_heard_like_piper(text, audio, sr, again=lambda: soundfile.read(io.BytesIO(post().content), dtype="float32")[0])


def test_default_format_is_wav_and_speed_sample_rate_and_priority_are_honoured(gateways: Gatewayed) -> None:
    base = {"model": "tts-1", "voice": "alloy", "input": "Roll for initiative, adventurers."}  # an OpenAI stock voice
    with httpx.Client(base_url=gateways.http_url, timeout=60) as http:
        normal = http.post("/v1/audio/speech", json=base)
        fast = http.post("/v1/audio/speech", json={**base, "speed": 2.0, "response_format": "pcm", "sample_rate": 16000, "priority": 1})
    assert normal.status_code == 200 and normal.headers["content-type"] == "audio/wav"
    assert fast.status_code == 200 and fast.headers["x-sample-rate"] == "16000"
    normal_s = (len(normal.content) - 44) / 2 / 22050
    fast_s = len(fast.content) / 2 / 16000
    assert 0.3 < fast_s / normal_s < 0.75


@pytest.mark.parametrize(
    "body, field, code",
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        ({"model": "tts-1", "voice": EN_VOICE}, "input", "missing_field"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "  \n "}, "input", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "response_format": "mp3"}, "response_format", "unsupported_format"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "response_format": "ogg"}, "response_format", "unsupported_format"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "speed": 10}, "speed", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "speed": 0.1}, "speed", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "speed": "fast"}, "speed", "invalid_value"),
        ({"model": "tts-9", "voice": EN_VOICE, "input": "Hi."}, "model", "model_not_found"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "x" * 5000}, "input", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "volume": 3}, "volume", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "stream_format": "sse"}, "stream_format", "invalid_value"),
        ({"model": "tts-1", "voice": EN_VOICE, "input": "Hi.", "priority": 11}, "priority", "invalid_value"),
    ],
    ids=["bad-json", "not-object", "no-input", "blank-input", "mp3", "ogg", "speed-high", "speed-low", "speed-text",
         "unknown-model", "input-too-long", "unknown-key", "sse", "priority-high"],
)
def test_bad_input_is_a_400_with_a_json_error(gateways: Gatewayed, body: object, field: str | None, code: str) -> None:
    url = f"{gateways.http_url}/v1/audio/speech"
    r = httpx.post(url, content=body, timeout=30) if isinstance(body, bytes) else httpx.post(url, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
    if field is not None:
        assert err["param"] == field and err["message"].startswith(field)
    if code == "unsupported_format":
        assert "pcm, wav" in err["message"]


def test_unknown_voice_is_the_brokers_bad_request_as_a_400(gateways: Gatewayed) -> None:
    r = httpx.post(f"{gateways.http_url}/v1/audio/speech", json=speech(input="Hi.", voice="no_such-voice"), timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "bad_request" and "no_such-voice" in err["message"] and EN_VOICE in err["message"]


def test_wrong_method_and_path_are_json_errors(gateways: Gatewayed) -> None:
    with httpx.Client(base_url=gateways.http_url, timeout=30) as http:
        get = http.get("/v1/audio/speech")
        missing = http.get("/v1/nothing")
    assert get.status_code == 405 and get.json()["error"]["code"] == "method_not_allowed"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_models_voices_and_status(gateways: Gatewayed) -> None:
    with httpx.Client(base_url=gateways.http_url, timeout=30) as http:
        models = http.get("/v1/models").json()
        voices = http.get("/v1/voices").json()
        st = http.get("/v1/status").json()
        page = http.get("/")
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and "tts-1" in ids and "piper" in ids
    [voice] = voices["voices"]
    assert voice == {"id": EN_VOICE, "name": EN_VOICE, "engine": "piper", "languages": ["en"], "workers": 2}
    assert "alloy" in voices["aliases"]
    assert len(st["broker"]["services"][f"piper.{EN_VOICE}"]["workers"]) == 2
    assert page.status_code == 200 and "window.ttsPage" in page.text


def test_client_disconnect_cancels_at_the_broker(gateways: Gatewayed) -> None:
    wait_for(gateways.served, idle)
    before = status(gateways.served)["counters"]
    with httpx.Client(base_url=gateways.http_url, timeout=60) as http:
        with http.stream("POST", "/v1/audio/speech", json=speech(input=STORY, response_format="pcm")) as r:
            assert r.status_code == 200
            next(r.iter_raw())
    # Leaving the block closed the connection with most of the story unsent.
    after = wait_for(gateways.served, lambda st: st["counters"]["cancelled"] > before["cancelled"] and idle(st))["counters"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_kill_9_of_the_serving_worker_mid_request_still_gives_the_whole_audio(gateways: Gatewayed) -> None:
    def story_through_a_kill() -> tuple[np.ndarray, int]:
        """The story as WAV, its serving worker killed at the first piece of the body."""
        pieces = []
        with httpx.Client(base_url=gateways.http_url, timeout=120) as http:
            with http.stream("POST", "/v1/audio/speech", json=speech(input=STORY, response_format="wav")) as r:
                assert r.status_code == 200
                for piece in r.iter_raw():
                    if not pieces:
                        os.kill(busy_pid(status(gateways.served)), signal.SIGKILL)
                    pieces.append(piece)
        return soundfile.read(io.BytesIO(b"".join(pieces)), dtype="float32")

    wait_for(gateways.served, idle)
    before = status(gateways.served)["counters"]
    audio, sr = story_through_a_kill()
    after = wait_for(gateways.served, lambda st: idle(st))["counters"]
    assert after["failovers"] == before["failovers"] + 1 and after["completed"] == before["completed"] + 1
    assert len(audio) / sr > 20  # the whole story, not the piece before the kill

    def again() -> np.ndarray:
        wait_for(gateways.served, idle)  # the killed worker restarted
        return story_through_a_kill()[0]

    assert_heard_like_piper(STORY, audio, sr, again=again)
