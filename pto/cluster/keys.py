"""The keys of one cluster session: made by the driver, handed to host actors through Ray.

``SessionKeys.new()`` makes a CURVE key pair for the hosts' control endpoints (server), one
for the driver (client) and a secret for tensor streams. They live in memory only: the
driver passes them to each host actor in a Ray call (``HostActor.open``), and a restarted
actor gets a fresh set (the driver makes new ones then). A host's endpoint accepts only
the session's client key (``serve_curve``): a peer without it completes no handshake and
gets nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator


@dataclass(frozen=True)
class SessionKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    stream_secret: bytes

    @classmethod
    def new(cls) -> SessionKeys:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret,
                   secrets.token_bytes(32))

    def for_host(self) -> dict[str, bytes]:
        """What a host needs: its server keys, the client key to accept, the stream secret
        (and the client pair: hosts fetch from each other's streams)."""
        return {"server_public": self.server_public, "server_secret": self.server_secret,
                "client_public": self.client_public, "client_secret": self.client_secret,
                "stream_secret": self.stream_secret}

    def __repr__(self) -> str:  # never print a secret
        return "SessionKeys(...)"


class _OneKey:
    """ZAP credentials provider: accepts exactly one client public key."""

    def __init__(self, client_public: bytes):
        self._allowed = client_public

    def callback(self, domain: str, z85_key: bytes) -> bool:
        return secrets.compare_digest(z85_key, self._allowed)


def serve_curve(ctx: zmq.Context, sock: zmq.Socket, keys: dict[str, Any]) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server with the session's keys, admitting only its client key
    (stop the returned authenticator after closing the socket)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_OneKey(keys["client_public"]))
    sock.curve_server = True
    sock.curve_publickey = keys["server_public"]
    sock.curve_secretkey = keys["server_secret"]
    return auth


def curve_client(sock: zmq.Socket, keys: SessionKeys | dict[str, Any]) -> None:
    """Make ``sock`` present the session's client key and trust only its server key."""
    get = keys.get if isinstance(keys, dict) else (lambda k: getattr(keys, k))
    sock.curve_publickey = get("client_public")
    sock.curve_secretkey = get("client_secret")
    sock.curve_serverkey = get("server_public")
