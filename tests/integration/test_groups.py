"""Group tasks (issue 4): gang start, rank/world, barriers, failures, dependencies, collectives.

A group is one member per chip, dispatched together; members meet in ``pto.task().barrier()``.
Every barrier in these kernels has a short timeout, so a runtime that does not start the
members together fails the test (TimeoutError inside the kernel) instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pto

from ._kernels import BARRIER_S, allreduce_inplace
from ._util import REPO, ExternalBroker, stop_process

pytestmark = pytest.mark.timeout(60)



# ---- kernels (module level: they travel to the workers by value) -------------------------


def arrive(flags, seen):
    """Flag my arrival, wait for everyone, then count the flags I can see."""
    t = pto.task()
    flags[t.rank] = 1
    t.barrier(timeout=BARRIER_S)
    seen[t.rank] = flags.sum()


def arrive_no_barrier(flags, seen, limit):
    """Gang start without the barrier: wait (bounded) until every member has flagged."""
    t = pto.task()
    flags[t.rank] = 1
    deadline = time.monotonic() + limit
    while flags.sum() < t.world and time.monotonic() < deadline:
        time.sleep(0.001)
    seen[t.rank] = flags.sum()


def whoami(info):
    t = pto.task()
    info[t.rank] = [t.rank, t.world, t.chip]


def rounds(slots, report, n):
    """Reuse the barrier 2*n times; count the slots that did not hold this round's value."""
    t = pto.task()
    bad = 0
    for k in range(n):
        slots[t.rank] = k * 100 + t.rank
        t.barrier(timeout=BARRIER_S)
        for j in range(t.world):
            if slots[j] != k * 100 + j:
                bad += 1
        t.barrier(timeout=BARRIER_S)
    report[t.rank] = [bad, n]


def start_stamp(stamps):
    t = pto.task()
    stamps[t.rank] = [time.time(), t.chip]


def single_stamp(out):
    out[:] = [time.time(), pto.task().chip]


def sleep_fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def one_raises(out, bad_rank):
    t = pto.task()
    if t.rank == bad_rank:
        time.sleep(0.2)  # the others are already waiting in the barrier
        raise ValueError("member-boom-51c2")
    t.barrier(timeout=BARRIER_S)
    out[t.rank] = 1


def copy(src, dst, delay):
    time.sleep(delay)
    dst[:] = src


def scale_part(x, y, delay):
    """Rank r writes its part of y from x (after a delay that would expose a WAR race)."""
    t = pto.task()
    time.sleep(delay)
    n = x.shape[0] // t.world
    part = slice(t.rank * n, (t.rank + 1) * n)
    y[part] = x[part] * (t.rank + 1)


def allreduce_scratch(*args):
    """args: world read-only shards, a shared scratch tensor, world outputs (one per rank).

    Reduce-scatter: rank r sums slice r of every shard into slice r of the scratch.
    All-gather: after the barrier, every rank copies the whole scratch into its output.
    """
    t = pto.task()
    rank, world = t.rank, t.world
    shards, scratch, outs = args[:world], args[world], args[world + 1 :]
    n = scratch.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    acc = np.zeros(hi - lo, dtype=scratch.dtype)
    for s in shards:
        acc += s[lo:hi]
    scratch[lo:hi] = acc
    t.barrier(timeout=BARRIER_S)
    outs[rank][:] = scratch


KERNELS = {
    "arrive": arrive,
    "arrive_no_barrier": arrive_no_barrier,
    "whoami": whoami,
    "rounds": rounds,
    "start_stamp": start_stamp,
    "single_stamp": single_stamp,
    "sleep_fill": sleep_fill,
    "one_raises": one_raises,
    "copy": copy,
    "scale_part": scale_part,
    "allreduce_inplace": allreduce_inplace,
    "allreduce_scratch": allreduce_scratch,
}
In, Out, InOut, S, NoDep = (pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar,
                            pto.Arg.no_dep)


def register(rt, name, orch):
    rt.register(name, orch=orch, kernels=KERNELS)


# ---- gang start ----------------------------------------------------------------------


def test_every_member_sees_all_others_arrive_before_any_finishes(rt4_module):
    def orch(ctx, args):
        chips = args["chips"]
        flags = ctx.alloc((len(chips),), np.int64)
        seen = ctx.alloc((len(chips),), np.int64)
        ctx.submit_group(chips, "arrive", [NoDep(flags), Out(seen)])
        return seen

    register(rt4_module, "gang", orch)
    for chips in ([0, 1], [0, 1, 2, 3], [2, 0, 3], [0, 1, 2, 3]):
        seen = rt4_module.run("gang", args={"chips": chips})
        assert seen.numpy().tolist() == [len(chips)] * len(chips), chips


