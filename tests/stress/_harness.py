"""The plumbing of the stress tests: one long-lived broker, client processes, the OS view.

Everything a test starts writes to files (never pipes, so nobody blocks on a full pipe),
and runs in its own process group, so a clean-up SIGKILL reaches all of it. Only
processes these helpers started are ever signalled, always by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from integration._util import chip_workers

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("dag_client.py")
SHM_DIR = Path("/dev/shm")


def pto_segments() -> list[str]:
    """Every pto shared-memory object: segments, kept segments (``ptocache_*``) and
    (``sem.pto_*``) semaphores."""
    return sorted(n for n in os.listdir(SHM_DIR)
                  if n.startswith(("pto_", "ptocache_", "sem.pto_")))


def owner_pid(segment: str) -> int | None:
    """The pid in ``pto_<pid>x<random>_<id>`` (or ``ptocache_...``, ``sem.pto_...``): the
    creating process."""
    head = segment.split("_", 1)[1].split("x", 1)[0]
    return int(head) if head.isdigit() else None


def segments_of(pids: set[int]) -> list[str]:
    """The pto objects created by these processes (others may share this machine)."""
    return [s for s in pto_segments() if owner_pid(s) in pids]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return bool(pred())
        time.sleep(interval)
    return True


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PTO_BROKER"}


class StressBroker:
    """``scripts/start_broker.sh --workers N``: the broker (the script execs it) + N workers."""

    def __init__(self, tmp_path: Path, workers: int = 4):
        self.tmp = tmp_path
        self.n_workers = workers
        self.out, self.err = tmp_path / "broker.out", tmp_path / "broker.err"
        with open(self.out, "wb") as fo, open(self.err, "wb") as fe:
            self.proc = subprocess.Popen(
                ["bash", str(REPO / "scripts" / "start_broker.sh"), "--workers", str(workers)],
                cwd=REPO, env=_env(), stdout=fo, stderr=fe, start_new_session=True,
            )
        self.ps = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {self.proc.pid: self.ps}  # every pid it had
        self.address = self._first_line(timeout=30)
        assert self.address.startswith(("ipc://", "tcp://")), self.address

    def _first_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.out.read_text(errors="replace")
            if "\n" in text:
                return text.split("\n", 1)[0].strip()
            if self.proc.poll() is not None:
                raise EOFError(f"broker exited (rc={self.proc.returncode}) before its address:"
                               f" {text!r}\n{tail(self.err)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"broker printed no address within {timeout}s ({text!r})")
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = [p for p in self.ps.children(recursive=True) if alive(p)]
        except psutil.Error:
            return []
        for p in kids:
            self.seen.setdefault(p.pid, p)
        return kids

    def chip_workers(self) -> list[psutil.Process]:
        """The live chip workers (``python -m worker ... --device N``), not host workers."""
        return chip_workers(self.descendants())

    def wait_workers(self, timeout: float = 30) -> bool:
        """Until every chip has a live worker process again."""
        return wait_for(lambda: len(self.chip_workers()) >= self.n_workers, timeout, 0.1)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; on timeout SIGKILL its process group and return None."""
        self.descendants()  # remember the last workers too
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
                return None
        return self.proc.returncode

    def stragglers(self, timeout: float = 5.0) -> list[str]:
        """Processes it ever had that are still alive ``timeout`` s after it stopped."""
        procs = list(self.seen.values())
        wait_for(lambda: not any(alive(p) for p in procs), timeout)
        out = []
        for p in procs:
            if alive(p):
                try:
                    out.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
                    p.kill()
                except psutil.Error:
                    pass
        return out

    def clean_exit(self, rc: int | None) -> bool:
        return rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


class Client:
    """One ``dag_client.py`` process."""

    def __init__(self, tmp_path: Path, index: int, address: str, *args: str):
        self.index = index
        self.out, self.err = tmp_path / f"c{index}.out", tmp_path / f"c{index}.err"
        with open(self.out, "wb") as fo, open(self.err, "wb") as fe:
            self.proc = subprocess.Popen(
                [sys.executable, str(CLIENT), "--broker", address, *args],
                cwd=REPO, env=_env(), stdout=fo, stderr=fe, start_new_session=True,
            )

    def wait(self, deadline: float) -> bool:
        """Wait until the process ends or the monotonic ``deadline``; True if it ended."""
        try:
            self.proc.wait(timeout=max(0.5, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def report(self) -> dict:
        return json.loads(self.out.read_text().splitlines()[-1])

    def connected(self) -> bool:
        return "connected to " in tail(self.err, 100_000)

    def runs_done(self) -> int:
        text = tail(self.err, 100_000)
        return text.count(" ok\n") + text.count(" failed: ")

    def describe(self) -> str:
        return (f"client {self.index} (pid {self.proc.pid}) rc={self.proc.returncode}\n"
                f"stdout: {tail(self.out, 1000)}\nstderr: {tail(self.err)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def settle_rss(broker: StressBroker, limit: int, timeout: float = 10.0) -> int:
    """The broker's RSS once it is at most ``limit`` bytes, or its last value at ``timeout``."""
    rss = broker.rss()
    deadline = time.monotonic() + timeout
    while rss > limit and time.monotonic() < deadline:
        time.sleep(0.25)
        rss = broker.rss()
    return rss
