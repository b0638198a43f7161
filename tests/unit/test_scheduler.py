"""The broker's scheduling rules, checked on the scheduler alone (no processes).

Tests drive only its public methods (submit, schedule, report, cancel, worker_lost, ...)
as the server does, and call ``validate()`` after every step, so a step that leaves the
bookkeeping inconsistent fails where it happens.
"""

from __future__ import annotations

import itertools

import pytest

from broker.deps import inputs_overwritten
from broker.scheduler import Scheduler
from broker.task import ALLOWED, IllegalTransition, State, Task, check_transition
from pto.wire.args import ParamType
from pto.wire.chips import HOST_QUEUE, host_chip
from pto.wire.protocol import SKIPPED, ArgSpec, Failure, TaskSpec

IN, OUT, INOUT = ParamType.INPUT, ParamType.OUTPUT, ParamType.INOUT
KERNEL = 7


def arg(kind: ParamType, tensor: int, offset: int = 0, nbytes: int = 64) -> ArgSpec:
    return ArgSpec(int(kind), tensor, offset, nbytes, 12, [nbytes // 4])


def scheduler(chips=(0, 1), clients=(1,), limit: int = 100, traced: bool = False) -> Scheduler:
    """A scheduler with one worker per chip (``limit`` in flight each) and clients."""
    s = Scheduler(chips)
    for chip in chips:
        if chip >= 0:
            s.add_worker(chip, chip, limit)
    for client in clients:
        s.add_client(client, traced=traced)
        s.register_kernel(client, KERNEL, "k")
    s.validate()
    return s


def holder(s: Scheduler, gid: int) -> list[int]:
    """The workers that hold task ``gid`` now."""
    return [w for w in range(-4, 8) if any(t.gid == gid for t in s.in_flight(w))]


class Graph:
    """One client's tasks on a scheduler; each step is followed by ``validate()``."""

    def __init__(self, chips=(0, 1), limit: int = 100):
        self.s = scheduler(chips, limit=limit)
        self.ids = itertools.count(1)
        self.gids: dict[int, int] = {}  # client task id -> gid

    def task(self, *args: ArgSpec, chip: int = 0, group: list[int] | None = None,
             retries: int = 1) -> int:
        task_id = next(self.ids)
        (gid,) = self.s.submit(1, [TaskSpec(task_id, chip, KERNEL, list(args), group or [],
                                            retries)])
        self.gids[task_id] = gid
        self.s.validate()
        return task_id

    def batch(self, n: int, *args: ArgSpec, chip: int = 0) -> list[int]:
        """``n`` like tasks in one submission (one step)."""
        task_ids = [next(self.ids) for _ in range(n)]
        gids = self.s.submit(1, [TaskSpec(t, chip, KERNEL, list(args)) for t in task_ids])
        self.gids.update(zip(task_ids, gids, strict=True))
        self.s.validate()
        return task_ids

    def get(self, task_id: int) -> Task | None:
        return self.s.task(self.gids[task_id])

    def released(self) -> set[int]:
        """Tasks that may run now: READY or DISPATCHED, and not waiting on their worker for
        a predecessor still unfinished."""
        return {t for t, g in self.gids.items()
                if (task := self.s.task(g)) is not None
                and task.state in (State.READY, State.DISPATCHED)
                and all(p.state >= State.DONE for p in task.after or ())}

    def sent_early(self) -> set[int]:
        """Tasks READY or DISPATCHED that wait for unfinished predecessors on their worker."""
        return {t for t, g in self.gids.items()
                if (task := self.s.task(g)) is not None
                and task.state in (State.READY, State.DISPATCHED)
                and any(p.state < State.DONE for p in task.after or ())}

    def schedule(self) -> list[tuple[int, int, int]]:
        """(worker, task id, rank) of what a round dispatches."""
        out = [(w, t.task_id, r) for w, t, r, _, _ in self.s.schedule()]
        self.s.validate()
        return out

    def finish(self, task_id: int) -> None:
        self.schedule()
        gid = self.gids[task_id]
        workers = holder(self.s, gid)
        assert workers, f"task {task_id} was not dispatched"
        for w in workers:
            self.s.report(w, [gid], [])
            self.s.validate()

    def fail(self, task_id: int, reason: str = "boom") -> None:
        self.schedule()
        gid = self.gids[task_id]
        for w in holder(self.s, gid):
            self.s.report(w, [], [Failure(gid, "k", w, reason, gid)])
            self.s.validate()

    def failures(self) -> list[Failure]:
        results = self.s.take_results()
        return results[1][1] if 1 in results else []


def queued(g: Graph, chip: int) -> list[int]:
    return [t.task_id for t in g.s.queued(chip)]


# ---- the transition table --------------------------------------------------------------


def test_every_transition_outside_the_table_raises():
    task = Task(1, 1, TaskSpec(1, 0, KERNEL, []))
    for old, new in itertools.product(State, State):
        task.state = old
        if new in ALLOWED[old]:
            check_transition(task, new)
        else:
            with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
                check_transition(task, new)


def test_a_dead_workers_late_report_does_not_move_its_requeued_task():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.schedule()
    gid = g.gids[a]
    g.s.worker_lost(0, None, "worker of chip 0 died")  # a task it held goes back: READY
    assert g.get(a).state == State.READY
    g.s.add_worker(0, 0, 100)  # its replacement does not hold it yet
    g.s.report(0, [gid], [])  # (READY -> DONE would be illegal)
    g.s.validate()
    assert g.get(a).state == State.READY and g.s.take_results() == {}


def test_the_transition_log_keeps_the_last_moves_oldest_first():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), chip=1)
    g.finish(a)
    ga, gb = g.gids[a], g.gids[b]
    assert g.s.transition_log() == [
        (ga, "PENDING", "READY"), (ga, "READY", "DISPATCHED"),
        (gb, "PENDING", "READY"),  # b waits for a on its worker once a was sent
        (gb, "READY", "DISPATCHED"), (ga, "DISPATCHED", "DONE")]
    short = Scheduler([0], log_size=2)
    short.add_worker(0, 0, 10)
    short.add_client(1)
    short.register_kernel(1, KERNEL, "k")
    (gid,) = short.submit(1, [TaskSpec(1, 0, KERNEL, [arg(OUT, 1)])])
    short.schedule()
    assert short.transition_log() == [(gid, "PENDING", "READY"), (gid, "READY", "DISPATCHED")]
    assert Scheduler([0], log_size=0).transition_log() == []