def test_members_run_at_once_without_a_barrier(rt4_module):
    """Each member spins until all members flagged: only possible if all run together."""

    def orch(ctx, args):
        flags = ctx.alloc((4,), np.int64)
        seen = ctx.alloc((4,), np.int64)
        ctx.submit_group([0, 1, 2, 3], "arrive_no_barrier", [NoDep(flags), Out(seen), S(10.0)])
        return seen

    register(rt4_module, "gang_nobarrier", orch)
    t0 = time.monotonic()
    seen = rt4_module.run("gang_nobarrier", args={})
    assert seen.numpy().tolist() == [4, 4, 4, 4]
    assert time.monotonic() - t0 < 8, "members waited for each other for seconds"


def reserve_orch(ctx, args):
    busy = ctx.alloc((4,), np.float64)
    stamps = ctx.alloc((3, 2), np.float64)
    later = ctx.alloc((2,), np.float64)
    ctx.submit(1, "sleep_fill", [Out(busy), S(1.0), S(0.8)])  # chip 1 busy for 0.8 s
    ctx.submit_group([0, 1, 2], "start_stamp", [Out(stamps)])  # independent of it
    ctx.submit(0, "single_stamp", [Out(later)])  # independent of both, on chip 0, after
    return stamps, later


def test_a_group_waiting_for_a_busy_chip_starts_all_members_together(rt4_module):
    """Chip 1 is busy for 0.8 s: the group on [0, 1, 2] starts its members together once
    chip 1 is free, not its chip-0 and chip-2 members 0.8 s before its chip-1 member."""
    register(rt4_module, "gang_reserve", reserve_orch)
    rt4_module.run("gang_reserve", args={})  # warm-up: kernels shipped, workers hot
    stamps, _later = rt4_module.run("gang_reserve", args={})
    st = stamps.numpy()
    assert st[:, 1].tolist() == [0.0, 1.0, 2.0]
    spread = st[:, 0].max() - st[:, 0].min()
    assert spread < 0.3, f"members started {spread:.2f} s apart: {st.tolist()}"


def test_a_waiting_group_is_not_overtaken_by_later_single_tasks(rt4_module):
    register(rt4_module, "gang_reserve", reserve_orch)
    rt4_module.run("gang_reserve", args={})  # warm-up
    stamps, later = rt4_module.run("gang_reserve", args={})
    st = stamps.numpy()
    later_start, later_chip = later.numpy()
    assert later_chip == 0
    assert later_start >= st[0, 0] - 0.01, (
        f"a single task on chip 0 overtook the group waiting for chip 0: "
        f"single at {later_start:.3f}, group member at {st[0, 0]:.3f}"
    )


# ---- rank, world, barrier ------------------------------------------------------------


def test_rank_world_and_chip_of_each_member(rt4_module):
    def orch(ctx, args):
        outs = []
        for chips in ([0, 1], [3, 1, 2, 0], [2, 0]):
            info = ctx.alloc((len(chips), 3), np.int64)
            ctx.submit_group(chips, "whoami", [Out(info)])
            outs.append((chips, info))
        single = ctx.alloc((1, 3), np.int64)
        ctx.submit(3, "whoami", [Out(single)])
        return outs, single

    register(rt4_module, "whoami", orch)
    outs, single = rt4_module.run("whoami", args={})
    for chips, info in outs:
        w = len(chips)
        assert info.numpy().tolist() == [[r, w, c] for r, c in enumerate(chips)], chips
    assert single.numpy().tolist() == [[0, 1, 3]]


def test_rank_and_world_on_two_chips(rt2_module):
    def orch(ctx, args):
        info = ctx.alloc((2, 3), np.int64)
        ctx.submit_group([1, 0], "whoami", [Out(info)])
        return info

    register(rt2_module, "whoami2", orch)
    assert rt2_module.run("whoami2", args={}).numpy().tolist() == [[0, 2, 1], [1, 2, 0]]


def test_barrier_reused_many_times_in_a_row(rt4_module):
    n = 40

    def orch(ctx, args):
        chips = args["chips"]
        slots = ctx.alloc((len(chips),), np.int64)
        report = ctx.alloc((len(chips), 2), np.int64)
        ctx.submit_group(chips, "rounds", [NoDep(slots), Out(report), S(n)])
        return report

    register(rt4_module, "rounds", orch)
    # a second group on the same chips reuses nothing stale from the first
    for chips in ([0, 1], [0, 1, 2, 3], [0, 1, 2, 3], [3, 1]):
        report = rt4_module.run("rounds", args={"chips": chips}).numpy()
        assert report.tolist() == [[0, n]] * len(chips), chips


