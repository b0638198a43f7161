"""A killed client takes its embedded broker, its workers and its segments with it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest

from ._util import (
    REPO,
    kill_all,
    read_line,
    shm_path,
    stop_process,
    wait_dead,
    wait_gone,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

IDLE_PARENT = textwrap.dedent(
    """
    import os, time, numpy as np, pto

    def ident(x, y):
        y[:] = x

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(ctx.peers()[-1], "ident", [pto.Arg.input(x), pto.Arg.output(y)])
        return y

    rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    rt.register("o", orch=orch, kernels={"ident": ident})
    y = rt.run("o", args={"x": np.arange(4096.0)})
    assert (y.numpy() == np.arange(4096.0)).all()
    print(os.getpid(), y.name, flush=True)
    time.sleep(600)
    """
)

BUSY_PARENT = textwrap.dedent(
    """
    import os, sys, time, numpy as np, pto

    MARK = sys.argv[1]

    def stuck(x, y):
        open(MARK, "w").close()
        time.sleep(600)            # a kernel that never finishes on its own

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        for chip in ctx.peers():       # both workers busy in a kernel
            y = ctx.alloc(x.shape, x.dtype)
            ctx.submit(chip, "stuck", [pto.Arg.input(x), pto.Arg.output(y)])

    rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    rt.register("o", orch=orch, kernels={"stuck": stuck})
    rt.register("keep", orch=lambda ctx, args: ctx.tensor(args["x"]), kernels={})
    h = rt.run("keep", args={"x": np.ones(1000)})
    print(os.getpid(), h.name, flush=True)
    rt.run("o", args={"x": np.arange(8.0)})   # blocks: the kernel sleeps
    """
)


def run_and_kill(script: str, *argv: str, ready=None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, stdout=subprocess.PIPE)
    kids: list[psutil.Process] = []
    try:
        pid, name = read_line(proc, timeout=40).split()
        assert int(pid) == proc.pid
        path = shm_path(name)
        assert path.exists(), path
        if ready is not None:
            ready()
        kids = psutil.Process(proc.pid).children(recursive=True)
        # an embedded broker and one worker per device
        assert len(kids) >= 3, [k.cmdline() for k in kids]
        proc.kill()
        proc.wait(10)
        survivors = wait_dead(kids, timeout=6)
        assert survivors == [], f"outlived their killed parent: {[k.cmdline() for k in survivors]}"
        assert wait_gone([path], timeout=6) == [], f"{path} outlived its runtime"
    finally:
        stop_process(proc)
        kill_all(kids)
        if proc.stdout:
            proc.stdout.close()


def test_kill_9_idle_parent():
    run_and_kill(IDLE_PARENT)


def test_kill_9_parent_while_kernels_run(tmp_path):
    mark = tmp_path / "started"

    def ready():
        assert wait_until(mark.exists, timeout=20), "the kernel never started"

    run_and_kill(BUSY_PARENT, str(mark), ready=ready)
