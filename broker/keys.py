"""CurveZMQ key pairs in ``zmq.auth``'s certificate files, and the connecting side's socket options.

Every peer of the project that connects (clients, engine workers) and the
broker that binds read the same files: the ones ``zmq.auth.create_certificates``
writes and ``tts-broker keys`` makes, ``NAME.key`` holding the public key and
``NAME.key_secret`` the public and the secret one, as z85 text. Using the
library's format (not one of our own) means czmq/zmq tools and other languages'
clients read them too.

A key may be given as a path (``str`` or ``os.PathLike``: a certificate file)
or as ``bytes`` (the 40-character z85 key itself), so that a program holding
its keys elsewhere (a secret store) needs no file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import zmq
import zmq.auth
from zmq.utils import z85

KeySource = Union[str, "os.PathLike[str]", bytes]
"""A certificate file's path, or the z85 key itself as bytes."""

Z85_KEY_LEN = 40
"""A 32-byte Curve25519 key in z85 text."""


class CertificateError(ValueError):
    """A key or certificate file that cannot be used; the message names it and why."""


@dataclass(frozen=True)
class CurveKeys:
    """What a connecting socket needs for CURVE: its own key pair and the server's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes


def check_z85(key: bytes, what: str) -> bytes:
    """``key`` if it is a well-formed z85 Curve25519 key, else :class:`CertificateError` naming ``what``."""
    if len(key) != Z85_KEY_LEN:
        raise CertificateError(f"{what}: a z85 key has {Z85_KEY_LEN} characters, got {len(key)}")
    try:
        z85.decode(key)
    except (ValueError, KeyError):
        raise CertificateError(f"{what}: not z85 text") from None
    return key


def _load(path: Union[str, "os.PathLike[str]"]) -> tuple[bytes, Optional[bytes]]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read certificate {os.fspath(path)}: {exc}") from None
    check_z85(public, f"{os.fspath(path)} public-key")
    if secret is not None:
        check_z85(secret, f"{os.fspath(path)} secret-key")
    return public, secret


def public_key(source: KeySource) -> bytes:
    """The public key of a certificate file (public or secret one), or z85 bytes as given."""
    if isinstance(source, bytes):
        return check_z85(source, "public key")
    return _load(source)[0]


def key_pair(source: KeySource) -> tuple[bytes, bytes]:
    """(public, secret) from a secret certificate file, or from the z85 secret key (the public one is derived)."""
    if isinstance(source, bytes):
        secret = check_z85(source, "secret key")
        return zmq.curve_public(secret), secret
    public, secret = _load(source)
    if secret is None:
        raise CertificateError(f"{os.fspath(source)} holds no secret-key: give the NAME.key_secret file, not NAME.key")
    return public, secret


def connecting_keys(curve_key: Optional[KeySource], broker_key: Optional[KeySource]) -> Optional[CurveKeys]:
    """A client's or worker's CURVE keys; None (plain ZeroMQ) when neither is given.

    Both or neither: a secret key without the broker's public key (or the
    reverse) is a configuration mistake, never silently plain text."""
    if curve_key is None and broker_key is None:
        return None
    if curve_key is None or broker_key is None:
        raise CertificateError("CURVE needs both keys: the peer's own secret certificate (curve_key) and the broker's public one (broker_key)")
    public, secret = key_pair(curve_key)
    return CurveKeys(public, secret, public_key(broker_key))


def secure_connect(sock: zmq.Socket, keys: Optional[CurveKeys]) -> None:
    """Make ``sock`` a CURVE client of the broker (before ``connect``); nothing when ``keys`` is None."""
    if keys is None:
        return
    if not zmq.has("curve"):
        raise CertificateError("this libzmq was built without CURVE support")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server


def create_pair(directory: Union[str, "os.PathLike[str]"], name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` and ``DIR/NAME.key_secret`` with ``zmq.auth``; the secret one 0600.

    The files are created under a 077 umask, so the secret key is never
    readable by others, not even between its write and a chmod. Existing files
    are never overwritten: replacing a key is a deliberate act (delete first)."""
    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"bad certificate name {name!r}: a plain file name without '/' or a leading '.'")
    d = Path(directory)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise CertificateError(f"{path} exists; remove it first to replace the key pair")
    d.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        made_public, made_secret = zmq.auth.create_certificates(d, name)
    finally:
        os.umask(old)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)  # the public half is meant to be handed out
    return Path(made_public), Path(made_secret)


def write_public(path: Union[str, "os.PathLike[str]"], key: bytes) -> Path:
    """A public certificate file for ``key``, in ``zmq.auth``'s format (what ``load_certificate`` reads)."""
    check_z85(key, "public key")
    p = Path(path)
    p.write_text(f'#   ZeroMQ CURVE Public Certificate (tts-broker)\n\nmetadata\ncurve\n    public-key = "{key.decode()}"\n', encoding="utf-8")
    return p
