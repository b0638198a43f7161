"""What becomes of the tasks a dead worker held: the retry policy.

Decided from the worker's status block ([running, last finished] task gids, and its
completion ring, read after its death); the
scheduler (``broker.scheduler``) applies the verdicts, and only it changes task state.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from .deps import inputs_overwritten, overwrites
from .task import DISPATCHED, Task


class Verdict(Enum):
    REQUEUE = "requeue"  # it had not started: back to the head of its queue
    RERUN = "rerun"  # it started, and may run again (one retry less)
    FAIL = "fail"  # pto.WorkerLost (or it had already ended: its member just leaves)


def after_death(held: list[Task], status: tuple[int, int] | None,
                awaited_elsewhere: Callable[[Task], bool] = lambda task: False,
                exact: bool = False) -> list[Verdict]:
    """One verdict per task ``held``, in the order sent.

    ``status`` is the worker's [running, last finished] task gids, if known. With
    ``exact``, the tasks its completion ring says ended are not in ``held``, so only the
    running one started (a worker takes its clients in turn: order says nothing);
    otherwise the first tasks up to the running or last finished one started (a worker
    that ran its tasks in order), or all of them without a status.

    Group members fail (the others are at the barrier without it), and so does a task
    that a task on another chip already waits for on its worker (``awaited_elsewhere``):
    that one was sent naming this run of it, which will never end. A started task reruns
    while it has retries, unless a partial run may have changed what it reads: it
    overwrites its own inputs (INOUT, OUTPUT_EXISTING, NO_DEP), or another started task
    wrote bytes it reads."""
    gids = [t.gid for t in held]
    if status is None:
        started = set(gids)
    elif exact:
        started = {status[0]} & set(gids)
    else:
        upto = max((gids.index(g) + 1 for g in status if g in gids), default=0)
        started = set(gids[:upto])
    verdicts = []
    for i, task in enumerate(held):
        if task.state != DISPATCHED or len(task.chips) > 1 or awaited_elsewhere(task):
            verdicts.append(Verdict.FAIL)
        elif task.gid not in started:
            verdicts.append(Verdict.REQUEUE)
        elif (task.retries > 0 and not overwrites(task) and not inputs_overwritten(
                task, [t for t in held[i + 1:] if t.gid in started])):
            verdicts.append(Verdict.RERUN)
        else:
            verdicts.append(Verdict.FAIL)
    return verdicts
