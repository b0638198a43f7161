"""Telling hosts which L3 runs no Ref names any more, so they drop those runs' tensors.

Each ``_Output``'s finalizer calls ``Releaser.release`` when the last Ref (and the last
run reading it) lets go: the producer host drops the run's tensors, and every host that
may have copied them drops its copies. Finalizers run on whatever thread the garbage
collector does (the I/O thread included, in the middle of a send), so they only queue;
one thread sends the queued ids to each host, one ``Release`` message per host and batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("pto.cluster")


class Releaser:
    """Sends hosts the ids of runs no Ref names any more, in batches, from one thread."""

    def __init__(self, send: Callable[[int, list[int]], None]):
        self._send = send
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pto-l4-release", daemon=True)
        self._stopped = False
        self._thread.start()

    def release(self, host: int, run_id: int, copies: set[int]) -> None:  # a finalizer
        if not self._stopped:
            self._queue.put((host, run_id))
            for other in list(copies):
                self._queue.put((other, run_id))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            batch: dict[int, list[int]] = {}
            while item is not None:
                batch.setdefault(item[0], []).append(item[1])
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            for host, ids in batch.items():
                try:
                    self._send(host, ids)
                except Exception as exc:  # a lost host has nothing left to free
                    log.debug("release on host %d: %s", host, exc)
            if item is None:
                return

    def stop(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(5)
