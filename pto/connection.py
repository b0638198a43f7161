"""The client's link to the broker: one DEALER socket owned by one I/O thread.

User threads never touch the socket: they queue encoded frames and wake the thread
through an eventfd. The thread sends, receives, heartbeats, and declares the broker lost
when it stays silent for ``heartbeat * liveness`` seconds or its process is gone, so no
wait on a result can hang on a dead broker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from . import protocol as P
from .errors import BrokerLost, ProtocolError
from .security import secure_client

log = logging.getLogger("pto.client")


class Connection:
    def __init__(self, address: str, owner: str, timeout: float,
                 watch: Callable[[], str | None] | None = None, trace: bool = False,
                 curve: str | None = None):
        self.address = address
        self._watch = watch  # returns why the broker is gone, or None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        if curve:
            secure_client(self.sock, curve)
        self.sock.connect(address)
        self._outbox: deque[list[bytes]] = deque()
        self._frees: deque[int] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.lost: BrokerLost | None = None
        self.on_message: Callable[[P.Message], None] = lambda msg: None
        self.on_lost: Callable[[BrokerLost], None] = lambda exc: None
        try:
            self.welcome = self._handshake(owner, timeout, trace)
        except BaseException:
            self._close_socket()
            raise
        self.heartbeat = self.welcome.heartbeat
        self.liveness = self.welcome.liveness
        self._last_recv = self._last_sent = time.monotonic()

    def _handshake(self, owner: str, timeout: float, trace: bool) -> P.Welcome:
        self.sock.send_multipart(P.encode(P.Hello(owner, os.getpid(), trace)))
        deadline = time.monotonic() + timeout
        while True:
            why = self._watch() if self._watch else None
            if why:
                raise BrokerLost(f"broker at {self.address} is gone: {why}")
            left = deadline - time.monotonic()
            if left <= 0:
                hint = (" (a tcp broker needs this client's CURVE keys: PTO_CURVE_DIR or curve=)"
                        if self.address.startswith("tcp://") else "")
                raise BrokerLost(
                    f"no broker answered at {self.address} within {timeout:g}s{hint}")
            if self.sock.poll(int(min(left, 0.1) * 1000)):
                msg = P.decode(self.sock.recv_multipart())
                if isinstance(msg, P.Welcome):
                    return msg
                if isinstance(msg, P.Error):
                    raise BrokerLost(f"broker at {self.address} refused us: {msg.message}")

    def recv_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Before start(): handle messages on this thread until ``done()`` or timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.sock.poll(int(min(left, 0.1) * 1000)):
                self.on_message(P.decode(self.sock.recv_multipart()))
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._io_loop, name="pto-io", daemon=True)
        self._thread.start()

    # ---- called from user threads ------------------------------------------------------

    def send(self, msg: P.Message) -> None:
        if self.lost is not None:
            raise self.lost
        if self._stop:
            raise BrokerLost("the connection to the broker is closed")
        self._outbox.append(P.encode(msg))
        os.eventfd_write(self._wake_fd, 1)

    def free(self, tensor: int) -> None:
        if self.lost is None and not self._stop:
            self._frees.append(tensor)
            os.eventfd_write(self._wake_fd, 1)

    def close(self, bye: bool = True) -> None:
        if bye and self.lost is None:
            self._outbox.append(P.encode(P.Bye()))
        self._stop = True
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(timeout=5)
        self._close_socket()

    def _close_socket(self) -> None:
        if not self.sock.closed:
            self._flush_outbox()
            self.sock.close(linger=200)
            self.ctx.term()
            os.close(self._wake_fd)

    # ---- the I/O thread ----------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        tick = min(self.heartbeat, 0.25)
        try:
            while not self._stop:
                ready = dict(poller.poll(int(tick * 1000)))
                if self._wake_fd in ready:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                self._flush_outbox()
                if self.sock in ready:
                    self._drain()
                self._check_liveness()
        except BrokerLost as exc:
            self._declare_lost(exc)
        except Exception as exc:  # noqa: BLE001 - never die silently with waiters blocked
            log.exception("client I/O thread failed")
            self._declare_lost(BrokerLost(f"client I/O failed: {exc!r}"))

    def _flush_outbox(self) -> None:
        if self._frees:
            tensors = []
            while self._frees:
                tensors.append(self._frees.popleft())
            self._outbox.append(P.encode(P.FreeTensors(tensors)))
        sent = False
        while self._outbox:
            self.sock.send_multipart(self._outbox.popleft())
            sent = True
        if sent:
            self._last_sent = time.monotonic()

    def _drain(self) -> None:
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            self._last_recv = time.monotonic()
            try:
                msg = P.decode(frames)
            except ProtocolError as exc:
                log.error("bad frame from broker: %s", exc)
                continue
            if isinstance(msg, P.Shutdown):
                raise BrokerLost(f"broker at {self.address} stopped: {msg.reason}")
            if isinstance(msg, P.Error):
                log.error("broker error: %s", msg.message)
            self.on_message(msg)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        why = self._watch() if self._watch else None
        if why:
            raise BrokerLost(f"broker at {self.address} is gone: {why}")
        silent = now - self._last_recv
        if silent > self.heartbeat * self.liveness:
            raise BrokerLost(f"broker at {self.address} silent for {silent:.1f}s")
        if now - self._last_sent > self.heartbeat:
            self._outbox.append(P.encode(P.Heartbeat()))
            self._flush_outbox()

    def _declare_lost(self, exc: BrokerLost) -> None:
        log.error("%s", exc)
        self.lost = exc
        self.on_lost(exc)