def test_an_illegal_move_raises_with_the_last_moves_in_its_message():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.finish(a)
    b = g.task(arg(OUT, 2))
    gid = g.gids[a]
    with pytest.raises(IllegalTransition, match=rf"READY -> PENDING .*last moves: .*"
                                                rf"{gid} DISPATCHED->DONE"):
        # no public method makes an illegal move (that is the point): force one
        g.s._move(g.get(b), State.PENDING)  # noqa: SLF001


def test_validate_catches_inconsistent_bookkeeping():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), chip=1)
    g.schedule()
    g.get(a).left = 2  # as if a second member were running somewhere
    with pytest.raises(AssertionError, match="held by as many workers"):
        g.s.validate()
    g.get(a).left = 1
    g.get(b).after = None  # as if it no longer waited for a
    with pytest.raises(AssertionError, match="after names exactly"):
        g.s.validate()


# ---- dependencies ------------------------------------------------------------------------


def test_independent_tasks_are_ready_at_once():
    g = Graph()
    a, b = g.task(arg(OUT, 1)), g.task(arg(OUT, 2), chip=1)
    assert g.released() == {a, b}


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
    assert g.released() == {a}
    g.finish(a)
    assert g.released() == {b}


def test_readers_share_and_a_writer_waits_for_all():
    g = Graph()
    w = g.task(arg(OUT, 1))
    r1, r2 = g.task(arg(IN, 1)), g.task(arg(IN, 1), chip=1)
    w2 = g.task(arg(OUT, 1))
    g.finish(w)
    assert g.released() == {r1, r2}
    g.finish(r1)
    assert g.released() == {r2}
    g.finish(r2)
    assert g.released() == {w2}


