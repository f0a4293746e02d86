"""The Wyoming gateway under ``serve``, driven by the ``wyoming`` package's own async client."""

from __future__ import annotations

import asyncio
from typing import Optional

import numpy as np

from engines.audio import PIECE_MAX_MS
from tests.asr import SENTENCE, assert_heard_like_piper
from tests.conftest import EN_VOICE, STORY, Gatewayed
from tests.gateway_util import idle, status, wait_for
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

CHUNK_BYTES = 22050 * 2 * PIECE_MAX_MS // 1000
"""The broker's longest default chunk (the engine's pieces, cut at a second) of 16-bit audio at 22,050 Hz: no relayed chunk is larger."""


def client(g: Gatewayed) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", g.wyoming_port, connect_timeout=10, read_timeout=60)


async def read_until(c: AsyncTcpClient, *types: str) -> list[Event]:
    """Events up to and including the first of ``types`` (or an error)."""
    events = []
    while True:
        event = await c.read_event()
        assert event is not None, f"connection closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in types or Error.is_type(event.type):
            return events


def audio_of(events: list[Event]) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


def test_describe_lists_the_brokers_live_voices(gateways: Gatewayed) -> None:
    async def go() -> Info:
        async with client(gateways) as c:
            await c.write_event(Describe().event())
            [event] = await read_until(c, "info")
            return Info.from_event(event)

    info = asyncio.run(go())
    [program] = info.tts
    assert program.supports_synthesize_streaming and program.installed
    voices = {v.name: v for v in program.voices}
    assert set(voices) == {EN_VOICE}
    assert voices[EN_VOICE].languages == ["en"] and "2 live workers" in (voices[EN_VOICE].description or "")


def test_synthesize_relays_the_brokers_chunks_as_they_come(gateways: Gatewayed) -> None:
    text = SENTENCE

    async def go() -> list[Event]:
        async with client(gateways) as c:
            await c.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=EN_VOICE)).event())
            return await read_until(c, "audio-stop")

    before = status(gateways.served)["counters"]
    events = asyncio.run(go())
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types[-1] == "audio-stop", types
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (22050, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert len(chunks) == len(events) - 2 and len(chunks) >= 3
    # One Wyoming chunk per broker chunk (the engine's pieces, at most a second each), not the utterance gathered.
    assert all(0 < len(c.audio) <= CHUNK_BYTES and len(c.audio) % 2 == 0 for c in chunks)
    audio = np.frombuffer(audio_of(events), "<i2").astype(np.float32) / 32767
    after = wait_for(gateways.served, idle)["counters"]
    assert after["completed"] == before["completed"] + 1
    assert_heard_like_piper(text, audio, 22050, again=lambda: np.frombuffer(audio_of(asyncio.run(go())), "<i2").astype(np.float32) / 32767)


def test_streaming_synthesize_speaks_before_the_text_is_finished(gateways: Gatewayed) -> None:
    async def go() -> tuple[list[Event], list[Event]]:
        async with client(gateways) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(language="en")).event())
            await c.write_event(SynthesizeChunk(text="The dragon sleeps ").event())
            await c.write_event(SynthesizeChunk(text="beneath the mountain. Gather").event())
            # The first sentence is whole: its audio comes while the text is still open.
            first = await read_until(c, "audio-chunk")
            await c.write_event(SynthesizeChunk(text=" your courage and follow me.").event())
            await c.write_event(Synthesize(text=SENTENCE).event())  # HA's copy
            await c.write_event(SynthesizeStop().event())
            rest = await read_until(c, "synthesize-stopped")
            return first, rest

    first, rest = asyncio.run(go())
    assert [e.type for e in first] == ["audio-start", "audio-chunk"]
    types = [e.type for e in first + rest]
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1, types
    assert types[-2:] == ["audio-stop", "synthesize-stopped"]
    assert set(types[1:-2]) == {"audio-chunk"}
    audio = np.frombuffer(audio_of(first + rest), "<i2").astype(np.float32) / 32767
    # Both sentences, once each (the compatibility copy was not spoken again).
    assert len(audio) / 22050 < 8.0
    wait_for(gateways.served, idle)

    def again() -> np.ndarray:
        first, rest = asyncio.run(go())
        return np.frombuffer(audio_of(first + rest), "<i2").astype(np.float32) / 32767

    assert_heard_like_piper(SENTENCE, audio, 22050, "streamed", again=again)


def test_disconnect_mid_stream_cancels_at_the_broker(gateways: Gatewayed) -> None:
    wait_for(gateways.served, idle)
    before = status(gateways.served)["counters"]

    async def go() -> None:
        c = client(gateways)
        await c.connect()
        await c.write_event(Synthesize(text=STORY).event())
        await read_until(c, "audio-chunk")
        await c.disconnect()

    asyncio.run(go())
    after = wait_for(gateways.served, lambda st: st["counters"]["cancelled"] > before["cancelled"] and idle(st))["counters"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_unknown_voice_gets_an_error_event_with_the_brokers_code(gateways: Gatewayed) -> None:
    async def go() -> Optional[Event]:
        async with client(gateways) as c:
            await c.write_event(Synthesize(text="Hello.", voice=SynthesizeVoice(name="no_such-voice")).event())
            return (await read_until(c, "audio-stop"))[-1]

    event = asyncio.run(go())
    assert event is not None and Error.is_type(event.type)
    err = Error.from_event(event)
    assert err.code == "bad_request" and "no_such-voice" in err.text and EN_VOICE in err.text


def test_a_connection_speaks_several_requests_in_order(gateways: Gatewayed) -> None:
    async def go() -> list[Event]:
        async with client(gateways) as c:
            await c.write_event(Synthesize(text="One.").event())
            await c.write_event(Synthesize(text="Two, three and four.").event())
            first = await read_until(c, "audio-stop")
            second = await read_until(c, "audio-stop")
            return [first, second]

    first, second = asyncio.run(go())
    assert [e.type for e in first][0] == "audio-start" and [e.type for e in second][0] == "audio-start"
    assert 0 < len(audio_of(first)) < len(audio_of(second))
    assert AudioStop.is_type(first[-1].type) and AudioStop.is_type(second[-1].type)
