"""The broker's socket loop waits for its next tick instead of spinning towards it.

pyzmq truncates a float timeout to whole milliseconds, so a loop that polled for "the time
left" polled without waiting through the last millisecond before every tick: hundreds of
empty polls a tick, ~2 % of a core for an idle broker, in bursts that took a core from the
workers' decoders. Counted here in wake-ups, not in time."""

from __future__ import annotations

import itertools
import time

import pytest
import zmq

from broker.core import BrokerCore
from broker.polling import poll_ms
from broker.server import BrokerServer

_names = itertools.count()


def test_poll_ms_rounds_up_and_never_goes_negative() -> None:
    assert poll_ms(0.0004) == 1
    assert poll_ms(0.05) == 50
    assert poll_ms(0.0501) == 51
    assert poll_ms(0.0) == 0
    assert poll_ms(-0.2) == 0


def test_an_idle_broker_polls_about_once_per_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    polls, ticks = [0], [0]
    poll, tick = zmq.Poller.poll, BrokerCore.tick

    def counted_poll(self: zmq.Poller, timeout: int | None = None) -> list:
        polls[0] += 1
        return poll(self, timeout)

    def counted_tick(self: BrokerCore, now: float) -> list:
        ticks[0] += 1
        return tick(self, now)

    monkeypatch.setattr(zmq.Poller, "poll", counted_poll)
    monkeypatch.setattr(BrokerCore, "tick", counted_tick)
    n = next(_names)
    server = BrokerServer(f"inproc://loop-front-{n}", f"inproc://loop-back-{n}")
    thread = server.start_thread()
    try:
        time.sleep(1.0)  # 20 ticks at the default period; how long it really was does not matter
    finally:
        server.stop()
        thread.join(5)
    assert ticks[0] >= 3
    # One poll per tick, and one more now and then where the poll woke a hair early.
    assert polls[0] <= 2 * ticks[0] + 2, f"{polls[0]} polls for {ticks[0]} ticks"
