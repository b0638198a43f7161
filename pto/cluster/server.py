"""A host's control endpoint: where the driver's runs arrive and their results leave.

Where it sits: the host actor (pto/cluster/host.py) starts one ``ControlServer`` when the
driver opens it (``HostActor.open``, a Ray call carrying the session's keys). It binds a
ROUTER on the node's address (tcp, a free port), CURVE with the host's server keys,
admitting only the session's client key (pto/cluster/keys.py). One thread owns the socket:
it hands each ``Run`` to a pool of run threads (an L3 run blocks its thread until its
tasks end) once the runs of this host it reads have ended (``after``), applies a
``Release`` at once, sends the replies the run threads queue on an inproc pipe, and a
heartbeat every ``protocol.HEARTBEAT_S`` so the driver tells a silent host from a busy one.
Frames that do not decode are dropped and logged; the host serves on.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import zmq

from ..wire.errors import ProtocolError
from ..wire.sockets import incoming, send_frames
from . import protocol as P
from .keys import serve_curve

log = logging.getLogger("pto.cluster.server")
_ids = itertools.count(1)


class ControlServer:
    """Serve the driver's runs for one host actor (``run(msg)`` returns Done or Failed)."""

    def __init__(self, ip: str, keys: dict[str, Any], run: Callable[[P.Run], P.Message],
                 release: Callable[[list[int]], None], threads: int = 8,
                 after: Callable[[P.Run], list[Future]] | None = None):
        self._run = run
        self._release = release
        self._after = after
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._auth = serve_curve(self._ctx, self._router, keys)
        try:
            self._router.bind(f"tcp://{ip}:*")
        except BaseException:
            self._router.close(0)
            self._auth.stop()
            self._ctx.term()
            raise
        self.endpoint: str = self._router.last_endpoint.decode()
        address = f"inproc://pto-l4-replies-{next(_ids)}"
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.bind(address)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(address)
        self._push_lock = threading.Lock()
        self._driver: bytes | None = None  # the identity runs come from
        self.dropped = 0  # frames that did not decode
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pto-l4-run")
        self._thread = threading.Thread(target=self._loop, name="pto-l4-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (runs in flight finish first) and free the port."""
        with self._push_lock:
            send_frames(self._push, [b""])  # an empty identity: stop
        self._thread.join(10)
        self._pool.shutdown(wait=True)
        self._push.close(0)
        self._auth.stop()
        self._ctx.term()

    # ---- the serving thread ------------------------------------------------------------

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        beat = P.encode(P.Heartbeat())
        next_beat = time.monotonic()
        try:
            while True:
                ready = dict(poller.poll(int(P.HEARTBEAT_S * 1000)))
                if self._replies in ready:
                    for frames in incoming(self._replies):
                        if not frames[0]:
                            return
                        send_frames(self._router, frames)
                if self._router in ready:
                    for frames in incoming(self._router):
                        self._take(frames)
                now = time.monotonic()
                if now >= next_beat and self._driver is not None:
                    send_frames(self._router, [self._driver, *beat])
                    next_beat = now + P.HEARTBEAT_S
        finally:
            self._router.close(0)
            self._replies.close(0)

    def _take(self, frames: list[bytes]) -> None:
        identity = frames[0]
        try:
            msg = P.decode(frames[1:])
        except ProtocolError as exc:
            self.dropped += 1
            log.warning("control endpoint %s: dropped a message: %s", self.endpoint, exc)
            return
        if isinstance(msg, P.Run):
            self._driver = identity
            self._when_ready(identity, msg)
        elif isinstance(msg, P.Release):
            self._release(msg.runs)
        elif isinstance(msg, P.Hello):
            self._driver = identity
        elif not isinstance(msg, P.Heartbeat):
            self.dropped += 1
            log.warning("control endpoint %s: dropped a %s (not sent to hosts)",
                        self.endpoint, type(msg).__name__)

    def _when_ready(self, identity: bytes, msg: P.Run) -> None:
        """Start ``msg`` in the pool once the futures ``after(msg)`` names are done (runs of
        this host it reads: no thread waits for them meanwhile)."""
        waits = [f for f in self._after(msg) if not f.done()] if self._after else []
        if not waits:
            self._pool.submit(self._execute, identity, msg)
            return
        left = [len(waits)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                ready = left[0] == 0
            if ready:
                self._pool.submit(self._execute, identity, msg)

        for f in waits:
            f.add_done_callback(one_done)

    # ---- run threads -------------------------------------------------------------------

    def _execute(self, identity: bytes, msg: P.Run) -> None:
        try:
            reply = self._run(msg)
        except BaseException:  # run() reports its errors as Failed; this is a bug
            log.exception("run %d crashed the host's run handler", msg.run)
            return
        frames = P.encode(reply)
        with self._push_lock:
            send_frames(self._push, [identity, *frames])
