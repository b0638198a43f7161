"""What must hold of the scheduler's state between any two calls (``Scheduler.validate``).

Slow (it walks every task and queue): the unit tests call it after every step; the
broker never does. Each failed check raises AssertionError saying which rule broke.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .task import State, Task, covered

_LIVE = (State.PENDING, State.READY, State.DISPATCHED)
_ON_WORKER = (State.DISPATCHED, State.FAILED, State.DROPPED)


def _fail(rule: str, task: Task | None = None) -> None:
    where = f" (task {task.gid}, {State(task.state).name})" if task is not None else ""
    raise AssertionError(f"scheduler invariant broken: {rule}{where}")


def check(tasks: dict[int, Task], ready: dict[int, Iterable[Task]],
          workers: list[tuple[int, int, dict[int, Task], dict[int, int]]],
          barriers: set[int]) -> None:
    """``workers``: (worker, queue, in-flight gid -> task, watched seq -> count) of each
    connected worker."""
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
    watched: dict[int, Counter[int]] = {w: Counter() for w, _, _, _ in workers}
    for worker, queue, inflight, _ in workers:
        for gid, t in inflight.items():
            if t.gid != gid or t.state not in _ON_WORKER or queue not in t.chips:
                _fail(f"worker {worker} holds only tasks dispatched to its queue {queue}", t)
            if len(t.chips) == 1 and (t.worker is None or t.worker.worker != worker):
                _fail(f"a single task held by worker {worker} records it as its worker", t)
            held[gid] += 1
            held_tasks[gid] = t
            for slot, seq in t.watching or ():
                if slot.worker not in watched:
                    _fail("a task in flight waits only for tasks of connected workers", t)
                watched[slot.worker][seq] += 1
    for worker, _, _, counts in workers:
        if Counter(counts) != watched[worker]:
            _fail(f"worker {worker}'s watched seqs count the in-flight tasks waiting for them")
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
    # those it may wait for on its worker (``covered``): they are named in ``after``.
    waiting: Counter[int] = Counter()
    for d in tasks.values():
        for t in d.dependents:
            if t.state not in _LIVE:
                continue
            ahead = covered(t, d)
            if ahead != (d in (t.after or ())):
                _fail(f"after names exactly the unfinished predecessors it may wait for on "
                      f"its worker ({d.gid}: {ahead})", t)
            if not ahead:
                waiting[t.gid] += 1
            if t.state == State.DISPATCHED and d.state == State.DISPATCHED and len(
                    t.chips) == 1 and (t.wait is None or d.seq not in t.wait[1::2]):
                _fail(f"a dispatched task was sent to wait for its running predecessor "
                      f"{d.gid}", t)
    for t in tasks.values():
        want = waiting[t.gid]
        if t.state == State.PENDING:
            if want == 0 or t.waiting != want:
                _fail(f"waiting counts the unfinished predecessors ({t.waiting} vs {want})", t)
        elif want or t.waiting:
            _fail("a task past PENDING waits for no predecessor but those ahead of it", t)
