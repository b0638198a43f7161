"""A long-lived broker from scripts/start_broker.sh, shared by several clients."""

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

from ._kernels import everywhere
from ._util import (
    REPO,
    ExternalBroker,
    children,
    owner_of,
    read_line,
    segments_of,
    shm_path,
    stop_process,
    wait_dead,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

def scale(x, y, factor):
    y[:] = x * factor


def add_const(x, y):
    y[:] = x + 100


def check_everywhere(rt, x):
    outs = rt.run("ext", args={"x": x})
    assert len(outs) == len(rt.devices)
    for chip, y in zip(rt.devices, outs, strict=True):
        np.testing.assert_array_equal(y.numpy(), x * (chip + 2))
    return outs


def test_script_prints_address_and_serves_two_devices(broker):
    before = {p.pid for p in children()} - {p.pid for p in broker.procs}
    with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
        assert rt.devices == [0, 1]
        # a client of an external broker starts no broker or workers of its own
        assert {p.pid for p in children()} - {p.pid for p in broker.procs} <= before
        rt.register("ext", orch=everywhere, kernels={"k": scale})
        check_everywhere(rt, np.arange(32, dtype=np.float64))
    assert broker.proc.poll() is None  # closing a client leaves the broker running


def test_connect_through_env_var(broker, monkeypatch):
    monkeypatch.setenv("PTO_BROKER", broker.address)
    with pto.Runtime(level="host", platform="sim") as rt:
        assert rt.devices == [0, 1]
        rt.register("ext", orch=everywhere, kernels={"k": scale})
        check_everywhere(rt, np.arange(8, dtype=np.int64))


def test_device_subset_and_unserved_device(broker):
    with pto.Runtime(level="host", platform="sim", broker=broker.address, devices=[1]) as rt:
        assert rt.devices == [1]
        rt.register("ext", orch=everywhere, kernels={"k": scale})
        check_everywhere(rt, np.ones(4))
    with pytest.raises(ValueError):
        pto.Runtime(level="host", platform="sim", broker=broker.address, devices=[0, 5])


def test_two_runtimes_on_one_broker(broker):
    """Two clients register the same names with different kernels; neither sees the other's."""

    def other(ctx, args):
        x = ctx.tensor(args["x"])
        outs = []
        for chip in ctx.peers():
            y = ctx.alloc(x.shape, x.dtype)
            ctx.submit(chip, "k", [pto.Arg.input(x), pto.Arg.output(y)])
            outs.append(y)
        return outs

    a = pto.Runtime(level="host", platform="sim", broker=broker.address)
    try:
        b = pto.Runtime(level="host", platform="sim", broker=broker.address)
        try:
            a.register("ext", orch=everywhere, kernels={"k": scale})
            b.register("ext", orch=other, kernels={"k": add_const})
            x = np.arange(16, dtype=np.float64)
            kept_b = []
            for i in range(5):
                check_everywhere(a, x + i)
                outs = b.run("ext", args={"x": x + i})
                for y in outs:
                    np.testing.assert_array_equal(y.numpy(), x + i + 100)
                kept_b.append((i, outs))
            kept_a = check_everywhere(a, x)
            a_paths = [shm_path(h) for h in kept_a]
            a_owner = owner_of(kept_a[0])
            assert a_owner != owner_of(kept_b[0][1][0])  # each client owns its segments
            del kept_a
        finally:
            a.close()
        # a's segments are gone; b's handles and b itself are undisturbed
        assert wait_gone(a_paths, timeout=5) == []
        assert not segments_of(a_owner)
        for i, outs in kept_b:
            for y in outs:
                np.testing.assert_array_equal(y.numpy(), x + i + 100)
        for i in range(5):
            for y in b.run("ext", args={"x": x * i}):
                np.testing.assert_array_equal(y.numpy(), x * i + 100)
        b.close()
    finally:
        a.close()
    assert broker.proc.poll() is None


CLIENT = textwrap.dedent(
    """
    import os, sys, time, numpy as np, pto
    TAG = int(sys.argv[1])
    RUNS = int(sys.argv[2])
    STOP = sys.argv[3] if len(sys.argv) > 3 else None   # keep running until this file exists

    def kern(x, y):                     # defined in __main__: travels by value
        y[:] = x * 1000 + TAG

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        outs = []
        for chip in ctx.peers():
            y = ctx.alloc(x.shape, x.dtype)
            ctx.submit(chip, "k", [pto.Arg.input(x), pto.Arg.output(y)])
            outs.append(y)
        return outs

    with pto.Runtime(level="host", platform="sim") as rt:
        assert rt.devices == [0, 1], rt.devices
        rt.register("client", orch=orch, kernels={"k": kern})
        deadline = time.monotonic() + 60
        i = 0
        while i < RUNS or (STOP and not os.path.exists(STOP) and time.monotonic() < deadline):
            x = np.arange(64.0) + i
            outs = rt.run("client", args={"x": x})
            for y in outs:
                got = y.numpy()
                assert (got == x * 1000 + TAG).all(), (TAG, i, got[:4])
            if i == 0:
                print("OWNER", outs[0].name, flush=True)
            i += 1
    print("OK", TAG, i, flush=True)
    """
)


def test_two_client_processes_on_one_broker(broker, tmp_path):
    env = dict(os.environ, PTO_BROKER=broker.address)
    stop = tmp_path / "stop"
    short = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "1", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    long = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "2", "20", str(stop)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out1, err1 = short.communicate(timeout=60)
        assert long.poll() is None, "the long client should still be running"
        time.sleep(0.3)  # the long client keeps running after the short one closed
        stop.touch()
        out2, err2 = long.communicate(timeout=60)
    finally:
        stop_process(short)
        stop_process(long)
    assert short.returncode == 0, err1
    assert long.returncode == 0, err2
    assert "OK 1 5" in out1, (out1, err1)
    assert "OK 2 " in out2, (out2, err2)
    # every client's segments are gone once it exited
    for out in (out1, out2):
        name = next(line.split()[1] for line in out.splitlines() if line.startswith("OWNER"))
        owner = owner_of(name)
        assert wait_until(lambda o=owner: not segments_of(o), timeout=5), segments_of(owner)
    assert broker.proc.poll() is None


HOLDER = textwrap.dedent(
    """
    import os, sys, time, numpy as np, pto
    rt = pto.Runtime(level="host", platform="sim")
    rt.register("hold", orch=lambda ctx, args: ctx.tensor(args["x"]), kernels={})
    h = rt.run("hold", args={"x": np.arange(1024.0)})
    print(os.getpid(), h.name, flush=True)
    time.sleep(120)
    """
)


def test_killed_client_segments_are_reclaimed(broker):
    env = dict(os.environ, PTO_BROKER=broker.address)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], cwd=REPO, env=env, stdout=subprocess.PIPE
    )
    try:
        _pid, name = read_line(proc, timeout=30).split()
        path = shm_path(name)
        assert path.exists()
        proc.kill()
        proc.wait(10)
        assert wait_gone([path], timeout=10) == [], (
            "the broker's janitor left a dead client's segment"
        )
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()
    # the broker still serves others
    with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
        rt.register("ext", orch=everywhere, kernels={"k": scale})
        check_everywhere(rt, np.ones(8))


