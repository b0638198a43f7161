"""The broker's dependency rules, checked on the scheduler alone (no processes)."""

from __future__ import annotations

import pytest

from broker.scheduler import Scheduler, State
from pto.args import ParamType
from pto.protocol import ArgSpec, TaskSpec

IN, OUT, INOUT = ParamType.INPUT, ParamType.OUTPUT, ParamType.INOUT
KERNEL = 7


def arg(kind: ParamType, tensor: int, offset: int = 0, nbytes: int = 64) -> ArgSpec:
    return ArgSpec(int(kind), tensor, offset, nbytes, 12, [nbytes // 4])


class Graph:
    """Submit tasks as one client and watch which become ready."""

    def __init__(self, chips=(0, 1)):
        self.s = Scheduler(chips)
        self.s.kernel_names[(1, KERNEL)] = "k"
        self.next_tid = 1
        self.gids: dict[int, int] = {}

    def task(self, *args: ArgSpec, chip: int = 0) -> int:
        tid = self.next_tid
        self.next_tid += 1
        self.s.submit(1, [TaskSpec(tid, chip, KERNEL, list(args))])
        self.gids[tid] = max(self.s.tasks) if self.s.tasks else -1
        return tid

    def ready(self) -> set[int]:
        return {t.tid for q in self.s.ready.values() for t in q}

    def run(self, tid: int) -> None:
        task = self.s.tasks[self.gids[tid]]
        for chip in task.chips:
            self.s.ready[chip].remove(task)
        task.state, task.left = State.DISPATCHED, len(task.chips)

    def finish(self, tid: int) -> None:
        self.run(tid)
        self.s.done(self.gids[tid])

    def fail(self, tid: int, reason: str = "boom") -> None:
        self.run(tid)
        self.s.failed(self.gids[tid], reason)


def test_independent_tasks_are_ready_at_once():
    g = Graph()
    a, b = g.task(arg(OUT, 1)), g.task(arg(OUT, 2), chip=1)
    assert g.ready() == {a, b}


@pytest.mark.parametrize("first,second", [
    (OUT, IN),      # read after write
    (IN, OUT),      # write after read
    (OUT, OUT),     # write after write
    (INOUT, IN),    # inout is a write
    (IN, INOUT),    # ...and a read
])
def test_hazards_order_tasks(first, second):
    g = Graph()
    a = g.task(arg(first, 1))
    b = g.task(arg(second, 1), chip=1)
    assert g.ready() == {a}
    g.finish(a)
    assert g.ready() == {b}


def test_readers_share_and_a_writer_waits_for_all():
    g = Graph()
    w = g.task(arg(OUT, 1))
    r1, r2 = g.task(arg(IN, 1)), g.task(arg(IN, 1), chip=1)
    w2 = g.task(arg(OUT, 1))
    g.finish(w)
    assert g.ready() == {r1, r2}
    g.finish(r1)
    assert g.ready() == {r2}
    g.finish(r2)
    assert g.ready() == {w2}


def test_disjoint_byte_ranges_do_not_conflict_and_overlaps_do():
    g = Graph()
    lo = g.task(arg(OUT, 1, 0, 32))
    hi = g.task(arg(OUT, 1, 32, 32), chip=1)
    mid = g.task(arg(IN, 1, 16, 32))
    assert g.ready() == {lo, hi}
    g.finish(lo)
    assert g.ready() == {hi}
    g.finish(hi)
    assert g.ready() == {mid}


def test_tensors_of_different_clients_never_conflict():
    s = Scheduler([0])
    for client in (1, 2):
        s.kernel_names[(client, KERNEL)] = "k"
        s.submit(client, [TaskSpec(1, 0, KERNEL, [arg(OUT, 5)])])
    assert len(s.ready[0]) == 2


def test_failure_poisons_dependents_but_not_independent_tasks():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), arg(OUT, 2))
    c = g.task(arg(IN, 2), arg(OUT, 3))
    d = g.task(arg(OUT, 4), chip=1)
    g.fail(a, "ValueError: bad")
    done, failed = g.s.take_results()[1]
    assert {f.task for f in failed} == {a, b, c}
    assert all(f.root == a for f in failed)
    assert "ValueError: bad" in next(f for f in failed if f.task == c).reason
    assert g.ready() == {d}


