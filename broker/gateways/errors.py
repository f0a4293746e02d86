"""Broker error codes (PROTOCOL.md) in the gateways' terms.

Wyoming carries the code itself (``error`` event ``code``); HTTP needs a
status. A stream that fails before its first audio gets the status below; one
that fails after the response has started (headers and audio sent) can only be
cut short: the gateway aborts the connection without the last chunk, so the
client sees an incomplete body rather than a complete-looking short one.
"""

from __future__ import annotations

from .. import tts

HTTP_STATUS = {
    tts.BAD_REQUEST: 400,   # the broker refused the request (unknown voice, a language no engine of a restricted engine speaks…)
    tts.TOO_LARGE: 413,     # text longer than the broker's max_text_chars
    tts.OVERLOADED: 429,    # too many requests in flight or queued
    tts.UNAVAILABLE: 503,   # no worker can serve it (none live, or the broker is gone)
    tts.CANCELLED: 503,     # cancelled by the broker (a stalled connection): retry
    tts.TIMEOUT: 504,       # waited request_timeout_ms for a worker, or the broker went silent
    tts.INTERNAL: 502,      # every worker failed it (max_failovers) or a broken stream
}
"""Broker error code → HTTP status (unknown codes: 502)."""

ERROR_TYPE = {400: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
"""OpenAI's ``error.type`` for a status; anything else is ``server_error``."""


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 502)


def error_type(status: int) -> str:
    return ERROR_TYPE.get(status, "server_error")
