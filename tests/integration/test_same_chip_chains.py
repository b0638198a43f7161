"""Successors on the chip of their predecessor: the broker queues them right behind it, the
worker runs them in order and skips them if the predecessor failed (no broker round trip
per task). These tests check the answers, the order, the failures and a worker death.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import pto

from ._util import children, wait_until

pytestmark = pytest.mark.timeout(60)

In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def append_digit(x, digit):
    x[:] = x * 10 + digit


def stepper(marks: str):
    """x += 1, leaving a mark ``<i>-<pid>``; step ``fail_at`` raises instead."""

    def step(x, i, fail_at):
        open(os.path.join(marks, f"{int(i)}-{os.getpid()}"), "w").close()
        if i == fail_at:
            raise ValueError(f"step {int(i)} refuses")
        x += 1

    return step


def plus_one_hanging_at(marks: str):
    """dst = src + 1; the step from ``hang_at`` hangs on its first attempt (to be killed)."""

    def plus_one(src, dst, hang_at):
        if src[0] == hang_at:
            first = not os.listdir(marks)
            open(os.path.join(marks, f"{len(os.listdir(marks))}-{os.getpid()}"), "w").close()
            if first:
                time.sleep(60)
        dst[:] = src + 1

    return plus_one


def hang_once_with(marks: str):
    def hang_once():
        if not os.listdir(marks):
            open(os.path.join(marks, f"0-{os.getpid()}"), "w").close()
            time.sleep(60)

    return hang_once


KERNELS = {"append_digit": append_digit}


def test_a_chain_on_one_chip_runs_in_submission_order(rt4_module):
    def orch(ctx, args):
        x = ctx.alloc(1, np.int64)
        for digit in range(1, 10):
            ctx.submit(2, "append_digit", [InOut(x), S(digit)])
        return x

    rt4_module.register("chain_order", orch=orch, kernels=KERNELS)
    x = rt4_module.run("chain_order")
    assert int(x.numpy()[0]) == 123456789


def test_a_chain_that_changes_chips_keeps_its_order(rt4_module):
    chips = [0, 0, 1, 1, 1, 0, 2, 2, 0]

    def orch(ctx, args):
        x = ctx.alloc(1, np.int64)
        for digit, chip in enumerate(chips, start=1):
            ctx.submit(chip, "append_digit", [InOut(x), S(digit)])
        return x

    rt4_module.register("chain_hops", orch=orch, kernels=KERNELS)
    for _ in range(5):
        x = rt4_module.run("chain_hops")
        assert int(x.numpy()[0]) == 123456789
        x.free()


def test_a_failed_task_skips_the_tasks_queued_behind_it(rt4_module, tmp_path):
    marks = str(tmp_path)

    def orch(ctx, args):
        x = ctx.alloc(1, np.int64)
        for i in range(10):
            ctx.submit(1, "step", [InOut(x), S(i), S(4)])
        return x

    rt4_module.register("chain_fail", orch=orch, kernels={"step": stepper(marks)})
    with pytest.raises(pto.TaskError) as info:
        rt4_module.run("chain_fail")
    assert info.value.kernel == "step" and info.value.chip == 1
    assert "step 4 refuses" in info.value.reason
    assert info.value.failed == 6  # the failed one and the five behind it
    ran = sorted(int(m.split("-")[0]) for m in os.listdir(marks))
    assert ran == [0, 1, 2, 3, 4], f"tasks behind the failure ran: {ran}"


def test_an_unrelated_task_behind_a_failure_still_runs(rt4_module, tmp_path):
    marks = str(tmp_path)

    def failing(ctx, args):
        x = ctx.alloc(1, np.int64)
        for i in range(3):
            ctx.submit(3, "step", [InOut(x), S(i), S(0)])

    def independent(ctx, args):
        y = ctx.alloc(1, np.int64)
        ctx.submit(3, "append_digit", [InOut(y), S(7)])
        return y

    rt4_module.register("chain_failing", orch=failing, kernels={"step": stepper(marks)})
    rt4_module.register("chain_independent", orch=independent, kernels=KERNELS)
    bad = rt4_module.submit("chain_failing")
    good = rt4_module.submit("chain_independent")
    assert int(good.result(timeout=20).numpy()[0]) == 7
    # exception(), not result(): a TaskError raised here would hold this frame (and through
    # it ``good`` and its tensor) in a reference cycle until a later garbage collection
    err = bad.exception(timeout=20)
    assert isinstance(err, pto.TaskError) and "step 0 refuses" in str(err), repr(err)
    assert sorted(os.listdir(marks))[0].startswith("0-") and len(os.listdir(marks)) == 1


@pytest.mark.slow
def test_a_worker_killed_mid_chain_reruns_the_rest_in_order(rt4, tmp_path):
    """Input/output steps are idempotent: after kill -9, the started step reruns and the
    steps queued behind it follow it on the chip's new worker."""
    marks = str(tmp_path)
    steps = 8

    def orch(ctx, args):
        x = ctx.tensor(np.zeros(1, np.int64))
        for _ in range(steps):
            y = ctx.alloc(1, np.int64)
            ctx.submit(2, "plus_one", [In(x), Out(y), S(3)])
            x = y
        return x

    rt4.register("chain_kill", orch=orch, kernels={"plus_one": plus_one_hanging_at(marks)})
    future = rt4.submit("chain_kill")
    assert wait_until(lambda: os.listdir(marks), timeout=20), "step 3 never started"
    pid = int(os.listdir(marks)[0].split("-")[1])
    assert pid in {p.pid for p in children()}
    os.kill(pid, signal.SIGKILL)
    x = future.result(timeout=30)
    assert int(x.numpy()[0]) == steps
    pids = {int(m.split("-")[1]) for m in os.listdir(marks)}
    assert len(pids) == 2 and pid in pids, os.listdir(marks)


def double(x, y):
    y[:] = x * 2


def overwrite(src, dst):
    dst[:] = src


@pytest.mark.slow
def test_a_task_whose_input_a_later_task_overwrote_is_not_rerun_after_a_kill(rt4, tmp_path):
    """y = 2x ran, then x was overwritten (queued behind it on one worker), then the worker
    died before reporting: rerunning y = 2x would read the new x. It must end in WorkerLost
    or, if its result was reported in time, keep y = 2 * old x."""
    marks = str(tmp_path)

    def orch(ctx, args):
        x = ctx.tensor(np.full(4, 3.0))
        z = ctx.tensor(np.full(4, 50.0))
        y, w = ctx.alloc(4, np.float64), ctx.alloc(4, np.float64)
        # The first task after an idle spell is reported at once; those right behind it
        # are reported together a little later (after the kill, here).
        ctx.submit(1, "double", [In(z), Out(w)])
        ctx.submit(1, "double", [In(x), Out(y)])
        ctx.submit(1, "overwrite", [In(z), Out(x)])  # waits for the read of x: queued behind
        ctx.submit(1, "hang_once", [])
        return y

    rt4.register("chain_war", orch=orch,
                 kernels={"double": double, "overwrite": overwrite,
                          "hang_once": hang_once_with(marks)})
    future = rt4.submit("chain_war")
    assert wait_until(lambda: os.listdir(marks), timeout=20), "the hanging task never started"
    pid = int(os.listdir(marks)[0].split("-")[1])
    assert pid in {p.pid for p in children()}
    os.kill(pid, signal.SIGKILL)
    try:
        y = future.result(timeout=30)
    except pto.WorkerLost:
        return
    np.testing.assert_array_equal(y.numpy(), np.full(4, 6.0))
