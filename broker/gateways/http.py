"""OpenAI-compatible HTTP gateway, and the web page, on aiohttp.

Why aiohttp: it is asyncio-native like the broker's async client, one
package serves streamed (chunked) responses without a separate ASGI server,
and it was already in the dependency tree (pinned in constraints.txt).

Endpoints (README "HTTP gateway" documents them):

* ``POST /v1/audio/speech`` — OpenAI's body (``model``, ``input``, ``voice``,
  ``response_format`` ``pcm``/``wav``, ``speed``); the body streams with chunked
  transfer encoding, one write per broker chunk as it arrives. ``pcm`` is
  OpenAI's raw 24 kHz 16-bit mono; ``wav`` a streaming header (sizes unknown)
  then 16-bit PCM at the voice's own rate. Headers go out with the first audio,
  so a request the broker refuses gets a real status and a JSON error.
* ``GET /v1/models``, ``GET /v1/voices``, ``GET /v1/status`` (for the page);
* ``GET /`` — the web page (``broker/web/index.html``).

Bad input is answered 4xx with OpenAI's error body
``{"error": {"message", "type", "code"}}``, never a 500. A client that
disconnects mid-stream has its stream cancelled at the broker (aiohttp's
handler cancellation is on: the handler is cancelled when the connection goes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engines import registry as engines

from .. import __version__, tts
from ..client import AsyncTtsClient, TtsError
from ..keys import KeySource
from . import stop_on_signals
from .errors import error_type, http_status
from .voices import VoiceCatalog
from .wav import streaming_header

log = logging.getLogger("broker.gateway.http")

WEB_PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"
SUPPORTED_FORMATS = ("pcm", "wav")
UNSUPPORTED_FORMATS = ("mp3", "opus", "aac", "flac")
"""OpenAI's other formats: answered 400 naming the supported ones (no encoder is shipped)."""
PCM_RATE = 24000
"""OpenAI's ``pcm``: 24 kHz, 16-bit signed little-endian, mono."""
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
"""OpenAI model names, accepted as "any engine"; an engine name (``piper``, ``xtts``) restricts to it."""
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer", "verse")
"""OpenAI's stock voices, accepted as "the broker's default voice" so that stock clients work."""
MAX_INPUT = 4096
"""OpenAI's limit on ``input``, in characters (the broker's own ``max_text_chars`` applies too)."""
MAX_BODY = 64 * 1024


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``: OpenAI's keys, plus ``language``, ``sample_rate`` and ``priority`` (ours)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=100)
    input: str = Field(min_length=1, max_length=MAX_INPUT)
    voice: str = Field(min_length=1, max_length=200)
    response_format: str = "wav"
    """OpenAI's default is mp3, which is not offered: the default here is wav."""
    speed: float = Field(default=1.0, gt=0.25, le=4.0, allow_inf_nan=False)
    instructions: Optional[str] = Field(default=None, max_length=4096)
    """Accepted for compatibility and ignored (no engine here takes style instructions)."""
    stream_format: Literal["audio"] = "audio"
    """OpenAI's ``sse`` is not offered: audio streams as the body."""
    language: Optional[str] = Field(default=None, pattern=r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
    """Ours: a language tag; default, the voice's own language."""
    sample_rate: Optional[int] = Field(default=None, ge=tts.MIN_RATE, le=tts.MAX_RATE)
    """Ours: output rate; default 24000 for pcm (OpenAI's), the voice's own rate for wav."""
    priority: Optional[int] = Field(default=None, ge=-tts.MAX_PRIORITY, le=tts.MAX_PRIORITY)
    """Ours: the request's ``priority`` (PROTOCOL.md, "Priority"); default 0."""

    @field_validator("speed", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("input")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not tts.clean_text(v).strip():
            raise ValueError("input is empty")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in SUPPORTED_FORMATS:
            why = "no encoder is shipped for it" if v in UNSUPPORTED_FORMATS else "unknown format"
            raise ValueError(f"response_format {v!r} is not supported ({why}); supported: {', '.join(SUPPORTED_FORMATS)}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v not in MODEL_ALIASES and v not in engines.names():
            raise ValueError(f"unknown model {v!r}; models: {', '.join(MODEL_ALIASES + tuple(engines.names()))}")
        return v


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": error_type(self.status), "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def parse_speech(raw: bytes) -> SpeechRequest:
    """Validate a request body; :class:`ApiError` (400) naming the bad field otherwise."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, f"body is not JSON: {exc}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "body must be a JSON object", "invalid_json")
    try:
        return SpeechRequest.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        code = "unsupported_format" if where == "response_format" and first["type"] == "value_error" else (
            "model_not_found" if where == "model" and first["type"] == "value_error" else "invalid_value")
        if first["type"] == "missing":
            code = "missing_field"
        raise ApiError(400, f"{where}: {msg}", code, where) from None


class HttpGateway:
    def __init__(self, client: AsyncTtsClient) -> None:
        self.client = client
        self.catalog = VoiceCatalog(client)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_get("/", self.page)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/voices", self.voices)
        app.router.add_get("/v1/status", self.status)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every error as OpenAI's JSON body: ours, aiohttp's own (404, 405, 413), and the broker's."""
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
            return ApiError(exc.status, exc.reason, code).response()
        except TtsError as exc:
            return ApiError(http_status(exc.code), exc.message, exc.code).response()

    async def page(self, request: web.Request) -> web.Response:
        return web.FileResponse(WEB_PAGE, headers={"Cache-Control": "no-cache"})  # type: ignore[return-value]

    async def models(self, request: web.Request) -> web.Response:
        live = sorted({v.engine for v in await self.catalog.voices(fresh=True)})
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tts-broker"} for m in (*MODEL_ALIASES, *live)]
        return web.json_response({"object": "list", "data": data})

    async def voices(self, request: web.Request) -> web.Response:
        voices = await self.catalog.voices(fresh=True)
        return web.json_response({"voices": [v.as_dict() for v in voices], "aliases": list(OPENAI_VOICES)})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"gateway": {"version": __version__}, "broker": await self.catalog.status()})

    async def _options(self, req: SpeechRequest) -> dict[str, Any]:
        voice = None if req.voice in OPENAI_VOICES or req.voice == "default" else req.voice
        opts = await self.catalog.options(voice, req.language)
        if req.model in engines.names():
            opts["engine"] = req.model
        opts["format"] = "s16le"
        opts["speed"] = req.speed
        rate = req.sample_rate or (PCM_RATE if req.response_format == "pcm" else None)
        if rate is not None:
            opts["sample_rate"] = rate
        if req.priority is not None:
            opts["priority"] = req.priority
        return opts

    async def speech(self, request: web.Request) -> web.StreamResponse:
        req = parse_speech(await request.read())
        stream = await self.client.speak(req.input, **await self._options(req))
        rid = stream.rid.decode()
        response: Optional[web.StreamResponse] = None
        sent = 0
        try:
            async for event in stream:
                if not isinstance(event, tts.Audio):
                    continue
                if response is None:
                    start = stream.start
                    assert start is not None
                    response = web.StreamResponse(headers={
                        "Content-Type": "audio/pcm" if req.response_format == "pcm" else "audio/wav",
                        "X-Sample-Rate": str(start.sample_rate),
                        "X-Engine": start.engine,
                        "X-Voice": start.voice,
                        "X-Request-Id": rid,
                        "Cache-Control": "no-store",
                    })
                    response.enable_chunked_encoding()
                    await response.prepare(request)
                    if req.response_format == "wav":
                        await response.write(streaming_header(start.sample_rate, start.channels))
                await response.write(event.pcm)
                sent += len(event.pcm)
        except TtsError as exc:
            log.info("http r=%s: broker error %s after %d bytes: %s", rid, exc.code, sent, exc.message)
            if response is None:
                raise
            # Audio already went out with 200: cut the body short so the client sees it failed.
            if request.transport is not None:
                request.transport.abort()
            return response
        except (asyncio.CancelledError, ConnectionError):
            log.info("http r=%s: client gone after %d bytes; cancelling at the broker", rid, sent)
            raise
        finally:
            if not stream.done:
                await stream.cancel()
        if response is None:  # an end without audio: nothing a client could play
            raise ApiError(502, "the broker ended the stream without audio", tts.INTERNAL)
        await response.write_eof()
        end = stream.end.stats if stream.end else {}
        log.info("http r=%s: %s %d bytes in %d chunks, first audio %s ms (broker), engine %s",
                 rid, req.response_format, sent, stream.next_seq, end.get("ttfa_ms"), stream.start.engine if stream.start else None)
        return response


async def serve(broker: str, host: str, port: int, *, curve_key: Optional[KeySource] = None, broker_key: Optional[KeySource] = None) -> None:
    """Run the HTTP gateway on ``host:port`` until SIGTERM / SIGINT."""
    client = AsyncTtsClient(broker, timeout=60.0, curve_key=curve_key, broker_key=broker_key)
    runner = web.AppRunner(HttpGateway(client).app(), handler_cancellation=True, access_log=None)
    stopping = stop_on_signals()
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info("http gateway on http://%s:%d/, broker %s", host if ":" not in host else f"[{host}]", port, broker)
        await stopping.wait()
        log.info("http gateway stopping")
    finally:
        await runner.cleanup()
        await client.close()
