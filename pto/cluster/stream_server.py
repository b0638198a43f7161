"""The producer side of host-to-host tensor streams: one ``TensorServer`` per host.

It binds a ROUTER on ``tcp://<bind_host>:<port>`` and answers "bytes [offset, offset+n) of
tensor KEY" with a slice of the memoryview its owner's ``lookup(KEY)`` returns, sent
zero-copy (libzmq writes straight from the producer's mapping to the socket). One thread
serves the socket, the session's ZAP authentication (see ``pto.cluster.stream``), and a
wake-up pipe that ``close()`` uses; the server owns its zmq context, so closing it leaves
no thread, socket or port behind. Requests that are not ours are dropped and logged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import zmq

from .stream import (
    BAD_RANGE,
    FAILED,
    MAGIC,
    MAX_KEY_BYTES,
    MAX_REQUEST_BYTES,
    OK,
    REPLY,
    REQUEST,
    UNKNOWN,
    StreamAuth,
    zap_reply,
)

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by ZeroMQ: one ZAP handler per context
STAT_NAMES = ("requests", "transfers", "bytes_sent", "unknown", "dropped", "accepted",
              "denied", "unreachable")


class TensorServer:
    """Serve this host's tensors to the session's other hosts.

    ``bind_host`` is this node's address as the other hosts reach it (``address`` is then
    ``tcp://<bind_host>:<port>``, the port a free one unless given). ``lookup(key)`` returns
    a memoryview of the tensor's mapping (or None: "unknown tensor"); it is called from the
    server's thread. ``max_chunk_bytes`` bounds one reply.
    """

    def __init__(self, bind_host: str, auth: StreamAuth,
                 lookup: Callable[[str], memoryview | None], port: int = 0,
                 max_chunk_bytes: int = 64 << 20):
        self._auth = auth
        self._lookup = lookup
        self._max_chunk = max_chunk_bytes
        self._stats = dict.fromkeys(STAT_NAMES, 0)
        self._ctx = zmq.Context(io_threads=1)
        try:
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.linger = 0
            self._zap.bind(ZAP_ENDPOINT)
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.linger = 0
            self._router.router_mandatory = True  # a gone peer is an error, not a silent drop
            self._router.maxmsgsize = MAX_REQUEST_BYTES
            auth.secure_server(self._router)
            if port:
                self._router.bind(f"tcp://{bind_host}:{port}")
            else:
                self._router.bind(f"tcp://{bind_host}:*")
            self.address: str = self._router.last_endpoint.decode()
            self._wake_rx = self._ctx.socket(zmq.PAIR)
            self._wake_rx.bind(f"inproc://pto-stream-wake-{id(self)}")
            self._wake_tx = self._ctx.socket(zmq.PAIR)
            self._wake_tx.connect(f"inproc://pto-stream-wake-{id(self)}")
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="pto-tensor-server",
                                        daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, int]:
        """Counters since start: requests (chunks asked), transfers (requests at offset 0,
        i.e. fetches begun), bytes_sent, unknown (keys not found), dropped (malformed
        requests), accepted and denied (handshakes: connections of session members, and of
        peers without the credentials), unreachable (replies to gone peers)."""
        return dict(self._stats)

    def close(self) -> None:
        """Stop serving: the thread ends, sockets close, the port is free. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(zmq.Again):  # no reader: the thread already ended
                self._wake_tx.send(b"", zmq.NOBLOCK)
            self._thread.join()
            self._wake_tx.close()
            self._ctx.term()  # every socket is closed: returns at once

    def __enter__(self) -> TensorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self._router, self._zap, self._wake_rx):
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_rx in ready:
                    return
                if self._zap in ready:
                    self._authenticate()
                if self._router in ready:
                    self._serve_requests()
        except Exception:  # a bug: say so loudly, and leave clients to time out
            log.exception("tensor server %s stopped", self.address)
        finally:
            for sock in (self._router, self._zap, self._wake_rx):
                sock.close(linger=0)

    def _authenticate(self) -> None:
        request = self._zap.recv_multipart()
        try:
            reply, allowed, address = zap_reply(self._auth, request)
        except Exception:  # never let a peer's odd handshake stop the server: refuse it
            log.exception("tensor server %s: ZAP request failed", self.address)
            reply, allowed, address = [b"1.0", request[1] if len(request) > 1 else b"",
                                       b"500", b"internal error", b"", b""], False, b"?"
        self._stats["accepted" if allowed else "denied"] += 1
        if not allowed:
            log.warning("tensor server %s: refused a peer at %s without the session's "
                        "credentials", self.address, address.decode(errors="replace"))
        self._zap.send_multipart(reply)

    def _serve_requests(self) -> None:
        # A bounded batch, so ZAP and close() are never starved by a busy peer.
        for _ in range(64):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._answer(frames)

    def _answer(self, frames: list[bytes]) -> None:
        if (len(frames) != 4 or frames[1] != MAGIC or len(frames[2]) > MAX_KEY_BYTES
                or len(frames[3]) != REQUEST.size):
            self._stats["dropped"] += 1
            log.warning("tensor server %s: dropped a malformed request (%d frame(s))",
                        self.address, len(frames))
            return
        identity, _, key_bytes, header = frames
        tag, offset, n = REQUEST.unpack(header)
        self._stats["requests"] += 1
        key = key_bytes.decode(errors="replace")
        try:
            view = self._lookup(key)
        except Exception as exc:  # the owner's bug must not stop the server
            log.exception("tensor server %s: lookup(%r) failed", self.address, key)
            return self._reply(identity, FAILED, tag, offset, n, f"lookup failed: {exc!r}")
        if view is None:
            self._stats["unknown"] += 1
            return self._reply(identity, UNKNOWN, tag, offset, n, f"unknown tensor {key!r}")
        if offset + n > view.nbytes or n > self._max_chunk:
            return self._reply(identity, BAD_RANGE, tag, offset, n,
                               f"bytes [{offset}, {offset + n}) of tensor {key!r} "
                               f"({view.nbytes} bytes, at most {self._max_chunk} a chunk)")
        if offset == 0:
            self._stats["transfers"] += 1
        flat = view if view.ndim == 1 and view.format == "B" else view.cast("B")
        # Counted before the send: a client may read the stats as soon as its data arrived.
        self._stats["bytes_sent"] += n
        if not self._send(identity, REPLY.pack(OK, tag, offset, n), flat[offset:offset + n]):
            self._stats["bytes_sent"] -= n

    def _reply(self, identity: bytes, status: int, tag: int, offset: int, n: int,
               message: str) -> None:
        self._send(identity, REPLY.pack(status, tag, offset, n), message.encode())

    def _send(self, identity: bytes, header: bytes, body: memoryview | bytes) -> bool:
        try:
            self._router.send(identity, zmq.SNDMORE | zmq.NOBLOCK)
            self._router.send(header, zmq.SNDMORE | zmq.NOBLOCK)
            self._router.send(body, zmq.NOBLOCK, copy=False)
            return True
        except (zmq.Again, zmq.ZMQError) as exc:
            # The peer left (EHOSTUNREACH) or stopped reading: it will time out or retry.
            self._stats["unreachable"] += 1
            log.debug("tensor server %s: reply not sent: %s", self.address, exc)
            return False
