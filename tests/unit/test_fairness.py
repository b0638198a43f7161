"""Fairness between clients in each chip's ready queue, on the scheduler alone (no
processes): one client floods, another's task goes within one round-robin turn; groups
still start, in one global order, even next to a flood."""

from __future__ import annotations

import pytest

from broker.ready import ReadyQueue
from broker.scheduler import Scheduler
from pto.wire.args import ParamType
from pto.wire.protocol import ArgSpec, TaskSpec

KERNEL = 7
FLOOD, SMALL, THIRD = 1, 2, 3


class Broker:
    """A scheduler with a worker per chip (each holding at most ``limit`` tasks) and
    clients that submit independent tasks; every step is followed by ``validate``."""

    def __init__(self, chips=(0, 1), limit: int = 4, clients=(FLOOD, SMALL, THIRD)):
        self.s = Scheduler(chips)
        for client in clients:
            self.s.add_client(client)
            self.s.register_kernel(client, KERNEL, "k")
        for chip in chips:
            self.s.add_worker(chip, chip, limit)
        self.next_tid = {c: 1 for c in clients}
        self.held: dict[int, list[int]] = {c: [] for c in chips}  # gids per worker
        self.order: list[tuple[int, int]] = []  # (client, task id) in dispatch order

    def submit(self, client: int, n: int = 1, chip: int = 0, group=(),
               tensor: int | None = None) -> list[int]:
        specs = []
        for _ in range(n):
            tid = self.next_tid[client]
            self.next_tid[client] += 1
            args = [] if tensor is None else [ArgSpec(int(ParamType.INOUT), tensor, 0, 8, 12,
                                                      [1])]
            specs.append(TaskSpec(tid, chip, KERNEL, args, list(group)))
        self.s.submit(client, specs)
        self.s.validate()
        return [spec.task for spec in specs]

    def dispatch(self) -> list[tuple[int, int]]:
        """One scheduling round: (client, task id) of each member sent, in order."""
        got = []
        for worker, task, rank, _barrier, _seq in self.s.schedule():
            self.held[worker].append(task.gid)
            if rank == 0:
                got.append((task.client, task.task_id))
        self.order += got
        self.s.validate()
        return got

    def finish(self, chip: int, count: int | None = None) -> None:
        """The worker of ``chip`` reports its oldest ``count`` tasks (all) done."""
        held = self.held[chip]
        count = len(held) if count is None else count
        done, self.held[chip] = held[:count], held[count:]
        self.s.report(chip, done, [])
        self.s.validate()

    def results(self) -> dict[int, list[int]]:
        return {c: done for c, (done, _failed, _times) in self.s.take_results().items()}


def test_a_small_clients_task_goes_within_one_turn_of_a_flood():
    b = Broker(chips=(0,), limit=4)
    b.submit(FLOOD, 1000)
    assert b.dispatch() == [(FLOOD, t) for t in (1, 2, 3, 4)]
    (small,) = b.submit(SMALL)
    b.finish(0, 2)  # room for two: one turn each
    assert b.dispatch() == [(FLOOD, 5), (SMALL, small)]


def test_clients_take_turns_one_task_each():
    b = Broker(chips=(0,), limit=1)
    b.submit(FLOOD, 5)
    b.submit(SMALL, 2)
    b.submit(THIRD, 2)
    while b.s.has_ready():
        b.dispatch()
        b.finish(0)
    assert [c for c, _ in b.order] == [FLOOD, SMALL, THIRD, FLOOD, SMALL, THIRD,
                                       FLOOD, FLOOD, FLOOD]


def test_each_client_keeps_its_own_order():
    b = Broker(chips=(0,), limit=3)
    b.submit(FLOOD, 20)
    b.submit(SMALL, 20)
    while b.s.has_ready():
        b.dispatch()
        b.finish(0)
    for client in (FLOOD, SMALL):
        assert [t for c, t in b.order if c == client] == list(range(1, 21))