# ---- failures ------------------------------------------------------------------------


def test_a_raising_member_fails_the_group_and_the_others_do_not_hang(rt4_module):
    def orch(ctx, args):
        out = ctx.alloc((3,), np.int64)
        after = ctx.alloc((3,), np.int64)
        ctx.submit_group([0, 1, 2], "one_raises", [Out(out), S(1)])
        ctx.submit(3, "copy", [In(out), Out(after), S(0.0)])  # a dependent: poisoned
        return after

    register(rt4_module, "group_fail", orch)
    t0 = time.monotonic()
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("group_fail", args={})
    elapsed = time.monotonic() - t0
    assert elapsed < 10, f"the failed group took {elapsed:.1f} s (members stuck in barrier?)"
    err = ei.value
    assert err.reason.startswith("rank 1 of 3:"), err.reason
    assert "member-boom-51c2" in err.reason
    assert err.kernel == "one_raises"

    # the chips are free again: a good group on the same chips runs
    def good(ctx, args):
        flags = ctx.alloc((4,), np.int64)
        seen = ctx.alloc((4,), np.int64)
        ctx.submit_group([0, 1, 2, 3], "arrive", [NoDep(flags), Out(seen)])
        return seen

    register(rt4_module, "group_fail_after", good)
    assert rt4_module.run("group_fail_after", args={}).numpy().tolist() == [4, 4, 4, 4]


# ---- dependencies --------------------------------------------------------------------


def test_group_depends_on_earlier_writer_and_later_tasks_depend_on_group(rt4_module):
    def orch(ctx, args):
        x = ctx.alloc((8,), np.float64)
        y = ctx.alloc((8,), np.float64)
        z = ctx.alloc((8,), np.float64)
        ctx.submit(2, "sleep_fill", [Out(x), S(5.0), S(0.3)])  # RAW: group reads x
        ctx.submit_group([0, 1], "scale_part", [In(x), Out(y), S(0.3)])
        ctx.submit(3, "copy", [In(y), Out(z), S(0.0)])  # RAW on the group's output
        ctx.submit(2, "sleep_fill", [Out(x), S(-1.0), S(0.0)])  # WAR: after the group read
        return x, y, z

    register(rt4_module, "group_deps", orch)
    x, y, z = rt4_module.run("group_deps", args={})
    expected = np.array([5.0] * 4 + [10.0] * 4)
    np.testing.assert_array_equal(y.numpy(), expected)
    np.testing.assert_array_equal(z.numpy(), expected)
    np.testing.assert_array_equal(x.numpy(), np.full(8, -1.0))


