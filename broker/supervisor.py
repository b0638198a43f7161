"""The worker processes a broker starts itself (``python -m broker --workers N``):
spawning, restarting, and backing off from workers that keep dying.

The server tells it when a worker it started connects; it tells the server when one of
them has exited (so the server fails or reruns what that worker held) and restarts it:
at once if it had served, ever more slowly if it keeps dying before it connects (a
broken environment).

Workers are forked from a warm fork server (``broker.forks``) unless PTO_FORK_WORKERS=0
or it cannot work here (not Linux, or it failed to start workers 3 times in a row): then
each is exec'd as ``python -m worker``. Either way the worker is this process's child,
with the same command line.
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

from .forks import ForkedWorker, ForkServer, become_subreaper, cmdline_bytes, reap_adopted

log = logging.getLogger("pto.broker")

_MAX_BACKOFF_S = 5.0
_FORK_FAILURES = 3  # in a row, before exec'ing workers instead


@dataclass
class WorkerProcess:
    """A worker this broker started and restarts when it dies."""

    device: int
    popen: subprocess.Popen | ForkedWorker | None = None
    forking: bool = False  # asked the fork server for it, pid not known yet
    restarts: int = 0  # deaths in a row before connecting, for back-off
    start_at: float = 0.0
    connected: bool = False  # it said WorkerHello
    last_exit: tuple[int, str] | None = None  # (pid, how it ended) of the one reaped last


class Supervisor:
    def __init__(self, address: str, devices: list[int], host_workers: int, heartbeat: float,
                 liveness: int, log_dir: str | None = None, curve: str | None = None,
                 fork: bool = True):
        """Run one worker per chip in ``devices`` and ``host_workers`` host workers, for
        the broker at ``address`` (no devices: run none); ``fork``: from a fork server."""
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.log_dir = log_dir
        self.curve = curve
        hosts = [host_chip(k) for k in range(host_workers)] if devices else []
        self._procs = {d: WorkerProcess(d) for d in (*devices, *hosts)}
        self._forks: ForkServer | None = None
        # A subreaper inherits its descendants' orphans (reap_adopted takes them) until stop.
        self._subreaper = bool(fork and self._procs) and become_subreaper()
        self._fork_failures = 0 if self._subreaper else _FORK_FAILURES
        self._fork_server()  # its imports overlap the broker's own start-up

    def devices(self) -> list[int]:
        """The chips and host workers (``host_chip(k)``) it runs."""
        return list(self._procs)

    def process(self, device: int) -> subprocess.Popen | ForkedWorker | None:
        """The process running ``device``'s worker now, if any."""
        proc = self._procs.get(device)
        return None if proc is None else proc.popen

    def connected(self, device: int, pid: int) -> None:
        """A worker said hello: if it is the one we started, it has served."""
        self._collect_forked()  # its hello may come before the fork server's reply
        proc = self._procs.get(device)
        if proc is not None and proc.popen is not None and proc.popen.pid == pid:
            proc.connected = True

    def exit_of(self, device: int, pid: int, gone: bool = False) -> str | None:
        """How the worker with ``pid`` that we started for ``device`` ended, if it has.
        ``gone``: the caller saw the process dead, so its status is a moment away at most
        (a worker whose main thread has exited while its other threads have not, as a
        SIGKILL takes them one by one, is a zombie that ``waitpid`` cannot take yet)."""
        proc = self._procs.get(device)
        if proc is not None and proc.last_exit is not None and proc.last_exit[0] == pid:
            return proc.last_exit[1]  # ``tick`` reaped it before the server asked
        if proc is None or proc.popen is None or proc.popen.pid != pid:
            return None  # not ours (an external worker): the server watches its pid
        code = proc.popen.poll()
        if code is None and gone:
            try:
                code = proc.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                return None
        return None if code is None else exit_text(code)

    def tick(self, now: float, stopping: bool) -> None:
        """Start the workers that are due: new ones, and dead ones after their back-off."""
        self._collect_forked()
        for proc in self._procs.values():
            if proc.forking:
                continue
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
                self._start(proc)

    def _start(self, proc: WorkerProcess) -> None:
        proc.connected = False
        log.info("starting %s worker", chip_label(proc.device))
        argv = self._argv(proc.device)
        forks = self._fork_server()
        if forks is not None and forks.start(proc.device, argv):
            proc.forking = True
            return
        proc.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=child_env())

    def _fork_server(self) -> ForkServer | None:
        """A live fork server, started if need be (one exits when idle); None: exec."""
        if self._forks is not None and not self._forks.alive():
            self._retire_fork_server()
        if self._forks is None and self._fork_failures < _FORK_FAILURES:
            room = max(cmdline_bytes(self._argv(d)) for d in self._procs)
            try:
                self._forks = ForkServer(child_env(), room)
            except OSError as exc:
                self._fork_failed(f"cannot start the fork server: {exc}")
        return self._forks

    def _retire_fork_server(self, timeout: float = 1.0) -> None:
        for device, pid, error in self._forks.close(timeout):
            self._adopt(device, pid, error)
        self._forks = None

    def _fork_failed(self, why: str) -> None:
        self._fork_failures += 1
        log.error("%s%s", why, "; exec'ing workers from now on"
                  if self._fork_failures == _FORK_FAILURES else "")

    def _collect_forked(self) -> None:
        """Take the pids of the workers the fork server has started since last time."""
        if self._forks is None:
            return
        if self._forks.pending:
            for device, pid, error in self._forks.started():
                self._adopt(device, pid, error)
        elif not self._forks.alive():  # it exited, idle: reap it
            self._retire_fork_server()

    def _adopt(self, device: int, pid: int | None, error: str) -> None:
        proc = self._procs[device]
        proc.forking = False
        if pid is not None:
            proc.popen = ForkedWorker(pid, self._argv(device))
            self._fork_failures = 0
        else:  # the next tick starts it again
            self._fork_failed(f"the fork server did not start {chip_label(device)} worker: "
                              f"{error}")

    def log_hint(self, device: int) -> str:
        """"; worker log: PATH" for error messages, or "" without a log dir."""
        path = self._log_file(device)
        return f"; worker log: {path}" if path else ""

    def _log_file(self, device: int) -> str | None:
        if not self.log_dir:
            return None
        name = f"worker-{device}.log" if device >= 0 else f"host-{host_index(device)}.log"
        return os.path.join(self.log_dir, name)

    def _argv(self, device: int) -> list[str]:
        """The worker's command line, whether exec'd or forked (it shows in ps)."""
        role = ["--device", str(device)] if device >= 0 else ["--host", str(host_index(device))]
        cmd = [sys.executable, "-m", "worker", "--broker", self.address, *role,
               "--parent-pid", str(os.getpid()), "--heartbeat", str(self.heartbeat),
               "--liveness", str(self.liveness)]
        log_file = self._log_file(device)
        if log_file:
            cmd += ["--log-file", log_file]
        if self.curve:
            cmd += ["--curve", self.curve]
        return cmd

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the workers: SIGTERM at once those that never connected (they had no
        Shutdown; on SIGTERM a worker removes its status segment and exits), wait for the
        others (already asked to stop) up to ``timeout``, SIGTERM the late ones, then
        SIGKILL those still there."""
        if self._forks is not None:
            self._retire_fork_server(timeout)
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
        if self._subreaper:  # for a process that goes on (tests): orphans go to init again
            become_subreaper(False)
            self._subreaper = False

    def reap_orphans(self) -> None:
        """Reap the exited children this process inherited as a subreaper (a kernel's own
        child that outlived its worker), leaving those it started alone. For the broker's
        process only: any other child of the caller's counts as an orphan."""
        if not self._subreaper or self._forks is not None and self._forks.pending:
            return  # (a worker being forked has no pid here yet)
        ours = {p.popen.pid for p in self._procs.values() if p.popen is not None}
        if self._forks is not None:
            ours.add(self._forks.process.pid)
        reap_adopted(ours)


def exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
