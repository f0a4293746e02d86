"""Workers of one ``serve`` sharing the machine's cores (``engines/host_cores.py``): the busy map,
the start announcements, what ``serve`` gives each worker, and the sessions a run takes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from broker.config import Config
from broker.supervisor import Supervisor
from engines.host_cores import BUSY, IDLE, STARTING, HostCores
from engines.schedule import Pacing, Playback
from engines.vits_split import FrameStreamer, Parts


@pytest.fixture
def three() -> Iterator[Path]:
    path = HostCores.create(3)
    yield path
    path.unlink()


def test_each_worker_sees_the_others_states_and_not_its_own(three: Path) -> None:
    views = [HostCores(three, i) for i in range(3)]
    try:
        assert [v.others() for v in views] == [(0, 0)] * 3 and views[0].workers == 3
        views[0].set(STARTING)
        views[1].set(BUSY)
        assert views[0].others() == (1, 0) and views[1].others() == (1, 1) and views[2].others() == (2, 1)
        views[0].set(IDLE)
        assert views[2].others() == (1, 0)
    finally:
        for v in views:
            v.close()


def test_a_worker_restarted_in_a_dead_ones_place_clears_what_it_left(three: Path) -> None:
    dead = HostCores(three, 1)
    dead.set(BUSY)  # then killed: no close()
    reader = HostCores(three, 0)
    assert reader.others() == (1, 0)
    successor = HostCores(three, 1)
    try:
        assert reader.others() == (0, 0)
    finally:
        reader.close()
        successor.close()


def test_a_worker_that_stops_renewing_its_entry_counts_as_idle(three: Path) -> None:
    """Frozen (SIGSTOP) or dead, it uses no core: the others must not hold back for it."""
    now = [100.0]
    frozen, reader = HostCores(three, 1, clock=lambda: now[0]), HostCores(three, 0, stale_s=1.0, clock=lambda: now[0])
    try:
        frozen.set(STARTING)
        now[0] += 0.9
        assert reader.others() == (1, 1)
        now[0] += 0.2
        assert reader.others() == (0, 0)
        frozen.renew()  # its socket loop turns again
        assert reader.others() == (1, 1)
    finally:
        frozen.close()
        reader.close()


def test_a_start_wakes_every_other_worker_once_and_not_the_one_starting(three: Path) -> None:
    views = [HostCores(three, i) for i in range(3)]
    try:
        views[2].close()  # a worker not running: its socket is gone, the others still hear
        views[0].announce_start()
        views[0].announce_start()
        assert views[1].wait_start(5) and not views[1].wait_start(0.05), "two announcements, read as one wake-up"
        assert not views[0].wait_start(0.05)
    finally:
        for v in views[:2]:
            v.close()
    assert not any(p.name.startswith(f"{three.name}.") for p in three.parent.iterdir()), "sockets left behind"


@pytest.mark.parametrize("spec", ["no-index", "/x:", "/x:one"])
def test_a_bad_host_cores_argument_is_a_clear_error(spec: str) -> None:
    with pytest.raises(ValueError, match="PATH:INDEX"):
        HostCores.parse(spec)


def test_an_index_beyond_the_map_is_a_clear_error(three: Path) -> None:
    with pytest.raises(ValueError, match="no index 3"):
        HostCores(three, 3)


def test_serve_gives_several_piper_workers_every_core_and_an_entry_each_and_removes_the_map() -> None:
    cfg = Config.model_validate({"workers": [{"engine": "piper", "count": 2}, {"engine": "piper", "voice": "en_US-joe-medium"}]})
    sup = Supervisor(cfg)
    specs = [slot.argv[slot.argv.index("--host-cores") + 1] for slot in sup.slots]
    assert not any("--threads" in slot.argv for slot in sup.slots)
    assert sup.host_cores is not None and HostCores(sup.host_cores, 0).workers == 3
    assert specs == [f"{sup.host_cores}:{i}" for i in range(3)]
    HostCores(sup.host_cores, 1)  # a worker killed, not stopped: its socket is left
    sup.stop()
    assert not [p for p in sup.host_cores.parent.iterdir() if p.name.startswith(sup.host_cores.name)]
    alone = Supervisor(Config.model_validate({"workers": [{"engine": "piper"}]}))
    told = Supervisor(Config.model_validate({"workers": [{"engine": "piper", "count": 2, "threads": 1}]}))
    assert alone.host_cores is None and told.host_cores is None
    assert not any("--host-cores" in slot.argv for slot in alone.slots + told.slots)


def test_a_run_takes_the_narrow_sessions_while_another_worker_on_the_cores_is_busy() -> None:
    fast, lean, narrow = (Parts(name, name, name) for name in ("fast", "lean", "narrow"))  # type: ignore[arg-type]
    streamer = FrameStreamer(fast, lean, [], "z", Path("."), margin=1, flow_margin=1, narrow=narrow)
    busy_elsewhere = [0]
    playing = Pacing(Playback(arrived=0.0, first=time.monotonic(), audio_s=1.0), lambda: (), elsewhere=lambda: busy_elsewhere[0])
    waiting = Pacing(Playback(arrived=0.0), lambda: (), elsewhere=lambda: busy_elsewhere[0])
    assert (streamer.parts(playing), streamer.parts(waiting)) == (lean, fast)
    busy_elsewhere[0] = 1
    assert (streamer.parts(playing), streamer.parts(waiting)) == (narrow, fast)  # a first window keeps every core
