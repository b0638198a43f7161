"""ZeroMQ CURVE for tcp brokers: only peers holding the keys may talk to a broker.

A key directory (made by ``pto keygen DIR``) holds ``broker.key``/``broker.key_secret``
(the broker's certificate), ``client.key``/``client.key_secret`` (the certificate clients
and workers present) and ``authorized/`` (the public certificates the broker accepts).
Over ipc the 0700 runtime directory already restricts peers to our user.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from . import config

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


def curve_dir(explicit: str | None = None,
              settings: config.Config | None = None) -> str | None:
    """The CURVE key directory to use: ``explicit``, else ``PTO_CURVE_DIR`` (from
    ``settings``, or read now), else None (no CURVE)."""
    if explicit:
        return explicit
    return (settings or config.load()).curve_dir


def _load(path: str) -> tuple[bytes, bytes | None]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"CURVE certificate {path} is missing (make one: pto keygen DIR)")
    return zmq.auth.load_certificate(path)


def secure_client(sock: zmq.Socket, directory: str) -> None:
    """Make ``sock`` present the client certificate and trust only the broker's key."""
    public, secret = _load(os.path.join(directory, "client.key_secret"))
    server_public, _ = _load(os.path.join(directory, "broker.key"))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def secure_server(ctx: zmq.Context, sockets: list[zmq.Socket],
                  directory: str) -> ThreadAuthenticator:
    """CURVE on the broker's sockets, accepting only certificates in ``authorized/``."""
    public, secret = _load(os.path.join(directory, "broker.key_secret"))
    from zmq.auth.thread import ThreadAuthenticator  # asyncio: only for a CURVE broker

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=os.path.join(directory, "authorized"))
    for sock in sockets:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    return auth


def keygen(directory: str, force: bool = False) -> dict[str, str]:
    """Create the key directory: broker and client certificates, and authorized/."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    existing = [n for n in ("broker.key_secret", "client.key_secret")
                if os.path.exists(os.path.join(directory, n))]
    if existing and not force:
        raise FileExistsError(f"{directory} already holds {existing} (use --force to replace)")
    authorized = os.path.join(directory, "authorized")
    os.makedirs(authorized, mode=0o700, exist_ok=True)
    paths = {}
    for name in ("broker", "client"):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        paths[name] = public
    shutil.copyfile(paths["client"], os.path.join(authorized, "client.key"))
    return paths
