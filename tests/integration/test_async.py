"""Async runs (issue 4): ``rt.submit`` futures, many in flight from many threads, that
overlap on the chips and can be cancelled; ``rt.run`` is ``rt.submit(...).result()``."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import numpy as np
import pytest

import pto

from ._util import shm_path, wait_gone

pytestmark = pytest.mark.timeout(60)


def scale(x, y, k):
    y[:] = x * k


def add_into(x, acc):
    acc += x


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def stamp(out, delay):
    t0 = time.time()
    time.sleep(delay)
    out[:] = [t0, time.time(), pto.task().chip]


def boom(out):
    raise RuntimeError("async-boom-0c1d")


KERNELS = {"scale": scale, "add_into": add_into, "fill": fill, "stamp": stamp, "boom": boom}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def chain(ctx, args):
    """y = (x * k) summed over chips: a small graph touching every chip."""
    x = ctx.tensor(args["x"])
    acc = ctx.alloc(x.shape, x.dtype)
    for chip in ctx.peers():
        tmp = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "scale", [In(x), Out(tmp), S(args["k"])])
        ctx.submit((chip + 1) % len(ctx.peers()), "add_into", [In(tmp), InOut(acc)])
    return {"k": args["k"], "acc": acc}


def test_fifty_concurrent_submits_from_four_threads(rt4_module):
    rt4_module.register("chain", orch=chain, kernels=KERNELS)
    x = np.arange(256, dtype=np.float64)
    futures: dict[int, cf.Future] = {}
    lock = threading.Lock()
    start = threading.Barrier(4)

    def client(t):
        start.wait(10)
        for k in range(t, 50, 4):
            f = rt4_module.submit("chain", {"x": x, "k": k})
            assert isinstance(f, cf.Future)
            with lock:
                futures[k] = f

    with cf.ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(client, t) for t in range(4)]:
            job.result(timeout=30)
    assert sorted(futures) == list(range(50))
    done, not_done = cf.wait(futures.values(), timeout=30)
    assert not not_done, f"{len(not_done)} of 50 runs did not finish within 30 s"
    for k, f in futures.items():
        value = f.result()
        assert value["k"] == k
        np.testing.assert_array_equal(value["acc"].numpy(), x * k * 4, err_msg=f"run {k}")


def test_runs_in_flight_overlap_on_the_chips(rt4_module):
    def one(ctx, args):
        out = ctx.alloc((3,), np.float64)
        ctx.submit(args["chip"], "stamp", [Out(out), S(0.4)])
        return out

    rt4_module.register("one", orch=one, kernels=KERNELS)
    rt4_module.run("one", {"chip": 0})  # warm-up
    rt4_module.run("one", {"chip": 3})
    t0 = time.monotonic()
    fa = rt4_module.submit("one", {"chip": 0})
    fb = rt4_module.submit("one", {"chip": 3})
    assert time.monotonic() - t0 < 0.3, "submit blocked until the run finished"
    a, b = fa.result(timeout=10).numpy(), fb.result(timeout=10).numpy()
    wall = time.monotonic() - t0
    assert max(a[0], b[0]) < min(a[1], b[1]), f"two runs did not overlap: {a}, {b}"
    assert wall < 0.75, f"two 0.4 s runs on two chips took {wall:.2f} s"


def test_cancel_queued_work(rt4_module):
    n = 40
    rt4_module.register("targets", orch=lambda ctx, args: [ctx.tensor(np.full(8, -1.0))
                                                    for _ in range(n)], kernels={})
    targets = rt4_module.run("targets", args={})
    names: list[str] = []

    def slow_then_many(ctx, args):
        gate = ctx.alloc((8,), np.float64)
        ctx.submit(0, "fill", [Out(gate), S(1.0), S(1.0)])  # ~1 s on chip 0
        for i, target in enumerate(args):
            tmp = ctx.alloc((8,), np.float64)  # intermediates of this run
            names.append(tmp.name)
            ctx.submit(i % 4, "scale", [In(gate), Out(tmp), S(i)])
            ctx.submit((i + 1) % 4, "scale", [In(tmp), Out(target), S(1.0)])
        names.append(gate.name)

    rt4_module.register("cancel_me", orch=slow_then_many, kernels=KERNELS)
    fut = rt4_module.submit("cancel_me", targets)
    assert fut.cancel() is True
    assert fut.cancelled()
    with pytest.raises(cf.CancelledError):
        fut.result(timeout=10)
    time.sleep(1.5)  # the gate task has ended by now; its dependents would have run
    for i, target in enumerate(targets):
        np.testing.assert_array_equal(target.numpy(), np.full(8, -1.0),
                                      err_msg=f"a dependent of a cancelled run ran ({i})")
    assert len(names) == n + 1
    assert wait_gone([shm_path(name) for name in names], timeout=5) == [], (
        "a cancelled run's tensors were not freed"
    )
    del fut
    # the runtime, and every chip, still work
    rt4_module.register("chain", orch=chain, kernels=KERNELS)
    value = rt4_module.run("chain", {"x": np.ones(4), "k": 3})
    np.testing.assert_array_equal(value["acc"].numpy(), np.full(4, 12.0))

    def write_targets(ctx, args):
        for i, target in enumerate(args):
            ctx.submit(i % 4, "fill", [Out(target), S(float(i)), S(0.0)])

    rt4_module.register("write_targets", orch=write_targets, kernels=KERNELS)
    rt4_module.run("write_targets", targets)
    assert [t.numpy()[0] for t in targets] == [float(i) for i in range(n)]


def test_a_cancelled_runs_returned_tensors_are_freed_while_the_future_is_held(rt4_module):
    """Nobody can get the return value of a cancelled run: its tensors must go, even while
    the caller still holds the (cancelled) future, e.g. in a list of futures."""
    names: list[str] = []

    def orch(ctx, args):
        gate = ctx.alloc((8,), np.float64)
        out = ctx.alloc((8,), np.float64)
        ctx.submit(0, "fill", [Out(gate), S(1.0), S(1.0)])
        ctx.submit(1, "scale", [In(gate), Out(out), S(2.0)])
        names.extend([gate.name, out.name])
        return out, [gate]

    rt4_module.register("cancel_returned", orch=orch, kernels=KERNELS)
    futures = [rt4_module.submit("cancel_returned", {})]
    assert futures[0].cancel() is True
    with pytest.raises(cf.CancelledError):
        futures[0].result(timeout=10)
    left = wait_gone([shm_path(name) for name in names], timeout=5)
    assert left == [], f"a cancelled run's returned tensors stay while its future is held: {left}"


def test_run_equals_submit_result(rt4_module):
    rt4_module.register("chain", orch=chain, kernels=KERNELS)
    x = np.linspace(0, 1, 33)
    by_run = rt4_module.run("chain", {"x": x, "k": 5})
    by_submit = rt4_module.submit("chain", {"x": x, "k": 5}).result(timeout=20)
    assert by_run.keys() == by_submit.keys() == {"k", "acc"}
    assert by_run["k"] == by_submit["k"] == 5
    np.testing.assert_array_equal(by_run["acc"].numpy(), by_submit["acc"].numpy())

    def failing(ctx, args):
        out = ctx.alloc((2,), np.float64)
        ctx.submit(1, "boom", [Out(out)])
        return out

    rt4_module.register("failing", orch=failing, kernels=KERNELS)
    with pytest.raises(pto.TaskError) as e_run:
        rt4_module.run("failing", {})
    fut = rt4_module.submit("failing", {})
    with pytest.raises(pto.TaskError) as e_submit:
        fut.result(timeout=20)
    assert isinstance(fut.exception(), pto.TaskError)
    assert (e_run.value.kernel, e_run.value.chip) == (e_submit.value.kernel, e_submit.value.chip)
    assert "async-boom-0c1d" in e_run.value.reason and "async-boom-0c1d" in e_submit.value.reason
    with pytest.raises(KeyError):
        rt4_module.submit("never_registered", {})


def test_blocking_runs_from_four_threads_at_once_each_get_their_own_result(rt4_module):
    """rt.run lets the waiting thread read results itself; with four waiting at once, one
    reads for all and each still gets its own value, without hanging."""
    rt4_module.register("chain_mt", orch=chain, kernels=KERNELS)
    x = np.arange(64, dtype=np.float64)
    start = threading.Barrier(4)

    def client(t):
        start.wait(10)
        for k in range(t, 80, 4):
            value = rt4_module.run("chain_mt", {"x": x, "k": k}, timeout=30)
            assert value["k"] == k
            np.testing.assert_array_equal(value["acc"].numpy(), x * k * 4, err_msg=f"run {k}")
            value["acc"].free()
        return t

    with cf.ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(client, range(4), timeout=60)) == [0, 1, 2, 3]
