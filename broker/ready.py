"""One chip's ready queue, fair between clients: what ``Scheduler.schedule`` takes from.

Each client has its own FIFO of READY tasks on the chip, and the clients take turns: one
task each, round-robin, in the order they first had work here. So a client that floods a
chip delays another client's task by at most one task per other client with work there
(plus what the chip's worker already holds), never by the whole flood.

Groups (one task on several chips, started together) keep their global order: the group
that became READY first among those queued on a chip *reserves* the chip. While it does,
the chip serves only that group's client, up to and including the group (the single tasks
its client queued here before it), so the chip drains and the group can start once it
heads its client's FIFO on every one of its chips. Every group's chips agree on which
group came first (a group joins all its chips' queues at once), so the first-ready group
of all reserves each of its chips and always starts: two groups can never wait on each
other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterator

from .task import Task


class ReadyQueue:
    """READY tasks of one chip: a FIFO per client, served round-robin (see module doc)."""

    __slots__ = ("_fifos", "_groups", "_size")

    def __init__(self) -> None:
        # client -> its FIFO; the dict's order is the round-robin order (next turn first).
        # A client is in the dict only while its FIFO is not empty.
        self._fifos: dict[int, deque[Task]] = {}
        self._groups: deque[Task] = deque()  # groups queued here, in the order they came
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Task]:
        """Every queued task: client by client in turn order, each client's in FIFO order."""
        for fifo in self._fifos.values():
            yield from fifo

    def append(self, task: Task) -> None:
        """Queue a task that just became READY, last of its client's."""
        fifo = self._fifos.get(task.client)
        if fifo is None:
            fifo = self._fifos[task.client] = deque()
        fifo.append(task)
        if len(task.chips) > 1:
            self._groups.append(task)
        self._size += 1

    def appendleft(self, task: Task) -> None:
        """Put a single task back first of its client's (its worker died before running
        it); its client's turn comes as before."""
        if len(task.chips) > 1:
            raise ValueError(f"task {task.gid} is a group: groups are never requeued")
        fifo = self._fifos.get(task.client)
        if fifo is None:
            fifo = self._fifos[task.client] = deque()
        fifo.appendleft(task)
        self._size += 1

    def head(self, barred: Container[int] = ()) -> Task | None:
        """The task whose turn it is: the reserving group's client's first task if a group
        is queued here, else the first task of the client whose turn it is. Clients in
        ``barred`` are passed over (None if that leaves none, or bars the group's)."""
        if self._groups:
            client = self._groups[0].client
            return None if client in barred else self._fifos[client][0]
        for client, fifo in self._fifos.items():
            if client not in barred:
                return fifo[0]
        return None

    def pop(self, task: Task) -> None:
        """Take ``task``, which is ``head()``; its client's turn passes to the next client
        (unless a group reserves the chip for that client)."""
        client = task.client
        fifo = self._fifos[client]
        if fifo[0] is not task:
            raise ValueError(f"task {task.gid} is not the head of its client's queue")
        fifo.popleft()
        if len(task.chips) > 1:
            self._groups.remove(task)
        self._size -= 1
        if not fifo:
            del self._fifos[client]
        elif len(self._fifos) > 1:
            del self._fifos[client]
            self._fifos[client] = fifo  # re-inserted: last in turn order

    def remove(self, task: Task) -> None:
        """Take ``task`` out wherever it is (it failed, was cancelled, or its client left)."""
        fifo = self._fifos[task.client]
        fifo.remove(task)
        if len(task.chips) > 1:
            self._groups.remove(task)
        self._size -= 1
        if not fifo:
            del self._fifos[task.client]

    def check(self, chip: int) -> None:
        """The queue's own invariants (for ``Scheduler.validate``); AssertionError if broken."""
        where = f"ready queue of chip {chip}"
        if sum(len(f) for f in self._fifos.values()) != self._size:
            raise AssertionError(f"{where}: its size counts every queued task")
        groups = []
        for client, fifo in self._fifos.items():
            if not fifo:
                raise AssertionError(f"{where}: client {client} is listed with no task")
            for t in fifo:
                if t.client != client:
                    raise AssertionError(f"{where}: task {t.gid} is in its own client's FIFO")
                if len(t.chips) > 1:
                    groups.append(t)
        if {t.gid for t in groups} != {t.gid for t in self._groups} or len(groups) != len(
                self._groups):
            raise AssertionError(f"{where}: the group list holds exactly the queued groups")
        for client in {t.client for t in self._groups}:
            mine = [t for t in self._groups if t.client == client]
            if mine != [t for t in self._fifos[client] if len(t.chips) > 1]:
                raise AssertionError(f"{where}: a client's groups are listed in FIFO order")
