"""The worker processes a broker starts itself (``python -m broker --workers N``):
spawning, restarting, and backing off from workers that keep dying.

The server tells it when a worker it started connects; it tells the server when one of
them has exited (so the server fails or reruns what that worker held) and restarts it:
at once if it had served, ever more slowly if it keeps dying before it connects (a
broken environment).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pto.wire import shm
from pto.wire.chips import chip_label, host_chip, host_index
from pto.wire.sockets import child_env

log = logging.getLogger("pto.broker")

_MAX_BACKOFF_S = 5.0


@dataclass
class WorkerProcess:
    """A worker this broker started and restarts when it dies."""

    device: int
    popen: subprocess.Popen | None = None
    restarts: int = 0  # deaths in a row before connecting, for back-off
    start_at: float = 0.0
    connected: bool = False  # it said WorkerHello
    last_exit: tuple[int, str] | None = None  # (pid, how it ended) of the one reaped last


class Supervisor:
    def __init__(self, address: str, devices: list[int], host_workers: int, heartbeat: float,
                 liveness: int, log_dir: str | None = None, curve: str | None = None):
        """Run one worker per chip in ``devices`` and ``host_workers`` host workers, for
        the broker at ``address`` (no devices: run none)."""
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.log_dir = log_dir
        self.curve = curve
        hosts = [host_chip(k) for k in range(host_workers)] if devices else []
        self._procs = {d: WorkerProcess(d) for d in (*devices, *hosts)}

    def devices(self) -> list[int]:
        """The chips and host workers (``host_chip(k)``) it runs."""
        return list(self._procs)

    def process(self, device: int) -> subprocess.Popen | None:
        """The process running ``device``'s worker now, if any."""
        proc = self._procs.get(device)
        return None if proc is None else proc.popen

    def connected(self, device: int, pid: int) -> None:
        """A worker said hello: if it is the one we started, it has served."""
        proc = self._procs.get(device)
        if proc is not None and proc.popen is not None and proc.popen.pid == pid:
            proc.connected = True

    def exit_of(self, device: int, pid: int) -> str | None:
        """How the worker with ``pid`` that we started for ``device`` ended, if it has."""
        proc = self._procs.get(device)
        if proc is not None and proc.last_exit is not None and proc.last_exit[0] == pid:
            return proc.last_exit[1]  # ``tick`` reaped it before the server asked
        if proc is None or proc.popen is None or proc.popen.pid != pid:
            return None  # not ours (an external worker): the server watches its pid
        code = proc.popen.poll()
        return None if code is None else exit_text(code)

    def tick(self, now: float, stopping: bool) -> None:
        """Start the workers that are due: new ones, and dead ones after their back-off."""
        for proc in self._procs.values():
            if proc.popen is not None:
                if proc.popen.poll() is None:
                    continue
                # (the server fails what a dead one held when exit_of says so, which may be
                # after this: keep how it ended)
                proc.last_exit = (proc.popen.pid, exit_text(proc.popen.returncode))
                shm.reap_pid(proc.popen.pid)  # its status segment, if it died unannounced
                proc.popen = None
                proc.restarts = 0 if proc.connected else proc.restarts + 1
                proc.start_at = now + (min(_MAX_BACKOFF_S, 0.1 * 2 ** proc.restarts)
                                       if proc.restarts else 0)
            if now >= proc.start_at and not stopping:
                proc.popen = self._spawn(proc.device)
                proc.connected = False

    def log_hint(self, device: int) -> str:
        """"; worker log: PATH" for error messages, or "" without a log dir."""
        path = self._log_file(device)
        return f"; worker log: {path}" if path else ""

    def _log_file(self, device: int) -> str | None:
        if not self.log_dir:
            return None
        name = f"worker-{device}.log" if device >= 0 else f"host-{host_index(device)}.log"
        return os.path.join(self.log_dir, name)

    def _spawn(self, device: int) -> subprocess.Popen:
        role = ["--device", str(device)] if device >= 0 else ["--host", str(host_index(device))]
        cmd = [sys.executable, "-m", "worker", "--broker", self.address, *role,
               "--parent-pid", str(os.getpid()), "--heartbeat", str(self.heartbeat),
               "--liveness", str(self.liveness)]
        log_file = self._log_file(device)
        if log_file:
            cmd += ["--log-file", log_file]
        if self.curve:
            cmd += ["--curve", self.curve]
        log.info("starting %s worker", chip_label(device))
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=child_env())

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the workers: SIGTERM at once those that never connected (they had no
        Shutdown; on SIGTERM a worker removes its status segment and exits), wait for the
        others (already asked to stop) up to ``timeout``, SIGTERM the late ones, then
        SIGKILL those still there."""
        running = [p for p in self._procs.values() if p.popen is not None]
        for proc in running:
            if not proc.connected and proc.popen.poll() is None:
                proc.popen.terminate()
        deadline = time.monotonic() + timeout
        late = []
        for proc in running:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.terminate()
                late.append(proc.popen)
        deadline = time.monotonic() + timeout / 2
        for popen in late:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
                shm.reap_pid(popen.pid)  # it had no chance to remove its status segment


def exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
