"""The Python client library (sync and asyncio) against a real ``serve``."""

from __future__ import annotations

import asyncio

import pytest

from broker.client import AsyncTtsClient, TtsClient, TtsError
from broker.tts import Audio, End, Start
from tests.conftest import EN_VOICE, Served
from tests.test_e2e import LONG


def test_sync_streams_interleave_and_finish(served: Served) -> None:
    with TtsClient(served.frontend, timeout=30) as c:
        assert c.service_ready("tts")
        a = c.speak("One small sentence.")
        b = c.speak("Another, different sentence.", format="f32le", sample_rate=24000)
        # Read b first: a's replies are queued on a meanwhile.
        events_b = list(b)
        events_a = list(a)
        for events in (events_a, events_b):
            assert isinstance(events[0], Start) and isinstance(events[-1], End)
            audio = [e for e in events if isinstance(e, Audio)]
            assert audio and [e.seq for e in audio] == list(range(len(audio)))
        assert b.start is not None and b.start.sample_rate == 24000 and b.start.format == "f32le"
        assert a.ttfa_s is not None and a.ttfa_s > 0


def test_sync_error_and_cancel(served: Served) -> None:
    with TtsClient(served.frontend) as c:
        with pytest.raises(TtsError) as err:
            c.speak("hi", voice="nobody").audio()
        assert err.value.code == "bad_request"
        s = c.speak(LONG)
        for event in s:
            if isinstance(event, Audio):
                s.cancel()
                break
        with pytest.raises(TtsError) as err:
            list(s)
        assert err.value.code == "cancelled"
        st = c.status()
        assert f"piper.{EN_VOICE}" in st["services"]


def test_asyncio_client(served: Served) -> None:
    async def main() -> None:
        c = AsyncTtsClient(served.frontend, timeout=30)
        try:
            streams = [await c.speak(t) for t in ("Async one.", "Async two, a bit longer.")]
            pcms = await asyncio.gather(*(s.audio() for s in streams))
            assert all(len(p) > 0 for p in pcms) and pcms[0] != pcms[1]
            assert all(s.end is not None and s.end.stats["engines"] == ["piper"] for s in streams)
            s = await c.speak(LONG)
            async for event in s:
                if isinstance(event, Audio):
                    await s.cancel()
                    break
            with pytest.raises(TtsError) as err:
                async for _ in s:
                    pass
            assert err.value.code == "cancelled"
        finally:
            await c.close()

    asyncio.run(main())