def test_disjoint_byte_ranges_do_not_conflict_and_overlaps_do():
    g = Graph()
    lo = g.task(arg(OUT, 1, 0, 32))
    hi = g.task(arg(OUT, 1, 32, 32), chip=1)
    mid = g.task(arg(IN, 1, 16, 32))
    assert g.released() == {lo, hi}
    g.finish(lo)
    assert g.released() == {hi}
    g.finish(hi)
    assert g.released() == {mid}


def test_tensors_of_different_clients_never_conflict():
    s = scheduler([0], clients=(1, 2))
    for client in (1, 2):
        s.submit(client, [TaskSpec(1, 0, KERNEL, [arg(OUT, 5)])])
        s.validate()
    assert len(s.queued(0)) == 2


def test_failure_poisons_dependents_but_not_independent_tasks():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), arg(OUT, 2))
    c = g.task(arg(IN, 2), arg(OUT, 3))
    d = g.task(arg(OUT, 4), chip=1)
    g.fail(a, "ValueError: bad")
    failed = g.failures()
    assert {f.task for f in failed} == {a, b, c}
    assert all(f.root == a for f in failed)
    assert "ValueError: bad" in next(f for f in failed if f.task == c).reason
    assert g.released() == {d}


def test_reading_bytes_of_a_failed_write_fails_until_rewritten():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.fail(a)
    g.failures()
    late = g.task(arg(IN, 1))
    assert [f.task for f in g.failures()] == [late]
    rewrite = g.task(arg(OUT, 1))
    reader = g.task(arg(IN, 1))
    g.finish(rewrite)
    assert g.released() == {reader}


def test_unknown_chip_and_kernel_fail_at_submit():
    s = scheduler([0])
    s.submit(1, [TaskSpec(1, 9, KERNEL, []), TaskSpec(2, 0, 99, [])])
    s.validate()
    reasons = [f.reason for f in s.take_results()[1][1]]
    assert "unknown chip 9" in reasons[0] and "unknown kernel" in reasons[1]


def test_dropping_a_client_forgets_its_queued_tasks_and_ignores_the_running_ones():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.task(arg(IN, 1), chip=1)  # waits in the broker
    g.schedule()
    (running,) = g.s.in_flight(0)
    g.s.drop_client(1)
    g.s.validate()
    assert g.released() == set() and g.s.unfinished() == {}
    assert running.state == State.DROPPED and g.s.in_flight(0) == [running]  # still held
    g.s.report(0, [g.gids[a]], [])  # it finishes unreported
    g.s.validate()
    assert g.s.in_flight(0) == [] and g.s.take_results() == {}


def test_bookkeeping_stays_bounded_by_live_tasks():
    g = Graph(chips=(0,))
    for _ in range(10_000):
        t = g.task(arg(IN, 1))
        g.finish(t)
    assert g.s.accesses_kept(1, 1) < 64
    assert g.s.unfinished() == {}


def test_a_covering_write_keeps_access_lists_short():
    g = Graph()
    for _ in range(60):
        readers = g.batch(20, arg(IN, 1), chip=1)
        g.task(arg(OUT, 1))  # waits for all 20 readers, then stands for them
    assert g.s.accesses_kept(1, 1) == 1
    assert len(g.s.queued(1)) == 20 and not g.s.queued(0) and set(readers) <= set(g.gids)


def test_a_writer_after_a_failed_covering_write_still_waits_for_running_readers():
    g = Graph()
    a = g.task(arg(OUT, 2))  # will fail
    reader = g.task(arg(IN, 1))  # reads tensor 1, keeps running
    w = g.task(arg(IN, 2), arg(OUT, 1))  # waits for a and reader; covers reader's access
    g.fail(a)  # w fails by propagation while reader still runs
    assert g.failures()[-1].task == w
    x = g.task(arg(OUT, 1), chip=1)
    assert x not in g.released()  # must not overwrite what reader is reading
    g.finish(reader)
    assert x in g.released()