def test_sigterm_stops_broker_and_its_workers(tmp_path):
    b = ExternalBroker(tmp_path, workers=2)
    try:
        assert len(b.procs) >= 3, b.procs  # the script/broker and two workers
        rt = pto.Runtime(level="host", platform="sim", broker=b.address, timeout=2)
        try:
            rt.register("ext", orch=everywhere, kernels={"k": scale})
            check_everywhere(rt, np.ones(8))
            b.remember()
            b.proc.send_signal(signal.SIGTERM)
            try:
                b.proc.wait(10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"broker ignored SIGTERM for 10 s\n{b.logtext()}")
            survivors = wait_dead(b.procs, timeout=5)
            assert survivors == [], f"left running after SIGTERM: {survivors}"
            # a client of a stopped broker gets BrokerLost in bounded time, not a hang
            t0 = time.monotonic()
            with pytest.raises(pto.BrokerLost):
                rt.run("ext", args={"x": np.ones(8)})
            assert time.monotonic() - t0 < 15
        finally:
            t0 = time.monotonic()
            rt.close()
            assert time.monotonic() - t0 < 15, "close() hung on a dead broker"
    finally:
        b.stop()


def is_broker_process(p: psutil.Process) -> bool:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return False
    return any(a == "-m" and b == "broker" for a, b in zip(cmd, cmd[1:], strict=False))


def test_sigkill_of_broker_takes_workers_down(tmp_path):
    b = ExternalBroker(tmp_path, workers=2)
    try:
        b.remember()
        assert len(b.procs) >= 3, b.procs
        # A worker caught between fork and exec still shows the broker's command line.
        wait_until(lambda: sum(map(is_broker_process, b.procs)) == 1, timeout=10)
        brokers = [p for p in b.procs if is_broker_process(p)]
        assert len(brokers) == 1, [p.cmdline() for p in b.procs]
        workers = [p for p in b.procs if p not in brokers and p.pid != b.proc.pid]
        assert len(workers) >= 2, [p.cmdline() for p in b.procs]
        brokers[0].kill()  # no chance to clean up: the workers must notice on their own
        survivors = wait_dead(workers, timeout=8)
        assert survivors == [], f"workers outlived their broker: {survivors}"
    finally:
        b.stop()
