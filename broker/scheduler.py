"""The broker's task bookkeeping, with no sockets in it: the one owner of task state.

Every state change goes through ``_move``, checked against ``broker.task.ALLOWED``. The
scheduler also owns what depends on those states: the ready queue of each chip, the
tasks in flight on each worker (which must agree with DISPATCHED; ``validate`` checks
that and the other invariants), what becomes of a dead worker's tasks (the policy is
``broker.retry``'s), which group barriers are open, trace times, and the kernel names
failures are reported with (what is to send waits in a ``broker.outbox.Outbox``). The
server (``broker.server``) only routes: it feeds messages in through the public methods
and sends out what ``schedule``, ``take_results`` and ``take_barrier_orders`` return.

A worker runs its tasks one by one in the order it got them, so a task need not wait in
the broker for a predecessor that is queued ahead of it on the same chip: it is queued
right behind it and names it in ``after``; the worker skips it if that predecessor
failed. A chain of tasks on one chip thus costs no broker round trip per task.
Dependencies themselves are ``broker.deps``'s.

Clients share the chips fairly: each chip's ready queue (``broker.ready.ReadyQueue``)
keeps a FIFO per client and serves the clients round-robin, one task per turn, so a
client's small run is not queued behind another client's flood (what a worker already
holds, at most its credit, still runs first: workers run in the order sent).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable

from pto.errors import ProtocolError
from pto.protocol import Failure, LaunchTime, PackedTaskSpec, TaskSpec, TaskTime, unpack_args

from .deps import Accesses
from .invariants import check as check_invariants
from .outbox import Outbox, Results
from .ready import ReadyQueue
from .retry import Verdict, after_death
from .task import (
    DISPATCHED,
    DONE,
    DROPPED,
    FAILED,
    NEXT_STATES,
    PENDING,
    READY,
    State,
    Task,
    check_transition,
    failure_of,
    queued_behind,
    unknown_chips,
)

log = logging.getLogger("pto.broker")

# (worker, task, rank, barrier id or 0): one member of a task to send to a worker
Assignment = tuple[int, Task, int, int]


class _Worker:
    """A connected worker as the scheduler sees it: its queue and what it holds."""

    __slots__ = ("worker", "queue", "limit", "inflight")

    def __init__(self, worker: int, queue: int, limit: int):
        self.worker, self.queue, self.limit = worker, queue, limit
        self.inflight: dict[int, Task] = {}  # gid -> task, in the order sent


class Scheduler:
    """Dependencies, ready queues per chip, in-flight tasks per worker, and results."""

    def __init__(self, queues: Iterable[int] = ()):
        self._gids = itertools.count(1)
        self._tasks: dict[int, Task] = {}  # unfinished tasks by gid
        self._ready: dict[int, ReadyQueue] = {q: ReadyQueue() for q in queues}
        self._accesses = Accesses()
        self._workers: dict[int, _Worker] = {}
        self._queue_workers: dict[int, list[_Worker]] = {}
        self._traced: set[int] = set()  # clients that asked for task times
        self._kernel_names: dict[tuple[int, int], str] = {}  # (client, kernel id) -> name
        self._out = Outbox()  # results and barrier orders for the server to take
        self._barriers: set[int] = set()  # gids of dispatched groups: their barrier is open

    # ---- peers -----------------------------------------------------------------------

    def add_client(self, client: int, traced: bool = False) -> None:
        if traced:
            self._traced.add(client)

    def register_kernel(self, client: int, kernel: int, name: str) -> None:
        self._kernel_names[(client, kernel)] = name

    def kernel_name(self, task: Task) -> str:
        return self._kernel_names.get((task.client, task.kernel), f"#{task.kernel}")

    def add_worker(self, worker: int, queue: int, limit: int) -> None:
        """A worker (its chip, or ``pto.sockets.host_chip(k)``) takes tasks from ``queue``,
        at most ``limit`` in flight."""
        if worker in self._workers:
            raise ValueError(f"worker {worker} is already connected")
        slot = _Worker(worker, queue, limit)
        self._workers[worker] = slot
        self._queue_workers.setdefault(queue, []).append(slot)
        self._ready.setdefault(queue, ReadyQueue())

    def drop_client(self, client: int) -> None:
        """Forget a client: its tasks are DROPPED (dispatched ones stay in flight until
        their worker reports them), its tensors, kernel names and results go."""
        for task in [t for t in self._tasks.values() if t.client == client]:
            task.dependents = []
            if task.state == READY:
                self._unqueue(task)
            self._move(task, DROPPED)
        self._accesses.drop_client(client)
        for key in [k for k in self._kernel_names if k[0] == client]:
            del self._kernel_names[key]
        self._out.forget(client)
        self._traced.discard(client)

    # ---- input -----------------------------------------------------------------------

    def submit(self, client: int, specs: list[TaskSpec] | list[PackedTaskSpec]) -> list[int]:
        """Take a client's tasks in; returns the gids they got, in order."""
        gids = []
        for spec in specs:
            task = Task(next(self._gids), client, spec)
            self._tasks[task.gid] = task
            gids.append(task.gid)
            self._link(task)
        return gids

    def report(self, worker: int, done: Iterable[int], failed: Iterable[Failure],
               times: Iterable[tuple[int, int, float, float]] = (),
               launches: Iterable[tuple[int, int, list[LaunchTime]]] = ()) -> None:
        """What a worker finished: task gids, failures (``root`` 0: a group member that
        failed only because another did), and (gid, rank, start, end) of traced tasks.
        Reports of tasks it does not hold (duplicates, a forgotten client's) are ignored."""
        slot = self._workers.get(worker)
        if slot is None:
            return
        inflight = slot.inflight
        spans = {(gid, rank): spans for gid, rank, spans in launches}
        for gid, rank, start, end in times:
            task = inflight.get(gid)
            if task is not None and task.trace is not None:
                ready, dispatch, deps = task.trace
                self._out.timed(task.client,
                    TaskTime(task.task_id, worker, rank, ready, dispatch, start, end, deps,
                             spans.get((gid, rank), [])))
        for gid in done:
            task = inflight.pop(gid, None)
            if task is not None:
                self._member_left(task)
        for failure in failed:
            task = inflight.pop(failure.task, None)
            if task is not None:
                self._member_left(task, (failure.reason, False, failure.root == 0))

    def cancel(self, client: int, task_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Fail the named tasks not dispatched yet; return (worker, gid) of the dispatched
        single ones (their worker may still hold them queued and drop them)."""
        wanted = set(task_ids)
        on_workers = []
        for task in [t for t in self._tasks.values() if t.client == client
                     and t.task_id in wanted]:
            if task.state in (PENDING, READY):
                self._fail(task, None, "cancelled")
            elif task.state == DISPATCHED and len(task.chips) == 1:
                on_workers.extend((w.worker, task.gid) for w in self._workers.values()
                                  if task.gid in w.inflight)
        return on_workers

    def forget_tensors(self, client: int, tensor_ids: Iterable[int]) -> None:
        self._accesses.forget(client, tensor_ids)

    def worker_lost(self, worker: int, status: tuple[int, int] | None, died: str,
                    hint: str = "") -> None:
        """Fail or rerun what a dead worker held. ``status`` is its [running, last
        finished] task gids if known; ``died`` says who died how ("worker of chip 0 (pid
        7) died (killed by SIGKILL)"), ``hint`` where its log is.

        Tasks it had not started go back to the head of their queue; started ones rerun
        or fail as ``broker.retry.after_death`` decides."""
        slot = self._workers.pop(worker)
        self._queue_workers[slot.queue].remove(slot)
        held = list(slot.inflight.values())
        slot.inflight.clear()
        requeue = []
        for task, verdict in zip(held, after_death(held, status), strict=True):
            if verdict is Verdict.FAIL:
                reason = f"{died} while running kernel {self.kernel_name(task)!r}{hint}"
                self._member_left(task, (reason, True, False))
                continue
            if verdict is Verdict.RERUN:
                task.retries -= 1
                log.info("rerunning task %d (kernel %r) after its worker died", task.gid,
                         self.kernel_name(task))
            requeue.append(task)
        for task in reversed(requeue):  # back at the head of its queue, in the order sent
            if task.state != DISPATCHED:  # failed meanwhile, downstream of one that failed
                self._member_left(task)
                continue
            self._move(task, READY)
            task.left = 0
            self._ready[task.chip].appendleft(task)

    # ---- output ----------------------------------------------------------------------

    def has_ready(self) -> bool:
        return any(self._ready.values())

    def schedule(self) -> list[Assignment]:
        """Take ready work within each worker's room (its limit less what it holds).

        Each queue is a ``broker.ready.ReadyQueue``: a FIFO per client, the clients
        taking turns one task at a time, so one client's flood never holds another's task
        back by more than a turn. A group reserves its chips for its client: nothing of
        another client goes to them until the group heads its client's FIFO on every one
        of its chips and every one of those chips is idle (its worker holds no task), and
        then all its members go at once, so they start together. The group that became
        ready first reserves all its chips, so two groups sharing chips never wait on
        each other.
        """
        credit: dict[int, int] = {}
        idle: set[int] = set()
        for slot in self._workers.values():
            room = slot.limit - len(slot.inflight)
            if room > 0:
                credit[slot.queue] = credit.get(slot.queue, 0) + room
            if not slot.inflight:
                idle.add(slot.queue)
        out: list[Assignment] = []
        progress = True
        while progress:
            progress = False
            for chip, queue in self._ready.items():
                while queue and credit.get(chip, 0) > 0:
                    task = queue.head()
                    if len(task.chips) == 1:
                        queue.pop(task)
                        credit[chip] -= 1
                        idle.discard(chip)
                        self._move(task, DISPATCHED)
                        task.left = 1
                        out.append((self._assign(chip, task), task, 0, 0))
                        continue
                    if not all(self._ready[c].head() is task
                               and credit.get(c, 0) > 0 and c in idle for c in task.chips):
                        break
                    self._move(task, DISPATCHED)
                    task.left = len(task.chips)
                    self._barriers.add(task.gid)
                    for rank, c in enumerate(task.chips):
                        self._ready[c].pop(task)
                        credit[c] -= 1
                        idle.discard(c)
                        out.append((self._assign(c, task), task, rank, task.gid))
                    progress = True
        return out

    def _assign(self, queue: int, task: Task) -> int:
        workers = self._queue_workers[queue]
        # Host workers share one queue: the least loaded takes it.
        slot = workers[0] if len(workers) == 1 else min(workers, key=lambda w: len(w.inflight))
        slot.inflight[task.gid] = task
        return slot.worker

    def take_results(self) -> Results:
        """Per client: task ids done, failures, and the task times gathered so far."""
        return self._out.take_results()

    def take_barrier_orders(self) -> tuple[list[int], list[int]]:
        """Group barriers (by gid) to abort, and to remove: apply in that order."""
        return self._out.take_barrier_orders()

    # ---- reading (status, tests) -------------------------------------------------------

    def task(self, gid: int) -> Task | None:
        """An unfinished task (do not change it: only the scheduler does)."""
        return self._tasks.get(gid)

    def queued(self, queue: int) -> list[Task]:
        return list(self._ready.get(queue, ()))

    def queue_lengths(self) -> dict[int, int]:
        return {q: len(d) for q, d in sorted(self._ready.items())}

    def in_flight(self, worker: int) -> list[Task]:
        """What a worker holds, in the order sent."""
        slot = self._workers.get(worker)
        return [] if slot is None else list(slot.inflight.values())

    def accesses_kept(self, client: int, tensor_id: int) -> int:
        """Accesses remembered for one tensor (bounded by its unfinished tasks)."""
        return self._accesses.count(client, tensor_id)

    def unfinished(self) -> dict[int, int]:
        """Unfinished tasks per client."""
        counts: dict[int, int] = {}
        for task in self._tasks.values():
            counts[task.client] = counts.get(task.client, 0) + 1
        return counts

    def validate(self) -> None:
        """Check every invariant (slow: for tests); AssertionError names the broken one."""
        for queue, ready in self._ready.items():
            ready.check(queue)
        check_invariants(self._tasks, self._ready, [(w.worker, w.queue, w.inflight)
                                         for w in self._workers.values()], self._barriers)

    # ---- transitions -----------------------------------------------------------------

    def _move(self, task: Task, new: State) -> None:
        """The one place a task's state changes."""
        if new not in NEXT_STATES[task.state]:
            check_transition(task, new)  # raises IllegalTransition
        if task.trace is not None:
            if new == READY and task.state == PENDING:
                task.trace[0] = time.monotonic()
            elif new == DISPATCHED:
                task.trace[1] = time.monotonic()
        task.state = new
        if new >= DONE:
            del self._tasks[task.gid]

    def _link(self, task: Task) -> None:
        bad_chips = unknown_chips(task, self._ready)
        if bad_chips:
            self._fail(task, None, bad_chips)
            return
        if (task.client, task.kernel) not in self._kernel_names:
            self._fail(task, None, f"unknown kernel id {task.kernel}")
            return
        try:
            args = unpack_args(task.args)
        except ProtocolError as exc:
            self._fail(task, None, str(exc))
            return
        deps, poison = self._accesses.link(task, args)
        if task.client in self._traced:
            task.trace = [0.0, 0.0, [d.task_id for d in deps]]
        if poison is not None:
            self._fail(task, poison, "")
            return
        for dep in deps:
            dep.dependents.append(task)
            if queued_behind(task, dep) and dep.state in (READY, DISPATCHED):
                task.after = task.after or []
                task.after.append(dep.gid)
            else:
                task.waiting += 1
        if not task.waiting:
            self._ready_now(task)

    def _ready_now(self, task: Task) -> None:
        todo = deque([task])
        while todo:
            task = todo.popleft()
            self._move(task, READY)
            for chip in task.chips:
                self._ready[chip].append(task)
            # Successors on the same chip may now queue right behind it.
            for dep in task.dependents:
                if dep.state == PENDING and queued_behind(dep, task):
                    dep.after = dep.after or []
                    dep.after.append(task.gid)
                    dep.waiting -= 1
                    if dep.waiting == 0:
                        todo.append(dep)

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
                    self._done(task)
        # (A task FAILED or DROPPED while on its workers only leaves them.)
        if task.left == 0 and task.gid in self._barriers:
            self._barriers.discard(task.gid)
            self._out.close_barrier(task.gid)

    def _done(self, task: Task) -> None:
        self._move(task, DONE)
        self._out.done(task.client, task.task_id)
        for dep in task.dependents:
            if queued_behind(dep, task):
                continue  # it stopped waiting for this task when queued behind it
            dep.waiting -= 1
            if dep.waiting == 0 and dep.state == PENDING:
                self._ready_now(dep)
        task.dependents = []

    def _unqueue(self, task: Task) -> None:
        for chip in task.chips:
            self._ready[chip].remove(task)

    def _fail(self, task: Task, root: Failure | None, reason: str, lost: bool = False) -> None:
        """Fail ``task`` (its own ``reason``, or caused by ``root``) and everything downstream."""
        stack = [(task, root)]
        while stack:
            t, cause = stack.pop()
            if t.state >= DONE:
                continue
            failure = failure_of(t, self.kernel_name(t), cause, reason, lost)
            t.root = cause or failure
            if t.state == READY:
                self._unqueue(t)
            self._move(t, FAILED)
            self._out.failed(t.client, failure)
            for dep in t.dependents:
                stack.append((dep, t.root))
            t.dependents = []
