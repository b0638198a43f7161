"""The client's link to the broker: two DEALER sockets and one I/O thread.

Requests (registrations, task batches, frees, cancels, heartbeats) leave on ``tx`` from the
thread that makes them. Results arrive on ``rx``, which one thread at a time drives (polls,
decodes, hands to ``on_message``): the I/O thread, or a caller blocked in ``wait_until``
(as ``rt.run`` is), which takes ``rx`` over so its result wakes it directly instead of
waking the I/O thread that then wakes it. Heartbeats and the broker's liveness are the I/O
thread's job, on its own clock, whoever drives ``rx``. The broker knows ``tx`` as the same
client from its first message, ``Attach``.

Locking rules (every lock here is held for bookkeeping only, never across user code):
- ``_cv`` guards who drives ``rx`` (``_driver``), the callers waiting, ``lost`` (written
  once, before ``on_lost`` runs: a waiter that sees it first ends the runs itself, which
  ``on_lost`` does idempotently) and ``_stop``. Only the driver touches ``rx``; it blocks
  only in its poll, which ``_wake_fd`` (I/O thread) or ``_halt_fd`` (loss, close: written
  once, never read) interrupts.
- ``_tx_lock`` guards ``tx`` for one send; nothing is taken while holding it.
- ``on_message`` (on the driver) and ``on_lost`` (on whoever saw the loss) run with no
  lock of ours held; they may take the runtime lock (pto/host/runbook.py) briefly, but never
  run user code: futures are resolved later, by a thread holding none of these locks and
  not driving ``rx``.
- Order: a GC finalizer may take the runtime lock while its thread holds ``_cv`` or
  ``_tx_lock``; so nobody holding the runtime lock takes those or calls in here, except
  ``free()``, which only appends to ``_frees`` and writes ``_wake_fd``.
- Who may block: callers in ``wait_until`` (on ``_cv`` or their poll), the I/O thread (its
  poll). A caller never waits for the I/O thread to run user code: it never does.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from ..wire import protocol as P
from ..wire.errors import BrokerLost, ProtocolError
from ..wire.shm import pid_alive, pid_stat
from ..wire.sockets import connect, incoming, send_frames

log = logging.getLogger("pto.client")

# After the last caller stops driving rx, the I/O thread waits this long before taking it
# back, polling at this period meanwhile: calls back to back then cost it no wake-up each.
_LINGER = 0.005
_IO = -1  # _driver when the I/O thread drives rx (callers are thread idents)


class Connection:
    def __init__(self, address: str, owner: str, timeout: float,
                 watch: Callable[[], str | None] | None = None, trace: bool = False,
                 curve: str | None = None):
        self.address = address
        self._watch = watch  # returns why the broker is gone, or None
        self.ctx = zmq.Context()
        opened: list[zmq.Socket] = []
        try:
            for _ in range(2):
                opened.append(connect(self.ctx, address, curve))
        except BaseException:
            for sock in opened:
                sock.close(0)
            self.ctx.term()  # waits for every socket of the context: all closed now
            raise
        self.rx, self.tx = opened
        self._tx_lock = threading.Lock()
        # (tensor, kept) appended by GC finalizers too: sent with the next batch
        self._frees: deque[tuple[int, bool]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # to the I/O thread
        self._halt_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # to every poll
        self._rx_poller = zmq.Poller()  # the callers' (Socket.poll() would build one per call)
        self._rx_poller.register(self.rx, zmq.POLLIN)
        self._rx_poller.register(self._halt_fd, zmq.POLLIN)
        self._cv = threading.Condition()
        self._driver: int | None = None
        self._callers = 0  # callers in wait_until: the I/O thread leaves rx to them
        self._caller_left = 0.0
        self._stop = False
        self._fds_closed = False
        self.lost: BrokerLost | None = None
        self._thread: threading.Thread | None = None
        self.on_message: Callable[[P.Message], None] = lambda msg: None
        self.on_lost: Callable[[BrokerLost], None] = lambda exc: None
        try:
            self.welcome = self._handshake(owner, timeout, trace)
            send_frames(self.tx, P.encode(P.Attach(self.welcome.client, owner)))
        except BaseException:
            self._close_sockets()
            raise
        self.heartbeat = self.welcome.heartbeat
        self.liveness = self.welcome.liveness
        # On this host a busy broker may be silent for a while: watch its process instead.
        self._broker_pid = self.welcome.pid if address.startswith("ipc://") else 0
        self._last_recv = self._last_sent = time.monotonic()
        # (the _last_recv a silence began at, the broker's CPU ticks then)
        self._silence_cpu: tuple[float, int | None] | None = None
        self._tick = min(self.heartbeat, 0.25)  # how often the I/O thread checks liveness

    def _handshake(self, owner: str, timeout: float, trace: bool) -> P.Welcome:
        send_frames(self.rx, P.encode(P.Hello(owner, os.getpid(), trace)))
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
            if self._rx_poller.poll(int(min(left, 0.1) * 1000)):
                self._drain()
            self._check_liveness(time.monotonic())
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._io_loop, name="pto-io", daemon=True)
        self._thread.start()

    def wait_until(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Drive ``rx`` on the calling thread until ``done()`` (True) or timeout (False).

        Callers that block on a result use this rather than an Event the I/O thread sets:
        the answer then wakes one thread, not two. While another thread drives, this one
        sleeps until that one has handled a batch or let go. Returns at once when the
        broker is lost or the connection closed (``done()`` then says how it ended).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        with self._cv:
            self._callers += 1
            driver = self._driver
            if driver is None and not done() and self.lost is None and not self._stop:
                self._driver = driver = me  # nobody drives rx: take it in this same turn
        driving = driver == me
        if driver == _IO and not done():  # it lets go of rx when woken (see _io_loop)
            os.eventfd_write(self._wake_fd, 1)
        try:
            if not driving:
                driving = self._take_rx(me, done, deadline)
            if driving:
                self._drive(done, deadline)
            return done()
        except BrokerLost as exc:
            self._declare_lost(exc)
            return done()
        finally:
            with self._cv:  # let go of rx and leave in one turn
                if driving:
                    self._driver = None
                    self._cv.notify_all()
                self._callers -= 1
                self._caller_left = time.monotonic()

    def _take_rx(self, me: int, done: Callable[[], bool], deadline: float | None) -> bool:
        """Wait while another thread drives ``rx``, then drive it (True); False if there
        is no need any more: ``done()``, the deadline, loss or close."""
        with self._cv:
            while self._driver is not None:
                if done() or self.lost is not None or self._stop:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)  # the driver notifies as it handles or lets go
            if done() or self.lost is not None or self._stop:
                return False
            if deadline is not None and deadline <= time.monotonic():
                return False
            self._driver = me
            return True

    def _drive(self, done: Callable[[], bool], deadline: float | None) -> None:
        """As the driver: poll and drain ``rx`` until ``done()``, the deadline, loss or close."""
        while not done() and self.lost is None and not self._stop:
            wait_ms = -1  # no deadline: the halt fd ends the poll on loss or close
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait_ms = math.ceil(left * 1000)
            if self._rx_poller.poll(wait_ms):
                self._drain()
                if self._callers > 1:  # others wait for results this batch may hold
                    with self._cv:
                        self._cv.notify_all()

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
            send_frames(self.tx, frames)
            self._last_sent = time.monotonic()

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
            send_frames(self.tx, P.encode(P.FreeTensors(gone, kept)))

    def close(self, bye: bool = True) -> None:
        with self._cv:
            if self._fds_closed:
                return
            self._stop = True
            self._cv.notify_all()
            os.eventfd_write(self._halt_fd, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._cv:  # a caller still driving rx lets go at once (the halt woke it)
            self._cv.wait_for(lambda: self._driver is None, timeout=5)
            self._driver = _IO
        if bye and self.lost is None:
            with self._tx_lock:
                self._send_frees()
                send_frames(self.tx, P.encode(P.Bye()))
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._cv:  # _declare_lost writes _halt_fd under it
            self._fds_closed = True
        if not self.rx.closed:
            self.rx.close(0)
            self.tx.close(linger=200)  # let a Bye leave
            self.ctx.term()
            os.close(self._wake_fd)
            os.close(self._halt_fd)

    # ---- the I/O thread ----------------------------------------------------------------

    def _io_loop(self) -> None:
        drive = zmq.Poller()
        for fd in (self.rx, self._wake_fd, self._halt_fd):
            drive.register(fd, zmq.POLLIN)
        idle = zmq.Poller()  # while a caller drives rx: frees, liveness, heartbeats
        for fd in (self._wake_fd, self._halt_fd):
            idle.register(fd, zmq.POLLIN)
        next_check = 0.0
        try:
            while not self._stop and self.lost is None:
                now = time.monotonic()
                with self._cv:
                    lingering = now - self._caller_left < _LINGER
                    take = self._driver is None and not self._callers and not lingering
                    if take:
                        self._driver = _IO
                wait_ms = int(max(0.0, next_check - now) * 1000) + 1
                if not take:
                    # A caller drives rx (or just did: it may come right back).
                    self._handle_wake(idle.poll(min(wait_ms, int(_LINGER * 1000))))
                else:
                    try:
                        ready = self._handle_wake(drive.poll(wait_ms))
                        if self.rx in ready:
                            self._drain()
                    finally:
                        with self._cv:
                            self._driver = None
                            if self._callers:
                                self._cv.notify_all()
                # Judged after the poll: a thread starved past the silence limit first
                # reads the heartbeats waiting for it instead of calling the broker lost.
                now = time.monotonic()
                if now >= next_check:
                    self._check_liveness(now)
                    next_check = now + self._tick
        except BrokerLost as exc:
            self._declare_lost(exc)
        except Exception as exc:  # noqa: BLE001 - never die silently with waiters blocked
            log.exception("client I/O thread failed")
            self._declare_lost(BrokerLost(f"client I/O failed: {exc!r}"))

    def _handle_wake(self, events: list) -> dict:
        ready = dict(events)
        if self._wake_fd in ready:
            try:
                os.eventfd_read(self._wake_fd)
            except BlockingIOError:
                pass
        if self._frees and self._tx_lock.acquire(blocking=False):
            try:
                self._send_frees()
            finally:
                self._tx_lock.release()
        return ready

    def _drain(self) -> None:
        for frames in incoming(self.rx):
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

    def _check_liveness(self, now: float) -> None:
        """Raise BrokerLost if the broker is gone; send a heartbeat when one is due."""
        why = self._watch() if self._watch else None
        if why:
            raise BrokerLost(f"broker at {self.address} is gone: {why}")
        if self._broker_pid and not pid_alive(self._broker_pid):
            raise BrokerLost(f"broker at {self.address} (pid {self._broker_pid}) is gone")
        silent = now - self._last_recv
        limit = self.heartbeat * self.liveness
        # A silent local broker that is working (running or waiting on I/O now, or has used
        # CPU since this silence began) is busy, not lost: give it longer. One that is
        # stopped, or asleep without running at all, is judged by the heartbeat limit.
        busy = self._broker_working() if silent > self.heartbeat and self._broker_pid else False
        if silent > limit and busy:
            limit *= 20
        if silent > limit:
            raise BrokerLost(f"broker at {self.address} silent for {silent:.1f}s")
        if now - self._last_sent > self.heartbeat:
            with self._tx_lock:
                send_frames(self.tx, P.encode(P.Heartbeat()))
                self._last_sent = now

    def _broker_working(self) -> bool:
        state, cpu = pid_stat(self._broker_pid)
        if self._silence_cpu is None or self._silence_cpu[0] != self._last_recv:
            self._silence_cpu = (self._last_recv, cpu)  # the CPU it had when this silence began
            return state in ("R", "D")
        since = self._silence_cpu[1]
        return state in ("R", "D") or (cpu is not None and since is not None and cpu > since)

    def _declare_lost(self, exc: BrokerLost) -> None:
        """Once: record the loss (``lost``, the one record of it: the runtime's book reads
        it too), let the runtime end every run (``on_lost``), then wake every waiter."""
        with self._cv:
            if self.lost is not None:
                return
            self.lost = exc
        log.error("%s", exc)
        try:
            self.on_lost(exc)
        finally:
            with self._cv:
                self._cv.notify_all()
                if not self._fds_closed:
                    os.eventfd_write(self._halt_fd, 1)
