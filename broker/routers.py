"""The broker's sockets: a ROUTER for clients, one for workers, and the pipe a signal
wakes the poll through. ``broker.server`` runs the loop; this module binds, polls,
drains within a round's budgets, sends without blocking, and closes.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable

import zmq

from pto.wire import protocol as P
from pto.wire.errors import ProtocolError
from pto.wire.procs import SpinPoll, worker_address
from pto.wire.sockets import bind_routers, incoming, remove_endpoint, send_frames

log = logging.getLogger("pto.broker")

# Messages per socket per round: bounds a round's work (timers stay on time) and keeps one
# busy socket from starving the other.
_MAX_DRAIN = 32
# Tasks submitted, and tasks reported, taken in per round at most (a socket's drain ends
# once past it): each costs microseconds, and what is ready is dispatched only at the end
# of the round, so 32 full Submits or Reports (8k tasks) of one client's flood would hold
# another client's task for tens of milliseconds. ZeroMQ's ROUTER takes its peers in
# turn, so the next round starts with the other clients' messages.
_TASK_BUDGET = 512

# handles one message (identity, frames); returns the tasks it submitted or reported
Handler = Callable[[bytes, list[bytes]], int]


class Routers:
    def __init__(self, address: str, curve: str | None, spin_seconds: float):
        """Bind the clients' ROUTER at ``address`` and the workers' at its worker address."""
        self.address = address
        self.ctx = zmq.Context()
        (self.frontend, self.backend), self._auth = bind_routers(
            self.ctx, [address, worker_address(address)], curve)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._poll = SpinPoll(poller.poll, spin_seconds)

    def wake_on_signals(self) -> None:
        """A signal wakes the poll (its handler only sets a flag); main thread only."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def wait(self, timeout_ms: int, busy: bool) -> dict:
        """Wait up to ``timeout_ms`` (spinning first if ``busy``) for either socket or a
        signal; what is ready, for ``take_in``."""
        return dict(self._poll(timeout_ms, busy))

    def take_in(self, ready: dict, on_client: Handler, on_worker: Handler) -> bool:
        """Take in what ``wait`` found, within the round's budgets; True if anything came."""
        if self._wake_r.fileno() in ready or self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        if self.frontend in ready:
            _take_in(self.frontend, on_client)
        if self.backend in ready:
            _take_in(self.backend, on_worker)
        return bool(ready)

    def send(self, sock: zmq.Socket, identity: bytes, msg: P.Message) -> None:
        try:
            send_frames(sock, [identity, *P.encode(msg)], block=False)
        except zmq.Again:
            log.warning("dropped a message to a peer whose queue is full")

    def decode(self, sock: zmq.Socket, identity: bytes, frames: list[bytes]) -> P.Message | None:
        """The message in ``frames``, or None after answering the sender with an Error."""
        try:
            return P.decode(frames, broker=True)
        except ProtocolError as exc:
            role = "client" if sock is self.frontend else "worker"
            log.warning("bad frame from %s %r: %s", role, identity, exc)
            self.send(sock, identity, P.Error(str(exc)))
            return None

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.frontend.close(0)
        self.backend.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        for address in (self.address, worker_address(self.address)):
            remove_endpoint(address)
        self._wake_r.close()
        self._wake_w.close()


def _take_in(sock: zmq.Socket, handle: Handler) -> None:
    tasks = 0
    for identity, *frames in incoming(sock, _MAX_DRAIN):
        tasks += handle(identity, frames)
        if tasks >= _TASK_BUDGET:
            break
