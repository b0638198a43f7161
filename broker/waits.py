"""Tasks that wait for their predecessors on their workers instead of in the broker.

A task need not wait in the broker for a predecessor that is already dispatched (to any
chip), or queued ahead of it on its own chip (``broker.task.covered``): it becomes READY
and, once sent, waits for it on its worker. Each worker numbers the tasks it gets
(``seq``) and writes their outcomes in its completion ring (``worker.completions``); a
task goes out with the (worker uid, seq) of each predecessor still unfinished, and each
predecessor's worker is asked to poke the waiting one when it ends. A chain thus costs
no broker round trip per task, on one chip or alternating between chips.

The scheduler (``broker.scheduler``) decides and changes task state; this module keeps
the bookkeeping of those waits: what the scheduler knows of each worker (``WorkerSlot``:
credit, in-flight tasks, and the seqs that tasks elsewhere still wait for, so that no
outcome waited for leaves a ring), what a task is sent to wait for, and which tasks a
dispatch lets stop waiting in the broker.
"""

from __future__ import annotations

from collections.abc import Iterable

from pto.wire.protocol import RING_SLOTS

from .outbox import Outbox
from .task import DISPATCHED, DONE, PENDING, Task, waits_on_worker


class WorkerSlot:
    """A connected worker as the scheduler sees it: its queue, what it holds, how many
    tasks it has been sent, and which of them tasks elsewhere still wait for."""

    __slots__ = ("worker", "queue", "limit", "inflight", "uid", "sent", "watched", "floor")

    def __init__(self, worker: int, queue: int, limit: int, uid: int):
        self.worker, self.queue, self.limit, self.uid = worker, queue, limit, uid
        self.inflight: dict[int, Task] = {}  # gid -> task, in the order sent
        self.sent = 0  # the seq its next task gets
        self.watched: dict[int, int] = {}  # seq -> tasks elsewhere still waiting for it
        self.floor = 0  # at most the smallest seq in ``watched``

    def room(self) -> int:
        """How many tasks it may be sent now: its credit, and never so many that an outcome
        still waited for would leave its completion ring (RING_SLOTS)."""
        room = self.limit - len(self.inflight)
        if self.watched and self.sent + room > self.floor + RING_SLOTS:
            self.floor = min(self.watched)
            room = min(room, self.floor + RING_SLOTS - self.sent)
        return room

    def watch(self, seq: int) -> None:
        if not self.watched or seq < self.floor:
            self.floor = seq
        self.watched[seq] = self.watched.get(seq, 0) + 1

    def unwatch(self, seq: int) -> None:
        count = self.watched.pop(seq, 0)
        if count > 1:
            self.watched[seq] = count - 1


def send_waiting(task: Task, slot: WorkerSlot, out: Outbox) -> None:
    """``task`` goes to ``slot`` now: name the predecessors still unfinished for it to
    wait for, and have the other workers running them watch them for it."""
    wait: list[int] = []
    for pred in task.after or ():
        if pred.state != DISPATCHED:
            continue  # done (a FAILED or DROPPED one would have taken it along)
        other = pred.worker
        wait += (other.uid, pred.seq)
        if other is not slot:
            other.watch(pred.seq)
            task.watching = task.watching or []
            task.watching.append((other, pred.seq))
            out.watch(other.worker, pred.seq, slot.uid)
    task.wait = wait or None
    # Only unfinished ones are kept: a done task named here must not keep its own
    # predecessors alive (memory stays bounded by the live tasks).
    task.after = [pred for pred in task.after or () if pred.state == DISPATCHED] or None


def no_longer_waiting(task: Task, same_chip: bool) -> list[Task]:
    """``task`` became READY (``same_chip``: its PENDING dependents on its own chip may now
    queue behind it) or was dispatched (those on other chips may now wait for it on their
    workers): they wait for it on their workers from now on (``after``). Returns them: the
    scheduler takes one off each one's count of what it waits for in the broker."""
    moved = []
    for dep in task.dependents:
        if (dep.state == PENDING and (dep.chip == task.chip) == same_chip
                and waits_on_worker(dep, task) and task not in (dep.after or ())):
            dep.after = dep.after or []
            dep.after.append(task)
            moved.append(dep)
    return moved


def awaited_elsewhere(task: Task) -> bool:
    """Whether an unfinished task of another chip already counts on ``task`` being
    dispatched (it may be queued on its worker waiting for this very run of it)."""
    return any(d.state < DONE and d.chip != task.chip and task in (d.after or ())
               for d in task.dependents)


def stop_watching(task: Task) -> None:
    """``task`` left its worker: it no longer waits for tasks of other workers."""
    if task.watching:
        for slot, seq in task.watching:
            slot.unwatch(seq)
        task.watching = None


def forget_dead(dead: WorkerSlot, alive: Iterable[WorkerSlot]) -> None:
    """Nothing is watched on a dead worker any more."""
    for slot in alive:
        for task in slot.inflight.values():
            if task.watching:
                task.watching = [w for w in task.watching if w[0] is not dead] or None
