"""A worker's local queue: a FIFO per client, clients in turn, waiting heads skipped over."""

from __future__ import annotations

from pto.wire import protocol as P
from worker.queue import LocalQueue


def task(gid: int, client: int, wait: list[int] | None = None) -> P.WorkTask:
    return P.WorkTask(gid, client, 1, [], wait=wait or [])


def drain(q: LocalQueue, check=lambda t: True) -> list[int]:
    out, skipped = [], []
    while (t := q.next(check, lambda t: skipped.append(t.task))) is not None:
        out.append(t.task)
    return out + [-g for g in skipped]


def test_clients_take_turns_and_each_keeps_its_order():
    q = LocalQueue()
    q.extend([task(i, 1) for i in range(1, 6)])  # a flood from client 1
    q.extend([task(10, 2), task(11, 2)])
    assert len(q) == 7
    assert drain(q) == [1, 10, 2, 11, 3, 4, 5]
    assert len(q) == 0


def test_a_waiting_client_does_not_hold_up_the_others():
    q = LocalQueue()
    q.extend([task(1, 1, wait=[7, 0]), task(2, 1)])
    q.extend([task(3, 2), task(4, 2)])
    waiting = {1}
    assert drain(q, lambda t: None if t.task in waiting else True) == [3, 4]
    waiting.clear()
    assert drain(q) == [1, 2]


def test_a_task_whose_predecessor_failed_is_skipped_and_its_client_goes_on():
    q = LocalQueue()
    q.extend([task(1, 1, wait=[7, 0]), task(2, 1)])
    assert drain(q, lambda t: False) == [2, -1]


def test_take_removes_what_is_rejected_in_order():
    q = LocalQueue()
    q.extend([task(1, 1), task(2, 2), task(3, 1), task(4, 2)])
    taken = q.take(lambda t: t.client != 2)
    assert [t.task for t in taken] == [2, 4] and len(q) == 2
    assert [t.task for t in q] == [1, 3]
