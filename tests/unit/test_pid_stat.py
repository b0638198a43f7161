"""pto.wire.shm's reading of another process's state and CPU time, which the client uses to
tell a busy local broker (silent, but using CPU) from a frozen or hung one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from pto.wire.shm import pid_alive, pid_stat, pid_state


@pytest.fixture
def child():
    procs = []

    def start(code: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _cpu_after(pid: int, seconds: float) -> tuple[int, int]:
    _, before = pid_stat(pid)
    time.sleep(seconds)
    _, after = pid_stat(pid)
    return before, after


def test_a_busy_process_uses_cpu_a_stopped_one_does_not(child):
    busy = child("while True: pass")
    time.sleep(0.3)
    before, after = _cpu_after(busy.pid, 0.5)
    assert after > before
    busy.send_signal(signal.SIGSTOP)
    time.sleep(0.1)
    assert pid_state(busy.pid) == "T"
    before, after = _cpu_after(busy.pid, 0.5)
    assert after == before
    busy.send_signal(signal.SIGCONT)


def test_a_sleeping_process_uses_no_cpu(child):
    idle = child("import time; time.sleep(60)")
    time.sleep(0.5)
    state, _ = pid_stat(idle.pid)
    assert state == "S"
    before, after = _cpu_after(idle.pid, 0.5)
    assert after == before


def test_gone_and_zombie_processes(child):
    done = child("pass")
    deadline = time.monotonic() + 10
    while pid_state(done.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_state(done.pid) == "Z" and not pid_alive(done.pid)  # exited, not yet reaped
    done.wait()
    assert pid_stat(done.pid) == (None, None) and not pid_alive(done.pid)
