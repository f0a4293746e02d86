"""``python -m broker``: the broker alone, workers connect from elsewhere."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Optional

from .config import BrokerConfig, Config
from .server import BrokerServer


def main(argv: Optional[list[str]] = None) -> None:
    d = BrokerConfig()
    p = argparse.ArgumentParser(prog="python -m broker", description="MDP/0.2 TTS broker (no workers)")
    p.add_argument("--frontend", default=d.frontend, help="endpoint clients connect to")
    p.add_argument("--backend", default=d.backend, help="endpoint workers connect to")
    p.add_argument("--heartbeat-ms", type=int, default=d.heartbeat_ms)
    p.add_argument("--liveness", type=int, default=d.liveness)
    p.add_argument("--request-timeout-ms", type=int, default=d.request_timeout_ms)
    p.add_argument("--stuck-timeout-ms", type=int, default=d.stuck_timeout_ms)
    p.add_argument("--service-grace-ms", type=int, default=d.service_grace_ms)
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = Config(
        broker=BrokerConfig(
            frontend=a.frontend, backend=a.backend, heartbeat_ms=a.heartbeat_ms,
            liveness=a.liveness, request_timeout_ms=a.request_timeout_ms, stuck_timeout_ms=a.stuck_timeout_ms,
            service_grace_ms=a.service_grace_ms,
        ),
        workers=[],
    )
    server = serve_broker(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.run()


def serve_broker(cfg: Config) -> BrokerServer:
    b = cfg.broker
    return BrokerServer(b.frontend, b.backend, cfg.core_settings(), max_message_bytes=b.max_message_bytes, client_hwm=b.client_hwm)


if __name__ == "__main__":
    main()
