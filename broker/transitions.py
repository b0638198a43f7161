"""The broker's task states and what each move between them does: the base of the
``Scheduler`` (``broker.scheduler``), as Dask's ``SchedulerState`` is of its scheduler.

A task's state changes only in ``_move``, which looks the (from, to) pair up in
``_TRANSITIONS``: a pair not there raises ``IllegalTransition`` (its message ends with the
last moves of the transition log), and each pair's side effects live in one method
named for it (``_pending_to_ready``, ``_dispatched_to_done``...). A method returns the
tasks its move set free (dependents that wait for nothing else in the broker now); the
caller makes them READY (``_ready_now``, a loop, so a long chain never recurses). A
task's ``waiting`` count goes down in one place, ``_one_less``.

The transition log keeps the last ``log_size`` moves as (gid, from, to), for
``pto status --json`` and for the message of an ``IllegalTransition``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from pto.wire.protocol import Failure

from .outbox import Outbox
from .ready import ReadyQueue
from .task import (
    ALLOWED,
    DISPATCHED,
    DONE,
    DROPPED,
    FAILED,
    PENDING,
    READY,
    IllegalTransition,
    State,
    Task,
    check_transition,
    failure_of,
    waits_on_worker,
)
from .waits import WorkerSlot, no_longer_waiting, send_waiting, stop_watching

# (worker, task, rank, barrier id or 0, seq): one member of a task to send to a worker,
# its number there
Assignment = tuple[int, Task, int, int, int]


class TaskStates:
    """Unfinished tasks, the ready queues, open barriers, and every move of a task."""

    def __init__(self, queues: list[int], log_size: int):
        self._tasks: dict[int, Task] = {}  # unfinished tasks by gid
        self._ready: dict[int, ReadyQueue] = {q: ReadyQueue() for q in queues}
        self._queue_workers: dict[int, list[WorkerSlot]] = {}
        self._kernel_names: dict[tuple[int, int], str] = {}  # (client, kernel id) -> name
        self._out = Outbox()  # results and barrier orders for the server to take
        self._barriers: set[int] = set()  # gids of dispatched groups: their barrier is open
        self._round: list[Assignment] = []  # what schedule() sends this round
        self._log: deque[tuple[int, int, int]] | None = (
            deque(maxlen=log_size) if log_size > 0 else None)

    def kernel_name(self, task: Task) -> str:
        return self._kernel_names.get((task.client, task.kernel), f"#{task.kernel}")

    def transition_log(self) -> list[tuple[int, str, str]]:
        """The last moves, oldest first: (gid, from, to); empty if the log is off."""
        return [(gid, State(a).name, State(b).name) for gid, a, b in self._log or ()]

    # ---- the one place a state changes ---------------------------------------------------

    def _move(self, task: Task, new: State, *how: object) -> list[Task] | None:
        """Move ``task`` to ``new`` and do that move's side effects (``how``: the failure
        of a move to FAILED); returns the tasks it set free."""
        old = task.state
        edge = _TRANSITIONS.get((old, new))
        if edge is None:  # not in task.ALLOWED: a bug in the broker
            try:
                check_transition(task, new)
            except IllegalTransition as exc:
                recent = "; ".join(f"{g} {a}->{b}" for g, a, b in self.transition_log()[-20:])
                raise IllegalTransition(f"{exc} (last moves: {recent or 'log off'})") from None
        if self._log is not None:
            self._log.append((task.gid, old, new))
        task.state = new
        if new >= DONE:
            del self._tasks[task.gid]
            task.after = task.wait = None  # what it waited for need not live on with it
        return edge(self, task, *how)

    def _one_less(self, task: Task) -> bool:
        """One predecessor less to wait for in the broker: True if it waits for none now."""
        task.waiting -= 1
        return task.waiting == 0 and task.state == PENDING

    def _ready_now(self, task: Task) -> None:
        """``task`` waits for nothing in the broker: READY, with what that frees in turn."""
        todo = deque([task])
        while todo:
            todo.extend(self._move(todo.popleft(), READY))

    # ---- the moves -----------------------------------------------------------------------

    def _pending_to_ready(self, task: Task) -> list[Task]:
        if task.trace is not None:
            task.trace[0] = time.monotonic()
        for chip in task.chips:
            self._ready[chip].append(task)
        # its PENDING dependents on its chip may queue behind it now
        return [d for d in no_longer_waiting(task, same_chip=True) if self._one_less(d)]

    def _ready_to_dispatched(self, task: Task) -> list[Task]:
        """Sent to its chips' workers (the caller took it off their queues, within their
        credit): a group's barrier opens; a single task's dependents on other chips may
        wait for it on their workers now."""
        if task.trace is not None:
            task.trace[1] = time.monotonic()
        task.left = len(task.chips)
        if task.left > 1:
            self._barriers.add(task.gid)
            for rank, chip in enumerate(task.chips):
                slot = self._assign(chip, task)
                self._round.append((slot.worker, task, rank, task.gid, slot.sent - 1))
            return []
        slot = self._assign(task.chip, task)
        task.worker, task.seq = slot, slot.sent - 1
        if task.after:
            send_waiting(task, slot, self._out)
        self._round.append((slot.worker, task, 0, 0, task.seq))
        if not task.dependents:
            return []
        return [d for d in no_longer_waiting(task, same_chip=False) if self._one_less(d)]

    def _dispatched_to_done(self, task: Task) -> list[Task]:
        self._out.done(task.client, task.task_id)
        free = [d for d in task.dependents
                # (one that waits on its worker stopped counting this one when it went)
                if not waits_on_worker(d, task) and self._one_less(d)]
        task.dependents = []
        return free

    def _dispatched_to_ready(self, task: Task) -> None:
        """Its worker died before it ran (or it reruns): back at the head of its queue."""
        task.left = 0
        task.worker, task.skipped, task.wait = None, False, None
        self._ready[task.chip].appendleft(task)

    def _ready_to_failed(self, task: Task, failure: Failure, downstream: bool) -> list[Task]:
        self._unqueue(task)
        return self._to_failed(task, failure, downstream)

    def _dispatched_to_failed(self, task: Task, failure: Failure,
                              downstream: bool) -> list[Task]:
        if downstream and task.worker is not None and task.gid in task.worker.inflight:
            # Downstream of a failure while on its worker, waiting for it there: the worker
            # skips it, or drops it now (a dead worker's task never ends).
            if task.skipped:
                del task.worker.inflight[task.gid]
                stop_watching(task)
                task.left = 0
            else:
                self._out.cancel_on(task.worker.worker, task.gid)
        return self._to_failed(task, failure, downstream)

    def _to_failed(self, task: Task, failure: Failure, downstream: bool) -> list[Task]:
        """Reported to its client (``downstream``: it failed because a predecessor did);
        every dependent fails with it (returned, to fail)."""
        self._out.failed(task.client, failure)
        downstream = task.dependents
        task.dependents = []
        return downstream

    def _ready_to_dropped(self, task: Task) -> None:
        self._unqueue(task)
        task.dependents = []

    def _to_dropped(self, task: Task) -> None:
        task.dependents = []

    # ---- what moves them -------------------------------------------------------------

    def _assign(self, queue: int, task: Task) -> WorkerSlot:
        workers = self._queue_workers[queue]
        # Host workers share one queue: the least loaded takes it.
        slot = workers[0] if len(workers) == 1 else min(workers, key=lambda w: len(w.inflight))
        slot.inflight[task.gid] = task
        slot.sent += 1
        return slot

    def _unqueue(self, task: Task) -> None:
        for chip in task.chips:
            self._ready[chip].remove(task)

    def _member_left(self, task: Task, failure: tuple[str, bool, bool] | None = None) -> None:
        """One member of ``task`` reported (or its worker died: ``failure`` says why,
        (reason, lost, followed)); it ends once every member has."""
        task.left -= 1
        if task.state == DISPATCHED:
            if failure is not None:
                # Prefer a member's own failure to one that only followed another's.
                if task.failure is None or (task.failure[2] and not failure[2]):
                    task.failure = failure
                if task.gid in self._barriers:
                    self._out.abort_barrier(task.gid)  # members waiting at it give up
            if task.left == 0:
                if task.failure is not None:
                    self._fail(task, None, *task.failure[:2])
                else:
                    for dep in self._move(task, DONE):
                        self._ready_now(dep)
        # (A task FAILED or DROPPED while on its workers only leaves them.)
        if task.left == 0 and task.gid in self._barriers:
            self._barriers.discard(task.gid)
            self._out.close_barrier(task.gid)

    def _fail(self, task: Task, root: Failure | None, reason: str, lost: bool = False) -> None:
        """Fail ``task`` (its own ``reason``, or caused by ``root``) and everything downstream."""
        stack = [(task, root)]
        while stack:
            t, cause = stack.pop()
            if t.state >= DONE:
                continue
            failure = failure_of(t, self.kernel_name(t), cause, reason, lost)
            t.root = cause or failure
            stack.extend((dep, t.root)
                         for dep in self._move(t, FAILED, failure, cause is not None))


T = TaskStates
# (from, to) -> the method doing that move's side effects: one per edge of task.ALLOWED
_TRANSITIONS: dict[tuple[int, int], Callable[..., list[Task] | None]] = {
    (PENDING, READY): T._pending_to_ready,
    (READY, DISPATCHED): T._ready_to_dispatched,
    (DISPATCHED, DONE): T._dispatched_to_done,
    (DISPATCHED, READY): T._dispatched_to_ready,
    (PENDING, FAILED): T._to_failed,
    (READY, FAILED): T._ready_to_failed,
    (DISPATCHED, FAILED): T._dispatched_to_failed,
    (PENDING, DROPPED): T._to_dropped,
    (READY, DROPPED): T._ready_to_dropped,
    (DISPATCHED, DROPPED): T._to_dropped,
}
assert set(_TRANSITIONS) == {(a, b) for a, to in ALLOWED.items() for b in to}
