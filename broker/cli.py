"""``tts-broker``: serve, say, status, demo, keys, and the gateways (wyoming, http)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import soundfile
import zmq

from engines import registry as engines

from . import keys, tts
from .captions import TimingTrack, plot_timings, webvtt
from .client import TtsClient, TtsError
from .config import BrokerConfig, Config, ConfigError, GatewaysConfig, load_config, split_host_port, wyoming_uri
from .gcpause import freeze_startup_objects

if TYPE_CHECKING:
    from .metrics import BrokerMetrics
    from .security import CurveServer, LocalWorkerKeys
    from .server import BrokerServer

log = logging.getLogger("broker.cli")

DEMO_TEXT = (
    "The torchlight flickers across the damp stone walls. "
    "Somewhere below, a door groans open, and the party holds its breath."
)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def write_wav(path: Path, pcm: bytes, start: tts.Start) -> None:
    """Write a stream's PCM as WAV in its own format (16-bit or float)."""
    dtype, subtype = ("<i2", "PCM_16") if start.format == "s16le" else ("<f4", "FLOAT")
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.frombuffer(pcm, dtype=dtype), start.sample_rate, subtype=subtype)


def speak_to_wav(
    client: TtsClient, text: str, out: Path, *, captions: Optional[Path] = None, timings_plot: Optional[Path] = None, **options: object
) -> dict:
    """Speak ``text`` through the broker into ``out``; return what a user wants to know.

    With ``captions`` (WebVTT, words) or ``timings_plot`` (PNG: waveform, words, visemes) the
    request asks for the timings those need and writes them beside the WAV."""
    if captions is not None or timings_plot is not None:
        options["timings"] = ["words", "visemes"]
    t0 = time.monotonic()
    stream = client.speak(text, **options)
    chunks: list[bytes] = []
    track = TimingTrack()
    width = received = 0
    for event in stream:
        if isinstance(event, tts.Start):
            width = tts.SAMPLE_WIDTH[event.format]
        elif isinstance(event, tts.Audio):
            chunks.append(event.pcm)
            received += len(event.pcm) // width
        elif isinstance(event, tts.Timing):
            track.add(event)
        elif isinstance(event, tts.Failover):
            track.failover(received)
    pcm = b"".join(chunks)
    total = time.monotonic() - t0
    assert stream.start is not None and stream.end is not None
    write_wav(out, pcm, stream.start)
    rate = stream.start.sample_rate
    if captions is not None:
        captions.parent.mkdir(parents=True, exist_ok=True)
        captions.write_text(webvtt(track.words, rate), encoding="utf-8")
    if timings_plot is not None:
        dtype = "<i2" if stream.start.format == "s16le" else "<f4"
        audio = np.frombuffer(pcm, dtype=dtype).astype(np.float32) / (32767 if dtype == "<i2" else 1)
        plot_timings(audio, rate, track, timings_plot)
    audio_s = len(pcm) / tts.SAMPLE_WIDTH[stream.start.format] / stream.start.sample_rate
    return {
        "wav": str(out),
        "engine": stream.start.engine,
        "voice": stream.start.voice,
        "worker_pid": stream.start.worker.get("pid"),
        "sample_rate": stream.start.sample_rate,
        "audio_s": round(audio_s, 3),
        "ttfa_ms": round((stream.ttfa_s or 0) * 1000, 1),
        "rtf": round(total / audio_s, 4) if audio_s else None,
        "chunks": stream.next_seq,
        "words": len(track.words),
        "timings": stream.start.timings,
    }


def _print_result(r: dict) -> None:
    print(f"wrote {r['wav']}: {r['audio_s']:.2f}s of audio at {r['sample_rate']} Hz in {r['chunks']} chunks "
          f"({r['engine']} voice {r['voice']}, worker pid {r['worker_pid']})")
    print(f"time to first audio: {r['ttfa_ms']:.1f} ms    real-time factor: {r['rtf']}")
    if r.get("timings") is not None:
        print(f"timings: {', '.join(r['timings']) or 'none (this engine has no alignment)'}; {r['words']} words")


