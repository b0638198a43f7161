"""Captured graphs under faults: a worker killed mid-replay (that replay fails with
WorkerLost, the restarted worker gets its part again, the next replay succeeds), a client
killed with graphs installed (broker and workers drop them, its segments go), and memory
that stays flat over many replays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

import pto

from ._util import (
    REPO,
    ExternalBroker,
    owner_of,
    read_line,
    segments_of,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
In, Out = pto.Arg.input, pto.Arg.output


def copy(x, y):
    y[...] = x


@pytest.fixture
def rt2():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PTO_BROKER", raising=False)
        rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    try:
        yield rt
    finally:
        rt.close()


def test_worker_killed_mid_replay_fails_it_with_worker_lost_then_the_graph_replays(rt2,
                                                                                    tmp_path):
    marks = str(tmp_path)

    def slow(x, y):
        if x[0] > 0:  # the replay to kill: say who runs it, then hang
            open(os.path.join(marks, str(os.getpid())), "w").close()
            time.sleep(60)
        y[...] = x + 1

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y, z = ctx.alloc(x.shape, x.dtype), ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "slow", [In(x), Out(y)])
        ctx.submit(1, "copy", [In(y), Out(z)])  # waits on chip 1 for chip 0
        return z

    rt2.register("killed", orch=orch, kernels={"slow": slow, "copy": copy})
    g = rt2.capture("killed", args={"x": np.zeros(4)})
    np.testing.assert_array_equal(g.run({"x": np.zeros(4)}), 1.0)
    doomed = g.submit({"x": np.ones(4)})
    queued = g.submit({"x": np.full(4, -1.0)})  # waits its turn behind the doomed one
    assert wait_until(lambda: os.listdir(marks), timeout=30)
    pid = int(os.listdir(marks)[0])
    proc = psutil.Process(pid)
    assert proc.pid in {p.pid for p in psutil.Process().children(recursive=True)}
    assert "worker" in " ".join(proc.cmdline())
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(pto.WorkerLost) as err:
        doomed.result(timeout=30)
    assert err.value.chip == 0 and "died" in err.value.reason
    print(f"\nWorkerLost {time.monotonic() - killed:.2f}s after the kill")
    np.testing.assert_array_equal(queued.result(timeout=60), 0.0)  # on the new worker
    for k in range(3):
        np.testing.assert_array_equal(g.run({"x": np.full(4, -k - 1.0)}), -k)
    g.close()


CLIENT = textwrap.dedent("""
    import os, time, numpy as np, pto
    def copy(x, y):
        y[...] = x
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "copy", [pto.Arg.input(x), pto.Arg.output(y)])
        ctx.submit(1, "copy", [pto.Arg.input(y), pto.Arg.output(x)])
        return y
    rt = pto.Runtime(level="host", platform="sim")
    rt.register("orch", orch=orch, kernels={"copy": copy})
    g = rt.capture("orch", args={"x": np.ones(4)})
    y = g.run({"x": np.full(4, 3.0)}, copy=False)
    assert (y.numpy() == 3).all()
    print(os.getpid(), y.name, flush=True)
    time.sleep(120)
""")


def _mapped_owner(pid: int, owner: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return f"{owner}_" in f.read()


def test_a_killed_client_graphs_are_dropped_by_broker_and_workers(tmp_path):
    broker = ExternalBroker(tmp_path, workers=2)
    proc = None
    try:
        env = dict(os.environ, PTO_BROKER=broker.address)
        proc = subprocess.Popen([sys.executable, "-c", CLIENT], cwd=REPO, env=env,
                                stdout=subprocess.PIPE)
        pid, name = read_line(proc, timeout=60).split()
        owner = owner_of(name)
        assert [g["name"] for g in pto.status(broker.address)["graphs"]] == ["orch"]
        workers = [p.pid for p in broker.descendants() if "worker" in " ".join(p.cmdline())]
        assert any(_mapped_owner(w, owner) for w in workers)
        assert segments_of(owner)
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: pto.status(broker.address)["graphs"] == [], timeout=15)
        assert wait_until(lambda: not segments_of(owner), timeout=15), segments_of(owner)
        assert wait_until(lambda: not any(_mapped_owner(w, owner) for w in workers),
                          timeout=15), "a worker still maps the dead client's tensors"
        # and the broker serves a new client's graphs
        with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
            rt.register("c", orch=lambda ctx, a: _one(ctx, a), kernels={"copy": copy})
            g = rt.capture("c", args={"x": np.ones(3)})
            np.testing.assert_array_equal(g.run({"x": np.full(3, 7.0)}), 7.0)
    finally:
        if proc is not None:
            stop_process(proc)
            if proc.stdout:
                proc.stdout.close()
        broker.stop()


def _one(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(1, "copy", [In(x), Out(y)])
    return y


def _rss(pids: list[int]) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


@pytest.mark.slow
def test_1000_replays_leave_broker_and_worker_memory_flat(rt2):
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y, z = ctx.alloc(x.shape, x.dtype), ctx.alloc(x.shape, x.dtype)
        for _ in range(5):
            ctx.submit(0, "copy", [In(x), Out(y)])
            ctx.submit(1, "copy", [In(y), Out(z)])
        return z

    rt2.register("flat", orch=orch, kernels={"copy": copy})
    g = rt2.capture("flat", args={"x": np.ones(256)})
    procs = [p.pid for p in psutil.Process().children(recursive=True)
             if any(r in " ".join(p.cmdline()) for r in ("-m broker", "-m worker"))]
    assert len(procs) >= 3
    x = np.ones(256)
    for _ in range(200):
        g.run({"x": x})
    before = _rss(procs)
    for i in range(1000):
        if i % 2:
            g.run({"x": x})
        else:
            g.submit({"x": x})
    g.run({"x": x})
    after = _rss(procs)
    grown = {pid: (after[pid] - before[pid]) / 2**20 for pid in procs}
    print("\nRSS growth over 1000 replays (MiB):", {k: round(v, 2) for k, v in grown.items()})
    assert all(v < 5 for v in grown.values()), grown
    g.close()
