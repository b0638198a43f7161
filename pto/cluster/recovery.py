"""The driver's answer to a host that may be gone: reopen its restarted actor, or give up.

Where it sits: ``ClusterRuntime`` (pto/cluster/runtime.py) opens each host through
``HostRecovery.open`` (fresh server keys, the host's endpoints, a ``watch()`` call parked on
its actor). Two reports make a host suspect: Ray's (the parked ``watch`` fails the moment
the actor dies; the watcher thread here waits on all of them, no polling while all is
well) and the wire's (pto/cluster/links.py: a host silent for ``protocol.SILENT_LOST_S``).
A suspect host gets a thread of its own that waits for Ray to restart its actor, opens it
again (new endpoint, fresh keys) and has the run book (pto/cluster/runbook.py) send its
runs in flight again, ``retries`` times at most; a host that is gone for good (its node
died, its actor is out of restarts, or it is the same process, alive but silent) is
declared lost: the book fails its runs and the runs reading its tensors with
``pto.HostLost``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..wire.errors import PtoError
from .errors import HostLostError, from_ray
from .placement import Node
from .runbook import RunBook

log = logging.getLogger("pto.cluster")


class HostRecovery:
    """Watches the host actors of one cluster runtime and recovers or loses them."""

    def __init__(self, actors: list[Any], nodes: list[Node], pids: list[int],
                 host_of_actor: dict[str, int], book: RunBook,
                 connect: Callable[[int], None], timeout: float, retries: int,
                 closed: Callable[[], bool]):
        self._actors = actors
        self._nodes = nodes
        self._pids = list(pids)  # each host actor's process: a new one means it restarted
        self._host_of_actor = host_of_actor
        self._book = book
        self._connect = connect
        self._timeout = timeout
        self._retries = retries
        self._closed = closed
        self._lock = threading.Lock()
        self._restarting: set[int] = set()
        self._watches: dict[int, Any] = {}  # host -> the parked ObjectRef of its watch()
        self._watcher = threading.Thread(target=self._watch, name="pto-l4-watch", daemon=True)

    def open(self, host: int) -> None:
        """Connect to ``host`` (``connect``: fresh keys, its endpoints) and watch its actor."""
        self._connect(host)
        self._watches[host] = self._actors[host].watch.options(max_task_retries=0).remote()

    def start(self) -> None:
        self._watcher.start()

    def join(self, timeout: float) -> None:
        if self._watcher.is_alive():
            self._watcher.join(timeout)

    def on_silent(self, host: int) -> None:
        """The wire heard nothing from ``host`` (the I/O thread)."""
        from . import protocol as P

        self.suspect(host, f"it sent nothing for {P.SILENT_LOST_S:g}s (no heartbeat)")

    # ---- Ray's death reports (the watcher thread) ----------------------------------------

    def _watch(self) -> None:
        """Wait on every host actor's parked ``watch()``: Ray fails it the moment the actor
        dies (no polling while all is well)."""
        import ray

        while not self._closed():
            refs = {ref: h for h, ref in list(self._watches.items())
                    if ref is not None and self._book.lost(h) is None}
            if not refs:
                return
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                host = refs[ref]
                if self._watches.get(host) is ref:
                    self._watches[host] = None
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.suspect(host, from_ray(exc, self._host_of_actor, host))

    # ---- recovering (a thread per suspect host) -------------------------------------------

    def suspect(self, host: int, why: str | BaseException) -> None:
        """Ray or the wire says ``host`` may be gone: find out (a thread of its own)."""
        with self._lock:
            if host in self._restarting or self._book.lost(host) is not None or self._closed():
                return
            self._restarting.add(host)
        threading.Thread(target=self._recover, args=(host, why), daemon=True,
                         name=f"pto-l4-recover-{host}").start()

    def _recover(self, host: int, why: str | BaseException) -> None:
        """Wait for Ray to restart ``host``'s actor, then open it again and resend its runs
        (each at most ``retries`` more times); or declare it lost: its node died, the actor
        is out of restarts, or it is the same process, alive but silent."""
        import ray

        reason = why.reason if isinstance(why, HostLostError) else str(why)
        try:
            # Ray holds this call until a restarting actor is up; one out of restarts fails it.
            ref = self._actors[host].info.remote()
            deadline = time.monotonic() + self._timeout
            while not ray.wait([ref], timeout=0.25)[0]:
                if not self._node_alive(host):
                    raise HostLostError(host, "its Ray node is gone")
                if time.monotonic() > deadline or self._closed():
                    raise HostLostError(host, f"{reason}; it did not come back within "
                                        f"{self._timeout:g}s")
            info = ray.get(ref)
            if info["pid"] == self._pids[host]:
                raise HostLostError(host, reason)
            self._pids[host] = info["pid"]
            if not self._closed():
                self.open(host)
        except (ray.exceptions.RayError, HostLostError, PtoError) as exc:
            if isinstance(exc, ray.exceptions.RayError):
                exc = from_ray(exc, self._host_of_actor, host)
            with self._lock:
                self._restarting.discard(host)
            self.lose(host, exc.reason if isinstance(exc, HostLostError) else reason)
            return
        log.warning("host %d restarted (%s): resending its runs in flight", host, reason)
        with self._lock:
            self._restarting.discard(host)
        self._book.resend(host, self._retries)

    def lose(self, host: int, reason: str) -> None:
        """``host`` is gone for good: the book fails its runs and the runs reading it."""
        if self._book.host_lost(host, reason):
            log.warning("host %d is lost: %s", host, reason)

    def _node_alive(self, host: int) -> bool:
        import ray

        node = self._nodes[host].node_id
        return any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes())