class Service:
    """A broker plus its supervised workers, in this process (``serve`` and ``demo``).

    The broker is a thread here, the workers are processes (see
    :mod:`broker.supervisor`). A broker thread that ends without being asked to
    would leave ``serve`` up but deaf, so :meth:`check` (polled by ``serve``)
    replaces it with a fresh broker on the same endpoints. Workers re-register
    by themselves once the old broker falls silent; requests in flight on the
    dead one are lost, and its counters restart from zero (``tts.status``'s;
    the metrics, kept here, go on).

    What must outlive a broker thread is made once, here: the ZAP handler and
    keys (``[security]``; libzmq has one ZAP endpoint per context), the key
    pair made for this ``serve``'s own workers, and the metrics with their
    HTTP server (``[metrics]``).
    """

    REBIND_S = 5.0
    """How long a restart retries binding while the dead broker's sockets are being closed."""

    def __init__(self, cfg: Config) -> None:
        from .__main__ import check_binds, serve_broker, start_metrics, start_security
        from .supervisor import Supervisor

        check_binds(cfg)
        self.local_keys: Optional[LocalWorkerKeys] = None
        self.security: Optional[CurveServer] = None
        self.metrics: Optional[BrokerMetrics] = None
        try:
            if cfg.security.curve and any(w.count and not (w.curve_key and w.broker_key) for w in cfg.workers):
                from . import security

                self.local_keys = security.LocalWorkerKeys(keys.key_pair(cfg.security.broker_key)[0])  # type: ignore[arg-type]
                self.security = start_security(cfg, {self.local_keys.public: security.LOCAL_WORKER})
            else:
                self.security = start_security(cfg)
            self.metrics = start_metrics(cfg)
            self.server = serve_broker(cfg, self.security, self.metrics)
        except BaseException:
            self._release()
            raise
        # The bound endpoints (real ports for ``*``): workers and restarts use these.
        cfg.broker.backend = self.server.backend_ep
        cfg.broker.frontend = self.server.frontend_ep
        self.cfg = cfg
        self.supervisor = Supervisor(cfg, self.local_keys, self.metrics.worker_restarted if self.metrics else None)
        self.restarts = 0
        """Broker threads replaced by :meth:`check`."""
        self._stopping = False

    def __enter__(self) -> "Service":
        self.thread = self._start_broker()
        self.supervisor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping = True
        self.supervisor.stop()
        self.server.stop()
        self.thread.join(timeout=5)
        self._release()

    def _release(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.security is not None:
            self.security.stop()
        if self.local_keys is not None:
            self.local_keys.close()

    def reload_keys(self) -> None:
        """SIGHUP: re-read the key directories (new connections only); without CURVE, say so."""
        if self.security is None:
            log.info("SIGHUP: nothing to reload ([security] curve is off)")
        else:
            self.security.reload()

    def _start_broker(self) -> threading.Thread:
        server = self.server

        def run() -> None:
            # Logged here, so that why the broker died is in the log, next to its restart.
            try:
                server.run()
            except BaseException:
                log.exception("broker thread failed")

        thread = threading.Thread(target=run, name="broker", daemon=True)
        thread.start()
        return thread

    def check(self) -> None:
        """Restart the broker if its thread ended while no stop was asked for."""
        if self._stopping or self.thread.is_alive():
            return
        self.restarts += 1
        log.error("broker thread died; restarting it (restart %d)", self.restarts)
        self.server = self._rebind()
        self.thread = self._start_broker()

    def _rebind(self) -> BrokerServer:
        from .__main__ import serve_broker

        deadline = time.monotonic() + self.REBIND_S
        while True:
            try:
                return serve_broker(self.cfg, self.security, self.metrics)
            except zmq.ZMQError as exc:
                # The old sockets are closed by run() on its way out, but libzmq
                # releases the ports asynchronously.
                if exc.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)


