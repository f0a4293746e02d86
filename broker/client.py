"""Python client: many concurrent TTS streams over one DEALER socket.

``TtsClient`` is synchronous: ``speak()`` sends a request and returns a
:class:`Stream` you iterate for events. Messages that arrive for other streams
while you iterate one are queued on those streams, so streams may be read in
any order (not thread-safe: one client per thread).

``AsyncTtsClient`` is the asyncio twin: one reader task dispatches replies to
per-stream queues.

Both take ``curve_key`` and ``broker_key`` for a broker with CURVE
(``[security] curve = true``): the client's own secret certificate and the
broker's public one, as file paths (``str``/``os.PathLike``, the files
``tts-broker keys`` writes) or as the z85 keys themselves (``bytes``). A
broker that does not know the key sends nothing back: the streams time out.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import time
from typing import Any, AsyncIterator, Iterator, Optional

import zmq
import zmq.asyncio

from . import mdp, tts
from .keys import KeySource, connecting_keys, secure_connect
from .polling import poll_ms
from .tts import Audio, End, Error, Event, Start


class TtsError(Exception):
    """A stream that ended with an ``error`` event, or a client-side timeout."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TtsTimeout(TtsError):
    def __init__(self, message: str) -> None:
        super().__init__(tts.TIMEOUT, message)


def _request_frames(service: str, rid: bytes, text: str, options: dict[str, Any]) -> list[bytes]:
    body = {"text": text, **{k: v for k, v in options.items() if v is not None}}
    return mdp.ClientRequest(service, [rid, json.dumps(body).encode()]).frames()


def _new_prefix() -> bytes:
    return os.urandom(4).hex().encode()


class _StreamState:
    """What both clients track per stream: start, end, sequence order, first-audio time."""

    def __init__(self, rid: bytes) -> None:
        self.rid = rid
        self.start: Optional[Start] = None
        self.end: Optional[End] = None
        self.done = False
        self.sent_at = time.monotonic()
        self.first_audio_at: Optional[float] = None
        self.next_seq = 0

    def _observe(self, event: Event) -> Event:
        """Record ``event``; a broken sequence becomes an ``internal`` error for this stream."""
        if isinstance(event, Start):
            self.start = event
        elif isinstance(event, Audio):
            if event.seq != self.next_seq:
                return Error(tts.INTERNAL, f"sequence gap: expected {self.next_seq}, got {event.seq}")
            self.next_seq += 1
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
        elif isinstance(event, End):
            self.end = event
        return event

    @property
    def ttfa_s(self) -> Optional[float]:
        """Seconds from sending the request to the first audio chunk, as seen by this client."""
        return None if self.first_audio_at is None else self.first_audio_at - self.sent_at


class Stream(_StreamState):
    """One request's events, in order. Iterating raises :class:`TtsError` on an ``error`` event."""

    def __init__(self, client: "TtsClient", rid: bytes) -> None:
        super().__init__(rid)
        self.client = client
        self.events: collections.deque[Event] = collections.deque()

    def __iter__(self) -> Iterator[Event]:
        while True:
            while not self.events:
                if self.done:
                    return
                self.client._pump(self)
            event = self.events.popleft()
            if isinstance(event, Error):
                if not self.done:  # a client-side error (sequence gap): stop the stream
                    self.client.cancel(self)
                    self.client._streams.pop(self.rid, None)
                    self.done = True
                    self.events.clear()
                raise TtsError(event.code, event.message)
            yield event

    def _accept(self, event: Event) -> None:
        self.events.append(self._observe(event))

    def audio(self) -> bytes:
        """Read the whole stream and return its PCM."""
        return b"".join(e.pcm for e in self if isinstance(e, Audio))

    def cancel(self) -> None:
        self.client.cancel(self)


