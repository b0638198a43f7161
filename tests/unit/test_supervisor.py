"""The broker's Supervisor: it starts workers (forked from a fork server, or exec'd),
keeps how a worker it reaped ended for the server to report even when its own tick saw
the death first, and stops workers that never connected at once.

No broker listens at the address these use: a worker starts and keeps trying to connect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from broker.forks import ForkedWorker, ForkServer
from broker.supervisor import Supervisor


def _started(sup: Supervisor, device: int = 0, timeout: float = 30.0):
    """Tick until the worker for ``device`` has a process (a forked one's pid comes a
    moment after the request)."""
    deadline = time.monotonic() + timeout
    while (proc := sup.process(device)) is None:
        assert time.monotonic() < deadline, "no worker process started"
        sup.tick(time.monotonic(), stopping=False)
        time.sleep(0.005)
    return proc


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"pto_{pid}x")]


def _wait_until(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(params=[True, False], ids=["forked", "execd"])
def sup(request, tmp_path):
    supervisor = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0], host_workers=1,
                            heartbeat=0.5, liveness=3, log_dir=str(tmp_path),
                            fork=request.param)
    yield supervisor
    supervisor.stop(timeout=2.0)


@pytest.mark.timeout(60)
def test_a_worker_is_our_child_with_the_command_line_of_python_m_worker(sup, tmp_path):
    sup.tick(time.monotonic(), stopping=False)
    for device, role, log in ((0, ["--device", "0"], "worker-0.log"),
                              (-1, ["--host", "0"], "host-0.log")):
        proc = _started(sup, device)
        p = psutil.Process(proc.pid)
        assert p.ppid() == os.getpid()
        cmd = p.cmdline()
        assert os.path.realpath(cmd[0]) == os.path.realpath(sys.executable)
        assert cmd[1:] == ["-m", "worker", "--broker", f"ipc://{tmp_path}/nobody.sock", *role,
                           "--parent-pid", str(os.getpid()), "--heartbeat", "0.5",
                           "--liveness", "3", "--log-file", str(tmp_path / log)], cmd
        path = tmp_path / log
        assert _wait_until(path.exists)  # it logs where it is told


@pytest.mark.timeout(60)
def test_a_worker_reaped_and_restarted_by_tick_is_still_reported_with_its_exit(sup):
    sup.tick(time.monotonic(), stopping=False)
    first = _started(sup)
    assert sup.exit_of(0, first.pid) is None  # running
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    sup.tick(time.monotonic(), stopping=False)  # reaps it ...
    assert sup.process(0) is None
    assert sup.exit_of(0, first.pid) == "killed by SIGKILL"
    # ... and starts the next one after its back-off (it never connected)
    sup.tick(time.monotonic() + 1.0, stopping=False)
    second = _started(sup)
    assert second.pid != first.pid
    assert sup.exit_of(0, first.pid) == "killed by SIGKILL"
    assert sup.exit_of(0, second.pid) is None
    assert sup.exit_of(0, 999_999_999) is None  # not one of ours


# Its main thread ends first; its other thread ends the process a moment later.
_MAIN_THREAD_ENDS_FIRST = """
import ctypes, os, threading, time
threading.Thread(target=lambda: (time.sleep(0.5), os._exit(7))).start()
ctypes.CDLL(None).pthread_exit(None)
"""


@pytest.mark.timeout(60)
def test_exit_of_a_process_seen_gone_waits_for_its_status(tmp_path, monkeypatch):
    # A SIGKILLed worker's main thread may be a zombie before its other threads are gone;
    # waitpid cannot take it yet. The server, which saw it gone, must still learn how it
    # ended (it reported "process gone" with no cause).
    sup = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0], host_workers=0,
                     heartbeat=0.5, liveness=3, fork=False)
    monkeypatch.setattr(sup, "_argv", lambda device: [sys.executable, "-c",
                                                      _MAIN_THREAD_ENDS_FIRST])
    try:
        sup.tick(time.monotonic(), stopping=False)
        proc = _started(sup)
        assert _wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        assert sup.exit_of(0, proc.pid) is None  # not reapable yet
        assert sup.exit_of(0, proc.pid, gone=True) == "exited with code 7"
    finally:
        sup.stop(timeout=2.0)


@pytest.mark.timeout(60)
def test_stop_terminates_a_worker_that_never_connected_at_once(sup):
    sup.tick(time.monotonic(), stopping=False)
    proc = _started(sup)
    # let it get as far as its poll loop (its status segment exists then)
    assert _wait_until(lambda: _segments_of(proc.pid))
    t0 = time.monotonic()
    sup.stop(timeout=2.0)
    took = time.monotonic() - t0
    assert proc.poll() is not None
    # The old stop waited the whole 2 s grace before its SIGTERM; now it is sent at once.
    assert took < 1.5, f"stop took {took:.2f}s"
    assert not _segments_of(proc.pid)  # it removed its segment


@pytest.mark.timeout(60)
def test_stop_right_after_a_start_stops_the_workers_still_being_forked(tmp_path):
    sup = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0, 1, 2], host_workers=1,
                     heartbeat=0.5, liveness=3)
    sup.tick(time.monotonic(), stopping=False)  # four requests, no pid read yet
    sup.stop(timeout=2.0)
    pids = [sup.process(d).pid for d in sup.devices()]
    assert len(pids) == 4
    assert not [pid for pid in pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def _fork_server_of(pid: int) -> psutil.Process | None:
    return next((p for p in psutil.Process(pid).children()
                 if p.name() == "pto-forkserver" and p.status() != psutil.STATUS_ZOMBIE), None)


@pytest.mark.timeout(60)
def test_a_fork_server_that_died_is_replaced_and_an_idle_one_exits(tmp_path):
    sup = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0], host_workers=0,
                     heartbeat=0.5, liveness=3)
    try:
        sup.tick(time.monotonic(), stopping=False)
        first = _started(sup)
        server = _fork_server_of(os.getpid())
        server.kill()
        server.wait(10)
        first.kill()
        first.wait(10)
        sup.tick(time.monotonic() + 1.0, stopping=False)  # reaps the worker, then restarts it
        second = _started(sup)
        assert second.pid != first.pid and type(second) is ForkedWorker
        assert psutil.Process(second.pid).ppid() == os.getpid()
        # the new server leaves after 2 s without requests, and is reaped by a tick
        assert _wait_until(lambda: (sup.tick(time.monotonic(), stopping=False),
                                    _fork_server_of(os.getpid()))[1] is None, timeout=10)
    finally:
        sup.stop(timeout=2.0)


class _BrokenForkServer(ForkServer):
    module = "worker.no_such_module"  # the server exits at once: no worker is ever forked


@pytest.mark.timeout(60)
def test_workers_are_execd_when_the_fork_server_keeps_failing(tmp_path, monkeypatch):
    monkeypatch.setattr("broker.supervisor.ForkServer", _BrokenForkServer)
    sup = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0], host_workers=0,
                     heartbeat=0.5, liveness=3)
    try:
        sup.tick(time.monotonic(), stopping=False)
        proc = _started(sup)  # three failed requests, then exec
        assert type(proc) is subprocess.Popen
        assert psutil.Process(proc.pid).cmdline()[1:3] == ["-m", "worker"]
    finally:
        sup.stop(timeout=2.0)
