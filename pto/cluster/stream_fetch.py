"""The consumer side of host-to-host tensor streams: ``Fetcher`` pulls a tensor from a host's
``TensorServer`` (``pto.cluster.stream_server``) into a destination the caller made.

It asks for the tensor in chunks, at most ``window`` in flight, and receives each chunk with
``recv_into`` straight into its slice of the destination, so nothing but ZeroMQ's buffers for
the chunks in flight is ever held. Every reply is checked (its fetch, its offset, its length)
before a byte is written. One DEALER per fetch in progress, kept in a small per-address pool
for the next fetch; a socket that saw an error is closed, never reused. ``fetch_shared``
merges concurrent fetches of one tensor. API and errors: ``pto.cluster.stream``.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from .stream import (
    BAD_RANGE,
    MAGIC,
    MAX_KEY_BYTES,
    OK,
    REPLY,
    REQUEST,
    UNKNOWN,
    StreamAuth,
    StreamClosed,
    StreamCorrupt,
    StreamError,
    StreamLost,
    StreamRefused,
    UnknownTensor,
)

if not hasattr(zmq.Socket, "recv_into"):
    raise ImportError(f"tensor streams need pyzmq >= 26.4 (Socket.recv_into); this is "
                      f"{zmq.__version__}")

D = TypeVar("D")
POLL_SLICE_MS = 100  # how often a waiting fetch looks at close()
IDLE_PER_ADDRESS = 4  # sockets kept per server for later fetches


class Fetcher:
    """Pull tensors from other hosts' ``TensorServer``s.

    ``chunk_bytes`` is one request's size, ``window`` how many requests may be in flight,
    ``timeout`` how long (s) a fetch waits for the server's next reply before ``StreamLost``.
    """

    def __init__(self, auth: StreamAuth, chunk_bytes: int = 4 << 20, window: int = 4,
                 timeout: float = 5.0):
        if chunk_bytes < 1 or window < 1 or timeout <= 0:
            raise ValueError("chunk_bytes and window must be >= 1, timeout > 0")
        self._auth = auth
        self._chunk = chunk_bytes
        self._window = window
        self._timeout = timeout
        self._ctx = zmq.Context(io_threads=1)
        self._lock = threading.Condition()
        self._idle: dict[str, list[_Link]] = {}
        self._active = 0
        self._closed = False
        self._shared: dict[tuple[str, str], Future] = {}
        # A fetch's tag: replies to an earlier fetch can never be taken for this one's.
        self._tags = itertools.count(secrets.randbits(48))

    def fetch(self, address: str, key: str, nbytes: int, dest: Any) -> int:
        """Copy bytes ``[0, nbytes)`` of tensor ``key`` at ``address`` into ``dest`` (a writable,
        contiguous buffer of at least ``nbytes``); returns ``nbytes``."""
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"a tensor key is at most {MAX_KEY_BYTES} bytes")
        # Our views of dest are released on the way out, error or not: a traceback that kept
        # them would keep the caller from closing its mapping.
        with memoryview(dest) as whole:
            if whole.readonly or not whole.c_contiguous:
                raise ValueError("fetch needs a writable, contiguous destination")
            if whole.nbytes < nbytes:
                raise ValueError(f"destination holds {whole.nbytes} bytes, the tensor {nbytes}")
            with whole.cast("B") as flat:
                return self._fetch(address, key, nbytes, flat)

    def _fetch(self, address: str, key: str, nbytes: int, view: memoryview) -> int:
        link = self._checkout(address)
        done = False
        try:
            self._pull(link, key, nbytes, view)
            done = True
        finally:
            with self._lock:
                idle = self._idle.setdefault(address, [])
                # After an error replies may still be on their way: never reuse that socket.
                if done and not self._closed and len(idle) < IDLE_PER_ADDRESS:
                    idle.append(link)
                else:
                    link.close()
                self._active -= 1
                self._lock.notify_all()
        return nbytes

    def fetch_shared(self, address: str, key: str, nbytes: int, make_dest: Callable[[], D],
                     discard: Callable[[D], None] | None = None) -> tuple[D, int]:
        """``fetch`` once for all callers of this (address, key) while one is in flight.

        The first caller makes the destination (``make_dest()``) and fetches: it gets
        ``(dest, nbytes)``; callers arriving meanwhile wait and get ``(dest, 0)``. On failure
        ``discard(dest)`` runs once and every caller raises the same error."""
        slot = (address, key)
        with self._lock:
            future = self._shared.get(slot)
            leader = future is None
            if leader:
                future = self._shared[slot] = Future()
        if not leader:
            return future.result(), 0
        dest: Any = None
        try:
            dest = make_dest()
            self.fetch(address, key, nbytes, dest)
        except BaseException as exc:
            if dest is not None and discard is not None:
                try:
                    discard(dest)
                except Exception as discard_exc:  # keep the fetch's error, note this one
                    exc.add_note(f"discarding the destination also failed: {discard_exc!r}")
            with self._lock:
                del self._shared[slot]
            future.set_exception(exc)
            raise
        with self._lock:
            del self._shared[slot]
        future.set_result(dest)
        return dest, nbytes

    def close(self) -> None:
        """Stop: fetches in progress raise ``StreamClosed`` (within 0.1 s), sockets close.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._lock.wait()
            for links in self._idle.values():
                for link in links:
                    link.close()
            self._idle.clear()
        self._ctx.term()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checkout(self, address: str) -> _Link:
        with self._lock:
            if self._closed:
                raise StreamClosed("the fetcher is closed")
            self._active += 1
            idle = self._idle.get(address)
            link = idle.pop() if idle else None
        try:
            if link is None:
                return _Link(self._ctx, self._auth, address, self._chunk)
            link.forget_events()  # a reconnection while it sat idle is no concern now
            return link
        except BaseException:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()
            raise

    def _pull(self, link: _Link, key: str, nbytes: int, dest: memoryview) -> None:
        tag = next(self._tags) & 0xFFFF_FFFF_FFFF_FFFF
        key_bytes = key.encode()
        pending: dict[int, int] = {}  # offset -> n of requests in flight
        sent = 0
        first = True  # a 0-byte tensor still asks once: the key must exist
        while first or sent < nbytes or pending:
            while (first or sent < nbytes) and len(pending) < self._window:
                n = min(self._chunk, nbytes - sent)
                link.sock.send_multipart([MAGIC, key_bytes, REQUEST.pack(tag, sent, n)])
                pending[sent] = n
                sent += n
                first = False
            self._wait(link, key)
            self._take_reply(link.sock, key, tag, pending, dest)

    def _wait(self, link: _Link, key: str) -> None:
        """Until a reply is readable; raises if the connection failed or went silent."""
        deadline = time.monotonic() + self._timeout
        while True:
            ready = dict(link.poller.poll(POLL_SLICE_MS))
            if link.sock in ready:  # replies that arrived before any failure count first
                return
            if link.monitor in ready:
                link.check_events(key)
            if self._closed:
                raise StreamClosed(f"the fetcher was closed while fetching {key!r}")
            if time.monotonic() > deadline:
                raise StreamLost(f"no reply for tensor {key!r} from {link.address} in "
                                 f"{self._timeout:g} s: the host is gone or unreachable")

    def _take_reply(self, sock: zmq.Socket, key: str, tag: int, pending: dict[int, int],
                    dest: memoryview) -> None:
        header = sock.recv()
        if len(header) != REPLY.size or not sock.rcvmore:
            _drain(sock)
            raise StreamCorrupt(f"malformed reply for tensor {key!r} ({len(header)} bytes)")
        status, reply_tag, offset, n = REPLY.unpack(header)
        if reply_tag != tag or pending.get(offset) != n:
            _drain(sock)
            raise StreamCorrupt(f"reply for bytes [{offset}, {offset + n}) of tensor {key!r} "
                                f"was not asked for")
        if status != OK:
            message = sock.recv().decode(errors="replace")
            _drain(sock)
            if status == UNKNOWN:
                raise UnknownTensor(message)
            if status == BAD_RANGE:
                raise StreamCorrupt(f"server refused the range: {message}")
            raise StreamError(f"server failed: {message}")
        if n:
            with dest[offset:offset + n] as piece:
                got = sock.recv_into(piece)
        else:
            got = len(sock.recv())
        if got != n or sock.rcvmore:
            _drain(sock)
            raise StreamCorrupt(f"reply for bytes [{offset}, {offset + n}) of tensor {key!r} "
                                f"held {got} bytes")
        del pending[offset]


class _Link:
    """One DEALER to a server, with a monitor that tells a refused handshake or a dropped
    connection at once (instead of after the timeout). Used by one thread at a time."""

    FAILURES = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, ctx: zmq.Context, auth: StreamAuth, address: str, chunk_bytes: int):
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        # A rogue reply cannot balloon (the margin: CURVE's per-message overhead).
        self.sock.maxmsgsize = chunk_bytes + (1 << 16)
        auth.secure_client(self.sock)
        self.monitor = self.sock.get_monitor_socket(self.FAILURES)
        self.monitor.linger = 0
        try:
            self.sock.connect(address)
        except BaseException:
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def forget_events(self) -> None:
        while self.monitor.poll(0):
            self.monitor.recv_multipart()

    def check_events(self, key: str) -> None:
        """Raise for the first failure the monitor reported."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                raise StreamLost(f"the connection to {self.address} dropped while fetching "
                                 f"tensor {key!r}: the host is gone")
            raise StreamRefused(f"{self.address} refused our credentials for tensor {key!r} "
                                f"({event.name}): not a host of this session")

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _drain(sock: zmq.Socket) -> None:
    """Discard the rest of a multipart message (the socket is closed after the error)."""
    while sock.rcvmore:
        sock.recv_into(bytearray())
