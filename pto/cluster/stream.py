"""Host-to-host tensor streams (L4): the shared parts of ``stream_server`` and ``stream_fetch``.

Where this sits: a tensor that one host produced and another host's run needs crosses the
network exactly once, producer's shared-memory mapping -> tcp -> consumer's new segment,
with no Ray object store in between. Each host runs one ``TensorServer``; a consumer's
``Fetcher`` pulls the bytes in chunks with a bounded number in flight, receiving each one
straight into its slice of the destination (``Socket.recv_into``, pyzmq >= 26.4). The server
sends slices of the producer's mapping zero-copy (``send(view, copy=False)``). Memory in
flight is at most ``window * chunk_bytes`` on the consumer and nothing extra on the producer,
however large the tensor.

API (everything a caller needs; all of it thread-safe unless said otherwise)::

    from pto.cluster.stream import StreamAuth, StreamError, StreamLost, UnknownTensor
    from pto.cluster.stream_server import TensorServer
    from pto.cluster.stream_fetch import Fetcher

    auth = StreamAuth.new(encrypt=False)        # once per session, shipped to hosts by Ray
    server = TensorServer("127.0.0.1", auth, lookup)   # lookup(key) -> memoryview | None
    #        (optional: port=0 for any free one, max_chunk_bytes=64 << 20 per reply)
    server.address                              # "tcp://127.0.0.1:41234"
    server.stats()                              # {"requests", "transfers", "bytes_sent", ...}
    server.close()

    fetcher = Fetcher(auth, chunk_bytes=4 << 20, window=4, timeout=5.0)
    copied = fetcher.fetch(server.address, key, nbytes, dest)   # dest: writable buffer
    dest, copied = fetcher.fetch_shared(server.address, key, nbytes, make_dest, discard)
    fetcher.close()

- ``StreamAuth(secret, curve=None)``: ``secret`` (1..255 bytes) authenticates every stream
  of the session; ``curve=(server_public, server_secret, client_public, client_secret)``
  (Z85 bytes, ``zmq.curve_keypair()``) turns on CURVE encryption instead. ``StreamAuth.new``
  makes both. It pickles (Ray ships it) and never shows its secrets in ``repr``.
- ``lookup`` runs on the server's thread, once per chunk: keep it a dictionary look-up. The
  server counts in ``stats()``: requests (chunks), transfers (requests at offset 0), bytes
  sent, unknown keys, dropped (malformed) requests, denied handshakes.
- ``fetch`` copies bytes ``[0, nbytes)`` of tensor ``key`` into ``dest`` and returns
  ``nbytes``. ``fetch_shared`` is the once-only form for concurrent fetches of one tensor in
  one process: the first caller of an (address, key) calls ``make_dest()`` and fetches; every
  caller that arrives while that fetch runs waits for it and gets the same destination, with
  ``copied == 0`` (so bytes-copied counters count the network copy once). If the fetch fails,
  ``discard(dest)`` (when given) runs once, and every waiter raises the same error. Only
  fetches in flight are merged: keeping a fetched tensor for later users is the caller's job.
- Errors (all ``StreamError``, a ``pto.PtoError``): ``StreamLost`` (server unreachable, its
  connection dropped during the fetch, or silent for ``timeout`` seconds), ``StreamRefused``
  (a ``StreamLost``: the handshake failed, our credentials are not the server's session's;
  told at once, not after the timeout), ``UnknownTensor`` (``lookup`` returned None),
  ``StreamCorrupt`` (a reply of the wrong length or shape; never silently written),
  ``StreamClosed`` (the fetcher was closed during the fetch). ``ValueError`` for a
  destination that is read-only, not contiguous or too small, or a key over 1024 bytes.
  A 0-byte fetch still asks the server once (the key must exist).
- The producer's mapping must stay open while chunks of it are in flight: free a tensor by
  dropping references (or unlinking its name); an ``mmap.close()`` while a chunk is in flight
  raises ``BufferError`` (ignore it: the mapping goes with the last view).

Authentication, not encryption, by default. ZeroMQ's PLAIN mechanism with the session secret
as password, checked by our own ZAP handler, run by the server's thread on the server's own
context. A peer without the secret never gets a message through: the handshake fails before
any frame reaches the server. Why PLAIN: it is ZeroMQ's standard authentication without
encryption, and costs nothing per byte. What it does not protect against: a peer that can
*read* the network sees the password (and the tensors) — the same exposure as the unencrypted
tensors themselves, and Ray's own object transfer, which has no authentication at all. On
an untrusted network use ``encrypt=True`` (CURVE: the session's keys authenticate both ends
and encrypt every byte). CURVE cannot authenticate without also encrypting, and an HMAC
handshake of our own would be code to maintain for no gain over PLAIN in this threat model.
Why our own ZAP handler rather than ``zmq.auth.ThreadAuthenticator``: the latter decodes the
password as text (distinct byte secrets can compare equal), compares it in non-constant time,
logs it in the clear at debug level, and needs a thread of its own.

Cost of CURVE (``encrypt=True``), measured here: producer and consumer in two processes over
127.0.0.1, 4 MiB chunks, 4 in flight, plain and CURVE fetches interleaved, 7 each, on this
2-core machine while four other sessions kept it busy (load average 11-13, so wall times are
high and noisy; CPU time per fetch is the steadier measure):

  tensor   plain, wall median (best)   CURVE, wall median (best)   CPU, consumer+producer
  64 MiB   132 ms (87 ms)              674 ms (577 ms)             plain 80+20, CURVE 200+160 ms
  256 MiB  1,212 ms (793 ms)           5,180 ms (3,935 ms)         plain 310+110, CURVE 900+760 ms

CURVE costs 2.5x the consumer's CPU and 7x the producer's (which otherwise only hands pages
to the kernel), about 5x the wall time: on by request only. Memory in flight, 256 MiB tensor:
consumer peak 16 MiB beyond its destination (plain; 8 MiB with CURVE), producer 1 MiB (13 MiB
with CURVE, whose encryption copies each chunk). 4 MiB chunks: 1 MiB ones cost more CPU per
byte, one 64 MiB message costs the consumer twice the CPU (a fresh 64 MiB buffer each time).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import struct
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

from ..wire.errors import PtoError

log = logging.getLogger(__name__)

MAGIC = b"PTOS1"  # first frame of every request: protocol and version
ZAP_DOMAIN = b"pto-stream"
USERNAME = b"pto-stream"
# request: tag (one per fetch), offset, n; reply header: status, tag, offset, n
REQUEST = struct.Struct("<QQQ")
REPLY = struct.Struct("<BQQQ")
OK, UNKNOWN, BAD_RANGE, FAILED = 0, 1, 2, 3
MAX_KEY_BYTES = 1024
MAX_REQUEST_BYTES = 4096  # bigger request frames drop the peer (libzmq MAXMSGSIZE)


class StreamError(PtoError):
    """A tensor stream failed."""


class StreamLost(StreamError):
    """The server could not be reached, died, or did not answer in time."""


class StreamRefused(StreamLost):
    """The server refused our credentials: it is not a host of this session (or no longer:
    a restarted host with new keys)."""


class UnknownTensor(StreamError, KeyError):
    """The server has no tensor of that key."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


