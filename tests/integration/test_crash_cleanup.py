"""Nothing left after a crash, nobody else's touched: the janitor (every broker start) and
``pto clean`` remove this user's pto files in /dev/shm whose owner is dead, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import posix_ipc
import psutil
import pytest

import pto

from ._util import REPO, SHM_DIR, descendants, read_line, stop_process, wait_dead, wait_until

pytestmark = pytest.mark.timeout(120)

SCRIPT = REPO / "scripts" / "start_broker.sh"
NOBODY = 65534


def scale(x, y, factor):
    y[:] = x * factor


def everywhere(ctx, args):
    x = ctx.tensor(args["x"])
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "k", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(chip + 2)])
        outs.append(y)
    return outs


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def pto_cmd(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pto", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)


def make_segment(name: str) -> str:
    """Create /dev/shm/<name> as pto would (mode 0600); returns the file name."""
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    return name


@pytest.fixture
def planted():
    """Four files of a dead owner pid and one of a live one: ``mine`` and ``sem`` (this user's,
    owner dead: to remove), ``live`` (owner alive), ``foreign`` (owner dead, another uid)."""
    if os.getuid() != 0:
        pytest.skip("needs root to give a segment to another user (CI runs as root)")
    dead = dead_pid()
    files = {
        "mine": make_segment(f"pto_{dead}xdead01_1"),
        "cache": make_segment(f"ptocache_{dead}xdead01_2"),
        "live": make_segment(f"pto_{os.getpid()}xa11fe0_1"),
        "foreign": make_segment(f"pto_{dead}xf0e1a0_1"),
    }
    sem = posix_ipc.Semaphore(f"/pto_{dead}xdead01_b1", posix_ipc.O_CREX, mode=0o600)
    sem.close()
    files["sem"] = f"sem.pto_{dead}xdead01_b1"
    os.chown(SHM_DIR / files["foreign"], NOBODY, NOBODY)
    try:
        yield files
    finally:
        for f in files.values():
            try:
                os.unlink(SHM_DIR / f)
            except FileNotFoundError:
                pass


def present(files: dict[str, str]) -> set[str]:
    return {k for k, f in files.items() if (SHM_DIR / f).exists()}


def test_pto_clean_removes_only_this_users_dead_segments(planted):
    dry = pto_cmd("clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert present(planted) == set(planted), "--dry-run removed something"
    for key in ("mine", "cache", "sem"):
        assert f"would remove {SHM_DIR / planted[key]}" in dry.stdout, dry.stdout
    assert planted["live"] not in dry.stdout and planted["foreign"] not in dry.stdout

    done = pto_cmd("clean")
    assert done.returncode == 0, done.stderr
    assert present(planted) == {"live", "foreign"}, done.stdout
    for key in ("mine", "cache", "sem"):
        assert f"removed {SHM_DIR / planted[key]}" in done.stdout, done.stdout
    assert planted["live"] not in done.stdout and planted["foreign"] not in done.stdout
    assert (SHM_DIR / planted["foreign"]).stat().st_uid == NOBODY

    again = pto_cmd("clean")  # nothing left to do
    assert again.stdout.strip().endswith("0 file(s) of dead pto processes removed"), again.stdout


def test_broker_start_janitor_follows_the_same_rules(planted):
    proc = subprocess.Popen([sys.executable, "-m", "broker"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        read_line(proc, timeout=30)
        assert wait_until(lambda: present(planted) == {"live", "foreign"}, timeout=10), (
            present(planted))
    finally:
        stop_process(proc)
        proc.stdout.close()
    assert present(planted) == {"live", "foreign"}


class SessionBroker:
    """scripts/start_broker.sh --workers 2 in its own session (its own process group), as a
    service manager or a shell's `setsid` would start it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(SCRIPT), "--workers", "2"], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self.address = read_line(self.proc, timeout=30)
        self.pgid = os.getpgid(self.proc.pid)

    def pids(self) -> set[int]:
        return {self.proc.pid, *(p.pid for p in descendants(self.proc.pid))}

    def kill_group(self) -> list[psutil.Process]:
        procs = [psutil.Process(pid) for pid in self.pids()]
        os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(10)
        assert wait_dead(procs, timeout=10) == []
        self.proc.stdout.close()
        return procs


def leftovers_of(pids: set[int]) -> list[str]:
    """Files in /dev/shm whose owner is one of ``pids``."""
    found = []
    for f in os.listdir(SHM_DIR):
        base = f.removeprefix("sem.")
        if base.startswith(("pto_", "ptocache_")):
            head = base.split("_", 1)[1].split("x", 1)[0]
            if head.isdigit() and int(head) in pids:
                found.append(f)
    return found


def run_work_then_kill(broker: SessionBroker) -> tuple[set[int], list[str]]:
    """Run tasks on both chips, kill -9 the broker's whole process group; returns the dead
    pids and the stale socket files."""
    with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
        rt.register("ext", orch=everywhere, kernels={"k": scale})
        outs = rt.run("ext", args={"x": np.ones(8)})
        assert [float(y.numpy()[0]) for y in outs] == [2.0, 3.0]
        wait_until(lambda: len(broker.pids()) >= 4, timeout=10)  # script, 2 chips, 1 host
        pids = broker.pids()
    broker.kill_group()
    path = broker.address.removeprefix("ipc://")
    sockets = [p for p in (path, path + ".w") if os.path.exists(p)]
    return pids, sockets


def test_kill9_of_an_external_brokers_group_then_pto_clean_leaves_nothing():
    broker = SessionBroker()
    try:
        pids, sockets = run_work_then_kill(broker)
    finally:
        if broker.proc.poll() is None:
            os.killpg(broker.pgid, signal.SIGKILL)
    left = leftovers_of(pids)
    # what this test is about: the dead workers' status words are there before the clean
    assert any(f.endswith("_status") for f in left), left
    assert sockets, "the killed broker left no socket file (nothing for pto clean to do)"
    out = pto_cmd("clean")
    assert out.returncode == 0, out.stderr
    assert leftovers_of(pids) == []
    for f in left:
        assert f"removed {SHM_DIR / f}" in out.stdout, out.stdout
    for path in sockets:
        assert not os.path.exists(path) and f"removed {path}" in out.stdout, out.stdout


def test_kill9_of_an_external_brokers_group_then_next_broker_start_leaves_nothing():
    broker = SessionBroker()
    try:
        pids, sockets = run_work_then_kill(broker)
    finally:
        if broker.proc.poll() is None:
            os.killpg(broker.pgid, signal.SIGKILL)
    assert any(f.endswith("_status") for f in leftovers_of(pids))
    nxt = SessionBroker()  # same runtime dir: its start-up sweeps segments and sockets
    procs = []
    try:
        wait_until(lambda: len(nxt.pids()) >= 4, timeout=10)
        procs = [psutil.Process(p) for p in nxt.pids()]
        assert wait_until(lambda: not leftovers_of(pids), timeout=10), leftovers_of(pids)
        assert wait_until(lambda: not any(map(os.path.exists, sockets)), timeout=10), sockets
    finally:
        stop_process(nxt.proc)
        nxt.proc.stdout.close()
        if wait_dead(procs, timeout=10):
            os.killpg(nxt.pgid, signal.SIGKILL)
