"""Waiting on ZeroMQ sockets until a deadline."""

from __future__ import annotations

import math


def poll_ms(seconds: float) -> int:
    """``zmq.Poller.poll``'s timeout for ``seconds``, rounded up to the millisecond: pyzmq
    truncates a float, and a loop waiting for a deadline less than a millisecond away then
    polled without waiting, hundreds of times, before every tick (an idle broker spent ~2 % of
    a core so, in a burst every 50 ms that took a core from the workers' decoders)."""
    return max(0, math.ceil(seconds * 1000))
