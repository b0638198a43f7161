"""The broker's task bookkeeping, with no sockets in it: the one owner of task state.

Every state change goes through ``_move`` (``broker.transitions``, the base class: the
table of moves and each move's side effects), checked against ``broker.task.ALLOWED``. The
scheduler also owns what depends on those states: the ready queue of each chip, the
tasks in flight on each worker (which must agree with DISPATCHED; ``validate`` checks
that and the other invariants), what becomes of a dead worker's tasks (the policy is
``broker.retry``'s), which group barriers are open, trace times, and the kernel names
failures are reported with (what is to send waits in a ``broker.outbox.Outbox``). The
server (``broker.server``) only routes: it feeds messages in through the public methods
and sends out what ``schedule``, ``take_results`` and ``take_barrier_orders`` return.

A task need not wait in the broker for a predecessor already dispatched, or queued ahead
of it on its chip: it waits on its worker (``broker.waits`` keeps that bookkeeping). A
worker skips a task whose predecessor failed and says so (``SKIPPED``); the scheduler
fails it with the root cause once it hears of that failure, and cancels what other
workers hold downstream. Dependencies themselves are ``broker.deps``'s.

Clients share the chips fairly: each chip's ready queue (``broker.ready.ReadyQueue``)
keeps a FIFO per client and serves the clients round-robin, one task per turn, so a
client's small run is not queued behind another client's flood. Each chip keeps the last
eighth of its credit for clients holding fewer than that many tasks there, so a flood
never fills a worker's credit and another client's task is sent at once; the worker then
takes its clients in turn too (``worker.queue``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

from pto.wire.errors import ProtocolError
from pto.wire.protocol import (
    SKIPPED,
    Failure,
    LaunchTime,
    PackedTaskSpec,
    TaskSpec,
    TaskTime,
    unpack_args,
)

from .deps import Accesses
from .invariants import check as check_invariants
from .outbox import Results
from .ready import ReadyQueue
from .retry import Verdict, after_death
from .task import (
    DISPATCHED,
    DROPPED,
    PENDING,
    READY,
    Task,
    covered,
    unknown_chips,
)
from .transitions import Assignment, TaskStates
from .waits import WorkerSlot, awaited_elsewhere, forget_dead, stop_watching

log = logging.getLogger("pto.broker")

# The last 1/_RESERVE_SHARE of a chip's credit (of each of its workers' limits) is kept
# for clients holding fewer than that many tasks there: a flood fills the rest, and another
# client's task always finds room at once instead of waiting for the flood's to finish.
_RESERVE_SHARE = 8

__all__ = ["Assignment", "Scheduler"]


class Scheduler(TaskStates):
    """Dependencies, ready queues per chip, in-flight tasks per worker, and results."""

    def __init__(self, queues: Iterable[int] = (), log_size: int = 1000):
        """``log_size``: moves the transition log keeps (0: no log)."""
        super().__init__(list(queues), log_size)
        self._gids = itertools.count(1)
        self._accesses = Accesses()
        self._workers: dict[int, WorkerSlot] = {}
        self._traced: set[int] = set()  # clients that asked for task times
        self._uids = itertools.count(1)  # a worker process's uid, never reused

    # ---- peers -----------------------------------------------------------------------

    def add_client(self, client: int, traced: bool = False) -> None:
        if traced:
            self._traced.add(client)

    def register_kernel(self, client: int, kernel: int, name: str) -> None:
        self._kernel_names[(client, kernel)] = name

    def add_worker(self, worker: int, queue: int, limit: int) -> int:
        """A worker (its chip, or ``pto.wire.chips.host_chip(k)``) takes tasks from ``queue``,
        at most ``limit`` in flight. Returns its uid (what tasks waiting for its tasks name
        it by)."""
        if worker in self._workers:
            raise ValueError(f"worker {worker} is already connected")
        slot = WorkerSlot(worker, queue, limit, next(self._uids))
        self._workers[worker] = slot
        self._queue_workers.setdefault(queue, []).append(slot)
        self._ready.setdefault(queue, ReadyQueue())
        return slot.uid

    def drop_client(self, client: int) -> None:
        """Forget a client: its tasks are DROPPED (dispatched ones stay in flight until
        their worker reports them), its tensors, kernel names and results go."""
        for task in [t for t in self._tasks.values() if t.client == client]:
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
                stop_watching(task)
                self._member_left(task)
        for failure in failed:
            if failure.root == SKIPPED:
                task = inflight.get(failure.task)
                if task is not None and task.state == DISPATCHED:
                    # Its predecessor's failure is on its way (or that worker's death is):
                    # failing it then names the root cause.
                    task.skipped = True
                    continue
            task = inflight.pop(failure.task, None)
            if task is not None:
                stop_watching(task)
                self._member_left(task, (failure.reason, failure.lost, failure.root == 0))

    def cancel(self, client: int, task_ids: Iterable[int]) -> None:
        """Fail the named tasks not dispatched yet; ask the workers holding the dispatched
        single ones to drop them if still queued (``take_worker_orders``)."""
        wanted = set(task_ids)
        for task in [t for t in self._tasks.values() if t.client == client
                     and t.task_id in wanted]:
            if task.state in (PENDING, READY):
                self._fail(task, None, "cancelled")
            elif task.state == DISPATCHED and task.worker is not None:
                self._out.cancel_on(task.worker.worker, task.gid)

    def forget_tensors(self, client: int, tensor_ids: Iterable[int]) -> None:
        self._accesses.forget(client, tensor_ids)

    def worker_lost(self, worker: int, status: tuple[int, int] | None, died: str,
                    hint: str = "",
                    outcome: Callable[[int], bool | None] | None = None) -> None:
        """Fail or rerun what a dead worker held. ``status`` is its [running, last
        finished] task gids if known, ``outcome(seq)`` what its completion ring says of its
        task ``seq``; ``died`` says who died how ("worker of chip 0 (pid 7) died (killed
        by SIGKILL)"), ``hint`` where its log is.

        Tasks its ring says ended count as reported (a task elsewhere may already have
        used their outputs). Of the others, those it had not started go back to the head
        of their queue; started ones rerun or fail as ``broker.retry.after_death``
        decides, and so does any that a task elsewhere already waits for."""
        slot = self._workers.pop(worker)
        self._queue_workers[slot.queue].remove(slot)
        forget_dead(slot, self._workers.values())
        held = []
        tasks = list(slot.inflight.values())
        slot.inflight.clear()
        for task in tasks:
            stop_watching(task)
            ended = outcome(task.seq) if outcome is not None and task.worker is slot else None
            if ended is None:
                held.append(task)
            elif ended:
                self._member_left(task)
            else:
                self._member_left(task, (f"{died} after kernel {self.kernel_name(task)!r} "
                                         f"failed, before saying why{hint}", True, False))
        requeue = []
        verdicts = after_death(held, status, awaited_elsewhere,
                               exact=outcome is not None and status is not None)
        for task, verdict in zip(held, verdicts, strict=True):
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
        reserve: dict[int, int] = {}
        idle: set[int] = set()
        for slot in self._workers.values():
            room = slot.room()
            if room > 0:
                credit[slot.queue] = credit.get(slot.queue, 0) + room
            # Host workers (limit 1: one host sub-task each) keep none.
            reserve[slot.queue] = reserve.get(slot.queue, 0) + slot.limit // _RESERVE_SHARE
            if not slot.inflight:
                idle.add(slot.queue)
        held: dict[int, dict[int, int]] = {}  # chip -> client -> tasks it holds there
        barred: dict[int, set[int]] = {}  # chip -> clients kept out of its reserve
        self._round = []
        progress = True
        while progress:
            progress = False
            for chip, queue in self._ready.items():
                kept_out = barred.setdefault(chip, set())
                while queue and credit.get(chip, 0) > 0:
                    task = queue.head(kept_out)
                    if task is None:
                        break
                    if len(task.chips) == 1:
                        if credit[chip] <= reserve.get(chip, 0):
                            holds = held.get(chip)
                            if holds is None:
                                holds = held[chip] = self._held(chip)
                            if holds.get(task.client, 0) >= reserve[chip]:
                                kept_out.add(task.client)
                                continue
                            holds[task.client] = holds.get(task.client, 0) + 1
                        elif chip in held:
                            held[chip][task.client] = held[chip].get(task.client, 0) + 1
                        queue.pop(task)
                        credit[chip] -= 1
                        idle.discard(chip)
                        for dep in self._move(task, DISPATCHED):
                            self._ready_now(dep)
                            progress = True  # a task on another chip became READY
                        continue
                    if not all(self._ready[c].head() is task
                               and credit.get(c, 0) > 0 and c in idle for c in task.chips):
                        break
                    for c in task.chips:
                        self._ready[c].pop(task)
                        credit[c] -= 1
                        idle.discard(c)
                    self._move(task, DISPATCHED)
                    progress = True
        out, self._round = self._round, []
        return out

    def _held(self, queue: int) -> dict[int, int]:
        """Tasks each client holds on the workers of ``queue``."""
        counts: dict[int, int] = {}
        for slot in self._queue_workers.get(queue, ()):
            for task in slot.inflight.values():
                counts[task.client] = counts.get(task.client, 0) + 1
        return counts

    def take_results(self) -> Results:
        """Per client: task ids done, failures, and the task times gathered so far."""
        return self._out.take_results()

    def take_barrier_orders(self) -> tuple[list[int], list[int]]:
        """Group barriers (by gid) to abort, and to remove: apply in that order."""
        return self._out.take_barrier_orders()

    def take_worker_orders(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Per worker: gids of queued tasks to drop (``Dispatch.cancel``), and flat (seq,
        waiter uid) pairs of its tasks that others wait for (``Dispatch.watch``)."""
        return self._out.take_worker_orders()

    def worker_uid(self, worker: int) -> int | None:
        slot = self._workers.get(worker)
        return None if slot is None else slot.uid

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
        check_invariants(self._tasks, self._ready, [(w.worker, w.queue, w.inflight, w.watched)
                                         for w in self._workers.values()], self._barriers)

    # ---- linking a new task -----------------------------------------------------------

    def _link(self, task: Task) -> None:
        """A new task: check it, find its predecessors, count those it waits for in the
        broker (``waiting``: counted up only here, down only in ``_one_less``)."""
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
            if covered(task, dep):
                task.after = task.after or []
                task.after.append(dep)
            else:
                task.waiting += 1
        if not task.waiting:
            self._ready_now(task)