# ---- groups --------------------------------------------------------------------------------


def test_a_group_waits_for_all_its_chips_and_reserves_them():
    s = Scheduler([0, 1])
    s.add_worker(0, 0, 1)  # room for one task
    s.add_worker(1, 1, 5)
    s.add_client(1)
    s.register_kernel(1, KERNEL, "k")
    s.submit(1, [TaskSpec(1, 0, KERNEL, []), TaskSpec(2, 0, KERNEL, [], [0, 1]),
                 TaskSpec(3, 1, KERNEL, [])])  # 3 is queued behind the group on chip 1
    s.validate()
    out = s.schedule()  # chip 0 is then full: the group cannot start...
    s.validate()
    assert [(w, t.task_id) for w, t, _, _, _ in out] == [(0, 1)]  # ...nor task 3 overtake it
    s.report(0, [out[0][1].gid], [])
    s.validate()
    out = s.schedule()
    s.validate()
    assert [(w, t.task_id, r) for w, t, r, _, _ in out] == [(0, 2, 0), (1, 2, 1), (1, 3, 0)]
    (group_task,) = {t for _, t, _, _, _ in out if t.task_id == 2}
    assert [b for _, t, _, b, _ in out] == [group_task.gid, group_task.gid, 0]  # its barrier


def test_overlapping_groups_reach_every_chip_in_one_order():
    s = scheduler([0, 1, 2], clients=(1, 2), limit=9)
    for client, task_id, chips in [(1, 1, [0, 1]), (2, 1, [1, 2]), (1, 2, [2, 0])]:
        s.submit(client, [TaskSpec(task_id, chips[0], KERNEL, [], chips)])
        s.validate()
    order: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
    for _ in range(5):  # a group starts only on idle chips: one round each
        out = s.schedule()
        s.validate()
        for w, t, _, _, _ in out:
            order[w].append((t.client, t.task_id))
        for w, t, _, _, _ in out:
            s.report(w, [t.gid], [])
            s.validate()
    pairs = [(1, 1), (2, 1), (1, 2)]
    for chip_order in order.values():  # every chip sees the groups in the same global order
        assert chip_order == [p for p in pairs if p in chip_order] and chip_order
    assert s.unfinished() == {}


def test_a_group_ends_when_every_member_reported_and_fails_if_one_failed():
    g = Graph()
    grp = g.task(arg(OUT, 1), group=[0, 1])
    after = g.task(arg(IN, 1))
    g.schedule()
    gid = g.gids[grp]
    g.s.report(1, [], [Failure(gid, "k", 1, "rank 1: boom", gid)])
    g.s.validate()
    assert g.get(grp).state == State.DISPATCHED
    assert g.s.take_barrier_orders() == ([gid], [])  # members waiting at it give up
    g.s.report(0, [gid], [])
    g.s.validate()
    assert g.get(grp) is None and g.s.take_barrier_orders() == ([], [gid])
    failed = g.failures()
    assert [f.task for f in failed] == [grp, after] and "rank 1: boom" in failed[1].reason


def test_a_groups_failure_names_the_member_that_failed_not_one_that_followed():
    g = Graph(chips=(0, 1, 2))
    grp = g.task(group=[0, 1, 2])
    g.schedule()
    gid = g.gids[grp]
    for w, reason, root in [(0, "rank 0 of 3: BarrierAborted", 0),
                            (1, "rank 1 of 3: ValueError: boom", gid),
                            (2, "rank 2 of 3: BarrierAborted", 0)]:
        g.s.report(w, [], [Failure(gid, "k", w, reason, root)])
        g.s.validate()
    (failure,) = g.failures()
    assert failure.reason == "rank 1 of 3: ValueError: boom"


# ---- cancelling, and tasks queued behind their predecessors on one chip ------------------


def test_cancel_fails_queued_tasks_and_names_the_dispatched_ones():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), chip=1)
    g.schedule()  # b is sent to chip 1 too, to wait there for a
    g.s.cancel(1, [a, b])
    g.s.validate()
    assert g.failures() == []  # both are on their workers, which may still drop them
    cancels, _ = g.s.take_worker_orders()
    assert cancels == {0: [g.gids[a]], 1: [g.gids[b]]}
    assert g.get(a).state == g.get(b).state == State.DISPATCHED