def test_reading_bytes_of_a_failed_write_fails_until_rewritten():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.fail(a)
    g.s.take_results()
    late = g.task(arg(IN, 1))
    assert [f.task for f in g.s.take_results()[1][1]] == [late]
    rewrite = g.task(arg(OUT, 1))
    reader = g.task(arg(IN, 1))
    g.finish(rewrite)
    assert g.ready() == {reader}


def test_unknown_chip_and_kernel_fail_at_submit():
    s = Scheduler([0])
    s.kernel_names[(1, KERNEL)] = "k"
    s.submit(1, [TaskSpec(1, 9, KERNEL, []), TaskSpec(2, 0, 99, [])])
    reasons = [f.reason for f in s.take_results()[1][1]]
    assert "unknown chip 9" in reasons[0] and "unknown kernel" in reasons[1]


def test_dropping_a_client_forgets_its_queued_tasks():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.task(arg(IN, 1))
    g.run(a)
    g.s.drop_client(1)
    assert g.ready() == set()
    assert list(g.s.tasks) == [g.gids[a]]  # the running one finishes unreported
    g.s.done(g.gids[a])
    assert not g.s.tasks


def test_bookkeeping_stays_bounded_by_live_tasks():
    g = Graph(chips=(0,))
    for _ in range(10_000):
        t = g.task(arg(IN, 1))
        g.finish(t)
    uses = g.s._tensors[(1, 1)]
    assert len(uses.reads) + len(uses.writes) < 64
    assert not g.s.tasks


def group(s: Scheduler, client: int, tid: int, chips: list[int], *args: ArgSpec) -> None:
    s.submit(client, [TaskSpec(tid, chips[0], KERNEL, list(args), chips)])


def test_a_group_waits_for_all_its_chips_and_reserves_them():
    s = Scheduler([0, 1])
    s.kernel_names[(1, KERNEL)] = "k"
    s.submit(1, [TaskSpec(1, 0, KERNEL, [])])
    group(s, 1, 2, [0, 1])
    s.submit(1, [TaskSpec(3, 1, KERNEL, [])])  # queued behind the group on chip 1
    out = s.schedule({0: 0, 1: 5})  # chip 0 has no credit: the group cannot start
    assert out == []  # ...and task 3 does not overtake it
    out = s.schedule({0: 5, 1: 5})
    assert [(q, t.tid, r) for q, t, r in out] == [(0, 1, 0), (0, 2, 0), (1, 2, 1), (1, 3, 0)]


def test_overlapping_groups_reach_every_chip_in_one_order():
    s = Scheduler([0, 1, 2])
    for client in (1, 2):
        s.kernel_names[(client, KERNEL)] = "k"
    group(s, 1, 1, [0, 1])
    group(s, 2, 1, [1, 2])
    group(s, 1, 2, [2, 0])
    out = s.schedule({0: 9, 1: 9, 2: 9})
    order = {chip: [(t.client, t.tid) for q, t, _ in out if q == chip] for chip in (0, 1, 2)}
    pairs = [(1, 1), (2, 1), (1, 2)]
    for chip_order in order.values():  # every chip sees the groups in the same global order
        assert chip_order == [p for p in pairs if p in chip_order]


def test_a_group_ends_when_every_member_reported_and_fails_if_one_failed():
    s = Scheduler([0, 1])
    s.kernel_names[(1, KERNEL)] = "k"
    group(s, 1, 1, [0, 1], arg(OUT, 1))
    s.submit(1, [TaskSpec(2, 0, KERNEL, [arg(IN, 1)])])
    (_, task, _), _ = s.schedule({0: 1, 1: 1})
    assert s.failed(task.gid, "rank 1: boom") is task and task.state == State.DISPATCHED
    s.done(task.gid)
    assert task.state == State.FAILED
    failed = s.take_results()[1][1]
    assert [f.task for f in failed] == [1, 2] and "rank 1: boom" in failed[1].reason


