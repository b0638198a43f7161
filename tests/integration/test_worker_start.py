"""How an embedded broker starts its workers: forked from a fork server by default, exec'd
with PTO_FORK_WORKERS=0; either way each is the broker's child with the command line of
``python -m worker``, and nothing of the fork server outlives its use."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

import pto

from ._util import children, wait_until

In, Out = pto.Arg.input, pto.Arg.output

pytestmark = pytest.mark.timeout(120)


def _broker(devices: str = "0,1,2,3") -> psutil.Process:
    """The embedded broker serving ``devices``."""
    return next(p for p in children() if p.cmdline()[1:3] == ["-m", "broker"]
                and p.cmdline()[p.cmdline().index("--devices") + 1] == devices)


def _children(broker: psutil.Process) -> list[tuple[psutil.Process, list[str]]]:
    """The broker's live children and their command lines."""
    out = []
    for p in broker.children():
        try:
            out.append((p, p.cmdline()))
        except psutil.Error:  # gone, or a zombie
            continue
    return out


def _workers(broker: psutil.Process) -> dict[str, psutil.Process]:
    """'--device N' / '--host K' -> the live worker process."""
    out = {}
    for p, cmd in _children(broker):
        if cmd[1:3] == ["-m", "worker"]:
            role = next(i for i, a in enumerate(cmd) if a in ("--device", "--host"))
            out[f"{cmd[role]} {cmd[role + 1]}"] = p
    return out


def _fork_servers(broker: psutil.Process) -> list[psutil.Process]:
    return [p for p, cmd in _children(broker) if cmd[:1] == ["pto-forkserver"]]


def random_numbers(y):
    y[:] = np.random.random(y.shape)


def orphan_pid(y):
    # the shell exits at once: its background sleep is orphaned, to the nearest subreaper
    out = subprocess.run("sleep 1 >/dev/null 2>&1 & echo $!", shell=True, check=True,
                         capture_output=True, text=True).stdout
    y[0] = int(out)


def on_every_chip(ctx, kernel):
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(4, np.float64)
        ctx.submit(chip, kernel, [Out(y)])
        outs.append(y)
    return outs


def _registered(runtime):
    runtime.register("on_every_chip", orch=on_every_chip,
                     kernels={"random_numbers": random_numbers, "orphan_pid": orphan_pid})
    return runtime


@pytest.fixture(scope="module")
def rt(rt4_module):
    return _registered(rt4_module)


def _check_command_lines(broker: psutil.Process, devices: list[int]) -> None:
    assert wait_until(lambda: len(_workers(broker)) == len(devices) + 1, timeout=30)
    workers = _workers(broker)
    assert sorted(workers) == sorted([*(f"--device {d}" for d in devices), "--host 0"])
    for role, p in workers.items():
        cmd = p.cmdline()
        assert os.path.realpath(cmd[0]) == os.path.realpath(sys.executable), cmd
        assert "" not in cmd, cmd
        flag, value = role.split()
        assert cmd[cmd.index(flag) + 1] == value
        assert cmd[cmd.index("--parent-pid") + 1] == str(broker.pid)
        assert p.ppid() == broker.pid


def test_workers_are_the_brokers_children_with_the_command_line_of_python_m_worker(rt):
    _check_command_lines(_broker(), rt.devices)


def test_the_fork_server_is_named_for_what_it_is_and_leaves_once_idle():
    with pto.Runtime(level="host", platform="sim", devices=[0]):
        broker = _broker("0")
        servers = _fork_servers(broker)
        if servers:  # (it may be gone already on a slow machine)
            assert servers[0].name() == "pto-forkserver"
            assert servers[0].cmdline() == ["pto-forkserver", "for", "broker", str(broker.pid)]
        assert wait_until(lambda: not _fork_servers(broker), timeout=15)


def test_each_worker_draws_its_own_random_numbers(rt):
    outs = rt.run("on_every_chip", "random_numbers")
    drawn = [tuple(y.numpy()) for y in outs]
    assert len(set(drawn)) == len(drawn), drawn  # forked workers reseed numpy


def test_a_killed_worker_comes_back_and_serves(rt4):
    rt = _registered(rt4)
    broker = _broker()
    old = _workers(broker)["--device 1"]
    old.kill()
    assert wait_until(lambda: _workers(broker).get("--device 1", old).pid != old.pid,
                      timeout=30)
    _check_command_lines(broker, rt.devices)
    outs = rt.run("on_every_chip", "random_numbers")
    assert all(np.all((y.numpy() >= 0) & (y.numpy() < 1)) for y in outs)


def test_an_orphan_a_kernel_leaves_is_reaped_by_the_broker(rt):
    broker = _broker()
    pids = [int(y.numpy()[0]) for y in rt.run("on_every_chip", "orphan_pid")]
    for pid in pids:
        try:
            assert psutil.Process(pid).ppid() == broker.pid  # adopted, not init's
        except psutil.NoSuchProcess:
            pass  # already exited and reaped
    # exited after 1 s and reaped by the broker: no zombie left
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=15), \
        [psutil.Process(pid).status() for pid in pids if psutil.pid_exists(pid)]


def test_with_pto_fork_workers_0_the_workers_are_execd(monkeypatch):
    monkeypatch.setenv("PTO_FORK_WORKERS", "0")
    with pto.Runtime(level="host", platform="sim", devices=[0, 1]):
        broker = _broker("0,1")
        _check_command_lines(broker, [0, 1])
        assert not _fork_servers(broker)
        assert all(p.cmdline()[0] == sys.executable for p in _workers(broker).values())