def test_groups_writing_one_tensor_are_ordered(rt4_module):
    """RAW from one group into another: the second group waits for all of the first."""

    def orch(ctx, args):
        x = ctx.alloc((8,), np.float64)
        y = ctx.alloc((8,), np.float64)
        ctx.submit_group([0, 1], "scale_part", [In(args["ones"]), Out(y), S(0.3)])
        ctx.submit_group([1, 2, 3, 0], "scale_part", [In(y), Out(x), S(0.0)])
        return x, y

    register(rt4_module, "group_group", orch)
    x, y = rt4_module.run("group_group", args={"ones": np.ones(8)})
    np.testing.assert_array_equal(y.numpy(), [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(x.numpy(), [1, 1, 2, 2, 6, 6, 8, 8])


# ---- collectives ---------------------------------------------------------------------


def allreduce_orch(ctx, args):
    chips, kernel = args["chips"], args["kernel"]
    shards = [ctx.tensor(s) for s in args["shards"]]
    if kernel == "allreduce_scratch":
        scratch = ctx.alloc(shards[0].shape, shards[0].dtype)
        outs = [ctx.alloc(shards[0].shape, shards[0].dtype) for _ in chips]
        ctx.submit_group(chips, kernel,
                         [In(s) for s in shards] + [InOut(scratch)] + [Out(o) for o in outs])
        return outs
    ctx.submit_group(chips, kernel, [InOut(s) for s in shards])
    return shards


def test_allreduce_on_two_and_four_chips_matches_numpy(rt4_module):
    pkg = pto.compile(platform="sim", kernels=[REPO / "examples" / "allreduce" / "allreduce.c"])
    rt4_module.register("allreduce", orch=allreduce_orch,
                 kernels={**KERNELS, "allreduce_c": pkg.kernel("allreduce")})
    rng = np.random.default_rng(4)
    for chips in ([1, 3], [0, 1, 2, 3], [3, 2, 1, 0]):
        shards = [rng.standard_normal(10_007).astype(np.float32) for _ in chips]
        expected = np.sum(np.array(shards, dtype=np.float64), axis=0)
        for kernel in ("allreduce_scratch", "allreduce_inplace", "allreduce_c"):
            outs = rt4_module.run("allreduce", args={"chips": chips, "kernel": kernel,
                                              "shards": shards})
            assert len(outs) == len(chips)
            for rank, out in enumerate(outs):
                np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{kernel} on {chips}, rank {rank}")


# ---- bad input -----------------------------------------------------------------------


def test_bad_chip_lists_raise_value_error_and_runtime_stays_usable(rt2_module):
    def bad(ctx, args):
        out = ctx.alloc((2, 3), np.int64)
        ctx.submit_group(args["chips"], "whoami", [Out(out)])
        return out

    def good(ctx, args):
        out = ctx.alloc((2, 3), np.int64)
        ctx.submit_group([0, 1], "whoami", [Out(out)])
        return out

    register(rt2_module, "bad_group", bad)
    register(rt2_module, "good_group", good)
    for chips in ([], [0, 0], [1, 0, 1], [0, 7], [-1], [2]):
        with pytest.raises(ValueError):
            rt2_module.run("bad_group", args={"chips": chips})
        assert rt2_module.run("good_group", args={}).numpy().tolist() == [[0, 2, 0], [1, 2, 1]]


# ---- two client processes, overlapping groups ----------------------------------------


GROUP_CLIENT = textwrap.dedent(
    """
    import sys, time, numpy as np, pto
    TAG, ROUNDS = int(sys.argv[1]), int(sys.argv[2])
    GROUPS = {1: [[0, 1, 2, 3], [1, 0], [3, 2, 1], [2]],
              2: [[3, 2, 1, 0], [0, 1], [1, 2, 3], [0, 3]]}[TAG]

    def member(*args):                  # defined in __main__: travels by value
        out, tag = args[-2], args[-1]
        t = pto.task()
        t.barrier(timeout=30)
        out[t.rank] = tag * 1000 + t.world * 10 + t.chip
        t.barrier(timeout=30)

    def orch(ctx, args):
        outs = []
        for chips in GROUPS:
            out = ctx.alloc((len(chips),), np.int64)
            ctx.submit_group(chips, "member", [pto.Arg.output(out), pto.Arg.scalar(TAG)])
            outs.append(out)
        # a chain across groups too: a group reading another group's output
        last = ctx.alloc((2,), np.int64)
        ctx.submit_group(GROUPS[1], "member", [pto.Arg.input(outs[0]),
                                              pto.Arg.output(last), pto.Arg.scalar(TAG)])
        return outs, last

    with pto.Runtime(level="host", platform="sim") as rt:
        assert rt.devices == [0, 1, 2, 3], rt.devices
        rt.register("groups", orch=orch, kernels={"member": member})
        t0 = time.monotonic()

        def check(i, future):
            outs, last = future.result(timeout=60)
            for chips, out in zip(GROUPS, outs):
                want = [TAG * 1000 + len(chips) * 10 + c for c in chips]
                got = out.numpy().tolist()
                assert got == want, (TAG, i, chips, got, want)
            want = [TAG * 1000 + 20 + c for c in GROUPS[1]]
            assert last.numpy().tolist() == want, (TAG, i, last.numpy().tolist(), want)

        pending = []                    # a few runs in flight: more groups compete at once
        for i in range(ROUNDS):
            pending.append((i, rt.submit("groups", args={})))
            if len(pending) >= 4:
                check(*pending.pop(0))
        for i, future in pending:
            check(i, future)
    print("OK", TAG, ROUNDS, round(time.monotonic() - t0, 2), flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_overlapping_groups_from_two_client_processes_never_deadlock(tmp_path):
    rounds = 200
    b = ExternalBroker(tmp_path, workers=4)
    procs = []
    try:
        env = dict(os.environ, PTO_BROKER=b.address)
        for tag in (1, 2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", GROUP_CLIENT, str(tag), str(rounds)],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        deadline = time.monotonic() + 120
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"clients with overlapping groups did not finish {rounds} rounds "
                            f"within 120 s (deadlock?)\nbroker log:\n{b.logtext()}")
            results.append((p.returncode, out, err))
        for tag, (rc, out, err) in zip((1, 2), results, strict=True):
            assert rc == 0, f"client {tag} failed:\n{err[-3000:]}"
            assert f"OK {tag} {rounds}" in out, (out, err[-3000:])
        assert b.proc.poll() is None
    finally:
        for p in procs:
            stop_process(p)
        b.stop()
