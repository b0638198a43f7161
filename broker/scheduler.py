"""Task states and dependencies: the broker's bookkeeping, with no sockets in it.

A task moves PENDING -> READY -> DISPATCHED -> DONE, or to FAILED from any state before
DONE; ``_ready`` and ``_fail`` are the only places a state changes besides dispatch and
completion. Dependencies come from the byte ranges a task reads and writes in each tensor
(read-after-write, write-after-read, write-after-write; INOUT is both), so disjoint views
of one tensor never wait on each other. A worker runs its tasks one by one in the order it
got them, so a task need not wait in the broker for a predecessor that is queued ahead of
it on the same chip: it is queued right behind it and names it in ``after``; the worker
skips it if that predecessor failed. A chain of tasks on one chip thus costs no broker
round trip per task. Only unfinished accesses are kept per tensor, so
memory is O(live tasks). A failed write poisons the bytes it covers: later readers fail
with the same root cause until a new write covers them.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from enum import IntEnum

from pto.args import ParamType
from pto.errors import ProtocolError
from pto.protocol import Failure, PackedTaskSpec, TaskSpec, pack_args, unpack_args

_READS = frozenset({ParamType.INPUT, ParamType.INOUT})
_WRITES = frozenset({ParamType.OUTPUT, ParamType.INOUT, ParamType.OUTPUT_EXISTING})
_OVERWRITES = frozenset({ParamType.INOUT, ParamType.OUTPUT_EXISTING, ParamType.NO_DEP})


class State(IntEnum):
    PENDING = 0
    READY = 1
    DISPATCHED = 2
    DONE = 3
    FAILED = 4


HOST = -1  # the queue of host sub-tasks, shared by every host worker


class Task:
    """A task, or a group task: one member per chip in ``chips``, started together."""

    __slots__ = ("gid", "client", "tid", "chip", "chips", "kernel", "args", "state", "waiting",
                 "dependents", "after", "root", "left", "failure", "retries", "trace")

    def __init__(self, gid: int, client: int, spec: TaskSpec | PackedTaskSpec):
        self.gid = gid
        self.client = client
        self.tid = spec.task
        self.chip = spec.chip
        self.chips: tuple[int, ...] = tuple(spec.group) if spec.group else (spec.chip,)
        self.left = 0  # members still running, once dispatched
        # (reason, lost, followed) of the first member failure, preferring a member's own
        # failure to one that only followed another's (a BarrierAborted)
        self.failure: tuple[str, bool, bool] | None = None
        self.retries = spec.retries
        self.trace: list | None = None  # [ready, dispatch, dep task ids] of a traced client
        self.kernel = spec.kernel
        self.args = pack_args(spec.args)  # msgpack: unpacked only when needed
        self.state = State.PENDING
        self.waiting = 0  # predecessors not yet done, nor queued ahead of it on its chip
        self.dependents: list[Task] = []
        self.after: list[int] | None = None  # gids of predecessors queued ahead on its chip
        self.root: Failure | None = None  # set when FAILED


class _Access:
    """A task's read or write of bytes [start, end) of a tensor.

    A write that covers earlier accesses takes them into its ``shadow``: later tasks are
    ordered after them through the write, so they need not be scanned again. Only if the
    write fails (and so orders nothing) do later writers look into its shadow.
    """

    __slots__ = ("start", "end", "task", "shadow")

    def __init__(self, start: int, end: int, task: Task, shadow: list[_Access] | None = None):
        self.start, self.end, self.task, self.shadow = start, end, task, shadow

    def live_behind(self) -> list[Task]:
        """Unfinished tasks this failed write had been ordered after."""
        out: list[Task] = []
        for acc in self.shadow or ():
            if acc.task.state < State.DONE:
                out.append(acc.task)
            elif acc.task.state == State.FAILED:
                out.extend(acc.live_behind())
        return out


class _TensorUses:
    """Unfinished (and failed) reads and writes of one tensor."""

    __slots__ = ("reads", "writes", "compact_at")

    def __init__(self) -> None:
        self.reads: list[_Access] = []
        self.writes: list[_Access] = []
        self.compact_at = 16

    def compact(self) -> None:
        # Done accesses constrain nothing; dropping them lazily keeps this O(1) amortized.
        self.reads = [a for a in self.reads if a.task.state < State.DONE]
        self.writes = [a for a in self.writes if a.task.state != State.DONE]
        self.compact_at = max(16, 2 * (len(self.reads) + len(self.writes)))


class Scheduler:
    """Dependencies, ready queues per chip, and results waiting to go back to clients."""

    def __init__(self, chips: Iterable[int] = ()):
        self._gids = itertools.count(1)
        self.tasks: dict[int, Task] = {}  # unfinished tasks by gid
        self.ready: dict[int, deque[Task]] = {c: deque() for c in chips}
        self._tensors: dict[tuple[int, int], _TensorUses] = {}
        self.traced: set[int] = set()  # clients that asked for task times
        self.kernel_names: dict[tuple[int, int], str] = {}  # (client, kernel id) -> name
        # results to send per client: (done task ids, failures)
        self.results: dict[int, tuple[list[int], list[Failure]]] = {}

    # ---- input -----------------------------------------------------------------------

    def add_chip(self, chip: int) -> None:
        self.ready.setdefault(chip, deque())

    def submit(self, client: int, specs: list[TaskSpec] | list[PackedTaskSpec]) -> None:
        for spec in specs:
            task = Task(next(self._gids), client, spec)
            self.tasks[task.gid] = task
            self._link(task)

    def done(self, gid: int) -> Task | None:
        """A member (or the only member) of a task finished; returns the task if it ended."""
        task = self.tasks.get(gid)
        if task is None or task.state != State.DISPATCHED:
            return None  # its client is gone, or a duplicate report
        task.left -= 1
        if task.left > 0:
            return None
        if task.failure is not None:
            self._fail(task, None, *task.failure[:2])
            return task
        del self.tasks[gid]
        task.state = State.DONE
        self._result(task.client)[0].append(task.tid)
        for dep in task.dependents:
            if _queued_behind(dep, task):
                continue  # it stopped waiting for this task when queued behind it
            dep.waiting -= 1
            if dep.waiting == 0 and dep.state == State.PENDING:
                self._ready(dep)
        task.dependents = []
        return task

    def failed(self, gid: int, reason: str, lost: bool = False,
               followed: bool = False) -> Task | None:
        """A member of a task failed (``followed``: only because another member did); the
        task fails once every member has reported."""
        task = self.tasks.get(gid)
        if task is None or task.state != State.DISPATCHED:
            return None
        task.left -= 1
        if task.failure is None or (task.failure[2] and not followed):
            task.failure = (reason, lost, followed)
        if task.left == 0:
            self._fail(task, None, *task.failure[:2])
        return task

    def requeue(self, tasks: list[Task]) -> None:
        """Put dispatched single tasks back at the head of their queues, in this order."""
        for task in reversed(tasks):
            if task.state == State.DISPATCHED and task.gid in self.tasks:
                task.state = State.READY
                self.ready[task.chip].appendleft(task)

    @staticmethod
    def overwrites(task: Task) -> bool:
        """Rerunning it after a partial run could give wrong data (INOUT, OUTPUT_EXISTING,
        NO_DEP)."""
        return any(a.kind in _OVERWRITES for a in unpack_args(task.args))

    @staticmethod
    def inputs_overwritten(task: Task, later: Iterable[Task]) -> bool:
        """Whether a task that ran after ``task`` on its worker wrote bytes ``task`` reads,
        so rerunning ``task`` would read the wrong data (possible only for tasks queued
        behind it: independent tasks never write what it reads)."""
        reads = [a for a in unpack_args(task.args) if a.kind in _READS]
        return any(w.tensor == r.tensor and w.offset < r.offset + r.nbytes
                   and r.offset < w.offset + w.nbytes
                   for t in later if t.client == task.client
                   for w in unpack_args(t.args) if w.kind in _WRITES or w.kind == ParamType.NO_DEP
                   for r in reads)

    def cancel(self, client: int, tids: Iterable[int]) -> list[Task]:
        """Fail the named tasks not dispatched yet; return the dispatched single ones (a
        worker may still hold them queued and drop them)."""
        wanted = set(tids)
        dispatched = []
        for task in [t for t in self.tasks.values() if t.client == client and t.tid in wanted]:
            if task.state in (State.PENDING, State.READY):
                self._fail(task, None, "cancelled")
            elif task.state == State.DISPATCHED and len(task.chips) == 1:
                dispatched.append(task)
        return dispatched

    def drop_client(self, client: int) -> None:
        """Forget a client: queued tasks vanish, dispatched ones finish unreported."""
        for gid, task in list(self.tasks.items()):
            if task.client != client:
                continue
            task.dependents = []
            if task.state == State.DISPATCHED:
                continue  # done() will pop it; its result goes nowhere
            if task.state == State.READY:
                self._unqueue(task)
            task.state = State.FAILED
            del self.tasks[gid]
        for key in [k for k in self._tensors if k[0] == client]:
            del self._tensors[key]
        for key in [k for k in self.kernel_names if k[0] == client]:
            del self.kernel_names[key]
        self.results.pop(client, None)
        self.traced.discard(client)

    def forget_tensors(self, client: int, tensors: Iterable[int]) -> None:
        for tid in tensors:
            self._tensors.pop((client, tid), None)

    # ---- output ----------------------------------------------------------------------

    def schedule(self, credit: dict[int, int],
                 idle: set[int] | None = None) -> list[tuple[int, Task, int]]:
        """Take ready work within each queue's ``credit``: (queue, task, rank) triples.

        Queues are FIFO. A group at the head of a queue reserves it: nothing behind it
        goes until the group heads the queue of every one of its chips and every one of
        those chips is ``idle`` (its worker holds no task), and then all its members go at
        once, so they start together. Groups thus reach every worker in one global order,
        so two groups sharing chips can never wait on each other.
        """
        out: list[tuple[int, Task, int]] = []
        progress = True
        while progress:
            progress = False
            for chip, queue in self.ready.items():
                while queue and credit.get(chip, 0) > 0:
                    task = queue[0]
                    if task.trace is not None:
                        task.trace[1] = time.monotonic()
                    if len(task.chips) == 1:
                        queue.popleft()
                        credit[chip] -= 1
                        if idle is not None:
                            idle.discard(chip)
                        task.state, task.left = State.DISPATCHED, 1
                        out.append((chip, task, 0))
                        continue
                    if not all(self.ready[c] and self.ready[c][0] is task and credit.get(c, 0) > 0
                               and (idle is None or c in idle) for c in task.chips):
                        break
                    for rank, c in enumerate(task.chips):
                        self.ready[c].popleft()
                        credit[c] -= 1
                        if idle is not None:
                            idle.discard(c)
                        out.append((c, task, rank))
                    task.state, task.left = State.DISPATCHED, len(task.chips)
                    progress = True
        return out

    def take_results(self) -> dict[int, tuple[list[int], list[Failure]]]:
        results, self.results = self.results, {}
        return results

    def kernel_name(self, task: Task) -> str:
        return self.kernel_names.get((task.client, task.kernel), f"#{task.kernel}")

    # ---- transitions -----------------------------------------------------------------

    def _link(self, task: Task) -> None:
        unknown = [c for c in task.chips if c not in self.ready]
        if unknown or len(set(task.chips)) != len(task.chips):
            served = sorted(c for c in self.ready if c != HOST)
            if unknown == [HOST]:
                what = "no host workers for host sub-tasks (start the broker with --host-workers)"
            else:
                what = f"unknown chip {unknown[0]}" if unknown else f"repeated chips {task.chips}"
            self._fail(task, None, f"{what} (broker serves {served})")
            return
        if (task.client, task.kernel) not in self.kernel_names:
            self._fail(task, None, f"unknown kernel id {task.kernel}")
            return
        try:
            args = unpack_args(task.args)
        except ProtocolError as exc:
            self._fail(task, None, str(exc))
            return
        deps: set[Task] = set()
        poison: Failure | None = None
        for arg in args:
            if arg.tensor < 0 or arg.kind not in _READS and arg.kind not in _WRITES:
                continue
            key = (task.client, arg.tensor)
            uses = self._tensors.get(key)
            if uses is None:
                uses = self._tensors[key] = _TensorUses()
            start, end = arg.offset, arg.offset + arg.nbytes
            reads, writes = arg.kind in _READS, arg.kind in _WRITES
            for acc in uses.writes:
                if acc.start < end and start < acc.end:
                    if acc.task.state == State.FAILED:
                        if reads and poison is None:
                            poison = acc.task.root
                        if writes:
                            deps.update(acc.live_behind())
                    elif acc.task.state < State.DONE:
                        deps.add(acc.task)
            if writes:
                for acc in uses.reads:
                    if acc.start < end and start < acc.end and acc.task.state < State.DONE:
                        deps.add(acc.task)
                # Accesses this write covers go into its shadow (a covered failed write's
                # poisoned bytes are replaced by this write).
                shadow: list[_Access] = []
                for kind in ("reads", "writes"):
                    kept = []
                    for acc in getattr(uses, kind):
                        if start <= acc.start and acc.end <= end:
                            if acc.task.state < State.DONE:
                                shadow.append(acc)
                        else:
                            kept.append(acc)
                    setattr(uses, kind, kept)
                uses.writes.append(_Access(start, end, task, shadow or None))
            else:
                uses.reads.append(_Access(start, end, task))
            if len(uses.reads) + len(uses.writes) >= uses.compact_at:
                uses.compact()
        deps.discard(task)
        if task.client in self.traced:
            task.trace = [0.0, 0.0, [d.tid for d in deps]]
        if poison is not None:
            self._fail(task, poison, "")
            return
        for dep in deps:
            dep.dependents.append(task)
            if _queued_behind(task, dep) and dep.state in (State.READY, State.DISPATCHED):
                task.after = task.after or []
                task.after.append(dep.gid)
            else:
                task.waiting += 1
        if not task.waiting:
            self._ready(task)

    def _ready(self, task: Task) -> None:
        todo = deque([task])
        while todo:
            task = todo.popleft()
            if task.trace is not None:
                task.trace[0] = time.monotonic()
            task.state = State.READY
            for chip in task.chips:
                self.ready[chip].append(task)
            # Successors on the same chip may now queue right behind it.
            for dep in task.dependents:
                if dep.state == State.PENDING and _queued_behind(dep, task):
                    dep.after = dep.after or []
                    dep.after.append(task.gid)
                    dep.waiting -= 1
                    if dep.waiting == 0:
                        todo.append(dep)

    def _unqueue(self, task: Task) -> None:
        for chip in task.chips:
            self.ready[chip].remove(task)

    def _fail(self, task: Task, root: Failure | None, reason: str, lost: bool = False) -> None:
        """Fail ``task`` (its own ``reason``, or caused by ``root``) and everything downstream."""
        stack = [(task, root)]
        while stack:
            t, cause = stack.pop()
            if t.state in (State.DONE, State.FAILED):
                continue
            name = self.kernel_name(t)
            if cause is None:
                t.root = Failure(t.tid, name, t.chip, reason, t.tid, lost)
                failure = t.root
            else:
                t.root = cause
                failure = Failure(
                    t.tid, name, t.chip,
                    f"not run: task {cause.root} (kernel {cause.kernel!r} on chip {cause.chip})"
                    f" failed: {cause.reason}",
                    cause.root, cause.lost,
                )
            if t.state == State.READY:
                self._unqueue(t)
            t.state = State.FAILED
            self.tasks.pop(t.gid, None)
            self._result(t.client)[1].append(failure)
            for dep in t.dependents:
                stack.append((dep, t.root))
            t.dependents = []

    def _result(self, client: int) -> tuple[list[int], list[Failure]]:
        res = self.results.get(client)
        if res is None:
            res = self.results[client] = ([], [])
        return res


def _queued_behind(task: Task, dep: Task) -> bool:
    """Whether ``task`` may wait for its predecessor ``dep`` on its worker instead of in the
    broker: both are single tasks of one chip (FIFO there), not host sub-tasks (which any
    host worker may take)."""
    return len(task.chips) == 1 and task.chips == dep.chips and task.chip != HOST
