"""Successors on other chips sent early: a task whose predecessors are dispatched goes to
its own worker at once and waits there for their outcomes (no broker round trip per
cross-chip edge). These tests check answers and order, failures, and kill -9 of the
predecessor's worker, of the waiting worker and of the client mid-chain: never a hang,
never a successor run on stale input, nothing left behind (the leak check after each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pto

from ._util import REPO, children, read_line, stop_process, wait_until

pytestmark = pytest.mark.timeout(90)

In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def append_digit(x, digit):
    x[:] = x * 10 + digit


def add(a, b, out):
    out[:] = a + b


def marked_plus_one(marks: str):
    """dst = src + 1, leaving a mark ``<step>-<pid>``; step ``fail_at`` raises instead, and
    step ``block_at`` first waits for the file ``release`` in ``marks``."""

    def plus_one(src, dst, step, fail_at, block_at):
        open(os.path.join(marks, f"{int(step)}-{os.getpid()}"), "w").close()
        if step == fail_at:
            raise ValueError(f"step {int(step)} refuses")
        if step == block_at:
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(marks, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError("never released")
                time.sleep(0.01)
        dst[:] = src + 1

    return plus_one


def chain_orch(ctx, args):
    """``steps`` steps of dst = src + 1, step i on chip ``chips[i % len(chips)]``."""
    x = ctx.tensor(np.zeros(1, np.int64))
    chips = args["chips"]
    for step in range(args["steps"]):
        y = ctx.alloc(1, np.int64)
        ctx.submit(chips[step % len(chips)], "plus_one",
                   [In(x), Out(y), S(step), S(args.get("fail_at", -1)),
                    S(args.get("block_at", -1))])
        x = y
    return x


def steps_run(marks: str) -> list[int]:
    return sorted(int(m.split("-")[0]) for m in os.listdir(marks) if m[0].isdigit())


def pid_of_step(marks: str, step: int) -> int:
    (mark,) = [m for m in os.listdir(marks) if m.startswith(f"{step}-")]
    return int(mark.split("-")[1])


@pytest.fixture
def marks(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    return str(d)


def test_chains_hopping_between_chips_keep_their_order(rt4_module):
    hops = [0, 1, 0, 2, 3, 1, 2, 0, 3]

    def orch(ctx, args):
        x = ctx.alloc(1, np.int64)
        for digit, chip in enumerate(hops, start=1):
            ctx.submit(chip, "append_digit", [InOut(x), S(digit)])
        return x

    rt4_module.register("hops", orch=orch, kernels={"append_digit": append_digit})
    for _ in range(10):
        x = rt4_module.run("hops")
        assert int(x.numpy()[0]) == 123456789
        x.free()


def test_fan_out_and_fan_in_across_chips(rt4_module):
    def orch(ctx, args):
        x = ctx.tensor(np.arange(8.0))
        y, z, w = (ctx.alloc(8, np.float64) for _ in range(3))
        ctx.submit(1, "add", [In(x), In(x), Out(y)])  # 2x, on chip 1
        ctx.submit(2, "add", [In(x), In(y), Out(z)])  # 3x, waits for chip 1
        ctx.submit(3, "add", [In(y), In(z), Out(w)])  # 5x, waits for chips 1 and 2
        ctx.submit(0, "add", [In(w), In(w), Out(x)])  # 10x, and overwrites x (after all)
        return x

    rt4_module.register("fan", orch=orch, kernels={"add": add})
    for _ in range(5):
        x = rt4_module.run("fan")
        np.testing.assert_array_equal(x.numpy(), np.arange(8.0) * 10)
        x.free()


def test_a_failure_mid_chain_skips_every_later_step_on_every_chip(rt4_module, marks):
    rt4_module.register("chain", orch=chain_orch, kernels={"plus_one": marked_plus_one(marks)})
    with pytest.raises(pto.TaskError) as info:
        rt4_module.run("chain", {"steps": 10, "chips": [0, 1], "fail_at": 4})
    assert info.value.kernel == "plus_one" and info.value.chip == 0
    assert "step 4 refuses" in info.value.reason
    assert info.value.failed == 6  # the failed step and the five after it
    assert steps_run(marks) == [0, 1, 2, 3, 4]
    x = rt4_module.run("chain", {"steps": 6, "chips": [1, 0]})  # the chips still serve
    assert int(x.numpy()[0]) == 6


@pytest.mark.slow
def test_killing_the_predecessors_worker_releases_the_waiting_chain(rt4, marks):
    """Step 3 (chip 1) blocks; step 4 already waits for it on chip 0. kill -9 of chip 1's
    worker: the chain ends in WorkerLost (step 4 was sent naming the dead run of step 3),
    the later steps never run, and both chips serve the next run."""
    rt4.register("chain", orch=chain_orch, kernels={"plus_one": marked_plus_one(marks)})
    future = rt4.submit("chain", {"steps": 8, "chips": [0, 1], "block_at": 3})
    assert wait_until(lambda: 3 in steps_run(marks), timeout=20), "step 3 never started"
    pid = pid_of_step(marks, 3)
    assert pid in {p.pid for p in children()}
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(pto.WorkerLost) as info:
        future.result(timeout=30)
    assert "chip 1" in str(info.value) and "SIGKILL" in str(info.value)
    assert steps_run(marks) == [0, 1, 2, 3], "a step after the killed one ran"
    open(os.path.join(marks, "release"), "w").close()
    x = rt4.run("chain", {"steps": 6, "chips": [0, 1]}, timeout=30)
    assert int(x.numpy()[0]) == 6


@pytest.mark.parametrize("steps", [2, 3])
def test_killing_the_waiting_worker_reruns_or_fails_never_runs_stale(broker, marks, steps):
    """Step 0 (chip 0) blocks; step 1 waits for it on chip 1. kill -9 of chip 1's worker
    while it waits: step 1 had not started, so it goes to chip 1's new worker, unless a
    later step (on chip 0) already waits for it there (steps=3): then WorkerLost."""
    with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
        _kill_the_waiting_worker(rt, broker.address, marks, steps)


def _kill_the_waiting_worker(rt, address, marks, steps):
    rt.register("chain", orch=chain_orch, kernels={"plus_one": marked_plus_one(marks)})
    warm = rt.run("chain", {"steps": 2, "chips": [1, 1]})  # learn chip 1's worker's pid
    warm.free()
    waiting_pid = pid_of_step(marks, 0)
    for m in os.listdir(marks):
        os.unlink(os.path.join(marks, m))
    future = rt.submit("chain", {"steps": steps, "chips": [0, 1], "block_at": 0})
    assert wait_until(lambda: 0 in steps_run(marks), timeout=20), "step 0 never started"
    assert waiting_pid in {p.pid for p in children()}
    os.kill(waiting_pid, signal.SIGKILL)
    def chip1_restarted() -> bool:  # the broker saw the death while step 0 still blocks
        pids = [w["pid"] for w in pto.status(address)["workers"] if w["chip"] == 1]
        return bool(pids) and pids[0] != waiting_pid

    assert wait_until(chip1_restarted, timeout=15)
    open(os.path.join(marks, "release"), "w").close()
    if steps == 2:
        x = future.result(timeout=30)
        assert int(x.numpy()[0]) == 2
        assert pid_of_step(marks, 1) != waiting_pid
    else:
        try:
            x = future.result(timeout=30)
        except pto.WorkerLost as exc:
            assert "chip 1" in str(exc)
            assert 2 not in steps_run(marks)
        else:
            assert int(x.numpy()[0]) == 3
    x = rt.run("chain", {"steps": 4, "chips": [1, 0]}, timeout=30)
    assert int(x.numpy()[0]) == 4


DOOMED_CLIENT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import pto
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from integration.test_cross_chip_chains import chain_orch, marked_plus_one

    marks = sys.argv[1]
    rt = pto.Runtime(level="host", platform="sim")
    rt.register("chain", orch=chain_orch, kernels={"plus_one": marked_plus_one(marks)})
    rt.submit("chain", {"steps": 40, "chips": [0, 1], "block_at": 2})
    print(os.getpid(), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_killing_the_client_mid_chain_drops_its_waiting_tasks(broker, marks):
    env = dict(os.environ, PTO_BROKER=broker.address)
    proc = subprocess.Popen([sys.executable, "-c", DOOMED_CLIENT, marks], cwd=REPO, env=env,
                            stdout=subprocess.PIPE)
    try:
        assert int(read_line(proc, timeout=40)) == proc.pid
        assert wait_until(lambda: 2 in steps_run(marks), timeout=20), "step 2 never started"
        proc.kill()
        proc.wait(10)
        # Once the broker has seen the death, chip 1's worker drops what it holds of the
        # dead client (the steps waiting there); chip 0's is still running step 2.
        def chip1_holds_nothing() -> bool:
            (chip1,) = [w for w in pto.status(broker.address)["workers"] if w["chip"] == 1]
            return chip1["inflight"] == 0

        assert wait_until(chip1_holds_nothing, timeout=10)
        open(os.path.join(marks, "release"), "w").close()
        with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
            other = os.path.join(marks, "other")
            os.mkdir(other)
            rt.register("chain", orch=chain_orch, kernels={"plus_one": marked_plus_one(other)})
            x = rt.run("chain", {"steps": 6, "chips": [1, 0]}, timeout=30)
            assert int(x.numpy()[0]) == 6
            assert steps_run(marks) == [0, 1, 2], "a dead client's waiting step ran"
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()
    assert broker.proc.poll() is None