class StreamCorrupt(StreamError):
    """A reply did not have the shape or length that was asked for."""


class StreamClosed(StreamError):
    """The fetcher was closed while a fetch ran."""


@dataclass(frozen=True)
class StreamAuth:
    """A session's credentials for tensor streams: a secret, and CURVE keys when encrypted."""

    secret: bytes = field(repr=False)
    curve: tuple[bytes, bytes, bytes, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or not 1 <= len(self.secret) <= 255:
            raise ValueError("StreamAuth.secret must be 1 to 255 bytes")
        if self.curve is not None:
            if len(self.curve) != 4 or any(
                    not isinstance(k, bytes) or len(k) != 40 for k in self.curve):
                raise ValueError("StreamAuth.curve must be four Z85 keys of 40 bytes "
                                 "(server public, server secret, client public, client secret)")

    @classmethod
    def new(cls, encrypt: bool = False) -> StreamAuth:
        """Fresh credentials for one session; with ``encrypt``, fresh CURVE keys too."""
        curve = (*zmq.curve_keypair(), *zmq.curve_keypair()) if encrypt else None
        return cls(secrets.token_bytes(32), curve)

    @property
    def encrypted(self) -> bool:
        return self.curve is not None

    def __repr__(self) -> str:
        return f"StreamAuth(encrypted={self.encrypted})"

    def secure_server(self, sock: zmq.Socket) -> None:
        """Make a server socket demand these credentials (ZAP must run on its context)."""
        sock.zap_domain = ZAP_DOMAIN
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.curve[0], self.curve[1]
        else:
            sock.plain_server = True

    def secure_client(self, sock: zmq.Socket) -> None:
        """Make a client socket present these credentials."""
        if self.curve is not None:
            sock.curve_serverkey = self.curve[0]
            sock.curve_publickey, sock.curve_secretkey = self.curve[2], self.curve[3]
        else:
            sock.plain_username = USERNAME
            sock.plain_password = self.secret

    def allows(self, mechanism: bytes, credentials: list[bytes]) -> bool:
        """The ZAP decision: does a peer with these credentials belong to the session?"""
        if self.curve is not None:
            return (mechanism == b"CURVE" and len(credentials) == 1
                    and hmac.compare_digest(credentials[0], z85.decode(self.curve[2])))
        return (mechanism == b"PLAIN" and len(credentials) == 2
                and hmac.compare_digest(credentials[0], USERNAME)
                and hmac.compare_digest(credentials[1], self.secret))


def zap_reply(auth: StreamAuth, request: list[bytes]) -> tuple[list[bytes], bool, bytes]:
    """Answer one ZAP request (RFC 27): the reply frames, whether allowed, the peer address."""
    if len(request) < 6 or request[0] != b"1.0":
        return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad ZAP request",
                b"", b""], False, b"?"
    _version, request_id, domain, address, _identity, mechanism, *credentials = request
    allowed = domain == ZAP_DOMAIN and auth.allows(mechanism, credentials)
    status = (b"200", b"OK") if allowed else (b"400", b"not a member of this session")
    return [b"1.0", request_id, *status, USERNAME if allowed else b"", b""], allowed, address