def _run_out(b: Broker, chips=(0, 1)) -> None:
    """Dispatch and finish until nothing is queued or held."""
    while b.s.has_ready() or any(b.held.values()):
        b.dispatch()
        for chip in chips:
            b.finish(chip)


def test_every_task_of_every_client_ends():
    b = Broker(chips=(0, 1), limit=8)
    b.submit(FLOOD, 100, chip=0)
    b.submit(FLOOD, 100, chip=1)
    b.submit(SMALL, 3, chip=1)
    _run_out(b)
    done = b.results()
    assert sorted(done[FLOOD]) == list(range(1, 201)) and sorted(done[SMALL]) == [1, 2, 3]


def test_a_small_clients_chain_across_chips_ends_while_the_flood_is_still_queued():
    """Each task of the small client waits for the one before (INOUT on one tensor, chips
    alternating): every step gets its turn, so the chain ends long before the flood."""
    b = Broker(chips=(0, 1), limit=2)
    b.submit(FLOOD, 500, chip=0)
    b.submit(FLOOD, 500, chip=1)
    b.dispatch()
    steps = [b.submit(SMALL, chip=i % 2, tensor=1)[0] for i in range(6)]
    done: list[int] = []
    while len(done) < len(steps):
        b.finish(0, 1)
        b.finish(1, 1)
        b.dispatch()
        done += b.results().get(SMALL, [])
    assert done == steps
    assert [t for c, t in b.order if c == SMALL] == steps
    left = b.s.unfinished()[FLOOD]
    assert left > 900, f"the flood had only {left} tasks left: the chain waited behind it"


def test_a_group_starts_next_to_a_flood_of_singles():
    b = Broker(chips=(0, 1), limit=4)
    b.submit(FLOOD, 1000, chip=0)
    b.submit(FLOOD, 1000, chip=1)
    b.dispatch()
    (group,) = b.submit(SMALL, chip=0, group=(0, 1))
    b.finish(0)
    b.finish(1)
    got = b.dispatch()
    # Both chips idle and the group reserving them: it goes first, the flood after it.
    assert got[0] == (SMALL, group) and got[1:] and all(c == FLOOD for c, _ in got[1:])


def test_a_group_reserves_its_chips_until_they_are_idle():
    b = Broker(chips=(0, 1), limit=4)
    b.submit(FLOOD, 1000, chip=0)
    b.submit(FLOOD, 1000, chip=1)
    b.dispatch()
    (group,) = b.submit(SMALL, chip=0, group=(0, 1))
    b.finish(0)  # chip 1's worker still holds four flood tasks
    assert b.dispatch() == []  # nothing goes to chip 0 either: it must stay idle
    b.finish(1)
    assert b.dispatch()[0] == (SMALL, group)


def test_two_clients_groups_on_shared_chips_never_wait_on_each_other():
    """Client FLOOD's group is queued behind its own single on chip 1; SMALL's group heads
    SMALL's queues on both chips. The group that became ready first starts first."""
    b = Broker(chips=(0, 1), limit=4)
    b.submit(FLOOD, 1, chip=1)  # a single ahead of FLOOD's group on chip 1
    (first,) = b.submit(FLOOD, chip=0, group=(0, 1))
    (second,) = b.submit(SMALL, chip=0, group=(1, 0))
    for _ in range(10):
        b.dispatch()
        b.finish(0)
        b.finish(1)
        if not b.s.has_ready():
            break
    groups = [(c, t) for c, t in b.order if (c, t) in ((FLOOD, first), (SMALL, second))]
    assert groups == [(FLOOD, first), (SMALL, second)]


def test_a_client_that_leaves_takes_its_queue_and_the_others_go_on():
    b = Broker(chips=(0,), limit=1)
    b.submit(FLOOD, 50)
    b.submit(SMALL, 2)
    b.dispatch()
    b.s.drop_client(FLOOD)
    b.s.validate()
    while b.s.has_ready():
        b.finish(0)
        b.dispatch()
    assert [t for c, t in b.order if c == SMALL] == [1, 2]