def cmd_serve(a: argparse.Namespace) -> int:
    _logging("INFO")  # the default log_level, so lines logged while reading the config (the XTTS model found) are seen
    cfg = load_config(a.config)
    logging.getLogger().setLevel(cfg.log_level)
    if a.frontend:
        cfg.broker.frontend = a.frontend
    if a.backend:
        cfg.broker.backend = a.backend
    if a.wyoming or a.http:
        try:
            cfg.gateways = GatewaysConfig(wyoming=a.wyoming or cfg.gateways.wyoming, http=a.http or cfg.gateways.http)
            cfg._gateways_plain()
        except ValueError as exc:
            raise ConfigError(f"gateways: {exc}") from None
    stop = False
    hup = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    def on_hup(*_: object) -> None:
        # Only a flag: the reload runs in the loop below, on this (the main) thread.
        nonlocal hup
        hup = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    with Service(cfg) as svc:
        freeze_startup_objects()  # the broker thread's full collections stall every stream (broker/gcpause.py)
        while not stop:
            time.sleep(0.1)
            if hup:
                hup = False
                svc.reload_keys()
            svc.check()
    log.info("shut down cleanly")
    return 0


def _options(a: argparse.Namespace) -> dict:
    return {"language": a.language, "engine": a.engine, "voice": a.voice, "format": a.format, "sample_rate": a.sample_rate}


def _curve(a: argparse.Namespace) -> dict:
    return {"curve_key": a.curve_key, "broker_key": a.broker_key}


def cmd_say(a: argparse.Namespace) -> int:
    with TtsClient(a.frontend, timeout=a.timeout, **_curve(a)) as client:
        captions = Path(a.captions) if a.captions else None
        plot = Path(a.timings_plot) if a.timings_plot else None
        _print_result(speak_to_wav(client, a.text, Path(a.output), captions=captions, timings_plot=plot, **_options(a)))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    with TtsClient(a.frontend, **_curve(a)) as client:
        st = client.status(timeout=a.timeout)
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    for name, svc in sorted(st["services"].items()):
        kind = f"{svc['engine']} {','.join(svc['languages'] or [])}" if svc["tts"] else "mdp"
        print(f"{name}  [{kind}]  workers {len(svc['workers'])} (idle {svc['idle']}, in flight {svc['inflight']})  failures {svc['failures']}")
        if svc["last_failure"]:
            print(f"    last failure: {svc['last_failure']}")
        for w in svc["workers"]:
            cert = f"  certificate {w['certificate']}" if w.get("certificate") else ""
            print(f"    {w['id']}  pid {w['pid']} on {w['host']}  {'busy' if w['busy'] else 'idle'}  served {w['served']}{cert}")
    print(f"waiting {st['waiting']}  in flight {st['inflight']}  counters {st['counters']}")
    return 0


def cmd_keys(a: argparse.Namespace) -> int:
    """Write a CURVE key pair in zmq.auth's certificate format (the secret file 0600)."""
    try:
        public, secret = keys.create_pair(a.dir, a.name)
    except keys.CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {public} (public: hand it out) and {secret} (secret: keep it, mode 0600)")
    return 0


def _curve_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--curve-key", help="this client's secret certificate (NAME.key_secret), for a broker with CURVE")
    s.add_argument("--broker-key", help="the broker's public certificate (broker.key)")


def _gateway_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, help: str, frontend: str) -> argparse.ArgumentParser:
    """A gateway's subcommand with what every gateway takes: its broker, log level and CURVE keys."""
    s = sub.add_parser(name, help=help)
    s.add_argument("--broker", default=frontend, help=f"the broker's frontend (default {frontend})")
    s.add_argument("--log-level", default="INFO")
    _curve_arguments(s)
    return s


def _gateway_logging(level: str) -> None:
    _logging(level)
    # aiohttp and the wyoming package log every connection at INFO/DEBUG; ours say what matters.
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_wyoming(a: argparse.Namespace) -> int:
    """The Wyoming gateway (broker/gateways/wyoming.py) in this process."""
    import asyncio

    from .gateways import wyoming

    try:
        wyoming_uri(a.uri)
    except ValueError as exc:
        raise ConfigError(f"--uri: {exc}") from None
    _gateway_logging(a.log_level)
    try:
        freeze_startup_objects()  # broker/gcpause.py
        asyncio.run(wyoming.serve(a.broker, a.uri, **_curve(a)))
    except OSError as exc:
        raise ConfigError(f"--uri: cannot listen on {a.uri}: {exc.strerror}") from None
    return 0


