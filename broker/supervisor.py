"""Starts engine worker processes and restarts the ones that die, with backoff.

Workers are separate processes (a crashed or frozen model never takes the
broker down), started with the same Python as the broker.

They must also die with it: a ``kill -9`` of ``serve`` gives no chance to stop
them, and orphans would register with the next ``serve`` on the same ports. On
Linux each worker asks the kernel for SIGTERM when its parent goes
(``PR_SET_PDEATHSIG``). That signal fires when the *thread* that forked the
worker ends, not the process, so every worker is spawned from the supervisor's
own watch thread, which lives exactly as long as the supervisor. Elsewhere
workers are only stopped by :meth:`Supervisor.stop`.

With ``[security] curve = true`` each worker gets ``--curve-key`` and
``--broker-key``: its entry's own certificate files, or those ``serve`` made
for its children (:class:`broker.security.LocalWorkerKeys`).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from engines import registry as engines
from engines.host_cores import HostCores

from .config import Config, WorkerConfig

if TYPE_CHECKING:
    from .security import LocalWorkerKeys

log = logging.getLogger("broker.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 15.0
STABLE_AFTER_S = 30.0
"""A worker that ran this long resets its backoff."""


PR_SET_PDEATHSIG = 1
"""From ``<linux/prctl.h>``."""


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that makes the child get SIGTERM when the forking thread ends; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl: nobody would signal us then.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@dataclass(eq=False)
class _Slot:
    name: str
    argv: list[str]
    service: str
    gateway: bool = False
    """A gateway process (``[gateways]``), not an engine worker: its restarts are not worker restarts."""
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    backoff: float = BACKOFF_START_S
    restart_at: float = 0.0
    restarts: int = 0

    @property
    def kind(self) -> str:
        """What the logs call it."""
        return "gateway" if self.gateway else "worker"


def _local(endpoint: str) -> str:
    """Where a child on this host reaches a bound endpoint (``*`` and ``0.0.0.0`` are not addresses)."""
    return endpoint.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")


def gateway_argvs(cfg: Config) -> dict[str, list[str]]:
    """``tts-broker wyoming`` / ``tts-broker http`` command lines for the configured ``[gateways]``,
    clients of this broker's frontend."""
    g = cfg.gateways
    base = [sys.executable, "-m", "broker.cli"]
    common = ["--broker", _local(cfg.broker.frontend), "--log-level", cfg.log_level]
    out = {}
    if g.wyoming:
        out["wyoming"] = [*base, "wyoming", *common, "--uri", g.wyoming]
    if g.http:
        out["http"] = [*base, "http", *common, "--listen", g.http]
    return out


def shares_cores(cfg: Config, w: WorkerConfig) -> bool:
    """Whether ``w``'s workers get every core and an entry of the busy map (``engines/host_cores.py``)
    instead of a share of the cores: engines that support it (Piper), where the config has
    several workers and ``w`` does not set ``threads``."""
    return w.threads is None and engines.get(w.engine).shares_cores and sum(x.count for x in cfg.workers) > 1


