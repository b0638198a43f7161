"""A failing kernel: TaskError names it, dependents fail, independent tasks finish."""

from __future__ import annotations

import time

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)

MESSAGE = "kaboom-7f3a: the kernel gave up"


def boom(out):
    raise RuntimeError(MESSAGE)


def boom_after(out, delay):
    time.sleep(delay)
    raise RuntimeError(MESSAGE)


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def copy(src, dst):
    dst[:] = src


def mark(src, dst, value):
    dst[:] = value  # writes whatever its input holds: shows whether it ran at all


KERNELS = {"boom": boom, "boom_after": boom_after, "fill": fill, "copy": copy, "mark": mark}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def make_targets(ctx, args):
    return [ctx.alloc((8,), np.float64) for _ in range(args["n"])]


def test_raising_kernel_raises_task_error_naming_kernel_chip_and_message(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        ctx.submit(2, "boom", [Out(a)])
        return a

    rt4_module.register("fail_simple", orch=orch, kernels=KERNELS)
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("fail_simple", args={})
    err = ei.value
    assert isinstance(err, pto.PtoError)
    msg = str(err)
    assert "boom" in msg
    assert "chip 2" in msg
    assert "kaboom-7f3a" in msg
    assert err.kernel == "boom"
    assert err.chip == 2
    assert "kaboom-7f3a" in err.reason


def test_dependents_fail_independent_tasks_finish(rt4_module):
    rt4_module.register("fail_targets", orch=make_targets, kernels=KERNELS)
    dep1, dep2, indep, indep_after = rt4_module.run("fail_targets", args={"n": 4})

    def orch(ctx, args):
        dep1, dep2, indep, indep_after = args["t"]
        a = ctx.alloc((8,), np.float64)
        ctx.submit(0, "boom_after", [Out(a), S(0.1)])
        ctx.submit(1, "mark", [In(a), Out(dep1), S(5.0)])  # depends on the failure
        ctx.submit(2, "mark", [In(dep1), Out(dep2), S(6.0)])  # depends on a dependent
        ctx.submit(3, "fill", [Out(indep), S(7.0), S(0.6)])  # independent, finishes late
        ctx.submit(0, "fill", [Out(indep_after), S(8.0), S(0.0)])  # same chip, after the failure
        return a

    rt4_module.register("fail_graph", orch=orch, kernels=KERNELS)
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("fail_graph", args={"t": (dep1, dep2, indep, indep_after)})
    err = ei.value
    # the error names the first failure, not a dependent
    assert err.kernel == "boom_after"
    assert err.chip == 0
    assert "kaboom-7f3a" in str(err)
    # dependents did not run
    np.testing.assert_array_equal(dep1.numpy(), np.zeros(8))
    np.testing.assert_array_equal(dep2.numpy(), np.zeros(8))
    # independent tasks finished before run() raised
    np.testing.assert_array_equal(indep.numpy(), np.full(8, 7.0))
    np.testing.assert_array_equal(indep_after.numpy(), np.full(8, 8.0))


def test_runtime_works_after_a_failure(rt4_module):
    def bad(ctx, args):
        a = ctx.alloc((8,), np.float64)
        for chip in ctx.peers():
            ctx.submit(chip, "boom", [Out(a)])
        return a

    def good(ctx, args):
        outs = []
        for chip in ctx.peers():
            o = ctx.alloc((8,), np.float64)
            ctx.submit(chip, "fill", [Out(o), S(float(chip)), S(0.0)])
            outs.append(o)
        return outs

    rt4_module.register("fail_bad", orch=bad, kernels=KERNELS)
    rt4_module.register("fail_good", orch=good, kernels=KERNELS)
    for _ in range(3):
        with pytest.raises(pto.TaskError):
            rt4_module.run("fail_bad", args={})
        outs = rt4_module.run("fail_good", args={})
        for chip, o in enumerate(outs):
            np.testing.assert_array_equal(o.numpy(), np.full(8, float(chip)))


def test_failure_in_one_run_does_not_poison_handles_of_the_next(rt1_module):
    """A handle written by a failed task's dependents is usable again in a later run."""

    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        ctx.submit(0, "boom", [Out(a)])
        ctx.submit(0, "copy", [In(a), Out(args["t"])])
        return a

    def refill(ctx, args):
        ctx.submit(0, "fill", [Out(args["t"]), S(3.0), S(0.0)])
        return args["t"]

    rt1_module.register("fail_t", orch=make_targets, kernels=KERNELS)
    rt1_module.register("fail_poison", orch=orch, kernels=KERNELS)
    rt1_module.register("fail_refill", orch=refill, kernels=KERNELS)
    (t,) = rt1_module.run("fail_t", args={"n": 1})
    with pytest.raises(pto.TaskError):
        rt1_module.run("fail_poison", args={"t": t})
    t2 = rt1_module.run("fail_refill", args={"t": t})
    assert t2 is t or t2.name == t.name
    np.testing.assert_array_equal(t.numpy(), np.full(8, 3.0))