def cmd_http(a: argparse.Namespace) -> int:
    """The OpenAI-compatible HTTP gateway and web page (broker/gateways/http.py) in this process."""
    import asyncio

    from .gateways import http

    try:
        host, port = split_host_port(a.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    _gateway_logging(a.log_level)
    try:
        freeze_startup_objects()  # broker/gcpause.py
        asyncio.run(http.serve(a.broker, host, port, **_curve(a)))
    except OSError as exc:
        raise ConfigError(f"--listen: cannot listen on {a.listen}: {exc.strerror}") from None
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The main job: broker + one Piper worker on the bundled voice, one sentence to a WAV."""
    _logging(a.log_level)
    cfg = Config(broker=BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"))
    print("starting broker and a Piper worker (bundled en_US-joe-medium voice)…", flush=True)
    with Service(cfg) as svc, TtsClient(svc.cfg.broker.frontend, timeout=60) as client:
        t0 = time.monotonic()
        if not client.wait_ready(timeout=120):
            print("error: the Piper worker did not come up within 120 s", file=sys.stderr)
            return 1
        print(f"worker ready after {time.monotonic() - t0:.1f}s; speaking: {a.text!r}", flush=True)
        _print_result(speak_to_wav(client, a.text, Path(a.output)))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    d = BrokerConfig()
    p = argparse.ArgumentParser(prog="tts-broker", description="ZeroMQ MDP/0.2 broker for streaming TTS")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the broker and its engine workers")
    s.add_argument("--config", help="TOML configuration file")
    s.add_argument("--frontend", help=f"client endpoint (default {d.frontend})")
    s.add_argument("--backend", help=f"worker endpoint (default {d.backend})")
    s.add_argument("--wyoming", metavar="URI", help="also run the Wyoming gateway on URI (tcp://127.0.0.1:10200); overrides [gateways] wyoming")
    s.add_argument("--http", metavar="HOST:PORT", help="also run the HTTP gateway and web page on HOST:PORT (127.0.0.1:8000); overrides [gateways] http")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("say", help="speak text through a running broker into a WAV file")
    s.add_argument("text")
    s.add_argument("-l", "--language", default="en")
    s.add_argument("-o", "--output", default="out/say.wav")
    s.add_argument("--engine", choices=engines.names())
    s.add_argument("--voice")
    s.add_argument("--format", default="s16le", choices=list(tts.FORMATS))
    s.add_argument("--sample-rate", type=int)
    s.add_argument("--frontend", default=d.frontend)
    s.add_argument("--timeout", type=float, default=30.0)
    _curve_arguments(s)
    s.add_argument("--captions", metavar="OUT.vtt", help="also write WebVTT captions, one cue per word (asks for timings)")
    s.add_argument("--timings-plot", metavar="OUT.png", help="also draw the waveform with its word and viseme tracks (asks for timings)")
    s.set_defaults(func=cmd_say)

    s = sub.add_parser("status", help="live workers per service")
    s.add_argument("--frontend", default=d.frontend)
    s.add_argument("--timeout", type=float, default=2.0)
    s.add_argument("--json", action="store_true")
    _curve_arguments(s)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("keys", help="write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, 0600)")
    s.add_argument("dir")
    s.add_argument("name")
    s.set_defaults(func=cmd_keys)

    s = _gateway_parser(sub, "wyoming", "run the Wyoming gateway (Home Assistant) in front of a running broker", d.frontend)
    s.add_argument("--uri", default="tcp://127.0.0.1:10200", help="where to listen: tcp://HOST:PORT or unix://PATH (default tcp://127.0.0.1:10200)")
    s.set_defaults(func=cmd_wyoming)

    s = _gateway_parser(sub, "http", "run the OpenAI-compatible HTTP gateway and web page in front of a running broker", d.frontend)
    s.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to listen on (default 127.0.0.1:8000)")
    s.set_defaults(func=cmd_http)

    s = sub.add_parser("demo", help="start everything on the bundled voice and speak one passage")
    s.add_argument("text", nargs="?", default=DEMO_TEXT)
    s.add_argument("-o", "--output", default="out/demo.wav")
    s.add_argument("--log-level", default="WARNING")
    s.set_defaults(func=cmd_demo)

    a = p.parse_args(argv)
    try:
        return a.func(a)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TtsError, keys.CertificateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