def test_a_chain_on_one_chip_is_queued_at_once_in_order_naming_its_predecessors():
    g = Graph()
    chain = [g.task(arg(INOUT, 1)) for _ in range(5)]
    assert queued(g, 0) == chain
    tasks = g.s.queued(0)
    assert tasks[0].after is None
    assert [t.after for t in tasks[1:]] == [[p] for p in tasks[:-1]]
    assert all(t.state == State.READY for t in tasks)


def test_a_successor_on_another_chip_is_sent_once_its_predecessor_is_and_waits_there():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), chip=1)
    c = g.task(arg(IN, 1), arg(OUT, 2), chip=1)
    assert queued(g, 1) == []  # a is not dispatched yet: they wait in the broker
    assert g.schedule() == [(0, a, 0), (1, b, 0), (1, c, 0)]  # one round
    ta, tb, tc = g.get(a), g.get(b), g.get(c)
    uid0 = g.s.worker_uid(0)
    assert tb.wait == tc.wait == [uid0, ta.seq] and tb.after == [ta]
    _, watches = g.s.take_worker_orders()
    assert watches == {0: [ta.seq, g.s.worker_uid(1)] * 2}  # chip 0 pokes chip 1's worker
    assert g.sent_early() == {b, c}
    g.finish(a)
    assert g.released() == {b, c}


def test_a_chain_alternating_chips_is_sent_whole_in_one_round():
    g = Graph()
    chain = [g.task(arg(INOUT, 1), chip=i % 2) for i in range(6)]
    out = g.schedule()
    assert [t for _, t, _ in out] == chain and [w for w, _, _ in out] == [0, 1] * 3
    tasks = [g.get(t) for t in chain]
    for prev, task in zip(tasks, tasks[1:], strict=False):
        assert task.wait == [g.s.worker_uid(prev.chip), prev.seq]
    for t in chain:
        g.finish(t)
    assert g.s.take_results()[1][0] == chain and g.s.unfinished() == {}


def test_a_task_is_sent_to_wait_only_for_predecessors_still_running():
    g = Graph()
    a = g.task(arg(OUT, 1))
    g.schedule()
    b = g.task(arg(IN, 1))
    assert queued(g, 0) == [b] and g.get(b).after == [g.get(a)]
    g.s.report(0, [g.gids[a]], [])
    g.schedule()
    assert g.get(b).wait is None  # a ended before b was sent


def test_a_successor_with_a_predecessor_not_yet_dispatched_waits_in_the_broker():
    g = Graph(limit=1)
    busy = g.task(arg(OUT, 9), chip=1)
    g.schedule()  # fills chip 1's only slot
    remote = g.task(arg(OUT, 2), chip=1)
    both = g.task(arg(IN, 2))
    assert queued(g, 0) == [] and g.get(both).state == State.PENDING
    g.finish(busy)
    g.schedule()  # remote goes, and both with it, to wait for it on chip 0
    assert g.get(both).wait == [g.s.worker_uid(1), g.get(remote).seq]


def test_a_pending_predecessor_brings_its_local_successors_along_when_ready():
    g = Graph(limit=1)
    g.task(arg(OUT, 9), chip=1)  # keeps chip 1 busy: remote stays READY a while
    remote = g.task(arg(OUT, 1), chip=1)
    a = g.task(arg(IN, 1), arg(OUT, 2))
    b = g.task(arg(INOUT, 2))
    c = g.task(arg(INOUT, 2))
    g.schedule()
    assert queued(g, 0) == [] and queued(g, 1) == [remote]
    g.finish(1)
    assert [t for _, t, _ in g.schedule()] == [remote, a]  # a is sent once remote is
    assert queued(g, 0) == [b, c]  # queued behind a on chip 0 at once


