"""The client's link to the broker: two DEALER sockets and one I/O thread.

Requests (registrations, task batches, frees, cancels) leave on ``tx`` straight from the
thread that makes them, under a lock, so a run costs no thread hop on the way out.
Results arrive on ``rx``, which one thread at a time drives (polls, decodes, hands to
``on_message``): normally the I/O thread, but a caller blocked in ``wait_until`` (as
``rt.run`` is) takes ``rx`` over, so its result wakes it directly instead of waking the
I/O thread that then wakes it. Whoever drives also sends heartbeats and declares the
broker lost when it stays silent for ``heartbeat * liveness`` seconds or its process is
gone, so no wait on a result can hang on a dead broker. The broker knows ``tx`` as the
same client from its first message, ``Attach``.
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
from .shm import pid_alive, pid_state

log = logging.getLogger("pto.client")

# After a caller stops driving rx, the I/O thread waits this long before taking it back.
_LINGER = 0.005


class Connection:
    def __init__(self, address: str, owner: str, timeout: float,
                 watch: Callable[[], str | None] | None = None, trace: bool = False,
                 curve: str | None = None):
        self.address = address
        self._watch = watch  # returns why the broker is gone, or None
        self.ctx = zmq.Context()
        self.rx = self._socket(curve)
        self.tx = self._socket(curve)
        self._rx_poller = zmq.Poller()  # Socket.poll() would build one per call
        self._rx_poller.register(self.rx, zmq.POLLIN)
        self._tx_lock = threading.Lock()
        # (tensor, kept) appended by GC finalizers too: sent with the next batch
        self._frees: deque[tuple[int, bool]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._rx_lock = threading.Lock()  # held by the thread driving rx
        self._callers = 0  # callers in wait_until: the I/O thread leaves rx to them
        self._callers_changed = threading.Condition()
        self._caller_left = 0.0
        self._io_polling = False  # the I/O thread is (about to be) in its poll on rx
        self.lost: BrokerLost | None = None
        self.on_message: Callable[[P.Message], None] = lambda msg: None
        self.on_lost: Callable[[BrokerLost], None] = lambda exc: None
        try:
            self.welcome = self._handshake(owner, timeout, trace)
            self.tx.send_multipart(P.encode(P.Attach(self.welcome.client, owner)))
        except BaseException:
            self._close_sockets()
            raise
        self.heartbeat = self.welcome.heartbeat
        self.liveness = self.welcome.liveness
        # On this host a busy broker may be silent for a while: watch its process instead.
        self._broker_pid = self.welcome.pid if address.startswith("ipc://") else 0
        self._last_recv = self._last_sent = time.monotonic()
        self._tick = min(self.heartbeat, 0.25)
        self._next_check = 0.0  # liveness is checked once per tick, not per message

    def _socket(self, curve: str | None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        if curve:
            secure_client(sock, curve)
        sock.connect(self.address)
        return sock

    def _handshake(self, owner: str, timeout: float, trace: bool) -> P.Welcome:
        self.rx.send_multipart(P.encode(P.Hello(owner, os.getpid(), trace)))
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
            if self.rx.poll(int(min(left, 0.1) * 1000)):
                msg = P.decode(self.rx.recv_multipart())
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
            self._pump(min(left, 0.1))
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._io_loop, name="pto-io", daemon=True)
        self._thread.start()

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive ``rx`` on the calling thread until ``done()`` (True) or timeout (False).

        Callers that block on a result use this rather than an Event the I/O thread sets:
        the answer then wakes one thread, not two. A broker declared lost here is reported
        through ``on_lost`` as from the I/O thread.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._callers_changed:
            self._callers += 1
        if self._io_polling:  # after our increment (see _io_loop): it lets go of rx
            os.eventfd_write(self._wake_fd, 1)
        try:
            while not done():
                if self.lost is not None or self._stop:
                    return done()
                left = self._tick if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                # Another caller, or the I/O thread finishing its poll, may hold rx.
                if not self._rx_lock.acquire(timeout=min(left, 0.01)):
                    continue
                try:
                    while not done() and self.lost is None and not self._stop:
                        left = self._tick if deadline is None else deadline - time.monotonic()
                        if left <= 0:
                            return False
                        self._pump(min(left, self._tick))
                finally:
                    self._rx_lock.release()
            return True
        except BrokerLost as exc:
            self._declare_lost(exc)
            return done()
        finally:
            with self._callers_changed:
                self._callers -= 1
                self._caller_left = time.monotonic()

    # ---- called from any thread --------------------------------------------------------

    def send(self, msg: P.Message) -> None:
        """Send a request now, from the calling thread."""
        if self.lost is not None:
            raise self.lost
        if self._stop:
            raise BrokerLost("the connection to the broker is closed")
        frames = P.encode(msg)
        with self._tx_lock:
            self._send_frees()
            self.tx.send_multipart(frames)

    def free(self, tensor: int, kept: bool = False) -> None:
        """Tell the broker (and so the workers) a tensor is gone, or its segment ``kept``
        for reuse; batched, never blocks."""
        if self.lost is None and not self._stop:
            self._frees.append((tensor, kept))
            if len(self._frees) == 1:
                os.eventfd_write(self._wake_fd, 1)  # the I/O thread sends it if nobody else

    def _send_frees(self) -> None:
        # Caller holds _tx_lock. GC finalizers only append to the deque, never send.
        if self._frees:
            gone, kept = [], []
            while self._frees:
                tensor, keep = self._frees.popleft()
                (kept if keep else gone).append(tensor)
            self.tx.send_multipart(P.encode(P.FreeTensors(gone, kept)))

    def close(self, bye: bool = True) -> None:
        self._stop = True
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            with self._callers_changed:
                self._callers_changed.notify_all()
            self._thread.join(timeout=5)
        if bye and self.lost is None:
            with self._tx_lock:
                self._send_frees()
                self.tx.send_multipart(P.encode(P.Bye()))
        self._close_sockets()

    def _close_sockets(self) -> None:
        if not self.rx.closed:
            self.rx.close(0)
            self.tx.close(linger=200)  # let a Bye leave
            self.ctx.term()
            os.close(self._wake_fd)

    # ---- the I/O thread ----------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.rx, zmq.POLLIN)
        poller.register(self._wake_fd, zmq.POLLIN)
        try:
            while not self._stop and self.lost is None:
                # Set before looking at _callers, which callers bump before looking at
                # this: either we see them, or they see us polling and wake us.
                self._io_polling = True
                if self._callers or time.monotonic() - self._caller_left < _LINGER:
                    # A caller drives rx. Lingering a little after it leaves spares a
                    # wake-up per call when calls come back to back.
                    self._io_polling = False
                    with self._callers_changed:
                        self._callers_changed.wait(_LINGER)
                    self._send_frees_if_free()
                    continue
                with self._rx_lock:
                    wait = max(0.0, self._next_check - time.monotonic())
                    ready = dict(poller.poll(int(wait * 1000) + 1))
                    self._io_polling = False
                    if self._wake_fd in ready:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                    self._send_frees_if_free()
                    if self.rx in ready:
                        self._drain()
                    self._check_liveness_when_due()
        except BrokerLost as exc:
            self._declare_lost(exc)
        except Exception as exc:  # noqa: BLE001 - never die silently with waiters blocked
            log.exception("client I/O thread failed")
            self._declare_lost(BrokerLost(f"client I/O failed: {exc!r}"))

    def _send_frees_if_free(self) -> None:
        if self._frees and self._tx_lock.acquire(blocking=False):
            try:
                self._send_frees()
            finally:
                self._tx_lock.release()

    def _pump(self, timeout: float) -> None:
        """Poll rx once (up to ``timeout`` s), handle what came, check liveness if due."""
        if self._rx_poller.poll(int(max(0.0, timeout) * 1000)):
            self._drain()
        self._check_liveness_when_due()

    def _drain(self) -> None:
        while self.rx.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.rx.recv_multipart(zmq.NOBLOCK)
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

    def _check_liveness_when_due(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._tick
        why = self._watch() if self._watch else None
        if why:
            raise BrokerLost(f"broker at {self.address} is gone: {why}")
        if self._broker_pid and not pid_alive(self._broker_pid):
            raise BrokerLost(f"broker at {self.address} (pid {self._broker_pid}) is gone")
        silent = now - self._last_recv
        limit = self.heartbeat * self.liveness
        # A silent local broker that is running (state R) is busy, not lost: give it longer.
        if self._broker_pid and pid_state(self._broker_pid) == "R":
            limit *= 20
        if silent > limit:
            raise BrokerLost(f"broker at {self.address} silent for {silent:.1f}s")
        if now - self._last_sent > self.heartbeat:
            self.rx.send_multipart(P.encode(P.Heartbeat()))
            self._last_sent = now

    def _declare_lost(self, exc: BrokerLost) -> None:
        log.error("%s", exc)
        self.lost = exc
        self.on_lost(exc)
