"""A killed client takes its embedded broker, its workers and its segments with it; a
killed broker (embedded or external) leaves nothing of its own or its workers' behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from ._util import (
    REPO,
    SHM_DIR,
    descendants,
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


@pytest.mark.slow
def test_kill_9_parent_while_kernels_run(tmp_path):
    mark = tmp_path / "started"

    def ready():
        assert wait_until(mark.exists, timeout=20), "the kernel never started"

    run_and_kill(BUSY_PARENT, str(mark), ready=ready)


# ---- a killed broker ----------------------------------------------------------------------

# A client whose group task is stuck in its kernel on both chips (so the broker holds a
# group barrier and each worker is busy) when the broker is killed.
GROUP_CLIENT = textwrap.dedent(
    """
    import os, sys, time, numpy as np, pto

    MARK, BROKER = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)

    def stuck(x):
        open(f"{MARK}.{pto.task().rank}", "w").close()
        time.sleep(600)

    def orch(ctx, args):
        ctx.submit_group(ctx.peers(), "stuck", [pto.Arg.input(ctx.tensor(args["x"]))])

    rt = pto.Runtime(level="host", platform="sim", devices=[0, 1], broker=BROKER)
    rt.register("o", orch=orch, kernels={"stuck": stuck})
    print(os.getpid(), flush=True)
    try:
        rt.run("o", args={"x": np.arange(8.0)})   # blocks until the broker dies
    except pto.BrokerLost:
        print("lost", flush=True)
    time.sleep(600)
    """
)


def owned_by(pids: set[int]) -> list[str]:
    """Our segments and semaphores in /dev/shm whose owner is one of ``pids``."""
    out = []
    for name in os.listdir(SHM_DIR):
        bare = name.removeprefix("sem.")
        if not bare.startswith("pto_"):
            continue
        head = bare[len("pto_"):].split("x", 1)[0]
        if head.isdigit() and int(head) in pids:
            out.append(name)
    return out


@pytest.mark.parametrize("how", ["embedded", "external"])
def test_kill_9_broker_leaves_nothing_of_it_or_its_workers_within_5s(tmp_path, how):
    mark = tmp_path / "started"
    external = None
    argv = [str(mark)]
    if how == "external":
        address = f"ipc://{tmp_path}/killed.sock"
        external = subprocess.Popen(
            [sys.executable, "-m", "broker", "--listen", address, "--workers", "2",
             "--log-dir", str(tmp_path / "logs")],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert read_line(external, timeout=30) == address
        argv.append(address)
    client = subprocess.Popen([sys.executable, "-c", GROUP_CLIENT, *argv], cwd=REPO,
                              stdout=subprocess.PIPE)
    kids: list[psutil.Process] = []
    try:
        assert int(read_line(client, timeout=40)) == client.pid
        started = [tmp_path / f"started.{rank}" for rank in (0, 1)]
        assert wait_until(lambda: all(p.exists() for p in started), timeout=20), \
            "the group never started"
        broker = psutil.Process(external.pid if external else next(
            p.pid for p in descendants(client.pid) if "broker" in " ".join(p.cmdline())))
        workers = broker.children()
        kids = [broker, *workers]
        pids = {p.pid for p in kids}
        left = owned_by(pids)
        # Before: the broker's group barrier (state and semaphores), each worker's status.
        assert any("_b" in n for n in left) and sum("_status" in n for n in left) >= 2, left
        # (a worker still starting up may have no segment yet: then it has nothing to do)
        log_files = [(cmd := w.cmdline())[cmd.index("--log-file") + 1] for w in workers
                     if owned_by({w.pid})]
        assert len(log_files) >= 2, left
        broker.kill()
        survivors = wait_dead(workers, timeout=6)
        assert survivors == [], f"outlived their broker: {[w.cmdline() for w in survivors]}"
        assert wait_until(lambda: not owned_by(pids), timeout=5), \
            f"left behind by a killed broker and its workers: {owned_by(pids)}"
        # ...removed by the workers themselves (another broker's janitor might have too).
        for log_file in log_files:
            text = open(log_file).read()
            assert "removed status segment" in text, text[-2000:]
        assert read_line(client, timeout=10) == "lost"  # the blocked run noticed
    finally:
        stop_process(client)
        if external is not None:
            stop_process(external)
        kill_all(kids)
        for proc in (client, external):
            if proc is not None and proc.stdout:
                proc.stdout.close()
