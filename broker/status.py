"""What ``pto status`` shows about a broker: built from the server's peers and the
scheduler's queues when a ``StatusRequest`` comes (never on the dispatch path)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from pto.wire import shm
from pto.wire.chips import HOST_QUEUE

from .peers import ClientPeer, WorkerPeer
from .scheduler import Scheduler


def broker_status(address: str, started: float, devices: list[int],
                  workers: Iterable[WorkerPeer], clients: Iterable[ClientPeer],
                  sched: Scheduler) -> dict[str, Any]:
    """Uptime, workers, clients, queues and shared memory (``started``: time.monotonic())."""
    unfinished = sched.unfinished()
    rows = []
    for w in sorted(workers, key=lambda w: w.device):
        held = sched.in_flight(w.device)
        running = (w.status.read() or (0, 0))[0]
        task = next((t for t in held if t.gid == running), None)
        rows.append({
            "chip": w.device if w.device >= 0 else "host", "pid": w.pid,
            "state": "busy" if held else "idle",
            "running": sched.kernel_name(task) if task else None,
            "inflight": len(held), "done": w.done, "failed": w.failed,
        })
    clients = sorted(clients, key=lambda c: c.index)
    owners = {c.owner for c in clients}
    shm_bytes = sum(_size(n) for n in shm.list_names() if shm.owner_of(n) in owners)
    return {
        "address": address, "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 3),
        "devices": devices, "workers": rows,
        "clients": [{"client": c.index, "pid": c.pid, "owner": c.owner,
                     "tasks": unfinished.get(c.index, 0)} for c in clients],
        "queues": {("host" if q == HOST_QUEUE else str(q)): n
                   for q, n in sched.queue_lengths().items()},
        "shm_bytes": shm_bytes,
        # the scheduler's last task moves, oldest first (python -m broker --transition-log)
        "transitions": [list(move) for move in sched.transition_log()],
    }


def _size(name: str) -> int:
    try:
        return os.stat(shm.SHM_DIR + name).st_size
    except OSError:
        return 0
