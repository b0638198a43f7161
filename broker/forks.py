"""The broker's side of the worker fork server (``python -m worker.forkserver``).

The Supervisor asks ``ForkServer`` for a worker with the argv it would have exec'd and,
a moment later, collects its pid: the server forks it from a process that has already
imported what a worker needs (~0.3 s of CPU an exec'd worker spends), and the worker is
reparented to the broker, a child subreaper. ``ForkedWorker`` then stands for it where a
``subprocess.Popen`` stood for an exec'd one: same pid, same exit status, same signals.

Requests never block the broker's loop: ``start`` writes a line, ``started`` reads the
replies that have come (the server handles requests in order, one fork each). A fork
server exits when idle; the Supervisor starts another when it needs one.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("pto.broker")

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(on: bool = True) -> bool:
    """Have orphaned descendants reparented to this process instead of init (Linux 3.4+),
    so that it can wait for the workers the fork server starts (``on=False``: no longer).
    False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def cmdline_bytes(argv: list[str]) -> int:
    """How much of a process's argv area ``argv`` fills (each argument and its NUL)."""
    return sum(len(os.fsencode(a)) + 1 for a in argv)


def reap_adopted(ours: set[int]) -> None:
    """Reap the exited children of a subreaper that are not in ``ours``: descendants
    orphaned to it (a kernel's own child that outlived its worker). Those in ``ours`` are
    left for their owner to wait for; peeking (WNOWAIT) never takes their status."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in ours:
            return  # the first exited child is one of ours: the rest wait for a next call
        os.waitpid(info.si_pid, 0)


class ForkedWorker:
    """A worker the fork server started, as the parts of ``subprocess.Popen`` the
    Supervisor uses. It is our child (we are its subreaper), so ``waitpid`` works."""

    def __init__(self, pid: int, args: list[str]):
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: nothing left to learn
                log.error("worker pid %d is not our child: its exit status is lost", self.pid)
                self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One ``python -m worker.forkserver`` of this broker."""

    module = "worker.forkserver"

    def __init__(self, env: dict[str, str], room: int, idle_exit: float = 2.0):
        """Start it with ``env`` (the workers inherit it); ``room``: bytes of command line
        the longest worker's argv needs (``worker.forkserver.set_cmdline``); it exits
        after ``idle_exit`` seconds without a request."""
        req_read, self._requests = os.pipe()
        self._replies, reply_write = os.pipe()
        os.set_blocking(self._replies, False)
        argv = ["-m", self.module, "--requests", str(req_read),
                "--replies", str(reply_write), "--parent-pid", str(os.getpid()),
                "--idle-exit", str(idle_exit)]
        own = cmdline_bytes([sys.executable, *argv])
        head, _, name = sys.executable.rpartition("/")
        argv0 = f"{head}{'/' * (1 + max(0, room - own))}{name}" if head else sys.executable
        try:
            self.process = subprocess.Popen([argv0, *argv], executable=sys.executable,
                                            stdin=subprocess.DEVNULL, env=env,
                                            pass_fds=(req_read, reply_write))
        finally:
            os.close(req_read)
            os.close(reply_write)
        self._buffer = b""
        self.pending: set[int] = set()  # tags asked for and not answered

    def alive(self) -> bool:
        return self._requests >= 0 and self.process.poll() is None

    def start(self, tag: int, argv: list[str]) -> bool:
        """Ask for a worker running ``argv``; False if the server is gone."""
        line = json.dumps({"tag": tag, "argv": argv}).encode() + b"\n"
        try:
            os.write(self._requests, line)  # a few hundred bytes: the pipe takes it whole
        except OSError:
            return False
        self.pending.add(tag)
        return True

    def started(self) -> list[tuple[int, int | None, str]]:
        """(tag, pid, "") per worker started since the last call; (tag, None, why) per
        request that failed, and for every request left when the server is gone."""
        try:
            while chunk := os.read(self._replies, 65536):
                self._buffer += chunk
        except BlockingIOError:
            chunk = None
        out = []
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            reply = json.loads(line)
            tag = reply.get("tag")
            if tag not in self.pending:
                log.error("fork server: %s", reply.get("error", reply))
                continue
            self.pending.discard(tag)
            out.append((tag, reply.get("pid"), reply.get("error", "")))
        if chunk is not None and self.pending:  # EOF: it died with requests unanswered
            out += [(tag, None, "the fork server died") for tag in sorted(self.pending)]
            self.pending.clear()
        return out

    def close(self, timeout: float) -> list[tuple[int, int | None, str]]:
        """Stop it: what it started after the last ``started`` call is returned, for the
        caller to stop too."""
        if self._requests >= 0:
            os.close(self._requests)  # it exits after the requests it has read
            self._requests = -1
        out = []
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            out += self.started()
            time.sleep(0.005)
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        out += self.started()
        os.close(self._replies)
        return out