def cpu_threads(cfg: Config, w: WorkerConfig, cores: Optional[int] = None) -> Optional[int]:
    """CPU threads for each of ``w``'s workers: its ``threads`` if set; else None (the engine's
    default, every core) for the only worker of the config or one that shares the cores
    (:func:`shares_cores`), and the cores shared out among the config's workers otherwise
    (at least one each).

    Each worker's pool otherwise spans every core, and two workers' pools on the same cores
    contend: on 2 cores with ``count = 2``, four passages sent at once took 1.46x
    wyoming-piper's wall time with 41 underrun chunks, and 1.01x with none with a thread
    each (README, "Several voices at once")."""
    if w.threads is not None:
        return w.threads
    workers = sum(x.count for x in cfg.workers)
    if workers <= 1 or shares_cores(cfg, w):
        return None
    return max(1, (cores or len(os.sched_getaffinity(0))) // workers)


def worker_argv(cfg: Config, w: WorkerConfig, local_keys: Optional[LocalWorkerKeys] = None) -> list[str]:
    b = cfg.broker
    spec = engines.get(w.engine)
    argv = [
        sys.executable, "-m", spec.module,
        "--backend", _local(b.backend),
        "--heartbeat-ms", str(b.heartbeat_ms),
        "--liveness", str(b.liveness),
        "--log-level", cfg.log_level,
        "--device", w.device,
    ]
    if w.slots is not None:
        argv += ["--slots", str(w.slots)]
    if (threads := cpu_threads(cfg, w)) is not None:
        argv += ["--threads", str(threads)]
    if cfg.security.curve:
        curve_key = w.curve_key or (local_keys and str(local_keys.secret_file))
        broker_key = w.broker_key or (local_keys and str(local_keys.broker_file))
        if not curve_key or not broker_key:
            raise ValueError("[security] curve = true: a worker needs curve_key and broker_key (or serve's local keys)")
        argv += ["--curve-key", curve_key, "--broker-key", broker_key]
    return argv + spec.argv(w.options, cfg.voice_dirs)


class Supervisor:
    """The worker processes of a config, each restarted with backoff when it exits."""

    def __init__(
        self, cfg: Config, local_keys: Optional[LocalWorkerKeys] = None, on_restart: Optional[Callable[[str], None]] = None
    ) -> None:
        sharing = sum(w.count for w in cfg.workers if shares_cores(cfg, w))
        self.host_cores: Optional[Path] = HostCores.create(sharing) if sharing else None
        """The busy map of the workers that share the cores (removed by :meth:`stop`)."""
        entry = itertools.count()
        self.slots = [
            _Slot(f"{service}#{i}", argv + (["--host-cores", f"{self.host_cores}:{next(entry)}"] if shares_cores(cfg, w) else []), service)
            for w in cfg.workers
            for service, argv in [(engines.get(w.engine).service(w.options), worker_argv(cfg, w, local_keys))]
            for i in range(w.count)
        ]
        self.slots += [_Slot(f"gateway.{kind}", argv, f"gateway.{kind}", gateway=True) for kind, argv in gateway_argvs(cfg).items()]
        self.on_restart = on_restart
        """Told the service of each worker restarted (metrics)."""
        self.stop_event = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the watch thread, which spawns every worker (see the module docstring for why there)."""
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: _Slot) -> None:
        slot.started = time.monotonic()
        try:
            slot.proc = subprocess.Popen(slot.argv, preexec_fn=_die_with_parent())
        except OSError as exc:
            # Retried with backoff: letting it end the watch thread would take every worker with it.
            log.error("cannot start worker %s: %s; retrying in %.1fs", slot.name, exc, slot.backoff)
            slot.restart_at = slot.started + slot.backoff
            slot.backoff = min(slot.backoff * 2, BACKOFF_MAX_S)
            return
        log.info("started %s %s (pid %d)", slot.kind, slot.name, slot.proc.pid)

    def _watch(self) -> None:
        for slot in self.slots:
            if self.stop_event.is_set():  # stop() came while the first workers were starting
                return
            self._spawn(slot)
        while not self.stop_event.wait(0.2):
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.proc
                if proc is not None and proc.poll() is not None:
                    ran = now - slot.started
                    if ran >= STABLE_AFTER_S:
                        slot.backoff = BACKOFF_START_S
                    log.warning("%s %s (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                                slot.kind, slot.name, proc.pid, proc.returncode, ran, slot.backoff)
                    slot.proc = None
                    slot.restart_at = now + slot.backoff
                    slot.backoff = min(slot.backoff * 2, BACKOFF_MAX_S)
                elif proc is None and now >= slot.restart_at and not self.stop_event.is_set():
                    slot.restarts += 1
                    if self.on_restart is not None and not slot.gateway:
                        self.on_restart(slot.service)
                    self._spawn(slot)

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join()
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()
        if self.host_cores is not None:  # and the sockets of workers that were killed, not stopped
            for path in [self.host_cores, *self.host_cores.parent.glob(f"{self.host_cores.name}.*")]:
                path.unlink(missing_ok=True)