class TtsClient:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float = 30.0,
        context: Optional[zmq.Context] = None,
        curve_key: Optional[KeySource] = None,
        broker_key: Optional[KeySource] = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        """Seconds without any message for a stream before it fails with ``timeout``."""
        curve = connecting_keys(curve_key, broker_key)  # a bad key fails here, before any socket exists
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_connect(self.sock, curve)
        # A dropped connection means the broker died or restarted: it has
        # forgotten our streams, so they fail now instead of at the timeout.
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._streams: dict[bytes, Stream] = {}
        self._replies: collections.deque[mdp.ClientReply] = collections.deque()
        self._ids = itertools.count()
        self._prefix = _new_prefix()

    def __enter__(self) -> "TtsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)

    def speak(self, text: str, *, service: str = tts.SERVICE, **options: Any) -> Stream:
        """Send a request; options are the JSON keys of PROTOCOL.md (language, voice, format…)."""
        # A disconnect notice queued while no one was reading (say the broker
        # restarted while this client was idle) concerns the streams in flight
        # now, never this one: handle it before the new stream exists.
        self._drain_monitor()
        rid = self._prefix + str(next(self._ids)).encode()
        stream = Stream(self, rid)
        self._streams[rid] = stream
        self.sock.send_multipart(_request_frames(service, rid, text, options))
        return stream

    def cancel(self, stream: Stream) -> None:
        if not stream.done:
            self.sock.send_multipart(mdp.ClientRequest(tts.CANCEL_SERVICE, [stream.rid]).frames())

    def _recv(self, timeout: float) -> Optional[mdp.ClientReply]:
        """Next valid reply within ``timeout`` seconds (malformed ones are skipped), else None."""
        deadline = time.monotonic() + timeout
        while True:
            ready = dict(self._poller.poll(poll_ms(deadline - time.monotonic())))
            if not ready:
                return None
            if self._monitor in ready:
                self._monitor.recv_multipart()
                self._connection_lost()
                return None
            try:
                return mdp.decode_client_reply(self.sock.recv_multipart())
            except mdp.ProtocolError:
                continue

    def _drain_monitor(self) -> None:
        """Handle every disconnect notice already queued, without waiting."""
        while True:
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._connection_lost()

    def _connection_lost(self) -> None:
        for stream in self._streams.values():
            stream._accept(Error(tts.UNAVAILABLE, f"lost the connection to the broker at {self.endpoint}"))
            stream.done = True
        self._streams.clear()

    def _dispatch(self, reply: mdp.ClientReply) -> None:
        """Hand one reply to its stream, or keep it for :meth:`_call`."""
        if reply.service == tts.CANCEL_SERVICE:
            return
        if reply.service == tts.STATUS_SERVICE or reply.service.startswith("mmi."):
            self._replies.append(reply)
            return
        try:
            rid, event = tts.decode_event(reply.body)
        except ValueError:
            return
        target = self._streams.get(rid)
        if target is None:
            return
        target._accept(event)
        if reply.final:
            target.done = True
            self._streams.pop(rid, None)

    def _pump(self, stream: Stream) -> None:
        """Receive until ``stream`` has an event, routing others to their streams."""
        deadline = time.monotonic() + self.timeout
        while not stream.events and not stream.done:
            reply = self._recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                if stream.done:  # the connection was lost
                    return
                self.cancel(stream)
                stream.done = True
                self._streams.pop(stream.rid, None)
                raise TtsTimeout(f"no reply within {self.timeout:g}s")
            self._dispatch(reply)

    def _call(self, service: str, body: list[bytes], timeout: float) -> Optional[mdp.ClientReply]:
        """A plain request/reply (MMI, status) that may interleave with streams."""
        self._drain_monitor()
        self.sock.send_multipart(mdp.ClientRequest(service, body).frames())
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._replies:
                if reply.service == service:
                    self._replies.remove(reply)
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            reply = self._recv(remaining)
            if reply is not None:
                self._dispatch(reply)

    def service_ready(self, service: str = tts.SERVICE, timeout: float = 2.0) -> bool:
        """MMI ``mmi.service``: True when a live worker can serve ``service`` now."""
        reply = self._call("mmi.service", [service.encode()], timeout)
        return reply is not None and reply.body[:1] == [b"200"]

    def wait_ready(self, service: str = tts.SERVICE, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.service_ready(service, timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
                return True
            time.sleep(0.1)
        return False

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        reply = self._call(tts.STATUS_SERVICE, [b"{}"], timeout)
        if reply is None:
            raise TtsTimeout(f"broker at {self.endpoint} did not answer within {timeout:g}s")
        return json.loads(reply.body[0])


class AsyncStream(_StreamState):
    def __init__(self, client: "AsyncTtsClient", rid: bytes) -> None:
        super().__init__(rid)
        self.client = client
        self.queue: asyncio.Queue[tuple[Event, bool]] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while not self.done:
            try:
                # An event already queued is taken as it is: asyncio.wait_for wrapped each get in
                # a task of its own (32 µs an event instead of 9, measured on this machine).
                event, final = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(self.client.timeout):
                        event, final = await self.queue.get()
                except TimeoutError:
                    await self.cancel()
                    self.done = True
                    raise TtsTimeout(f"no reply within {self.client.timeout:g}s") from None
            self.done = final
            event = self._observe(event)
            if isinstance(event, Error):
                self.done = True
                raise TtsError(event.code, event.message)
            yield event

    async def audio(self) -> bytes:
        return b"".join([e.pcm async for e in self if isinstance(e, Audio)])

    async def cancel(self) -> None:
        await self.client.cancel(self)


class AsyncTtsClient:
    """asyncio client; create it inside a running loop and ``await close()`` when done."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        *,
        timeout: float = 30.0,
        curve_key: Optional[KeySource] = None,
        broker_key: Optional[KeySource] = None,
    ) -> None:
        self.timeout = timeout
        curve = connecting_keys(curve_key, broker_key)
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_connect(self.sock, curve)
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self._streams: dict[bytes, AsyncStream] = {}
        self._calls: dict[str, collections.deque[asyncio.Future[mdp.ClientReply]]] = {}
        """Waiters of plain request/reply services (``tts.status``, ``mmi.*``), oldest first."""
        self._ids = itertools.count()
        self._prefix = _new_prefix()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read()), loop.create_task(self._watch())]

    async def _watch(self) -> None:
        """Fail every stream in flight when the connection to the broker drops."""
        while True:
            await self._monitor.recv_multipart()
            for stream in self._streams.values():
                stream.queue.put_nowait((Error(tts.UNAVAILABLE, "lost the connection to the broker"), True))
            self._streams.clear()

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = mdp.decode_client_reply(frames)
                if reply.service == tts.CANCEL_SERVICE:
                    continue
                if reply.service == tts.STATUS_SERVICE or reply.service.startswith("mmi."):
                    self._answer(reply)
                    continue
                rid, event = tts.decode_event(reply.body)
            except ValueError:
                continue
            stream = self._streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait((event, reply.final))
                if reply.final:
                    self._streams.pop(rid, None)

    async def speak(self, text: str, *, service: str = tts.SERVICE, **options: Any) -> AsyncStream:
        rid = self._prefix + str(next(self._ids)).encode()
        stream = AsyncStream(self, rid)
        self._streams[rid] = stream
        await self.sock.send_multipart(_request_frames(service, rid, text, options))
        return stream

    async def cancel(self, stream: AsyncStream) -> None:
        if not stream.done:
            await self.sock.send_multipart(mdp.ClientRequest(tts.CANCEL_SERVICE, [stream.rid]).frames())

    def _answer(self, reply: mdp.ClientReply) -> None:
        """Hand a plain reply to the oldest waiter of its service.

        The broker answers these services at once and in order on one socket,
        so replies match waiters first in, first out. A waiter that timed out
        has left the queue; its late reply goes to the next waiter, which for
        ``tts.status`` is an equally valid (slightly older) status."""
        waiters = self._calls.get(reply.service)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(reply)
                return

    async def _call(self, service: str, body: list[bytes], timeout: float) -> Optional[mdp.ClientReply]:
        fut: asyncio.Future[mdp.ClientReply] = asyncio.get_running_loop().create_future()
        waiters = self._calls.setdefault(service, collections.deque())
        waiters.append(fut)
        await self.sock.send_multipart(mdp.ClientRequest(service, body).frames())
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            if fut in waiters:
                waiters.remove(fut)

    async def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The broker's ``tts.status`` (PROTOCOL.md, "Status"); :class:`TtsTimeout` if it does not answer."""
        reply = await self._call(tts.STATUS_SERVICE, [b"{}"], timeout)
        if reply is None:
            raise TtsTimeout(f"broker did not answer tts.status within {timeout:g}s")
        return json.loads(reply.body[0])

    async def service_ready(self, service: str = tts.SERVICE, timeout: float = 2.0) -> bool:
        """MMI ``mmi.service``: True when a live worker can serve ``service`` now."""
        reply = await self._call("mmi.service", [service.encode()], timeout)
        return reply is not None and reply.body[:1] == [b"200"]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
