"""The client's short paths for one run (issue 14, item 2): a future's ``cancel()`` drops
its tasks by itself (no done-callback per run), a waiter takes the result socket in the
turn it registers, ``send_tasks`` is woken for room only when it waits for it. Each test
checks what the user sees: values, where callbacks run, what a cancel leaves behind."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time

import numpy as np
import pytest

import pto

from ._util import children, shm_path, wait_gone

pytestmark = pytest.mark.timeout(120)

In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def nap(out, seconds):
    time.sleep(seconds)
    out[:] = 1


def mark(out, value):
    out[:] = value


def mark_after(gate, out, value):
    out[:] = value


KERNELS = {"nap": nap, "mark": mark, "mark_after": mark_after}


def napping(ctx, seconds):
    y = ctx.alloc(1, np.int64)
    ctx.submit(0, "nap", [Out(y), S(seconds)])
    return y


def marking(ctx, args):
    chip, out, value = args
    ctx.submit(chip, "mark", [Out(out), S(value)])


def gated(ctx, args):
    """A 3 s task on chip 0, then one on chip 1 that writes 7 into ``target`` after it."""
    gate = ctx.alloc(1, np.int64)
    ctx.submit(0, "nap", [Out(gate), S(3.0)])
    ctx.submit(1, "mark_after", [In(gate), Out(args), S(7)])


def many_marks(ctx, out):
    for i in range(len(out)):
        ctx.submit(ctx.peers()[i % len(ctx.peers())], "mark", [Out(out[i]), S(i)])


@pytest.fixture
def rt(monkeypatch):
    monkeypatch.delenv("PTO_BROKER", raising=False)
    runtime = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    for name, orch in (("nap", napping), ("mark", marking), ("gated", gated),
                       ("many", many_marks)):
        runtime.register(name, orch=orch, kernels=KERNELS)
    runtime.register("ones", orch=lambda ctx, n: [ctx.tensor(np.full(1, -1, np.int64))
                                                  for _ in range(n)])
    try:
        yield runtime
    finally:
        runtime.close()


@pytest.mark.slow
def test_run_past_its_timeout_drops_its_tasks_not_started(rt):
    [target, probe] = rt.run("ones", 2)
    with pytest.raises(TimeoutError):
        rt.run("gated", target, timeout=0.3)
    # Chip 0 runs in order: this ends after the 3 s task. Its successor on chip 1 would
    # then have gone to chip 1 before this second mark, which chip 1 runs after it.
    rt.run("mark", (0, probe, 1))
    rt.run("mark", (1, probe, 2))
    assert int(probe.numpy()[0]) == 2
    assert int(target.numpy()[0]) == -1, "a task of the timed-out run ran"


@pytest.mark.slow
def test_a_timed_out_run_that_ends_later_frees_what_it_returned(rt):
    names: list[str] = []

    def napping_named(ctx, seconds):
        y = napping(ctx, seconds)
        names.append(y.name)
        return y

    rt.register("nap_named", orch=napping_named, kernels=KERNELS)
    with pytest.raises(TimeoutError):
        rt.run("nap_named", 2.0, timeout=0.3)  # the started task runs on to its end
    assert len(names) == 1
    assert wait_gone([shm_path(names[0])], timeout=30) == [], (
        "nobody can get the value of a run whose rt.run gave up: its tensors must go")
    assert int(rt.run("nap", 0.0).numpy()[0]) == 1


def test_rt_run_raises_what_the_orchestration_raised(rt):
    class Mine(Exception):
        pass

    def failing(ctx, args):
        napping(ctx, 0.0)
        raise Mine("after one task")

    rt.register("failing", orch=failing, kernels=KERNELS)
    with pytest.raises(Mine, match="after one task"):
        rt.run("failing")
    with pytest.raises(Mine):
        rt.submit("failing").result(timeout=30)


def test_cancel_twice_drops_the_tasks_and_the_runtime_serves_on(rt):
    [target, probe] = rt.run("ones", 2)
    f = rt.submit("gated", target)
    assert f.cancel() is True
    assert f.cancel() is True  # already cancelled: still True, as for any Future
    assert f.cancelled()
    with pytest.raises(cf.CancelledError):
        f.result(timeout=10)
    rt.run("mark", (0, probe, 3))  # as in the timeout test: chip 1's queue is past it
    rt.run("mark", (1, probe, 5))
    assert int(probe.numpy()[0]) == 5
    assert int(target.numpy()[0]) == -1, "a task of the cancelled run ran"


def test_cancel_after_the_end_changes_nothing(rt):
    f = rt.submit("nap", 0.0)
    y = f.result(timeout=30)
    assert f.cancel() is False
    assert not f.cancelled()
    assert f.result() is y and int(y.numpy()[0]) == 1


def test_cancel_once_the_broker_is_gone_does_not_raise(rt):
    f = rt.submit("nap", 30.0)
    broker = next(p for p in children() if "broker" in " ".join(p.cmdline()))
    os.kill(broker.pid, signal.SIGKILL)
    broker.wait(10)
    cancelled = f.cancel()
    if cancelled:
        assert f.cancelled()
    else:  # the loss ended the run first
        assert isinstance(f.exception(timeout=10), pto.BrokerLost)


def test_callbacks_of_a_waited_future_run_once_and_never_on_the_io_thread(rt):
    ran: list[str] = []
    f = rt.submit("nap", 0.2)
    f.add_done_callback(lambda fut: ran.append(threading.current_thread().name))
    y = f.result(timeout=30)
    assert int(y.numpy()[0]) == 1
    # The waiter resolves it (or the completion thread, had the run ended before result()).
    assert len(ran) == 1 and ran[0] in (threading.current_thread().name, "pto-done"), ran
    late: list[threading.Thread] = []
    f.add_done_callback(lambda fut: late.append(threading.current_thread()))
    assert late == [threading.current_thread()], "a callback added after the end runs at once"


def test_result_from_eight_threads_at_once(rt):
    f = rt.submit("nap", 0.3)
    start = threading.Barrier(8)
    callbacks: list[str] = []

    def wait() -> object:
        f.add_done_callback(lambda fut: callbacks.append(threading.current_thread().name))
        start.wait(10)
        return f.result(timeout=30)

    with cf.ThreadPoolExecutor(8) as pool:
        got = [job.result(timeout=60) for job in [pool.submit(wait) for _ in range(8)]]
    assert all(y is got[0] for y in got)
    assert int(got[0].numpy()[0]) == 1
    assert len(callbacks) == 8 and "pto-io" not in callbacks, callbacks


def test_rt_run_from_six_threads_hands_the_result_socket_over(rt):
    outs = rt.run("ones", 6)

    def client(k: int) -> list[int]:
        seen = []
        for i in range(40):
            rt.run("mark", (k % 2, outs[k], k * 100 + i))
            seen.append(int(outs[k].numpy()[0]))
        return seen

    with cf.ThreadPoolExecutor(6) as pool:
        seen = [job.result(timeout=90) for job in [pool.submit(client, k) for k in range(6)]]
    assert seen == [[k * 100 + i for i in range(40)] for k in range(6)]


def test_an_orchestration_waiting_for_room_is_woken_by_results(monkeypatch):
    monkeypatch.delenv("PTO_BROKER", raising=False)
    monkeypatch.setenv("PTO_MAX_OUTSTANDING_TASKS", "3")  # send_tasks waits for room
    with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
        rt.register("ones", orch=lambda ctx, n: [ctx.tensor(np.full(1, -1, np.int64))
                                                 for _ in range(n)])
        rt.register("many", orch=many_marks, kernels=KERNELS)
        outs = rt.run("ones", 300)
        rt.run("many", outs, timeout=60)
        assert [int(o.numpy()[0]) for o in outs] == list(range(300))
