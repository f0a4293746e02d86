"""The Python client library (sync and asyncio) against a real ``serve``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from broker import mdp, tts
from broker.client import AsyncTtsClient, TtsClient, TtsError, TtsTimeout
from broker.tts import Audio, End, Start
from tests.conftest import EN_VOICE, ROOT, Served, free_port, stop_serve, wait_services
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


def serve_on(tmp: Path, frontend: str, backend: str) -> Served:
    """``tts-broker serve`` (default configuration: one English Piper worker) on fixed endpoints,
    so that it can be restarted where its clients stay connected."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "serve.log"
    argv = [sys.executable, "-m", "broker.cli", "serve", "--frontend", frontend, "--backend", backend]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Served(proc, frontend, backend, log)


def test_new_stream_after_broker_restart_while_idle(tmp_path: Path) -> None:
    """The broker restarts while both clients are idle (no stream in flight). The disconnect
    notice that the restart leaves queued concerns no stream: the next stream must be served
    by the new broker, not fail with ``unavailable`` while that broker synthesises it."""
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    running = [serve_on(tmp_path / "first", fe, be)]

    def restart() -> None:
        old = running.pop()
        rc = stop_serve(old)
        assert rc == 0, f"serve exited with {rc}; log:\n{old.log_text()[-3000:]}"
        running.append(serve_on(tmp_path / "second", fe, be))
        wait_services(fe, ["tts"], timeout=120)

    async def main() -> None:
        wait_services(fe, ["tts"], timeout=120)
        sync_client = TtsClient(fe, timeout=30)
        async_client = AsyncTtsClient(fe, timeout=30)
        try:
            assert sync_client.speak("Before the restart.").audio()
            assert await (await async_client.speak("Async, before the restart.")).audio()
            # Restart off the event loop, which keeps running as an idle application's would.
            await asyncio.get_running_loop().run_in_executor(None, restart)
            s = sync_client.speak("After the restart.")
            assert s.audio(), "no audio after the restart"
            assert s.end is not None and s.end.stats["engines"] == ["piper"]
            a = await async_client.speak("Async, after the restart.")
            assert await a.audio()
            assert a.end is not None
            # Nothing was left behind: no orphan stream in flight at the new broker.
            assert sync_client.status()["inflight"] == 0
        finally:
            sync_client.close()
            await async_client.close()

    try:
        asyncio.run(main())
    finally:
        for s in running:
            rc = stop_serve(s)
            assert rc == 0, f"serve exited with {rc}; log:\n{s.log_text()[-3000:]}"


def test_a_stream_with_no_reply_times_out_and_is_cancelled_at_the_broker() -> None:
    """Both clients: a broker that takes the request and says nothing fails the stream with
    ``timeout`` after ``timeout`` seconds, and is told to cancel it."""
    ctx = zmq.Context.instance()
    mute = ctx.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    mute.bind(endpoint)

    def cancel_follows(rid: bytes) -> None:
        request = mdp.decode_client(mute.recv_multipart()[1:])
        assert request.service == tts.SERVICE and request.body[0] == rid
        assert mute.poll(5000), "no cancel"
        cancel = mdp.decode_client(mute.recv_multipart()[1:])
        assert cancel.service == tts.CANCEL_SERVICE and cancel.body == [rid]

    try:
        with TtsClient(endpoint, timeout=0.3) as c:
            stream = c.speak("Nobody answers.")
            with pytest.raises(TtsTimeout):
                list(stream)
            cancel_follows(stream.rid)

        async def main() -> bytes:
            c = AsyncTtsClient(endpoint, timeout=0.3)
            try:
                stream = await c.speak("Nobody answers.")
                with pytest.raises(TtsTimeout):
                    await stream.audio()
                return stream.rid
            finally:
                await c.close()

        cancel_follows(asyncio.run(main()))
    finally:
        mute.close(linger=0)