def test_a_failed_predecessor_fails_successors_queued_behind_it_and_ignores_their_reports():
    g = Graph()
    a, b, c = (g.task(arg(INOUT, 1)) for _ in range(3))
    g.fail(a, "ValueError: bad")  # b and c were dispatched behind it
    failed = g.failures()
    assert [(f.task, f.root) for f in failed] == [(a, a), (b, a), (c, a)]
    for t in (b, c):  # the worker skips them and says so: nothing more to report
        gid = g.gids[t]
        g.s.report(0, [], [Failure(gid, "k", 0, "not run: a task it depends on failed",
                                   SKIPPED)])
        g.s.validate()
    assert g.failures() == [] and g.s.in_flight(0) == []


def test_a_skip_reported_before_its_cause_waits_for_the_cause_to_name_the_root():
    g = Graph()
    a = g.task(arg(OUT, 1))
    b = g.task(arg(IN, 1), arg(OUT, 2), chip=1)
    c = g.task(arg(IN, 2))  # sent to chip 0 to wait for b
    g.schedule()
    gb = g.gids[b]
    # chip 1's worker saw a fail in chip 0's ring and skipped b before chip 0 reported a
    g.s.report(1, [], [Failure(gb, "k", 1, "not run: a task it depends on failed", SKIPPED)])
    g.s.validate()
    assert g.failures() == [] and g.get(b).state == State.DISPATCHED
    g.take_orders = g.s.take_worker_orders()
    g.s.report(0, [], [Failure(g.gids[a], "k", 0, "ValueError: bad", g.gids[a])])
    g.s.validate()
    assert [(f.task, f.root) for f in g.failures()] == [(a, a), (b, a), (c, a)]
    assert g.s.in_flight(1) == []  # b left: its worker no longer holds it
    cancels, _ = g.s.take_worker_orders()
    assert cancels == {0: [g.gids[c]]}  # c waits for b on chip 0: dropped, never run


def test_a_worker_is_never_sent_so_far_ahead_that_a_waited_outcome_leaves_its_ring(
        monkeypatch):
    import broker.waits
    monkeypatch.setattr(broker.waits, "RING_SLOTS", 4)
    g = Graph()
    first = g.task(arg(OUT, 1))
    g.task(arg(IN, 1), chip=1)  # waits for seq 0 of chip 0
    g.schedule()
    g.batch(6, arg(OUT, 5))  # more for chip 0
    g.batch(6, arg(OUT, 6))
    g.schedule()
    # seq 0 is waited for elsewhere: chip 0 gets seqs 1..3 only
    assert len(g.s.in_flight(0)) == 4
    g.finish(first)
    g.schedule()
    g.finish(2)  # the waiting task ends: seq 0 is no longer watched
    g.schedule()
    assert len(g.s.in_flight(0)) == 12  # the rest goes


def test_host_tasks_and_groups_never_queue_behind():
    s = scheduler([0, 1, HOST_QUEUE])
    s.submit(1, [TaskSpec(1, HOST_QUEUE, KERNEL, [arg(OUT, 1)]),
                 TaskSpec(2, HOST_QUEUE, KERNEL, [arg(IN, 1)])])
    s.validate()
    assert [t.task_id for t in s.queued(HOST_QUEUE)] == [1]
    s.submit(1, [TaskSpec(3, 0, KERNEL, [arg(OUT, 2)]),
                 TaskSpec(4, 0, KERNEL, [arg(IN, 2)], group=[0, 1])])
    s.validate()
    assert [t.task_id for t in s.queued(0)] == [3] and not s.queued(1)


def test_host_workers_share_one_queue_one_task_each():
    s = scheduler([HOST_QUEUE])
    for k in range(2):
        s.add_worker(host_chip(k), HOST_QUEUE, 1)
    s.submit(1, [TaskSpec(i, HOST_QUEUE, KERNEL, [arg(OUT, i)]) for i in (1, 2, 3)])
    s.validate()
    out = s.schedule()
    s.validate()
    assert sorted(w for w, _, _, _, _ in out) == [-2, -1] and len(s.queued(HOST_QUEUE)) == 1


