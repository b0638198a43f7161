"""The driver's side of the L4 control wire: one CURVE DEALER per host, one I/O thread.

Where it sits: ``ClusterRuntime`` (pto/cluster/runtime.py) sends runs and releases through
``Links.send`` from any thread; the I/O thread owns every socket (ZeroMQ sockets are not
thread-safe), so a send is a message down an inproc PUSH (guarded by a lock) that the I/O
thread forwards to the host's DEALER. What the hosts send back is decoded in the I/O thread
and handed to ``on_message(host, msg)`` at once (no poll tick: a result is acted on the
moment it arrives). A host that says nothing, not even a heartbeat, for
``protocol.SILENT_LOST_S`` is reported once through ``on_silent(host)``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import zmq

from ..wire.errors import ProtocolError
from ..wire.sockets import incoming, send_frames
from . import protocol as P
from .keys import curve_client

log = logging.getLogger("pto.cluster.links")
_ids = itertools.count(1)
_SEND, _CONNECT, _STOP = b"S", b"C", b"X"


class Links:
    """Connections to the hosts of one cluster runtime."""

    def __init__(self, session: str, client_keys: dict[str, bytes],
                 on_message: Callable[[int, P.Message], None],
                 on_silent: Callable[[int], None]):
        self._session = session
        self._client = client_keys  # client_public, client_secret
        self._on_message = on_message
        self._on_silent = on_silent
        self._ctx = zmq.Context()
        address = f"inproc://pto-l4-links-{next(_ids)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(address)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # never drop nor block a send on a full pipe
        self._push.connect(address)
        self._push_lock = threading.Lock()
        self._pending_keys: dict[int, bytes] = {}  # host -> its server key, for _CONNECT
        self._socks: dict[int, zmq.Socket] = {}  # owned by the I/O thread
        self._heard: dict[int, float] = {}
        self._silent_told: set[int] = set()
        self._thread = threading.Thread(target=self._loop, name="pto-l4-io", daemon=True)
        self._thread.start()

    # ---- any thread --------------------------------------------------------------------

    def connect(self, host: int, endpoint: str, server_public: bytes) -> None:
        """(Re)connect to ``host`` at ``endpoint`` (dropping an older connection to it)."""
        with self._push_lock:
            self._pending_keys[host] = server_public
            send_frames(self._push, [_CONNECT, str(host).encode(), endpoint.encode()])

    def send(self, host: int, msg: P.Message) -> None:
        """Send ``msg`` to ``host`` (queued to the I/O thread; never blocks on the network)."""
        frames = P.encode(msg)
        with self._push_lock:
            send_frames(self._push, [_SEND, str(host).encode(), *frames])

    def close(self) -> None:
        with self._push_lock:
            send_frames(self._push, [_STOP])
        self._thread.join(10)
        self._push.close(0)
        self._ctx.term()

    # ---- the I/O thread ----------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        try:
            while self._serve_once(poller):
                pass
        finally:
            for sock in self._socks.values():
                sock.close(0)
            self._pull.close(0)

    def _serve_once(self, poller: zmq.Poller) -> bool:
        ready = dict(poller.poll(int(P.HEARTBEAT_S * 1000)))
        if self._pull in ready:
            for frames in incoming(self._pull):
                if not self._command(frames, poller):
                    return False
        by_sock = {id(s): h for h, s in self._socks.items()}
        now = time.monotonic()
        for sock in ready:
            host = by_sock.get(id(sock))
            if host is None:
                continue
            for frames in incoming(sock):
                self._heard[host] = now
                try:
                    msg = P.decode(frames)
                except ProtocolError as exc:
                    log.warning("host %d sent a frame that does not decode: %s", host, exc)
                    continue
                if not isinstance(msg, P.Heartbeat):
                    self._deliver(host, msg)
        for host, heard in self._heard.items():
            if now - heard > P.SILENT_LOST_S and host not in self._silent_told:
                self._silent_told.add(host)
                try:
                    self._on_silent(host)
                except Exception:  # the runtime's bookkeeping must not stop the wire
                    log.exception("on_silent(%d) failed", host)
        return True

    def _deliver(self, host: int, msg: P.Message) -> None:
        try:
            self._on_message(host, msg)
        except Exception:
            log.exception("handling %s from host %d failed", type(msg).__name__, host)

    def _command(self, frames: list[bytes], poller: zmq.Poller) -> bool:
        kind = frames[0]
        if kind == _STOP:
            return False
        host = int(frames[1])
        if kind == _CONNECT:
            old = self._socks.pop(host, None)
            if old is not None:
                poller.unregister(old)
                old.close(0)
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # a host restarting must not block this thread
            sock.setsockopt(zmq.MAXMSGSIZE, -1)  # values may be large; the peer is trusted
            with self._push_lock:
                server_public = self._pending_keys[host]
            curve_client(sock, {**self._client, "server_public": server_public})
            sock.connect(bytes(frames[2]).decode())
            send_frames(sock, P.encode(P.Hello(self._session)))
            poller.register(sock, zmq.POLLIN)
            self._socks[host] = sock
            self._heard[host] = time.monotonic()
            self._silent_told.discard(host)
            return True
        sock = self._socks.get(host)
        if sock is None:
            log.debug("dropped a message for host %d: not connected", host)
            return True
        send_frames(sock, frames[2:])
        return True
