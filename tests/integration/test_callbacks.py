"""User code on futures (issue 12): done-callbacks never run on the thread that receives
results or sends heartbeats, so they may be slow, may call ``rt.run``, may chain further
submits; and a lost broker wakes every thread waiting on the runtime at once."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import pto

from ._util import children

pytestmark = pytest.mark.timeout(120)


def inc(x, y):
    y[:] = x + 1


def nap(y, seconds):
    time.sleep(seconds)
    y[:] = 1


KERNELS = {"inc": inc, "nap": nap}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def plus_one(ctx, value):
    """value + 1, computed by a task on chip ``value % chips``."""
    x = ctx.tensor(np.array([value], np.int64))
    y = ctx.alloc(1, np.int64)
    ctx.submit(ctx.peers()[int(value) % len(ctx.peers())], "inc", [In(x), Out(y)])
    return y


def napping(ctx, args):
    y = ctx.alloc(1, np.int64)
    ctx.submit(args["chip"], "nap", [Out(y), S(args["seconds"])])
    return y


@contextlib.contextmanager
def embedded(monkeypatch, **env: str) -> Iterator[pto.Runtime]:
    """An embedded runtime on chips 0 and 1, started with these PTO_* variables."""
    monkeypatch.delenv("PTO_BROKER", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # read when the runtime starts
    rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    rt.register("plus_one", orch=plus_one, kernels=KERNELS)
    rt.register("nap", orch=napping, kernels=KERNELS)
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def rt2(monkeypatch):
    with embedded(monkeypatch) as rt:
        yield rt


def value_of(future: cf.Future) -> int:
    return int(future.result(timeout=30).numpy()[0])


def our_client(rt) -> list[dict]:
    return [c for c in pto.status(rt.address)["clients"] if c["pid"] == os.getpid()]


@pytest.mark.slow
def test_a_3s_done_callback_leaves_the_runtime_serving(rt2):
    started, finished = threading.Event(), threading.Event()
    ran_on: list[threading.Thread] = []

    def slow(future):
        ran_on.append(threading.current_thread())
        started.set()
        time.sleep(3.0)  # twice the broker's patience with a silent client
        finished.set()

    f = rt2.submit("nap", {"chip": 1, "seconds": 0.5})  # still running when the callback is added
    f.add_done_callback(slow)
    assert started.wait(10), "the callback never ran"
    assert ran_on != [threading.current_thread()], "the run ended before add_done_callback"
    # while it sleeps, runs still get their results ...
    t0 = time.monotonic()
    assert int(rt2.run("plus_one", 5).numpy()[0]) == 6
    assert time.monotonic() - t0 < 2.0, "a run waited for a sleeping callback"
    assert not finished.is_set()
    assert finished.wait(10)
    # ... and afterwards the broker still knows us and the next run succeeds
    assert len(our_client(rt2)) == 1, "the broker dropped the client during the callback"
    assert int(rt2.run("plus_one", 41).numpy()[0]) == 42
    assert value_of(f) == 1


def test_rt_run_inside_a_done_callback_returns_its_result(rt2):
    got: dict[str, object] = {}
    done = threading.Event()

    def chained(future):
        got["thread"] = threading.current_thread()
        try:
            got["run"] = int(rt2.run("plus_one", value_of(future), timeout=20).numpy()[0])
            inner = rt2.submit("plus_one", 100)
            got["result"] = value_of(inner)  # future.result() inside a callback too
        except BaseException as exc:  # noqa: BLE001 - reported below
            got["error"] = exc
        finally:
            done.set()

    rt2.submit("nap", {"chip": 0, "seconds": 0.5}).add_done_callback(chained)
    assert done.wait(30), "rt.run inside a done-callback did not return"
    assert got.pop("thread") is not threading.current_thread(), "the run ended too soon"
    assert "error" not in got, got
    assert got == {"run": 2, "result": 101}


def test_four_threads_of_200_submits_whose_callbacks_chain_further_submits(monkeypatch):
    # a bound the submits reach: callbacks' submits then wait for room like the others
    with embedded(monkeypatch, PTO_MAX_OUTSTANDING_TASKS="50") as rt2:
        chain_from_four_threads(rt2)


def chain_from_four_threads(rt2):
    per_thread, threads = 200, 4
    chained: dict[int, cf.Future] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    all_chained = threading.Event()
    start = threading.Barrier(threads)

    def chain_next(k: int):
        def callback(future):
            try:
                nxt = rt2.submit("plus_one", value_of(future))  # k + 1 -> k + 2
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                    all_chained.set()
                return
            with lock:
                chained[k] = nxt
                if len(chained) == threads * per_thread:
                    all_chained.set()
        return callback

    def client(t: int):
        start.wait(10)
        for i in range(per_thread):
            k = t * per_thread + i
            rt2.submit("plus_one", k).add_done_callback(chain_next(k))

    with cf.ThreadPoolExecutor(threads) as pool:
        for job in [pool.submit(client, t) for t in range(threads)]:
            job.result(timeout=60)
    assert all_chained.wait(60), f"{len(chained)} of {threads * per_thread} chains started"
    assert errors == []
    done, pending = cf.wait(chained.values(), timeout=60)
    assert not pending, f"{len(pending)} chained runs did not finish"
    wrong = {k: value_of(f) for k, f in chained.items() if value_of(f) != k + 2}
    assert wrong == {}


@pytest.mark.slow
def test_a_lost_broker_wakes_every_waiter_at_once(monkeypatch):
    with embedded(monkeypatch, PTO_MAX_OUTSTANDING_TASKS="5",
                  PTO_RELEASE_BACKLOG_BYTES="1") as rt:
        wake_every_waiter(rt)


def wake_every_waiter(rt):
    woke: dict[str, tuple[float, BaseException | None]] = {}
    lock = threading.Lock()

    def backlogged(ctx, args):
        t = ctx.alloc(8, np.int64)
        ctx.submit(0, "nap", [Out(t), S(60.0)])
        t.free()  # still used by its task: over the 1-byte backlog ...
        ctx.alloc(8, np.int64)  # ... so this waits for room

    def waiter(name: str, call):
        try:
            result = call()
            error = result.exception(timeout=0) if isinstance(result, cf.Future) else None
        except BaseException as exc:  # noqa: BLE001 - checked below
            error = exc
        with lock:
            woke[name] = (time.monotonic(), error)

    rt.register("backlogged", orch=backlogged, kernels=KERNELS)
    long = {"chip": 1, "seconds": 60.0}
    f_result, f_wait = rt.submit("nap", long), rt.submit("nap", long)
    first = [  # five tasks outstanding once these wait
        ("rt.run", lambda: rt.run("nap", long)),
        ("future.result", lambda: f_result.result()),
        ("cf.wait", lambda: cf.wait([f_wait]) and f_wait),
        ("backlog 1", lambda: rt.submit("backlogged")),
        ("backlog 2", lambda: rt.submit("backlogged")),
    ]
    then = [(f"room {i}", lambda: rt.submit("nap", long)) for i in range(3)]
    threads = []
    for group in (first, then):
        for name, call in group:
            threads.append(threading.Thread(target=waiter, args=(name, call), daemon=True))
            threads[-1].start()
            # Staggered: a waiter that looked for the loss every 0.25 s would be seen late.
            time.sleep(0.25 / len(group))
        time.sleep(1.0)  # they are blocked by now
    assert woke == {}, f"returned before the broker was lost: {woke}"
    broker = next(p for p in children() if "broker" in " ".join(p.cmdline()))
    t_kill = time.monotonic()
    os.kill(broker.pid, signal.SIGKILL)
    for t in threads:
        t.join(10)
    blocked = {name for name, _ in first + then} - set(woke)
    assert not blocked, f"still blocked 10 s after the kill: {blocked}"
    for name, (_, error) in woke.items():
        assert isinstance(error, pto.BrokerLost), f"{name}: {error!r}"
    times = sorted(t for t, _ in woke.values())
    print(f"\nbroker lost: first waiter woke {times[0] - t_kill:.3f}s after the kill, "
          f"last {times[-1] - times[0]:.3f}s after the first")
    assert times[-1] - t_kill < 2.0
    assert times[-1] - times[0] < 0.1, {n: round(t - times[0], 3) for n, (t, _) in woke.items()}
