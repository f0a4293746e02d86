"""Long-lived processes freeze their start-up objects before serving (broker/gcpause.py).

Without it, a full collection every minute or so walked every object a worker or the broker
had built at start-up: 29-36 ms stalls of every stream in flight, measured through ``serve``."""

from __future__ import annotations

import gc
import signal
from typing import Iterator

import pytest

from broker.gcpause import freeze_startup_objects


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's own objects go back to the collector afterwards, and its signal
    handlers are its own again (the entry points install theirs)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    gc.unfreeze()
    yield
    gc.unfreeze()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a container the collector tracks


def test_frozen_objects_are_left_out_of_later_collections(unfrozen: None) -> None:
    built = [_Node() for _ in range(1000)]
    tracked = {id(o) for o in gc.get_objects()}
    assert all(id(o) in tracked for o in built)
    freeze_startup_objects()
    assert gc.get_freeze_count() >= len(built)
    walked = {id(o) for o in gc.get_objects()}  # what a full collection walks
    assert not any(id(o) in walked for o in built)
    made_later = _Node()
    assert id(made_later) in {id(o) for o in gc.get_objects()}


def test_startup_garbage_is_collected_not_frozen(unfrozen: None) -> None:
    import weakref

    garbage = _Node()
    gone = weakref.ref(garbage)
    gc.disable()  # no collection by chance between here and the freeze
    try:
        del garbage
        freeze_startup_objects()
    finally:
        gc.enable()
    assert gone() is None


def test_a_worker_freezes_once_its_engine_is_loaded(unfrozen: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from engines import cli
    from engines.runtime import WorkerRuntime
    from tests.fixtures.tone_engine import ToneEngine

    seen: list[int] = []
    def run(self: WorkerRuntime) -> None:
        seen.append(gc.get_freeze_count())
        self._synth.shutdown(wait=False)
        self._push.close(linger=0)
        self._pipe.close(linger=0)

    monkeypatch.setattr(WorkerRuntime, "run", run)
    parser = argparse.ArgumentParser()
    cli.worker_arguments(parser)
    cli.run_worker(parser.parse_args(["--backend", "tcp://127.0.0.1:1", "--log-level", "WARNING"]), lambda: ToneEngine(440.0))
    assert seen and seen[0] > 0


def test_the_broker_freezes_before_it_serves(unfrozen: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker import __main__ as broker_main
    from broker.server import BrokerServer

    seen: list[int] = []

    def run(self: BrokerServer) -> None:
        seen.append(gc.get_freeze_count())
        self.frontend.close(linger=0)
        self.backend.close(linger=0)

    monkeypatch.setattr(BrokerServer, "run", run)
    assert broker_main.main(["--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*", "--log-level", "WARNING"]) == 0
    assert seen and seen[0] > 0
