"""A task as the broker tracks it, and the states it may move between.

``ALLOWED`` is the one table of legal state changes; ``Scheduler._move`` is the one place
a state changes and checks it, so a change outside the table is a bug that raises
``IllegalTransition`` at once instead of corrupting the bookkeeping quietly.

    PENDING ----> READY ----> DISPATCHED ----> DONE
       |            |          |   |   ^
       |            |          |   +---+--(its worker died before or while running it:
       +------------+----------+--> FAILED   requeued, READY again)
       +------------+----------+--> DROPPED  (its client went away)

A DISPATCHED task stays in its workers' in-flight sets until each member reports, even
once FAILED (a predecessor failed while it was queued on the worker) or DROPPED (its
client left): the worker still holds it and counts it against its credit.
"""

from __future__ import annotations

from collections.abc import Collection
from enum import IntEnum
from typing import Any

from pto.wire.chips import HOST_QUEUE
from pto.wire.protocol import Failure, PackedTaskSpec, TaskSpec, pack_args


class State(IntEnum):
    # Ordered: below DONE means unfinished (dependency scans compare against DONE).
    PENDING = 0  # waiting for predecessors
    READY = 1  # in the ready queue of each of its chips
    DISPATCHED = 2  # sent to the workers of its chips
    DONE = 3
    FAILED = 4
    DROPPED = 5  # its client is gone: nobody wants its result


ALLOWED: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.READY, State.FAILED, State.DROPPED}),
    State.READY: frozenset({State.DISPATCHED, State.FAILED, State.DROPPED}),
    State.DISPATCHED: frozenset({State.DONE, State.FAILED, State.READY, State.DROPPED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.DROPPED: frozenset(),
}
# The same, indexed by state value: the check on the dispatch path is one tuple index.
NEXT_STATES: tuple[frozenset[State], ...] = tuple(ALLOWED[s] for s in State)
# The states as module constants for the hot paths: ``State.DONE`` looks the member up
# on the Enum class each time, ten times the cost of a global.
PENDING, READY, DISPATCHED, DONE, FAILED, DROPPED = tuple(State)


class IllegalTransition(RuntimeError):
    """A state change outside ``ALLOWED``: a bug in the broker, never bad input."""


def check_transition(task: Task, new: State) -> None:
    """Raise IllegalTransition unless ``task`` may move to ``new`` (see ``ALLOWED``)."""
    if new not in NEXT_STATES[task.state]:
        raise IllegalTransition(
            f"task {task.gid} (client {task.client} task {task.task_id}): "
            f"{State(task.state).name} -> {State(new).name} is not an allowed transition")


class Task:
    """A task, or a group task: one member per chip in ``chips``, started together.

    ``gid`` is the broker-global task id (what workers see); ``task_id`` is the id its
    client gave it (what results name). Tensor ids appear only inside ``args``.
    """

    __slots__ = ("gid", "client", "task_id", "chip", "chips", "kernel", "args", "state",
                 "waiting", "dependents", "after", "root", "left", "failure", "retries",
                 "trace", "worker", "seq", "wait", "watching", "skipped")

    def __init__(self, gid: int, client: int, spec: TaskSpec | PackedTaskSpec):
        self.gid = gid
        self.client = client
        self.task_id = spec.task
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
        self.state = PENDING
        self.waiting = 0  # unfinished predecessors it cannot wait for on its worker (yet)
        self.dependents: list[Task] = []
        # Unfinished predecessors it waits for on its worker instead (see waits_on_worker)
        self.after: list[Task] | None = None
        self.root: Failure | None = None  # set when FAILED
        # Once dispatched (single tasks): the scheduler's record of its worker, its number
        # there, the flat (uid, seq) pairs it was sent to wait for, and the
        # (worker record, seq) of those on other workers, which watch them for it.
        self.worker: Any = None
        self.seq = 0
        self.wait: list[int] | None = None
        self.watching: list[tuple[Any, int]] | None = None
        self.skipped = False  # its worker skipped it: a predecessor failed (cause to come)


def waits_on_worker(task: Task, dep: Task) -> bool:
    """Whether ``task`` may wait for its predecessor ``dep`` on its worker instead of in the
    broker: both are single tasks on chips (not groups, whose members start together, nor
    host sub-tasks, which any host worker may take). It may then be dispatched once
    ``dep`` is (see ``covered``) and starts when ``dep``'s outcome is in its worker's
    completion ring (``worker.completions``)."""
    return (len(task.chips) == 1 and len(dep.chips) == 1 and task.chip != HOST_QUEUE
            and dep.chip != HOST_QUEUE)


def covered(task: Task, dep: Task) -> bool:
    """Whether ``task`` need no longer wait in the broker for ``dep``: it may wait on its
    worker and ``dep`` is dispatched, or, on the same chip, at least queued ahead of it
    (a worker runs its tasks in the order sent)."""
    if not waits_on_worker(task, dep):
        return False
    return dep.state == DISPATCHED or (dep.state == READY and dep.chip == task.chip)


def unknown_chips(task: Task, queues: Collection[int]) -> str | None:
    """Why ``task`` names chips the broker cannot run it on (``queues``: the chips it
    serves, and HOST_QUEUE with host workers), or None."""
    if len(task.chips) == 1 and task.chip in queues:
        return None  # the common case, on the submit path
    unknown = [c for c in task.chips if c not in queues]
    if not unknown and len(set(task.chips)) == len(task.chips):
        return None
    served = sorted(c for c in queues if c != HOST_QUEUE)
    if unknown == [HOST_QUEUE]:
        what = "no host workers for host sub-tasks (start the broker with --host-workers)"
    else:
        what = f"unknown chip {unknown[0]}" if unknown else f"repeated chips {task.chips}"
    return f"{what} (broker serves {served})"


def failure_of(task: Task, kernel: str, cause: Failure | None, reason: str,
               lost: bool = False) -> Failure:
    """How ``task`` (running ``kernel``) failed: for its own ``reason``, or not run
    because the failure ``cause`` upstream of it."""
    if cause is None:
        return Failure(task.task_id, kernel, task.chip, reason, task.task_id, lost)
    return Failure(task.task_id, kernel, task.chip,
                   f"not run: task {cause.root} (kernel {cause.kernel!r} on chip {cause.chip})"
                   f" failed: {cause.reason}", cause.root, cause.lost)
