"""What must hold of the scheduler's state between any two calls (``Scheduler.validate``).

Slow (it walks every task and queue): the unit tests call it after every step; the
broker never does. Each failed check raises AssertionError saying which rule broke.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .task import State, Task, queued_behind

_LIVE = (State.PENDING, State.READY, State.DISPATCHED)
_ON_WORKER = (State.DISPATCHED, State.FAILED, State.DROPPED)


def _fail(rule: str, task: Task | None = None) -> None:
    where = f" (task {task.gid}, {State(task.state).name})" if task is not None else ""
    raise AssertionError(f"scheduler invariant broken: {rule}{where}")


def check(tasks: dict[int, Task], ready: dict[int, Iterable[Task]],
          workers: list[tuple[int, int, dict[int, Task]]], barriers: set[int]) -> None:
    """``workers``: (worker, queue, in-flight gid -> task) of each connected worker."""
    for gid, t in tasks.items():
        if t.gid != gid:
            _fail("tasks are filed under their gid", t)
        if t.state not in _LIVE:
            _fail("only unfinished tasks are kept", t)

    # Ready queues hold READY tasks, each once in the queue of each of its chips.
    queued: Counter[int] = Counter()
    for queue, items in ready.items():
        seen = set()
        for t in items:
            if t.state != State.READY:
                _fail(f"queue {queue} holds only READY tasks", t)
            if queue not in t.chips or t.gid in seen:
                _fail(f"a task is queued once in queue {queue}, one of its chips", t)
            if tasks.get(t.gid) is not t:
                _fail("a queued task is a known unfinished task", t)
            seen.add(t.gid)
            queued[t.gid] += 1
    for t in tasks.values():
        if t.state == State.READY and queued[t.gid] != len(t.chips):
            _fail("a READY task is queued on every one of its chips", t)

    # In flight: what workers hold agrees with DISPATCHED and with each task's ``left``.
    held: Counter[int] = Counter()
    held_tasks: dict[int, Task] = {}
    for worker, queue, inflight in workers:
        for gid, t in inflight.items():
            if t.gid != gid or t.state not in _ON_WORKER or queue not in t.chips:
                _fail(f"worker {worker} holds only tasks dispatched to its queue {queue}", t)
            held[gid] += 1
            held_tasks[gid] = t
    for gid, t in held_tasks.items():
        if held[gid] != t.left:
            _fail(f"a task is held by as many workers as members left ({held[gid]} vs "
                  f"{t.left})", t)
    for t in tasks.values():
        if t.state == State.DISPATCHED and (t.left < 1 or held[t.gid] != t.left):
            _fail("a DISPATCHED task is in flight on each worker of a member left", t)
        if t.state in (State.PENDING, State.READY) and t.left != 0:
            _fail("a task not dispatched has no members running", t)

    # Barriers are open exactly for the dispatched groups still held by a worker.
    for gid in barriers:
        t = held_tasks.get(gid)
        if t is None or len(t.chips) < 2:
            _fail(f"barrier {gid} belongs to a group some worker holds")
    for t in tasks.values():
        if t.state == State.DISPATCHED and len(t.chips) > 1 and t.gid not in barriers:
            _fail("a dispatched group has an open barrier", t)

    # Dependency counts: a PENDING task waits for each unfinished predecessor, except
    # those it is queued behind on their worker (they are named in ``after``).
    waiting: Counter[int] = Counter()
    for d in tasks.values():
        for t in d.dependents:
            if t.state not in _LIVE:
                continue
            ahead = queued_behind(t, d) and d.state in (State.READY, State.DISPATCHED)
            if ahead and t.state != State.PENDING and d.gid not in (t.after or ()):
                _fail(f"a task queued behind its predecessor {d.gid} names it in after", t)
            if not ahead:
                waiting[t.gid] += 1
    for t in tasks.values():
        want = waiting[t.gid]
        if t.state == State.PENDING:
            if want == 0 or t.waiting != want:
                _fail(f"waiting counts the unfinished predecessors ({t.waiting} vs {want})", t)
        elif want or t.waiting:
            _fail("a task past PENDING waits for no predecessor but those ahead of it", t)
