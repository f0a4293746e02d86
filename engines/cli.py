"""Command-line plumbing shared by every engine worker's ``python -m`` entry point."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from typing import Callable

from broker.gcpause import freeze_startup_objects
from broker.keys import CertificateError, connecting_keys
from engines.base import Engine
from engines.host_cores import HostCores
from engines.runtime import WorkerRuntime, synthesis_executor

log = logging.getLogger("engines")


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("must be 1-64")
    return value


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="tcp://127.0.0.1:5556", help="broker backend endpoint")
    parser.add_argument("--heartbeat-ms", type=int, default=250, help="heartbeat interval (must match the broker)")
    parser.add_argument("--liveness", type=int, default=3, help="missed heartbeats before the broker counts as lost")
    parser.add_argument("--slots", type=_positive, help="requests held at once, spoken in turns (default: the engine's own)")
    parser.add_argument("--threads", type=_positive, help="CPU threads the engine's inference runs on (default: every core)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--curve-key", help="this worker's secret certificate (NAME.key_secret), for a broker with CURVE")
    parser.add_argument("--broker-key", help="the broker's public certificate (broker.key); with --curve-key")
    parser.add_argument(
        "--host-cores", metavar="PATH:INDEX",
        help="the busy map shared with the other workers on these cores, and this worker's entry in it (set by serve)",
    )


def run_worker(args: argparse.Namespace, load: Callable[[], Engine]) -> None:
    """Load the engine (exit 2 with a clear message if that fails), then serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A crash in native code (onnxruntime, torch, espeak-ng) leaves every thread's Python stack
    # in the log, where ``serve`` collects the worker's output, instead of only an exit status.
    faulthandler.enable()
    try:
        curve = connecting_keys(args.curve_key, args.broker_key)
    except CertificateError as exc:
        log.error("%s", exc)
        sys.exit(2)
    try:
        # Stale after four heartbeats: the socket loop renews its entry at least once a heartbeat.
        host = HostCores.parse(args.host_cores, stale_s=4 * args.heartbeat_ms / 1000) if args.host_cores else None
    except (OSError, ValueError) as exc:
        log.error("--host-cores: %s", exc)
        sys.exit(2)
    if host is not None:
        log.info("sharing the cores with %d other worker(s) (%s)", host.workers - 1, args.host_cores)
    synth = synthesis_executor()  # load on the thread that will synthesise: see engines/runtime.py
    try:
        engine = synth.submit(load).result()
    except Exception as exc:
        log.error("engine failed to start: %s", exc)
        sys.exit(2)
    runtime = WorkerRuntime(
        engine, args.backend, heartbeat_s=args.heartbeat_ms / 1000, liveness=args.liveness, slots=args.slots, synthesis_thread=synth,
        curve=curve, host=host,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runtime.stop())
    freeze_startup_objects()  # the model and its tables, out of the collector's way (broker/gcpause.py)
    runtime.run()
