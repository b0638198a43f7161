"""Losing a host actor, a whole host, or the driver (issue 13), through the public API only.

- a host actor killed mid-run: the run is rerun once on the restarted actor and succeeds;
  killed again, the run fails with ``pto.HostLost`` naming the host;
- a host crashed (``LocalCluster.kill_host``): runs needing it fail with ``pto.HostLost``
  within seconds, never hang, and the other host keeps serving;
- the driver killed -9 mid-run: Ray stops its host actors and each host's broker, workers
  and segments go with them.

The host crash runs last: it leaves the module's cluster with one host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import pto

from .conftest import host_pids, pto_left_on_hosts, segments_of, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
BREAKS_THE_CLUSTER = True  # kills a host: the next module gets a fresh cluster (conftest.py)
REPO = Path(__file__).resolve().parents[2]
LOST_WITHIN_S = 15.0  # "within seconds": LocalCluster's health checks declare a node dead in ~4 s
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def scale(x, y, factor):
    y[...] = x * factor


def whoami(ctx, args):
    """The pid of the process running L3 orchestrations on this host: its host actor."""
    return os.getpid()


def slow_scaled(ctx, args):
    """Notes each start in a file (this machine is every host), waits, then scales."""
    with open(args["log"], "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(args["sleep"])
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "scale", [In(x), Out(y), S(2.0)])
    return y


def on_host(ctx, args):
    return ctx.submit(args["host"], args["entry"], args=args.get("args"))


@pytest.fixture
def runtime(cluster):
    """A runtime of the test's own (these tests break their runtime's hosts)."""
    with pto.Runtime(level="cluster", cluster=cluster.address) as rt:
        rt.register("whoami", orch=whoami, kernels={})
        rt.register("slow_scaled", orch=slow_scaled, kernels={"scale": scale})
        rt.register("on_host", orch=on_host)
        yield rt


def _starts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _wait_for_starts(log: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_starts(log)) < count:
        assert time.monotonic() < deadline, f"the run did not start {count} time(s)"
        time.sleep(0.05)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _running(pids: set[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has exited)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(alive)


def test_driver_killed_mid_run_leaves_nothing_on_the_hosts(cluster, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys, time
        import numpy as np
        import pto

        def nap(x, y):
            time.sleep(120)  # a kernel busy on its chip when the driver dies

        def whoami(ctx, args):
            return os.getpid()

        def busy(ctx, args):
            open(args, "w").close()
            x = ctx.tensor(np.ones(1 << 16, np.float32))
            y = ctx.alloc(x.shape, x.dtype)
            ctx.submit(ctx.peers()[-1], "nap", [pto.Arg.input(x), pto.Arg.output(y)])
            return y

        def everywhere(ctx, args):
            return [ctx.submit(h, args["entry"], args=args["arg"].format(h)) for h in ctx.hosts()]

        rt = pto.Runtime(level="cluster", cluster=sys.argv[1])
        rt.register("whoami", orch=whoami, kernels={})
        rt.register("busy", orch=busy, kernels={"nap": nap})
        rt.register("everywhere", orch=everywhere)
        print(json.dumps(rt.run("everywhere", args={"entry": "whoami", "arg": ""})), flush=True)
        rt.submit("everywhere", args={"entry": "busy", "arg": sys.argv[2] + "{}"})
        time.sleep(600)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    driver = subprocess.Popen([sys.executable, str(script), cluster.address,
                               str(tmp_path / "busy-on-host")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = driver.stdout.readline()
        assert line, f"the driver failed: {driver.stderr.read()[-3000:]}"
        actors = json.loads(line)
        assert len(actors) == 2
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"busy-on-host{h}").exists() for h in (0, 1)):
            assert time.monotonic() < deadline and driver.poll() is None, "the run never started"
            time.sleep(0.05)
        # the driver's processes on the hosts: its host actors and what they started
        theirs = set()
        for pid in actors:
            root = psutil.Process(pid)
            theirs |= {pid, *(c.pid for c in root.children(recursive=True))}
        assert len(theirs) >= 2 * (1 + 1 + 2), f"not actor, broker, 2 workers per host: {theirs}"
        assert segments_of(theirs), "the running hosts hold no segment?"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        alive = wait_until(lambda: _running(theirs), 30)
        assert not alive, f"processes of the killed driver still run on its hosts: {alive}"
        left = wait_until(lambda: segments_of(theirs), 10)
        assert not left, f"segments of the killed driver's hosts remain: {left}"
        procs, segs = pto_left_on_hosts(cluster)
        assert not procs and not segs, (procs, segs)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        driver.stdout.close()
        driver.stderr.close()


def test_a_killed_host_actor_reruns_once_then_is_lost(runtime, cluster, tmp_path):
    first_pid = runtime.run("on_host", args={"host": 1, "entry": "whoami"})
    log = tmp_path / "starts"
    data = np.arange(8, dtype=np.float32)
    job = {"host": 1, "entry": "slow_scaled", "args": {"log": str(log), "sleep": 2.0, "x": data}}

    future = runtime.submit("on_host", args=job)
    _wait_for_starts(log, 1)
    _kill(first_pid)  # mid-run: Ray restarts the actor and reruns the run on it
    np.testing.assert_array_equal(future.result(timeout=90), data * 2.0)
    starts = _starts(log)
    assert len(starts) == 2 and starts[0] == str(first_pid) != starts[1], starts
    second_pid = runtime.run("on_host", args={"host": 1, "entry": "whoami"})
    assert second_pid == int(starts[1])

    log.unlink()
    future = runtime.submit("on_host", args=job)
    _wait_for_starts(log, 1)
    _kill(second_pid)  # the one retry is spent: now the host is lost for this runtime
    t0 = time.monotonic()
    with pytest.raises(pto.HostLost) as info:
        future.result(timeout=90)
    assert time.monotonic() - t0 < LOST_WITHIN_S
    assert info.value.host == 1 and "host 1" in str(info.value)
    with pytest.raises(pto.HostLost, match="host 1"):  # and stays lost, at once
        runtime.run("on_host", args={"host": 1, "entry": "whoami"}, timeout=LOST_WITHIN_S)
    # host 0 still serves
    job0 = {**job, "host": 0, "args": {**job["args"], "sleep": 0.0, "log": str(tmp_path / "h0")}}
    np.testing.assert_array_equal(runtime.run("on_host", args=job0), data * 2.0)


def test_a_crashed_host_fails_its_runs_within_seconds_and_the_other_host_serves(
        runtime, cluster, tmp_path):
    log = tmp_path / "starts"
    data = np.ones(4, dtype=np.float32)
    job = {"host": 1, "entry": "slow_scaled", "args": {"log": str(log), "sleep": 60.0, "x": data}}
    future = runtime.submit("on_host", args=job)
    _wait_for_starts(log, 1)
    doomed = set(cluster.host_pids(1))
    t0 = time.monotonic()
    cluster.kill_host(1)
    with pytest.raises(pto.HostLost) as info:
        future.result(timeout=60)  # never a hang: the node is gone, not slow
    assert time.monotonic() - t0 < LOST_WITHIN_S, "the lost host was noticed too late"
    assert info.value.host == 1 and "host 1" in str(info.value)
    t0 = time.monotonic()
    with pytest.raises(pto.HostLost, match="host 1"):
        runtime.run("on_host", args={"host": 1, "entry": "whoami"}, timeout=LOST_WITHIN_S)
    assert time.monotonic() - t0 < LOST_WITHIN_S
    job0 = {**job, "host": 0, "args": {**job["args"], "sleep": 0.0, "log": str(tmp_path / "h0")}}
    np.testing.assert_array_equal(runtime.run("on_host", args=job0), data * 2.0)
    assert cluster.alive_hosts() == [0]
    with pytest.raises(ValueError, match="already killed"):
        cluster.kill_host(1)
    with pytest.raises(ValueError, match="no host 2"):
        cluster.kill_host(2)
    assert not _running(doomed)
    assert not segments_of(doomed), "the crashed host's shared memory outlived it"
    assert host_pids(cluster)  # host 0 is up
