"""Gateways: the broker behind the doors other tools already knock on.

Each gateway is a thin client of the broker (:class:`broker.client.AsyncTtsClient`)
in a process of its own, run by ``tts-broker wyoming`` / ``tts-broker http`` or
by ``serve``'s supervisor (``[gateways]``): it translates one protocol's
requests into broker requests and relays the broker's audio chunk by chunk as
it arrives, never gathering it, and cancels at the broker when its own client
goes away. Routing, failover and fallback stay the broker's.

* :mod:`.voices` — the broker's live voices (from ``tts.status``) and how a
  voice name / language becomes broker request options;
* :mod:`.errors` — broker error codes in each gateway's terms;
* :mod:`.wyoming` — Home Assistant's Wyoming protocol (the ``wyoming`` package);
* :mod:`.http` — OpenAI's ``POST /v1/audio/speech`` and the web page (aiohttp);
* :mod:`.wav` — the streaming WAV header.
"""

from __future__ import annotations

import asyncio
import signal


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, installed at once, so that a gateway signalled while
    it is still starting stops cleanly too (its client closed, its socket released)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    return stopping
