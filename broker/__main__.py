"""``python -m broker``: the broker alone, workers connect from elsewhere."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, Optional

from .config import BrokerConfig, Config, ConfigError, load_config
from .gcpause import freeze_startup_objects
from .server import BrokerServer

if TYPE_CHECKING:
    from .metrics import BrokerMetrics
    from .security import CurveServer

log = logging.getLogger("broker")


def main(argv: Optional[list[str]] = None) -> int:
    d = BrokerConfig()
    p = argparse.ArgumentParser(prog="python -m broker", description="MDP/0.2 TTS broker (no workers)")
    p.add_argument("--config", help="TOML configuration ([broker], [routing], [security], [metrics]; [[workers]] are not started)")
    p.add_argument("--frontend", help=f"endpoint clients connect to (default {d.frontend})")
    p.add_argument("--backend", help=f"endpoint workers connect to (default {d.backend})")
    p.add_argument("--heartbeat-ms", type=int)
    p.add_argument("--liveness", type=int)
    p.add_argument("--request-timeout-ms", type=int)
    p.add_argument("--stuck-timeout-ms", type=int)
    p.add_argument("--service-grace-ms", type=int)
    p.add_argument("--allow-insecure", action="store_true", help="bind a non-loopback address without CURVE")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(a.config) if a.config else Config(workers=[])
        b = cfg.broker
        for key in ("frontend", "backend", "heartbeat_ms", "liveness", "request_timeout_ms", "stuck_timeout_ms", "service_grace_ms"):
            if getattr(a, key) is not None:
                setattr(b, key, getattr(a, key))
        cfg.broker = BrokerConfig.model_validate(b.model_dump())  # the command line's values checked like the file's
        if a.allow_insecure:
            cfg.security.allow_insecure = True
        check_binds(cfg)  # before any key or port is taken
        security, metrics = start_security(cfg), start_metrics(cfg)
        server = serve_broker(cfg, security, metrics)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's, for a bad command-line value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    if security is not None:
        signal.signal(signal.SIGHUP, lambda *_: security.reload())
    freeze_startup_objects()
    server.run()
    return 0


def start_security(cfg: Config, local_workers: Optional[dict[bytes, str]] = None) -> Optional["CurveServer"]:
    """The ZAP handler and the broker's keys when ``[security] curve = true``, else None."""
    if not cfg.security.curve:
        return None
    from .security import CurveServer

    return CurveServer(cfg.security, local_workers=local_workers or {})


def start_metrics(cfg: Config) -> Optional["BrokerMetrics"]:
    """The metrics and their HTTP server when ``[metrics] listen`` is set, else None."""
    address = cfg.metrics.address()
    if address is None:
        return None
    from .metrics import BrokerMetrics

    metrics = BrokerMetrics()
    try:
        metrics.serve(*address)
    except OSError as exc:
        raise ConfigError(f"metrics.listen: cannot listen on {cfg.metrics.listen}: {exc.strerror}") from None
    return metrics


def check_binds(cfg: Config) -> None:
    """Refuse (``ConfigError``) to bind, in plain text, an address other hosts could reach (``[security]``)."""
    from .security import check_bind

    check_bind(cfg.broker.frontend, cfg.security, "frontend")
    check_bind(cfg.broker.backend, cfg.security, "backend")


def serve_broker(cfg: Config, security: Optional["CurveServer"] = None, metrics: Optional["BrokerMetrics"] = None) -> BrokerServer:
    """A bound broker for ``cfg``; refuses (``ConfigError``) a plain-text bind other hosts could reach."""
    check_binds(cfg)
    b = cfg.broker
    return BrokerServer(
        b.frontend, b.backend, cfg.core_settings(), max_message_bytes=b.max_message_bytes, client_hwm=b.client_hwm,
        security=security, metrics=metrics,
    )


if __name__ == "__main__":
    sys.exit(main())