def test_a_dead_workers_unstarted_tasks_go_back_first_of_their_client():
    b = Broker(chips=(0,), limit=3)
    b.submit(FLOOD, 10)
    b.submit(SMALL, 3)
    assert b.dispatch() == [(FLOOD, 1), (SMALL, 1), (FLOOD, 2)]
    b.s.worker_lost(0, (0, 0), "worker of chip 0 died")  # none of them had started
    b.s.validate()
    b.held[0] = []
    b.s.add_worker(0, 0, 3)
    b.order = []
    _run_out(b, chips=(0,))
    assert [t for c, t in b.order if c == FLOOD] == list(range(1, 11))
    assert [t for c, t in b.order if c == SMALL] == [1, 2, 3]


def test_ready_queue_refuses_a_pop_out_of_turn_and_a_requeued_group():
    q = ReadyQueue()
    s = Scheduler([0, 1])
    s.add_client(1)
    s.register_kernel(1, KERNEL, "k")
    s.submit(1, [TaskSpec(1, 0, KERNEL, []), TaskSpec(2, 0, KERNEL, []),
                 TaskSpec(3, 0, KERNEL, [], [0, 1])])
    first, second, group = s.queued(0)
    s.validate()
    q.append(first)
    q.append(second)
    with pytest.raises(ValueError, match="not the head"):
        q.pop(second)
    with pytest.raises(ValueError, match="never requeued"):
        q.appendleft(group)
    q.pop(first)
    assert q.head() is second and len(q) == 1
    q.check(0)


# ---- worker credit per client: the reserve ------------------------------------------
# A chip's last limit // 8 slots go only to clients holding fewer than that many tasks
# there (broker.scheduler._RESERVE_SHARE): with limit 16 the reserve is 2.


