"""Workers of one ``serve`` that share this machine's cores tell each other when they are busy.

Two Piper workers on 2 cores, each given one thread, keep out of each other's way when both
speak, but a line alone then gets half the machine: its last audio came 1.70x wyoming-piper's
(README, "Several voices at once"). Given every core instead, a worker decodes on all of them
while the others are idle, and on its share of them (its ``narrow`` sessions,
``engines/vits_split.py``, one run at a time) while another holds a job
(``Pacing.others_on_host``).

They also hold back for each other's new lines, as a worker's own jobs do (``engines/runtime.py``):
while another worker starts a line, a worker cuts short its run in progress if its listener has
audio enough to wait (``Pacing.interrupt``) and feeds only listeners about to run dry, so the
new line's first window has the cores.

They learn it from a small file that ``serve`` creates (in ``/dev/shm`` where there is one), an
entry per worker: :data:`IDLE`, :data:`BUSY` or :data:`STARTING`, and when the worker last said
so (``time.monotonic``, one clock for every process of a machine). Each worker writes only its
own entry and reads the others': no lock. Its socket loop renews the time at every turn (at
least once a heartbeat), and an entry not renewed for ``stale_s`` counts as idle: a worker that
is frozen (SIGSTOP) or dead uses no core, and while its entry said "starting", the worker left
held every line back to real time (the test of failover by SIGSTOP ran 50 s instead of 8). A
worker that starts a line also sends one datagram to each other worker's socket beside the file
(``PATH.INDEX``), which wakes the thread that cuts that worker's run short: polling the entries
for that every 2 ms instead cost a lone line time (in one run, the long sentence's last audio
1.21x wyoming-piper's; 1.02-1.09x without).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable


IDLE, BUSY, STARTING = 0, 1, 2
"""A worker's state: no job; jobs, each past its first audio; a job waiting for its first audio."""

_ENTRY = struct.Struct("<dB7x")
"""A worker's entry: when it last renewed it (``time.monotonic``, seconds), and its state."""


class HostCores:
    """One worker's view of the map: its own entry to write, the others' to read."""

    def __init__(self, path: Path, index: int, stale_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        if not 0 <= index < self.workers:
            raise ValueError(f"{path} has {self.workers} workers' entries; no index {index}")
        self.index = index
        self.stale_s = stale_s
        """An entry not renewed for this long counts as idle."""
        self._clock = clock
        self._state = IDLE
        self._lock = threading.Lock()
        """The socket thread renews what a synthesis thread sets: one writes at a time, the last state."""
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._wake = self._socket_path(index)
        self._wake.unlink(missing_ok=True)  # a predecessor's
        self._sock.bind(str(self._wake))
        self.set(IDLE)  # a predecessor that died busy left it set

    def _socket_path(self, index: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{index}")

    def close(self) -> None:
        self.set(IDLE)
        self._sock.close()
        self._wake.unlink(missing_ok=True)

    @classmethod
    def parse(cls, spec: str, stale_s: float = 1.0) -> "HostCores":
        """From ``PATH:INDEX`` (the worker's ``--host-cores``, set by ``serve``)."""
        path, sep, index = spec.rpartition(":")
        if not sep or not index.isdigit():
            raise ValueError(f"--host-cores wants PATH:INDEX, not {spec!r}")
        return cls(Path(path), int(index), stale_s)

    @staticmethod
    def create(workers: int) -> Path:
        """A fresh map for ``workers`` workers, all idle; ``serve`` removes it when it stops."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, name = tempfile.mkstemp(prefix="tts-broker-cores-", dir=shm)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(workers * _ENTRY.size))
        return Path(name)

    @property
    def workers(self) -> int:
        return len(self._map) // _ENTRY.size

    def set(self, state: int) -> None:
        """This worker's state now: :data:`IDLE`, :data:`BUSY` or :data:`STARTING`."""
        with self._lock:
            self._state = state
            _ENTRY.pack_into(self._map, self.index * _ENTRY.size, self._clock(), state)

    def renew(self) -> None:
        """Say the state again, now: the others count an entry not renewed for ``stale_s`` as idle."""
        with self._lock:
            _ENTRY.pack_into(self._map, self.index * _ENTRY.size, self._clock(), self._state)

    def announce_start(self) -> None:
        """Wake the other workers' :meth:`wait_start`: this one is starting a line."""
        for i in range(self.workers):
            if i != self.index:
                try:
                    self._sock.sendto(b"s", str(self._socket_path(i)))
                except OSError:  # not started yet, or its queue full: it reads the bytes anyway
                    pass

    def wait_start(self, timeout: float) -> bool:
        """Whether another worker announced a start within ``timeout`` seconds."""
        if not select.select([self._sock], [], [], timeout)[0]:
            return False
        while True:
            try:
                self._sock.recv(16)
            except BlockingIOError:
                return True

    def others(self) -> tuple[int, int]:
        """How many of the other workers hold a job now, and how many of those are starting one."""
        now = self._clock()
        states = [
            state for i, (said, state) in enumerate(_ENTRY.iter_unpack(self._map[:]))
            if i != self.index and now - said <= self.stale_s
        ]
        return sum(1 for state in states if state != IDLE), states.count(STARTING)
