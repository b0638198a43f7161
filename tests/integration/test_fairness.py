"""Fairness between the clients of one broker: a small client's task is not queued behind
another client's flood (issue 14). Checked on order only: the small task runs before the
flood's last task, never against a clock."""

from __future__ import annotations

import numpy as np
import pytest

import pto

from ._util import wait_until

pytestmark = pytest.mark.timeout(180)

FLOOD_TASKS = 20_000


def gate(opened):
    """Holds the chip's worker until the test opens it (so the whole flood is queued
    before the small client's task arrives); bounded, never a hang."""
    import time

    deadline = time.monotonic() + 60
    while not opened[0]:
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.001)


def count():
    import sys

    sys.pto_test_flood_ran = getattr(sys, "pto_test_flood_ran", 0) + 1


def seen(out):
    import sys

    out[0] = getattr(sys, "pto_test_flood_ran", 0)  # flood tasks this worker ran before us


def alloc_flag(ctx, args):
    return ctx.alloc((1,), np.int64)


def flood(ctx, args):
    ctx.submit(0, "gate", [pto.Arg.input(args["gate"])])
    for _ in range(args["n"]):
        ctx.submit(0, "count", [])


def small(ctx, args):
    out = ctx.alloc((1,), np.int64)
    ctx.submit(0, "seen", [pto.Arg.output(out)])
    return out


def _queued_tasks(address: str) -> int:
    return sum(c["tasks"] for c in pto.status(address)["clients"])


@pytest.mark.slow
def test_a_small_clients_task_runs_while_another_clients_flood_is_in_progress():
    with pto.Runtime(level="host", devices=[0]) as rt:
        with pto.Runtime(level="host", broker=rt.address, devices=[0]) as flooder:
            flooder.register("alloc", orch=alloc_flag)
            flooder.register("flood", orch=flood, kernels={"gate": gate, "count": count})
            rt.register("small", orch=small, kernels={"seen": seen})
            opened = flooder.run("alloc")
            flag = opened.numpy()
            try:
                flood_run = flooder.submit("flood", {"gate": opened, "n": FLOOD_TASKS})
                # The whole flood is in the broker, held behind the gate on chip 0.
                assert wait_until(lambda: _queued_tasks(rt.address) == FLOOD_TASKS + 1, 30)
                small_run = rt.submit("small")
                assert wait_until(lambda: _queued_tasks(rt.address) == FLOOD_TASKS + 2, 30)
                flag[0] = 1
                out = small_run.result(timeout=60)
                ran_before = int(out.numpy()[0])
                out.free()
                flood_run.result(timeout=120)
            finally:
                flag[0] = 1  # never leave the worker at the gate
                del flag
            opened.free()
    # First come first served would have run every flood task before ours.
    assert ran_before < FLOOD_TASKS // 2, (
        f"the small client's task ran after {ran_before:,} of {FLOOD_TASKS:,} flood tasks")
