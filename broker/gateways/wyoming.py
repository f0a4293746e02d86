"""Wyoming gateway: Home Assistant's TTS protocol in front of the broker.

Built on the ``wyoming`` package's own server and events (its framing is not
re-implemented here). One :class:`BrokerHandler` per connection:

* ``describe`` → ``info`` listing the broker's live voices and languages
  (``tts.status``, fetched fresh for each describe);
* ``synthesize`` → one broker request; ``audio-start`` when the broker's first
  audio arrives, then one ``audio-chunk`` per broker chunk as it arrives,
  ``audio-stop`` at the end;
* ``synthesize-start`` / ``synthesize-chunk`` / ``synthesize-stop`` (text
  streaming): the text is spoken as whole sentences become available, one
  broker request at a time, each carrying every sentence finished so far, so
  speech starts with the first sentence while the rest is still being written;
  the audio is one ``audio-start`` … ``audio-stop`` followed by
  ``synthesize-stopped``. A ``synthesize`` inside such a session is the
  compatibility copy of the same text Home Assistant sends, and is ignored (as
  wyoming-piper does);
* a broker error → an ``error`` event with the broker's ``code`` and message;
* a client that disconnects has its stream cancelled at the broker
  (``tts.cancel``): synthesis runs in a task of its own while the connection
  keeps being read, so the end of the connection is seen at once (a client
  that only shuts down its sending side is taken as gone too: the package's
  handler closes the connection at the end of its input).

Voice selection: ``voice.name`` a voice from ``info`` (or any voice or speaker
the broker knows), ``voice.language`` a language tag; see :mod:`.voices`.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Awaitable, Callable, Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error as WyomingError
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from engines.text import whole_sentences

from .. import __version__, tts
from ..client import AsyncTtsClient, TtsError
from ..keys import KeySource
from . import stop_on_signals
from .voices import VoiceCatalog

log = logging.getLogger("broker.gateway.wyoming")

ATTRIBUTION = {
    "piper": Attribution(name="Piper (piper-tts)", url="https://github.com/OHF-Voice/piper1-gpl"),
    "xtts": Attribution(name="Coqui XTTS v2 (coqui-tts)", url="https://github.com/idiap/coqui-ai-TTS"),
}
PROGRAM = Attribution(name="tts-broker", url="https://rfc.zeromq.org/spec/18/")

Format = tuple[int, int, int]
"""Wyoming's audio format: rate (Hz), width (bytes), channels."""


class Gateway:
    """What every connection shares: one broker client (one DEALER socket) and the voice catalogue."""

    def __init__(self, client: AsyncTtsClient) -> None:
        self.client = client
        self.catalog = VoiceCatalog(client)

    async def info(self) -> Info:
        voices = [
            TtsVoice(
                name=v.name,
                attribution=ATTRIBUTION.get(v.engine, Attribution(name=v.engine, url="")),
                installed=True,
                description=f"{v.engine} voice, {v.workers} live worker{'s' if v.workers != 1 else ''}",
                version=None,
                languages=list(v.languages),
            )
            for v in await self.catalog.voices(fresh=True)
        ]
        program = TtsProgram(
            name="tts-broker",
            attribution=PROGRAM,
            installed=True,
            description="ZeroMQ TTS broker: frame-streamed Piper, XTTS fallback, failover mid-utterance",
            version=__version__,
            voices=voices,
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program])


class _TextStream:
    """The text of one ``synthesize-start`` … ``synthesize-stop`` session, handed out a sentence at a time."""

    def __init__(self, voice: Optional[SynthesizeVoice]) -> None:
        self.voice = voice
        self.buffer = ""
        self.finished = False
        self.changed = asyncio.Event()

    def add(self, text: str) -> None:
        self.buffer += text
        self.changed.set()

    def finish(self) -> None:
        self.finished = True
        self.changed.set()

    async def next_text(self) -> Optional[str]:
        """Every whole sentence received so far (all the rest once finished); None at the end."""
        while True:
            cut = len(self.buffer) if self.finished else whole_sentences(self.buffer)
            if cut and self.buffer[:cut].strip():
                text, self.buffer = self.buffer[:cut], self.buffer[cut:]
                return text
            if self.finished:
                return None
            self.changed.clear()
            await self.changed.wait()