def test_traced_tasks_report_their_times_with_their_results():
    s = scheduler([0], traced=True)
    (first,) = s.submit(1, [TaskSpec(1, 0, KERNEL, [arg(OUT, 1)])])
    (second,) = s.submit(1, [TaskSpec(2, 0, KERNEL, [arg(IN, 1)])])
    s.schedule()
    s.report(0, [first, second], [], [(first, 0, 10.0, 11.0), (second, 0, 11.0, 12.0)])
    s.validate()
    done, _, times = s.take_results()[1]
    assert done == [1, 2] and [(t.task, t.start, t.deps) for t in times] == [
        (1, 10.0, []), (2, 11.0, [1])]
    assert all(t.ready <= t.dispatch for t in times)


# ---- a worker's death --------------------------------------------------------------------


def test_requeued_tasks_keep_their_order_and_are_not_counted_twice():
    g = Graph()
    a, b = g.task(arg(INOUT, 1)), g.task(arg(INOUT, 1))
    g.schedule()
    g.s.worker_lost(0, (0, 0), "worker of chip 0 died")  # before starting either
    g.s.validate()
    assert queued(g, 0) == [a, b]
    g.s.add_worker(0, 0, 100)
    g.finish(a)
    g.finish(b)
    assert g.s.take_results()[1][0] == [a, b] and g.s.unfinished() == {}


def test_a_started_task_reruns_while_it_has_retries_then_fails_as_lost():
    g = Graph()
    a = g.task(arg(IN, 1), arg(OUT, 2), retries=1)
    for attempt in range(2):
        g.schedule()
        gid = g.gids[a]
        g.s.worker_lost(0, (gid, 0), "worker of chip 0 (pid 9) died (killed by SIGKILL)",
                        "; worker log: /x")
        g.s.validate()
        g.s.add_worker(0, 0, 100)
        assert (g.get(a) is not None) == (attempt == 0)
    (failure,) = g.failures()
    assert failure.lost and failure.reason == (
        "worker of chip 0 (pid 9) died (killed by SIGKILL) while running kernel 'k'"
        "; worker log: /x")


def test_a_rerun_task_downstream_of_one_that_cannot_rerun_fails_with_it():
    g = Graph()
    read_x = g.task(arg(IN, 1), arg(OUT, 2))
    write_x = g.task(arg(IN, 3), arg(OUT, 1))  # queued behind it (write after read of x)
    last = g.task()
    g.schedule()
    # All three started: read_x cannot rerun (write_x overwrote its input); write_x could,
    # but it depends on read_x, so it fails with it; last reruns.
    g.s.worker_lost(0, (g.gids[last], g.gids[write_x]), "worker of chip 0 died")
    g.s.validate()
    failed = g.failures()
    assert [(f.task, f.root, f.lost) for f in failed] == [
        (read_x, read_x, True), (write_x, read_x, True)]
    assert queued(g, 0) == [last] and g.get(last).retries == 0


def test_a_started_task_that_overwrites_its_inputs_is_not_rerun():
    g = Graph()
    a = g.task(arg(INOUT, 1), retries=3)
    g.schedule()
    g.s.worker_lost(0, (g.gids[a], 0), "died")
    g.s.validate()
    assert [f.task for f in g.failures()] == [a]


def test_a_group_member_on_a_dead_worker_fails_the_group_and_aborts_its_barrier():
    g = Graph()
    grp = g.task(group=[0, 1])
    g.schedule()
    gid = g.gids[grp]
    g.s.worker_lost(1, None, "died")
    g.s.validate()
    assert g.s.take_barrier_orders() == ([gid], [])
    g.s.report(0, [], [Failure(gid, "k", 0, "rank 0 of 2: BarrierAborted", 0)])
    g.s.validate()
    assert g.s.take_barrier_orders() == ([gid], [gid])
    (failure,) = g.failures()
    assert failure.lost and "died" in failure.reason


