"""The tasks a worker holds and has not run: one FIFO per client, the clients taking turns.

A worker runs one task at a time. Taking the clients in turn (as the broker's ready
queues do: ``broker.ready``) means a client's single task is not run after everything
another client flooded this worker with (up to its credit), and a client whose next task
waits for a predecessor on another worker does not hold up the others. Within a client
tasks run in the order sent: the broker sends a task only after the tasks it depends on,
naming those still unfinished in ``WorkTask.wait``, so no wait can form a cycle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from pto.wire import protocol as P

# What a task's waits say: True, it may run; False, a predecessor failed; None, not yet.
WaitCheck = Callable[[P.WorkTask], bool | None]


class LocalQueue:
    def __init__(self) -> None:
        self._fifos: dict[int, deque[P.WorkTask]] = {}  # client -> tasks, in turn order
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[P.WorkTask]:
        for fifo in self._fifos.values():
            yield from fifo

    def extend(self, tasks: list[P.WorkTask]) -> None:
        fifos = self._fifos
        for task in tasks:
            fifo = fifos.get(task.client)
            if fifo is None:
                fifo = fifos[task.client] = deque()
            fifo.append(task)
        self._size += len(tasks)

    def next(self, check: WaitCheck, skipped: Callable[[P.WorkTask], None],
             hold: Callable[[P.WorkTask], bool] | None = None) -> P.WorkTask | None:
        """Take the first task that may run now, trying the clients in turn (the one it
        comes from goes last); None if every client's next task waits. A task whose
        predecessor failed is taken out and handed to ``skipped``; one ``hold`` names
        waits (``worker.graph``: live groups during some replays)."""
        for client, fifo in list(self._fifos.items()):
            while fifo:
                task = fifo[0]
                if hold is not None and hold(task):
                    break
                ok = True if not task.wait else check(task)
                if ok is None:
                    break  # this client waits; try the next one
                fifo.popleft()
                self._size -= 1
                del self._fifos[client]
                if fifo:
                    self._fifos[client] = fifo  # last in turn order
                if ok:
                    return task
                skipped(task)
                fifo = self._fifos.get(client, deque())
        return None

    def take(self, keep: Callable[[P.WorkTask], bool]) -> list[P.WorkTask]:
        """Remove and return the tasks ``keep`` rejects, in each client's order."""
        taken: list[P.WorkTask] = []
        for client in list(self._fifos):
            fifo = self._fifos[client]
            kept = deque(t for t in fifo if keep(t))
            if len(kept) != len(fifo):
                taken.extend(t for t in fifo if not keep(t))
                if kept:
                    self._fifos[client] = kept
                else:
                    del self._fifos[client]
        self._size -= len(taken)
        return taken