def _held(b: Broker, chip: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for task in b.s.in_flight(chip):
        counts[task.client] = counts.get(task.client, 0) + 1
    return counts


def test_a_flood_leaves_the_reserve_free_and_a_small_task_goes_at_once():
    b = Broker(chips=(0,), limit=16)
    b.submit(FLOOD, 1000)
    assert b.dispatch() == [(FLOOD, t) for t in range(1, 15)]
    assert b.dispatch() == []  # the flood alone never takes the last two slots
    (small,) = b.submit(SMALL)
    assert b.dispatch() == [(SMALL, small)]  # no flood task had to finish first
    assert _held(b, 0) == {FLOOD: 14, SMALL: 1}


def test_the_flood_refills_only_up_to_its_cap():
    b = Broker(chips=(0,), limit=16)
    b.submit(FLOOD, 1000)
    b.dispatch()
    b.submit(SMALL, 2)
    assert b.dispatch() == [(SMALL, 1), (SMALL, 2)]
    b.finish(0, 16)  # everything held ends: 14 of the flood's, both of the small one's
    assert b.dispatch() == [(FLOOD, t) for t in range(15, 29)]
    assert _held(b, 0) == {FLOOD: 14}


def test_a_client_holding_the_reserves_size_stays_out_of_it():
    b = Broker(chips=(0,), limit=16)
    b.submit(SMALL, 2)
    b.submit(FLOOD, 1000)
    b.dispatch()  # turns alternate until the reserve: then both hold 2 or more
    assert _held(b, 0) == {SMALL: 2, FLOOD: 12}
    b.submit(SMALL, 3)
    assert b.dispatch() == []  # SMALL holds 2 now: it waits like the flood
    (third,) = b.submit(THIRD)
    assert b.dispatch() == [(THIRD, third)]
    b.finish(0, 1)  # SMALL's first ends: it holds 1, and takes a reserve slot again
    assert b.dispatch() == [(SMALL, 3)]


def test_two_floods_together_leave_the_reserve_to_a_third_client():
    b = Broker(chips=(0,), limit=16)
    b.submit(FLOOD, 1000)
    b.submit(SMALL, 1000)
    b.dispatch()
    assert _held(b, 0) == {FLOOD: 7, SMALL: 7}
    (third,) = b.submit(THIRD)
    assert b.dispatch() == [(THIRD, third)]


def test_the_reserve_spans_the_workers_of_a_shared_queue():
    """Two workers on one queue (as host workers are): the reserve is of their credit
    together, and a small task still finds room with the flood at its cap."""
    b = Broker(chips=(0,), limit=8)  # 8 // 8: one slot of each worker's kept
    b.s.add_worker(100, 0, 8)
    b.held[100] = []
    b.submit(FLOOD, 1000)
    b.dispatch()
    assert len(b.s.in_flight(0)) + len(b.s.in_flight(100)) == 14
    (small,) = b.submit(SMALL)
    assert b.dispatch() == [(SMALL, small)]


def test_small_limits_keep_no_reserve():
    b = Broker(chips=(0,), limit=7)  # 7 // 8 = 0
    b.submit(FLOOD, 100)
    assert len(b.dispatch()) == 7


def test_host_workers_keep_no_reserve():
    """Host workers take one sub-task each (limit 1): however many share the queue, one
    client may use them all (a host sub-task may wait for others)."""
    b = Broker(chips=(0,), limit=1)
    for k in range(1, 16):
        b.s.add_worker(100 + k, 0, 1)
        b.held[100 + k] = []
    b.submit(FLOOD, 100)
    assert len(b.dispatch()) == 16


def test_every_task_ends_with_the_reserve_and_a_group_still_starts():
    b = Broker(chips=(0, 1), limit=16)
    b.submit(FLOOD, 300, chip=0)
    b.submit(FLOOD, 300, chip=1)
    b.dispatch()
    (group,) = b.submit(SMALL, chip=0, group=(0, 1))
    b.submit(SMALL, 20, chip=1)
    b.submit(THIRD, 20, chip=0)
    _run_out(b)
    done = b.results()
    assert sorted(done[FLOOD]) == list(range(1, 601))
    assert sorted(done[SMALL]) == list(range(1, 22)) and group in done[SMALL]
    assert sorted(done[THIRD]) == list(range(1, 21))
    assert not b.s.unfinished()


# ---- admission: the broker's client ROUTER takes the clients' messages in turn ---------


def test_a_small_clients_submit_is_taken_in_turn_with_a_floods(tmp_path):
    """A flood's Submits (256 tasks each, as ``pto.host.orchestration`` sends them) are
    queued at the broker before a small client's one: the ROUTER takes its peers in turn
    and a round stops at its task budget, so the small one comes in the first round, after
    at most one of the flood's."""
    import time

    import zmq

    from broker.routers import Routers

    routers = Routers(f"ipc://{tmp_path}/b.sock", None, 0.0)
    socks = []
    try:
        for name in (b"flood", b"small"):
            sock = routers.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, name)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(routers.address)
            socks.append(sock)
        flood, small = socks
        for i in range(100):
            flood.send(b"%d" % i)
        time.sleep(0.2)  # the flood's messages reach the broker's side first
        small.send(b"mine")
        time.sleep(0.2)
        rounds: list[list[bytes]] = []

        def on_client(identity: bytes, frames: list[bytes]) -> int:
            rounds[-1].append(identity)
            return 256

        while sum(map(len, rounds)) < 101:
            rounds.append([])
            ready = routers.wait(1000, False)
            assert ready, "the broker's socket saw no message"
            routers.take_in(ready, on_client, lambda identity, frames: 0)
        assert b"small" in rounds[0][:2], rounds[0]
        assert all(len(r) <= 2 for r in rounds)  # 512 tasks per round: two Submits
    finally:
        for sock in socks:
            sock.close(0)
        routers.close()
