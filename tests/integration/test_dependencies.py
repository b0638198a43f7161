"""Hazards on a handle order tasks across chips; independent tasks run at once.

Every test puts a sleep in the task that must go first and an observer in the task
that must go second, on another chip: if the runtime got the order wrong, the
observer would see the wrong bytes.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)

DELAY = 0.3


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def copy(src, dst, delay):
    time.sleep(delay)
    dst[:] = src


def inc(x, delay):
    time.sleep(delay)
    x += 1


def append_digit(x, digit, delay):
    time.sleep(delay)
    x[:] = x * 10 + digit


def stamp(out, delay):
    t0 = time.time()
    time.sleep(delay)
    out[:] = [t0, time.time(), pto.task().chip]


KERNELS = {"fill": fill, "copy": copy, "inc": inc, "append_digit": append_digit, "stamp": stamp}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def run(rt, name, orch, **args):
    rt.register(name, orch=orch, kernels=KERNELS)
    return rt.run(name, args=args)


def test_read_after_write(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((64,), np.float64)
        b = ctx.alloc((64,), np.float64)
        ctx.submit(0, "fill", [Out(a), S(7.0), S(DELAY)])
        ctx.submit(1, "copy", [In(a), Out(b), S(0.0)])
        return b

    b = run(rt4_module, "dep_raw", orch)
    np.testing.assert_array_equal(b.numpy(), np.full(64, 7.0))


def test_write_after_read(rt4_module):
    def orch(ctx, args):
        a = ctx.tensor(args["a"])
        b = ctx.alloc(a.shape, a.dtype)
        ctx.submit(0, "copy", [In(a), Out(b), S(DELAY)])
        ctx.submit(1, "fill", [Out(a), S(9.0), S(0.0)])
        return a, b

    a, b = run(rt4_module, "dep_war", orch, a=np.ones(64))
    np.testing.assert_array_equal(b.numpy(), np.ones(64))  # the reader saw the old bytes
    np.testing.assert_array_equal(a.numpy(), np.full(64, 9.0))


def test_write_after_write(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((64,), np.float64)
        ctx.submit(0, "fill", [Out(a), S(1.0), S(DELAY)])
        ctx.submit(1, "fill", [Out(a), S(2.0), S(0.0)])
        return a

    a = run(rt4_module, "dep_waw", orch)
    np.testing.assert_array_equal(a.numpy(), np.full(64, 2.0))


def test_inout_reads_after_write(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((16,), np.int64)
        ctx.submit(0, "fill", [Out(a), S(5), S(DELAY)])
        ctx.submit(1, "inc", [InOut(a), S(0.0)])
        return a

    a = run(rt4_module, "dep_inout_raw", orch)
    np.testing.assert_array_equal(a.numpy(), np.full(16, 6))  # 1 if inc ran before fill


def test_inout_write_is_seen_by_a_later_reader(rt4_module):
    def orch(ctx, args):
        a = ctx.tensor(args["a"])
        b = ctx.alloc(a.shape, a.dtype)
        ctx.submit(2, "inc", [InOut(a), S(DELAY)])
        ctx.submit(3, "copy", [In(a), Out(b), S(0.0)])
        return b

    b = run(rt4_module, "dep_inout_then_read", orch, a=np.zeros(16, dtype=np.int64))
    np.testing.assert_array_equal(b.numpy(), np.ones(16))


def test_inout_waits_for_an_earlier_reader(rt4_module):
    def orch(ctx, args):
        a = ctx.tensor(args["a"])
        b = ctx.alloc(a.shape, a.dtype)
        ctx.submit(0, "copy", [In(a), Out(b), S(DELAY)])
        ctx.submit(1, "inc", [InOut(a), S(0.0)])
        return a, b

    a, b = run(rt4_module, "dep_inout_war", orch, a=np.full(16, 3, dtype=np.int64))
    np.testing.assert_array_equal(b.numpy(), np.full(16, 3))
    np.testing.assert_array_equal(a.numpy(), np.full(16, 4))


def test_inout_waits_for_an_earlier_writer_and_a_later_writer_waits_for_it(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((16,), np.int64)
        ctx.submit(0, "fill", [Out(a), S(4), S(DELAY)])
        ctx.submit(1, "inc", [InOut(a), S(DELAY)])
        ctx.submit(2, "fill", [Out(a), S(100), S(0.0)])
        return a

    a = run(rt4_module, "dep_inout_waw", orch)
    np.testing.assert_array_equal(a.numpy(), np.full(16, 100))  # 5 or 101 means misordering


def test_inout_chain_across_all_chips_keeps_program_order(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((4,), np.int64)
        for i, chip in enumerate([3, 1, 0, 2, 1, 3]):
            # earlier tasks sleep longer: any reordering shows up in the digits
            ctx.submit(chip, "append_digit", [InOut(a), S(i + 1), S(0.05 * (6 - i))])
        return a

    a = run(rt4_module, "dep_chain", orch)
    np.testing.assert_array_equal(a.numpy(), np.full(4, 123456))


def test_diamond(rt4_module):
    def orch(ctx, args):
        src = ctx.alloc((8,), np.float64)
        left = ctx.alloc((8,), np.float64)
        right = ctx.alloc((8,), np.float64)
        ctx.submit(0, "fill", [Out(src), S(3.0), S(DELAY)])
        ctx.submit(1, "copy", [In(src), Out(left), S(DELAY)])
        ctx.submit(2, "copy", [In(src), Out(right), S(0.0)])
        ctx.submit(3, "inc", [InOut(left), S(0.0)])
        ctx.submit(0, "copy", [In(left), Out(src), S(0.0)])  # WAR on src after both readers
        return src, left, right

    src, left, right = run(rt4_module, "dep_diamond", orch)
    np.testing.assert_array_equal(right.numpy(), np.full(8, 3.0))
    np.testing.assert_array_equal(left.numpy(), np.full(8, 4.0))
    np.testing.assert_array_equal(src.numpy(), np.full(8, 4.0))


def test_independent_tasks_run_in_parallel_on_different_chips(rt4_module):
    def orch(ctx, args):
        outs = []
        for chip in ctx.peers():
            o = ctx.alloc((3,), np.float64)
            ctx.submit(chip, "stamp", [Out(o), S(0.5)])
            outs.append(o)
        return outs

    rt4_module.register("dep_parallel", orch=orch, kernels=KERNELS)
    rt4_module.run("dep_parallel", args={})  # warm-up: kernels shipped, workers hot
    t0 = time.monotonic()
    outs = rt4_module.run("dep_parallel", args={})
    wall = time.monotonic() - t0
    stamps = np.array([o.numpy() for o in outs])
    assert sorted(stamps[:, 2].tolist()) == [0.0, 1.0, 2.0, 3.0]
    starts, ends = stamps[:, 0], stamps[:, 1]
    assert starts.max() < ends.min(), f"tasks did not overlap: {stamps.tolist()}"
    assert wall < 1.6, f"4 x 0.5 s on 4 chips took {wall:.2f} s"


def test_tasks_on_one_chip_with_no_hazard_all_run(rt4_module):
    def orch(ctx, args):
        outs = []
        for i in range(16):
            o = ctx.alloc((2,), np.int64)
            ctx.submit(i % 2, "fill", [Out(o), S(i), S(0.0)])
            outs.append(o)
        return outs

    outs = run(rt4_module, "dep_many", orch)
    assert [o.numpy().tolist() for o in outs] == [[i, i] for i in range(16)]
