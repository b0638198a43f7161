"""Host sub-tasks (issue 4): ``ctx.submit_host(fn, args)`` runs a Python callable as a node
of the graph, in a host worker process of the broker (not in the client), with the same
tensor arguments, dependencies and failure rules as a kernel on a chip."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)

MESSAGE = "host-kaboom-93be"


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def scale(x, y, k):
    y[:] = x * k


def copy(src, dst):
    dst[:] = src


KERNELS = {"fill": fill, "scale": scale, "copy": copy}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


# host functions: module level, they travel by value like kernels


def host_plus_one(x, y, delay):
    time.sleep(delay)
    y[:] = x + 1


def host_where(info):
    t = pto.task()
    info[:] = [t.chip, t.rank, t.world, os.getpid()]


def host_fail(x, y):
    raise RuntimeError(MESSAGE)


def host_accumulate(x, acc):
    acc += x


def test_chip_host_chip_chain(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((16,), np.float64)
        b = ctx.alloc((16,), np.float64)
        c = ctx.alloc((16,), np.float64)
        ctx.submit(0, "fill", [Out(a), S(2.0), S(0.3)])  # the host task must wait for it
        ctx.submit_host(host_plus_one, [In(a), Out(b), S(0.3)])  # and chip 1 for this one
        ctx.submit(1, "scale", [In(b), Out(c), S(10.0)])
        return a, b, c

    rt4_module.register("host_chain", orch=orch, kernels=KERNELS)
    a, b, c = rt4_module.run("host_chain", args={})
    np.testing.assert_array_equal(a.numpy(), np.full(16, 2.0))
    np.testing.assert_array_equal(b.numpy(), np.full(16, 3.0))
    np.testing.assert_array_equal(c.numpy(), np.full(16, 30.0))


def test_host_tasks_follow_inout_and_war_hazards(rt4_module):
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        acc = ctx.alloc(x.shape, x.dtype)
        snapshot = ctx.alloc(x.shape, x.dtype)
        for i in range(4):
            ctx.submit(i, "fill", [Out(x), S(float(i + 1)), S(0.05)])  # WAR after host read
            ctx.submit_host(host_accumulate, [In(x), InOut(acc)])
        ctx.submit(2, "copy", [In(acc), Out(snapshot)])
        return snapshot

    rt4_module.register("host_hazards", orch=orch, kernels=KERNELS)
    snapshot = rt4_module.run("host_hazards", args={"x": np.zeros(8)})
    np.testing.assert_array_equal(snapshot.numpy(), np.full(8, 1 + 2 + 3 + 4))


def test_host_task_identity_runs_outside_the_client(rt4_module):
    def orch(ctx, args):
        info = ctx.alloc((4,), np.int64)
        ctx.submit_host(host_where, [Out(info)])
        return info

    rt4_module.register("host_where", orch=orch, kernels=KERNELS)
    chip, rank, world, pid = rt4_module.run("host_where", args={}).numpy().tolist()
    assert chip < 0
    assert (rank, world) == (0, 1)
    assert pid != os.getpid(), "the host task ran in the client process"


def test_a_raising_host_task_poisons_its_dependents(rt4_module):
    rt4_module.register("host_targets", orch=lambda ctx, args: [ctx.alloc((8,), np.float64)
                                                         for _ in range(3)], kernels={})
    dep1, dep2, indep = rt4_module.run("host_targets", args={})

    def orch(ctx, args):  # (handles come as args: a closure would keep them registered)
        dep1, dep2, indep = args
        x = ctx.tensor(np.ones(8))
        y = ctx.alloc((8,), np.float64)
        ctx.submit_host(host_fail, [In(x), Out(y)])
        ctx.submit(0, "scale", [In(y), Out(dep1), S(5.0)])  # depends on the failure
        ctx.submit_host(host_plus_one, [In(dep1), Out(dep2), S(0.0)])  # and on a dependent
        ctx.submit(1, "fill", [Out(indep), S(7.0), S(0.3)])  # independent: finishes
        return y

    rt4_module.register("host_fail", orch=orch, kernels=KERNELS)
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("host_fail", args=(dep1, dep2, indep))
    err = ei.value
    assert MESSAGE in err.reason
    assert "host_fail" in err.kernel
    assert err.chip < 0
    np.testing.assert_array_equal(dep1.numpy(), np.zeros(8))  # never ran
    np.testing.assert_array_equal(dep2.numpy(), np.zeros(8))
    np.testing.assert_array_equal(indep.numpy(), np.full(8, 7.0))

    # the runtime (and the host worker) still work
    def again(ctx, args):
        a = ctx.tensor(np.arange(4.0))
        b = ctx.alloc((4,), np.float64)
        ctx.submit_host(host_plus_one, [In(a), Out(b), S(0.0)])
        return b

    rt4_module.register("host_again", orch=again, kernels=KERNELS)
    np.testing.assert_array_equal(rt4_module.run("host_again", args={}).numpy(),
                                  np.arange(4.0) + 1)


def test_submit_host_needs_a_callable(rt4_module):
    def orch(ctx, args):
        x = ctx.alloc((4,), np.float64)
        ctx.submit_host(args["fn"], [Out(x)])
        return x

    rt4_module.register("host_noncallable", orch=orch, kernels=KERNELS)
    for fn in ("host_plus_one", None, 42):
        with pytest.raises(TypeError):
            rt4_module.run("host_noncallable", args={"fn": fn})
