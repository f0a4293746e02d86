"""Who may talk to the broker: CurveZMQ (RFC 26) and ZAP (RFC 27) on both sockets.

With ``[security] curve = true`` both ROUTERs are CURVE servers holding the
broker's secret key, and a ZAP handler — pyzmq's own
``zmq.auth.thread.ThreadAuthenticator``, in a thread of its own — admits a
peer only if its public key is a certificate in the directory of *that*
socket: each socket has its own ZAP domain (``frontend``/``backend``), so a
client key does not open the backend, nor a worker key the frontend. A
refused peer never completes the handshake and gets nothing at all.

The allowed sets are this module's :class:`KeyRing` objects, consulted
through ``configure_curve_callback``; :meth:`CurveServer.reload` builds new
ones from the directories and swaps them in with one assignment each, so the
SIGHUP reload (main thread) and the ZAP thread never see half a set. Peers
already connected stay connected: revoking a key takes effect for new
connections.

ZAP hands the broker the User-Id of each authenticated connection (the
public key, z85), which pyzmq exposes as the ``"User-Id"`` property of every
frame received from it. The server reads it for READY only, maps it back to
the certificate's name (:meth:`CurveServer.worker_name`) and checks
``worker_services`` (:meth:`CurveServer.may_register`) before the core sees
the READY.

Without CURVE, everything crosses the wire in plain text and anyone who can
connect is served, so :func:`check_bind` refuses an address other hosts can
reach unless ``allow_insecure`` says that is intended.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engines import registry as engines

from . import keys
from .config import ConfigError, SecurityConfig

log = logging.getLogger("broker.security")

FRONTEND_DOMAIN = "frontend"
BACKEND_DOMAIN = "backend"
LOCAL_WORKER = "serve-local"
"""Certificate name of the key pair ``serve`` makes for its own workers."""


class KeyRing:
    """The public certificates of one directory: z85 public key -> certificate name (file stem)."""

    def __init__(self, directory: Optional[str], extra: Mapping[bytes, str] = {}) -> None:
        self.names: dict[bytes, str] = dict(extra)
        if directory is None:
            return
        for path in sorted(Path(directory).glob("*.key")):
            try:
                public = keys.public_key(path)
            except keys.CertificateError as exc:
                log.warning("skipping certificate %s: %s", path, exc)
                continue
            self.names[public] = path.stem

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (``configure_curve_callback``): may this z85 public key connect?"""
        name = self.names.get(key)
        if name is None:
            log.warning("refused CURVE key %s on the %s: not among its certificates", key.decode(errors="replace"), domain)
            return False
        log.debug("accepted certificate %s on the %s", name, domain)
        return True


class CurveServer:
    """The broker's CURVE identity, its ZAP handler and its two allowed sets.

    One per process and context, created before the sockets and kept across
    broker restarts (``serve`` replaces a dead broker thread on the same
    context): libzmq has one ZAP endpoint per context."""

    def __init__(self, cfg: SecurityConfig, context: Optional[zmq.Context] = None, local_workers: Mapping[bytes, str] = {}) -> None:
        if not zmq.has("curve"):
            raise ConfigError("[security] curve = true, but this libzmq was built without CURVE")
        assert cfg.curve and cfg.broker_key is not None
        self.cfg = cfg
        self.public, self.secret = keys.key_pair(cfg.broker_key)
        if not secret_mode_ok(cfg.broker_key):
            log.warning("%s is readable by others than its owner: chmod 600 it", cfg.broker_key)
        self.local_workers = dict(local_workers)
        """Keys allowed on the backend besides the directory's (``serve``'s own workers), kept on reload."""
        self.context = context or zmq.Context.instance()
        self.clients = KeyRing(cfg.client_keys)
        self.workers = KeyRing(cfg.worker_keys, self.local_workers)
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("broker.zap"))
        self._auth.start()
        self._configure()
        log.info("CURVE on: %d client and %d worker certificates", len(self.clients.names), len(self.workers.names))

    def _configure(self) -> None:
        # The callbacks are bound methods of the current rings: replacing the entry
        # is one dict assignment, atomic for the ZAP thread that reads it.
        self._auth.configure_curve_callback(FRONTEND_DOMAIN, self.clients)
        self._auth.configure_curve_callback(BACKEND_DOMAIN, self.workers)

    def reload(self) -> None:
        """Re-read both key directories (SIGHUP); new connections are checked against the new sets."""
        self.clients = KeyRing(self.cfg.client_keys)
        self.workers = KeyRing(self.cfg.worker_keys, self.local_workers)
        self._configure()
        log.info("reloaded keys: %d client and %d worker certificates", len(self.clients.names), len(self.workers.names))

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        """Make a ROUTER a CURVE server of ``domain`` (before ``bind``)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def worker_name(self, user_id: Optional[str]) -> Optional[str]:
        """The certificate a backend connection authenticated with, from ZAP's User-Id (the z85 key)."""
        if not user_id:
            return None
        return self.workers.names.get(user_id.encode())

    def may_register(self, name: str, service: str) -> bool:
        """``worker_services``: a listed certificate registers only its patterns, another any engine service."""
        allowed = self.cfg.worker_services.get(name)
        if allowed is None:
            return service.startswith(engines.service_prefixes())
        return any(fnmatch.fnmatchcase(service, pattern) for pattern in allowed)

    def stop(self) -> None:
        self._auth.stop()


class LocalWorkerKeys:
    """Key files ``serve`` makes for its own workers when their ``[[workers]]`` entry names none.

    A fresh key pair per ``serve`` start (certificate ``serve-local``) and the
    broker's public certificate, in a private temporary directory (0700, the
    secret file 0600) removed at exit: the workers are ``serve``'s own
    children, so they need no operator-managed key, and no long-lived secret
    is left behind."""

    def __init__(self, broker_public: bytes) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tts-broker-keys-"))
        self.public_file, self.secret_file = keys.create_pair(self.dir, LOCAL_WORKER)
        self.public = keys.public_key(self.public_file)
        self.broker_file = keys.write_public(self.dir / "broker.key", broker_public)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _loopback_host(host: str) -> bool:
    if host in ("*", ""):
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "lo":  # libzmq also binds interface names
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def is_local_endpoint(endpoint: str) -> bool:
    """True when only this host can connect: ``ipc://``, ``inproc://``, or TCP on a loopback address."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rpartition(":")[0] if ":" in rest else rest
    return _loopback_host(host)


def check_bind(endpoint: str, cfg: SecurityConfig, side: str) -> None:
    """Refuse (``ConfigError``) to bind a network address in plain text unless the config allows it."""
    if cfg.curve or cfg.allow_insecure or is_local_endpoint(endpoint):
        return
    raise ConfigError(
        f"refusing to bind the {side} on {endpoint}: other hosts could connect, and without CURVE "
        "everything (text and audio) crosses the network in plain text and any peer is served. "
        "Set [security] curve = true with keys (see README, \"Deploying across machines\"), or "
        "allow_insecure = true in [security] if this network is trusted."
    )


def secret_mode_ok(path: str | os.PathLike[str]) -> bool:
    """The secret certificate is readable by its owner only (no group/other bits)."""
    return os.stat(path).st_mode & 0o077 == 0