def test_cancel_fails_queued_tasks_but_not_dispatched_ones():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1))
    g.run(a)
    g.s.cancel(1, [a, b])
    assert [f.reason for f in g.s.take_results()[1][1]] == ["cancelled"]
    assert g.s.tasks[g.gids[a]].state == State.DISPATCHED


def test_a_covering_write_keeps_access_lists_short():
    g = Graph()
    for _ in range(200):
        readers = [g.task(arg(IN, 1), chip=1) for _ in range(20)]
        g.task(arg(OUT, 1))  # waits for all 20 readers, then stands for them
    uses = g.s._tensors[(1, 1)]
    assert len(uses.reads) == 0 and len(uses.writes) == 1
    assert len(g.s.ready[1]) == 20 and not g.s.ready[0] and set(readers) <= set(g.gids)


def test_a_writer_after_a_failed_covering_write_still_waits_for_running_readers():
    g = Graph()
    a = g.task(arg(OUT, 2))  # will fail
    reader = g.task(arg(IN, 1))  # reads tensor 1, keeps running
    w = g.task(arg(IN, 2), arg(OUT, 1))  # waits for a and reader; covers reader's access
    g.run(reader)
    g.fail(a)  # w fails by propagation while reader still runs
    assert g.s.take_results()[1][1][-1].task == w
    x = g.task(arg(OUT, 1), chip=1)
    assert x not in g.ready()  # must not overwrite what reader is reading
    g.s.done(g.gids[reader])
    assert x in g.ready()


# ---- successors queued behind their predecessors on the same chip ------------------------


def queued(g: Graph, chip: int) -> list[int]:
    return [t.tid for t in g.s.ready[chip]]


def test_a_chain_on_one_chip_is_queued_at_once_in_order_naming_its_predecessors():
    g = Graph()
    chain = [g.task(arg(INOUT, 1)) for _ in range(5)]
    assert queued(g, 0) == chain
    tasks = list(g.s.ready[0])
    assert tasks[0].after is None
    assert [t.after for t in tasks[1:]] == [[p.gid] for p in tasks[:-1]]
    assert all(t.state == State.READY for t in tasks)


def test_a_successor_on_another_chip_waits_in_the_broker():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), chip=1)
    c = g.task(arg(IN, 1), arg(OUT, 2), chip=1)
    assert g.ready() == {a}
    g.finish(a)
    assert queued(g, 1) == [b, c] and g.s.tasks[g.gids[b]].after is None


def test_a_successor_behind_a_dispatched_predecessor_is_queued_too():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.run(a)
    b = g.task(arg(IN, 1))
    assert queued(g, 0) == [b] and g.s.tasks[g.gids[b]].after == [g.gids[a]]


def test_a_successor_with_a_remote_predecessor_waits_only_for_that_one():
    g = Graph()
    local = g.task(arg(OUT, 1))
    remote = g.task(arg(OUT, 2), chip=1)
    both = g.task(arg(IN, 1), arg(IN, 2))
    assert queued(g, 0) == [local]
    g.finish(local)  # queued behind it already counted: not counted again
    assert queued(g, 0) == []
    g.finish(remote)
    assert queued(g, 0) == [both] and g.s.tasks[g.gids[both]].after == [g.gids[local]]


def test_a_pending_predecessor_brings_its_local_successors_along_when_ready():
    g = Graph()
    remote = g.task(arg(OUT, 1), chip=1)
    a = g.task(arg(IN, 1), arg(OUT, 2))
    b = g.task(arg(INOUT, 2))
    c = g.task(arg(INOUT, 2))
    assert queued(g, 0) == []
    g.finish(remote)
    assert queued(g, 0) == [a, b, c]