class BrokerHandler(AsyncEventHandler):
    """One Wyoming connection."""

    def __init__(self, gateway: Gateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.gw = gateway
        self.peer = writer.get_extra_info("peername")
        self._text: Optional[_TextStream] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: Optional[asyncio.Task[None]] = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            try:
                info = await self.gw.info()
            except TtsError as exc:
                await self.write_event(WyomingError(text=exc.message, code=exc.code).event())
                return True
            await self.write_event(info.event())
            return True
        if Synthesize.is_type(event.type):
            if self._text is None:  # inside a text stream it is the compatibility copy
                syn = Synthesize.from_event(event)
                self._after(partial(self._synthesize, syn.text, syn.voice))
            return True
        if SynthesizeStart.is_type(event.type):
            if self._text is not None:  # a new session without a stop: the open one ends with what it has
                self._text.finish()
            self._text = _TextStream(SynthesizeStart.from_event(event).voice)
            self._after(partial(self._synthesize_stream, self._text))
            return True
        if SynthesizeChunk.is_type(event.type):
            if self._text is not None:
                self._text.add(SynthesizeChunk.from_event(event).text)
            return True
        if SynthesizeStop.is_type(event.type):
            if self._text is not None:
                self._text.finish()
                self._text = None
            return True
        return True

    def _after(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` once the previous synthesis of this connection has ended (its audio stays in order)."""
        previous = self._last

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await job()
            except ConnectionError as exc:  # the client went away while we wrote; its stream was cancelled
                log.info("wyoming %s: connection lost: %s", self.peer, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._last = task

    async def disconnect(self) -> None:
        """The client went away: cancel what it was still owed (each task cancels its broker stream)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    async def _synthesize(self, text: str, voice: Optional[SynthesizeVoice]) -> None:
        ok, fmt = await self._relay(text, voice, None)
        if ok and fmt is not None:
            await self.write_event(AudioStop().event())

    async def _synthesize_stream(self, stream: _TextStream) -> None:
        fmt: Optional[Format] = None
        while (text := await stream.next_text()) is not None:
            ok, fmt = await self._relay(text, stream.voice, fmt)
            if not ok:
                return  # the error event ends the session
        if fmt is not None:
            await self.write_event(AudioStop().event())
        await self.write_event(SynthesizeStopped().event())

    async def _relay(self, text: str, voice: Optional[SynthesizeVoice], fmt: Optional[Format]) -> tuple[bool, Optional[Format]]:
        """Speak ``text`` at the broker and relay its audio as it arrives, with ``audio-start`` first
        unless ``fmt`` says it was already sent (a text stream's later sentences).

        Returns (whether the stream ended well, the audio format once audio was sent); a broker
        error is sent as an ``error`` event."""
        try:
            options = await self.gw.catalog.options(voice.name if voice else None, voice.language if voice else None)
            if fmt is not None:  # one audio-start per text stream: later sentences at its rate, whichever engine speaks them
                options["sample_rate"] = fmt[0]
            stream = await self.gw.client.speak(text, **options)
        except TtsError as exc:  # the broker did not answer tts.status
            await self.write_event(WyomingError(text=exc.message, code=exc.code).event())
            return False, fmt
        rid = stream.rid.decode()
        try:
            async for event in stream:
                if isinstance(event, tts.Audio):
                    if fmt is None:
                        start = stream.start
                        assert start is not None
                        fmt = (start.sample_rate, tts.SAMPLE_WIDTH[start.format], start.channels)
                        await self.write_event(AudioStart(rate=fmt[0], width=fmt[1], channels=fmt[2]).event())
                    await self.write_event(AudioChunk(rate=fmt[0], width=fmt[1], channels=fmt[2], audio=event.pcm).event())
            end = stream.end.stats if stream.end else {}
            log.info("wyoming %s r=%s: %d chunks, %s s of audio, first audio %s ms (broker), engine %s",
                     self.peer, rid, stream.next_seq, end.get("audio_s"), end.get("ttfa_ms"), stream.start.engine if stream.start else None)
            return True, fmt
        except TtsError as exc:
            log.info("wyoming %s r=%s: broker error %s: %s", self.peer, rid, exc.code, exc.message)
            await self.write_event(WyomingError(text=exc.message, code=exc.code).event())
            return False, fmt
        except (asyncio.CancelledError, ConnectionError):
            log.info("wyoming %s r=%s: client gone after %d chunks; cancelling at the broker", self.peer, rid, stream.next_seq)
            raise
        finally:
            if not stream.done:
                await stream.cancel()


async def serve(broker: str, uri: str, *, curve_key: Optional[KeySource] = None, broker_key: Optional[KeySource] = None,
                ready: Optional[Callable[[], None]] = None) -> None:
    """Run the gateway on ``uri`` (``tcp://HOST:PORT``, ``unix://PATH``) until SIGTERM / SIGINT."""
    client = AsyncTtsClient(broker, timeout=60.0, curve_key=curve_key, broker_key=broker_key)
    gateway = Gateway(client)
    server = AsyncServer.from_uri(uri)
    stopping = stop_on_signals()
    try:
        await server.start(partial(BrokerHandler, gateway))
        log.info("wyoming gateway on %s, broker %s", uri, broker)
        if ready is not None:
            ready()
        await stopping.wait()
        log.info("wyoming gateway stopping")
        await server.stop()
    finally:
        await client.close()
