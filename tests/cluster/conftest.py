"""Fixtures for the L4 tests: one 2-host LocalCluster shared by the test modules, checked
when each module ends and when it stops.

Starting a Ray cluster costs seconds, so the modules share one ``cluster`` (2 hosts of 2
chips) until a module breaks it (``BREAKS_THE_CLUSTER = True``: it kills hosts), and a module's
tests that do not need their own share one ``rt`` (a cluster runtime on it). Host actors'
brokers, workers and segments legitimately live across tests, so the cluster declares its
hosts' process trees long-lived to the per-test leak check (tests/conftest.py) and is checked
here instead:

- when a module ends (its runtimes closed): no pto process and no pto segment on any host;
- once the cluster is stopped: no Ray process (raylet, gcs_server, ``ray::*`` workers,
  agents, dashboard, ...) and no pto process of this test session, no new pto segment.

A test that kills a host (``kill_host``) runs last in its module (test_l4_failures.py), so
every other test sees both hosts. All of tests/cluster runs on one xdist worker (the ``ray``
group, tests/conftest.py), so the sharing holds under xdist too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

import pto
from pto.wire import shm

GRACE_S = 10.0
MARK = "PTO_TEST_SESSION"  # set by tests/conftest.py, inherited by every process we start
_RAY_NAMES = ("raylet", "gcs_server")
_RAY_CMD = ("/ray/", "ray::", "ray_process_reaper")
_PTO_CMD = ("-m broker", "-m worker", "broker/__main__.py", "worker/__main__.py")


def _session_processes(match: Callable[[str, str], bool]) -> list[psutil.Process]:
    """Live processes of this test session (started by it: they carry its marker) that match."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        name, cmd = p.info["name"] or "", " ".join(p.info["cmdline"] or [])
        if not match(name, cmd):
            continue
        try:
            if p.environ().get(MARK) == os.environ[MARK]:
                found.append(p)
        except psutil.Error:  # gone, or not ours to inspect
            continue
    return found


def ray_processes() -> list[psutil.Process]:
    """This session's Ray processes: raylets, GCS, workers (``ray::...``), agents, dashboard."""
    return _session_processes(
        lambda name, cmd: name in _RAY_NAMES or name.startswith("ray::") or any(
            s in cmd for s in _RAY_CMD))


def pto_processes() -> list[psutil.Process]:
    """This session's pto brokers and chip workers."""
    return _session_processes(lambda name, cmd: any(s in cmd for s in _PTO_CMD))


def pto_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("pto_", "ptocache_"))}


def segment_owner(name: str) -> int | None:
    """The pid in a segment's name (``pto_<pid>x<id>_<n>``)."""
    return shm.owner_pid(shm.owner_of(name))


def segments_of(pids: set[int]) -> list[str]:
    """pto segments whose owner is in ``pids``."""
    return sorted(n for n in pto_segments() if segment_owner(n) in pids)


def _left_by_session(name: str, live_roots: set[int]) -> bool:
    """A segment of this test session (its owner dead, or alive with our marker), and not of
    a cluster still up."""
    pid = segment_owner(name)
    if pid is None:
        return True
    try:
        owner = psutil.Process(pid)
        return owner.environ().get(MARK) == os.environ[MARK] and not in_trees(owner, live_roots)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # another user's
        return False


def host_pids(cluster: pto.LocalCluster) -> set[int]:
    """Every live process of every host still up (raylet, Ray workers, pto broker/workers)."""
    return {pid for h in cluster.alive_hosts() for pid in cluster.host_pids(h)}


def in_trees(p: psutil.Process, roots: set[int]) -> bool:
    """``p`` is one of ``roots`` or descends from one."""
    try:
        return any(pid in roots for pid in [p.pid, *(a.pid for a in p.parents())])
    except psutil.Error:
        return False


def pto_left_on_hosts(cluster: pto.LocalCluster) -> tuple[list[str], list[str]]:
    """(pto processes, pto segments) still on the cluster's hosts."""
    pids = host_pids(cluster)
    procs = [f"pid {p.pid}: {' '.join(p.cmdline())}" for p in pto_processes() if p.pid in pids]
    return procs, segments_of(pids)


def wait_until(check: Callable[[], object], timeout: float = GRACE_S) -> object:
    """Poll ``check`` until it returns something false (nothing left), or ``timeout``."""
    deadline = time.monotonic() + timeout
    left = check()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = check()
    return left


def _assert_hosts_clean(cluster: pto.LocalCluster) -> None:
    def left() -> list:
        procs, segs = pto_left_on_hosts(cluster)
        return procs + segs

    remaining = wait_until(left)
    assert not remaining, f"after the module's runtimes closed, hosts still have {remaining}"


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid}: {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


def _stop_and_check(cluster: pto.LocalCluster, roots: set[int], segments_before: set[str],
                    long_lived: set[int]) -> None:
    """Stop ``cluster`` and check that nothing of it, Ray or pto, is left."""
    try:
        cluster.stop()
    finally:
        long_lived.difference_update(roots)
    left = wait_until(lambda: ray_processes() + pto_processes())
    new_segments = sorted(n for n in pto_segments() - segments_before
                          if _left_by_session(n, long_lived))
    described = [_describe(p) for p in left]
    for p in left:  # leave nothing to the next module, then fail
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not (left or new_segments), (
        f"after LocalCluster.stop(): processes {described}, segments {new_segments}")


class _SharedCluster:
    """The session's 2-host LocalCluster, handed from module to module until one breaks it
    (kills a host: such a module sets ``BREAKS_THE_CLUSTER = True``); the next module then
    gets a fresh one. Starting one costs ~15 s, so the modules share."""

    def __init__(self, long_lived: set[int]):
        self._long_lived = long_lived
        self._current: tuple[pto.LocalCluster, set[int], set[str]] | None = None

    def get(self) -> pto.LocalCluster:
        if self._current is None:
            segments_before = pto_segments()
            lc = pto.LocalCluster(hosts=2, chips=2)
            roots = set(lc.pids())  # its processes' descendants are long-lived too
            self._long_lived.update(roots)
            self._current = (lc, roots, segments_before)
        return self._current[0]

    def stop(self) -> None:
        if self._current is not None:
            lc, roots, segments_before = self._current
            self._current = None
            _stop_and_check(lc, roots, segments_before, self._long_lived)


@pytest.fixture(scope="session")
def _shared_cluster(long_lived_roots: set[int]) -> Iterator[_SharedCluster]:
    shared = _SharedCluster(long_lived_roots)
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture(scope="module")
def cluster(_shared_cluster: _SharedCluster, request: pytest.FixtureRequest
            ) -> Iterator[pto.LocalCluster]:
    """A 2-host, 2-chip LocalCluster for the module (shared with other modules, see
    ``_SharedCluster``); when the module ends, no pto process or segment is left on its hosts."""
    lc = _shared_cluster.get()
    try:
        yield lc
        _assert_hosts_clean(lc)
    finally:
        if getattr(request.module, "BREAKS_THE_CLUSTER", False) or (
                len(lc.alive_hosts()) < lc.hosts):
            _shared_cluster.stop()


@pytest.fixture(scope="module")
def rt(cluster: pto.LocalCluster) -> Iterator[pto.Runtime]:
    """A cluster runtime on the module's cluster (tests register entries under their own names)."""
    with pto.Runtime(level="cluster", cluster=cluster.address) as runtime:
        yield runtime