def test_inputs_overwritten_by_a_later_task_only_on_overlapping_bytes_of_one_client():
    s = scheduler([0], clients=(1, 2))
    gids = s.submit(1, [TaskSpec(1, 0, KERNEL, [arg(IN, 1, 0, 32), arg(OUT, 2)]),
                        TaskSpec(2, 0, KERNEL, [arg(OUT, 1, 32, 32)]),
                        TaskSpec(3, 0, KERNEL, [arg(INOUT, 1, 16, 32)]),
                        TaskSpec(4, 0, KERNEL, [arg(IN, 1), arg(OUT, 3)])])
    gids += s.submit(2, [TaskSpec(1, 0, KERNEL, [arg(OUT, 1)])])
    s.validate()
    reader, disjoint, overlapping, other_reader, other_client = (s.task(g) for g in gids)
    assert not inputs_overwritten(reader, [disjoint, other_reader, other_client])
    assert inputs_overwritten(reader, [disjoint, overlapping])


def test_a_dead_workers_task_awaited_on_another_chip_fails_and_its_waiter_is_dropped():
    g = Graph()
    a = g.task(arg(OUT, 1), retries=3)
    b = g.task(arg(IN, 1), chip=1)  # sent to chip 1 to wait for a
    g.schedule()
    g.s.take_worker_orders()
    g.s.worker_lost(0, (0, 0), "worker of chip 0 died", outcome=lambda seq: None)
    g.s.validate()
    # not started, but b was sent naming this run of a: a fails rather than requeue
    assert [(f.task, f.root, f.lost) for f in g.failures()] == [(a, a, True), (b, a, True)]
    cancels, _ = g.s.take_worker_orders()
    assert cancels == {1: [g.gids[b]]}  # chip 1's worker stops waiting and drops b
    g.s.report(1, [], [Failure(g.gids[b], "k", 1, "cancelled", g.gids[b])])
    g.s.validate()
    assert g.s.in_flight(1) == [] and g.s.unfinished() == {}


def test_a_dead_workers_tasks_its_ring_says_ended_count_as_reported():
    g = Graph()
    a = g.task(arg(OUT, 1))
    bad = g.task(arg(OUT, 2))
    b = g.task(arg(IN, 1), chip=1)
    g.schedule()
    seq_a, seq_bad = g.get(a).seq, g.get(bad).seq
    ring = {seq_a: True, seq_bad: False}
    g.s.worker_lost(0, (0, g.gids[bad]), "worker of chip 0 died", outcome=ring.get)
    g.s.validate()
    done, (failure,), _ = g.s.take_results()[1]
    assert done == [a]  # done: b (on chip 1) may already have used its output
    assert failure.task == bad and failure.lost and "before saying why" in failure.reason
    g.s.report(1, [g.gids[b]], [])
    assert g.s.take_results()[1][0] == [b]


def test_with_its_ring_only_the_running_task_of_a_dead_worker_counts_as_started():
    s = scheduler([0], clients=(1, 2))
    (first,) = s.submit(1, [TaskSpec(1, 0, KERNEL, [arg(INOUT, 1)])])
    (running,) = s.submit(2, [TaskSpec(1, 0, KERNEL, [arg(IN, 2), arg(OUT, 3)])])
    s.schedule()
    # client 2's task ran first (clients take turns on a worker): client 1's never started
    s.worker_lost(0, (running, 0), "worker of chip 0 died", outcome=lambda seq: None)
    s.validate()
    assert {t.gid for t in s.queued(0)} == {first, running}  # requeued, and rerun
    assert s.task(running).retries == 0 and s.task(first).retries == 1


def test_a_finished_task_keeps_nothing_it_waited_for_alive():
    g = Graph()
    chain = [g.task(arg(INOUT, 1), chip=i % 2) for i in range(50)]
    g.schedule()
    tasks = [g.get(t) for t in chain]
    for t in chain[:-1]:
        g.finish(t)
    # the live tail names its one unfinished-at-dispatch predecessor; that one, done,
    # no longer names its own (else a long chain would live as long as its last task)
    assert tasks[-1].after == [tasks[-2]] and tasks[-2].after is None
    assert all(t.after is None and t.wait is None for t in tasks[:-1])
