"""Small helpers shared by the integration tests (no pto internals: only the OS view).

Kernels must NOT live here: kernels travel to workers by value from the test module,
and anything they reference from this module would be pickled by import path.
"""

from __future__ import annotations

import gc
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
SHM_DIR = Path("/dev/shm")


def shm_path(name_or_handle: object) -> Path:
    """The /dev/shm file of a segment name ("/pto_x_1") or of a handle."""
    name = getattr(name_or_handle, "name", name_or_handle)
    assert isinstance(name, str), name
    return SHM_DIR / name.lstrip("/")


def pto_segments() -> set[str]:
    """File names of every pto segment currently in /dev/shm."""
    try:
        return {p for p in os.listdir(SHM_DIR) if p.startswith("pto_")}
    except FileNotFoundError:  # pragma: no cover
        return set()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(interval)


def wait_gone(paths: Iterable[Path], timeout: float = 5.0) -> list[Path]:
    """Wait (collecting garbage) until every path is gone; return the ones still there."""
    paths = list(paths)

    def gone() -> bool:
        gc.collect()
        return not any(p.exists() for p in paths)

    wait_until(gone, timeout)
    return [p for p in paths if p.exists()]


def is_alive(proc: psutil.Process) -> bool:
    """True if the process runs (a zombie, or a reused pid, counts as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """Wait until no process of ``procs`` is alive; return the survivors."""
    procs = list(procs)
    wait_until(lambda: not any(is_alive(p) for p in procs), timeout)
    return [p for p in procs if is_alive(p)]


def kill_all(procs: Iterable[psutil.Process]) -> None:
    """Clean-up only: SIGKILL the given processes (ones this test started) by pid."""
    for p in procs:
        try:
            if is_alive(p):
                p.kill()
        except psutil.Error:
            pass


def children() -> list[psutil.Process]:
    """Every live descendant of this test process."""
    return [p for p in psutil.Process().children(recursive=True) if is_alive(p)]


def chip_workers(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The chip workers (``python -m worker ... --device N``) among ``procs``, not host
    workers or the fork server."""
    found = []
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "worker" in cmd and "--device" in cmd:
            found.append(p)
    return found


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """Read one line of ``proc``'s stdout (a pipe, binary) within ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no output line within {timeout}s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            raise EOFError(f"process exited (rc={proc.poll()}) before a full line: {buf!r}")
        buf += chunk
    return buf.decode().strip()


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Clean-up only: SIGTERM, then SIGKILL, a process this test started, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def owner_of(name_or_handle: object) -> str:
    """The "pto_<owner>" part of a segment name: every segment of one runtime shares it."""
    return shm_path(name_or_handle).name.rsplit("_", 1)[0]


def segments_of(owner: str) -> set[str]:
    """Segments in /dev/shm that belong to the runtime whose owner_of() is ``owner``."""
    return {s for s in pto_segments() if s.rsplit("_", 1)[0] == owner}


SCRIPT = REPO / "scripts" / "start_broker.sh"


class ExternalBroker:
    """A broker started by start_broker.sh; ``procs`` is the script and all it started."""

    def __init__(self, tmp_path, workers: int = 2, args: tuple[str, ...] = ()):
        self.log = open(tmp_path / f"broker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(SCRIPT), "--workers", str(workers), *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.procs: list[psutil.Process] = [psutil.Process(self.proc.pid)]
        try:
            self.address = read_line(self.proc, timeout=30)
        except Exception:
            self.stop()
            raise
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.address.startswith(("ipc://", "tcp://")), self.address
        # the workers: every process the script started (some may still be starting)
        wait_until(lambda: len(self.chip_workers()) >= workers, timeout=10)
        self.remember()
        time.sleep(0.1)  # its host worker may come a moment after the chip workers
        self.remember()

    def _drain(self) -> None:
        try:
            while self.proc.stdout.read(4096):
                pass
        except (OSError, ValueError):
            pass

    def descendants(self) -> list[psutil.Process]:
        return [p for p in descendants(self.proc.pid) if is_alive(p)]

    def chip_workers(self) -> list[psutil.Process]:
        """Its ``python -m worker --device N`` processes."""
        return chip_workers(self.descendants())

    def remember(self) -> None:
        known = {p.pid for p in self.procs}
        self.procs += [p for p in self.descendants() if p.pid not in known]

    def logtext(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        """Clean-up: SIGTERM the script, then make sure nothing it started survives."""
        try:
            stop_process(self.proc, timeout=10)
        finally:
            kill_all(self.procs)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.log.close()