def test_a_failed_predecessor_fails_successors_queued_behind_it():
    g = Graph()
    a, b, c = (g.task(arg(INOUT, 1)) for _ in range(3))
    g.fail(a, "ValueError: bad")
    failed = g.s.take_results()[1][1]
    assert [f.task for f in failed] == [a, b, c] and all(f.root == a for f in failed)
    assert queued(g, 0) == []


def test_a_dispatched_successor_fails_with_the_root_cause_and_its_report_is_ignored():
    g = Graph()
    a, b = g.task(arg(INOUT, 1)), g.task(arg(INOUT, 1))
    out = g.s.schedule({0: 2, 1: 0})
    assert [t.tid for _, t, _ in out] == [a, b]
    gid_a, gid_b = g.gids[a], g.gids[b]
    g.s.failed(gid_a, "boom")
    assert g.s.failed(gid_b, "not run: a task it depends on failed") is None
    failed = g.s.take_results()[1][1]
    assert [(f.task, f.root) for f in failed] == [(a, a), (b, a)]


def test_requeued_tasks_keep_their_order_and_are_not_counted_twice():
    g = Graph()
    a, b = g.task(arg(INOUT, 1)), g.task(arg(INOUT, 1))
    out = g.s.schedule({0: 2, 1: 0})
    g.s.requeue([t for _, t, _ in out])  # their worker died before starting them
    assert queued(g, 0) == [a, b]
    g.s.schedule({0: 2, 1: 0})
    g.s.done(g.gids[a])
    g.s.done(g.gids[b])
    assert g.s.take_results()[1][0] == [a, b] and not g.s.tasks


def test_host_tasks_and_groups_never_queue_behind():
    s = Scheduler([0, 1, -1])
    s.kernel_names[(1, KERNEL)] = "k"
    s.submit(1, [TaskSpec(1, -1, KERNEL, [arg(OUT, 1)]), TaskSpec(2, -1, KERNEL, [arg(IN, 1)])])
    assert [t.tid for t in s.ready[-1]] == [1]
    s.submit(1, [TaskSpec(3, 0, KERNEL, [arg(OUT, 2)]),
                 TaskSpec(4, 0, KERNEL, [arg(IN, 2)], group=[0, 1])])
    assert [t.tid for t in s.ready[0]] == [3] and not s.ready[1]


def test_inputs_overwritten_by_a_later_task_only_on_overlapping_bytes_of_one_client():
    s = Scheduler([0])
    s.kernel_names[(1, KERNEL)] = "k"
    s.kernel_names[(2, KERNEL)] = "k"
    s.submit(1, [TaskSpec(1, 0, KERNEL, [arg(IN, 1, 0, 32), arg(OUT, 2)]),
                 TaskSpec(2, 0, KERNEL, [arg(OUT, 1, 32, 32)]),
                 TaskSpec(3, 0, KERNEL, [arg(INOUT, 1, 16, 32)]),
                 TaskSpec(4, 0, KERNEL, [arg(IN, 1), arg(OUT, 3)])])
    s.submit(2, [TaskSpec(1, 0, KERNEL, [arg(OUT, 1)])])
    reader, disjoint, overlapping, other_reader = (s.tasks[g] for g in (1, 2, 3, 4))
    other_client = s.tasks[5]
    assert not Scheduler.inputs_overwritten(reader, [disjoint, other_reader, other_client])
    assert Scheduler.inputs_overwritten(reader, [disjoint, overlapping])


def test_a_groups_failure_names_the_member_that_failed_not_one_that_followed():
    s = Scheduler([0, 1, 2])
    s.kernel_names[(1, KERNEL)] = "k"
    group(s, 1, 1, [0, 1, 2])
    (_, task, _), *_ = s.schedule({0: 1, 1: 1, 2: 1}, {0, 1, 2})
    s.failed(task.gid, "rank 0 of 3: BarrierAborted", followed=True)
    s.failed(task.gid, "rank 1 of 3: ValueError: boom")
    s.failed(task.gid, "rank 2 of 3: BarrierAborted", followed=True)
    (failure,) = s.take_results()[1][1]
    assert failure.reason == "rank 1 of 3: ValueError: boom"
