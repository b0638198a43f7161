"""Shared fixtures: embedded runtimes, and a leak check that runs after every test.

After each test, no ``/dev/shm/pto_*`` segment created during the test and no broker or
worker process started by this test process may remain (up to 5 s grace). Leaks fail the
test and are cleaned up, so one leaky test does not fail every later one.

Only processes of *this* test process are considered: every process the tests start
inherits the ``PTO_TEST_SESSION`` marker below (or is a descendant of pytest), so a
concurrent pto user on the same machine, or another pytest-xdist worker of the same run,
is never reported nor killed.

Under pytest-xdist (the default: pyproject.toml's ``addopts``) one thing cannot be judged
per test: a new segment whose owner process is already dead may be another worker's (a
client that worker's test killed). Those are left to the run's end: once every worker is
done, the controller fails the run if any pto segment or broker/worker process of the run
(``PTO_TEST_RUN``, inherited by every worker and every process they start) is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import tempfile
import time
import uuid
from collections.abc import Callable

import psutil
import pytest

import pto
from pto.wire import shm

SHM_DIR = "/dev/shm"
GRACE_S = 5.0
POLL_S = 0.05
MARK = "PTO_TEST_SESSION"
RUN = "PTO_TEST_RUN"
os.environ[MARK] = uuid.uuid4().hex  # this process's: inherited by every process it starts
os.environ.setdefault(RUN, uuid.uuid4().hex)  # the whole run's: xdist workers inherit it
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

_CMD_PATTERNS = (b"-m\0broker", b"-m\0worker", b"broker/__main__.py", b"worker/__main__.py")
_SESSION_START = time.time()


def _pto_segments() -> set[str]:
    """Tensors (pto_*) and the retired segments runtimes keep for reuse (ptocache_*)."""
    return {n for n in os.listdir(SHM_DIR) if n.startswith(("pto_", "ptocache_"))}


def _pto_pids() -> list[int]:
    """Live broker/worker processes, whoever started them: read from /proc directly, as
    this runs after every test (psutil's process_iter costs ~15 ms, this ~2)."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/comm", "rb") as f:
                name = f.read()
        except OSError:  # gone
            continue
        if name.startswith(b"pto-") or any(s in cmd for s in _CMD_PATTERNS):
            found.append(int(entry))
    return found


def _pto_processes() -> list[psutil.Process]:
    """Live (not zombie) broker/worker processes, whoever started them."""
    found = []
    for pid in _pto_pids():
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


_PREEXISTING = {p.pid for p in _pto_processes()}


def _ours(p: psutil.Process) -> bool:
    try:
        if p.pid in _PREEXISTING or p.create_time() < _SESSION_START - 1:
            return False
        if p.pid in {c.pid for c in psutil.Process().children(recursive=True)}:
            return True
        return p.environ().get(MARK) == os.environ[MARK]
    except psutil.Error:  # gone, or not ours to inspect
        return False


def _owner_pid(segment: str) -> int | None:
    return shm.owner_pid(shm.owner_of(segment))


def _segment_is_ours(segment: str) -> bool:
    """Made by this test process: by us, a process of ours, or (run alone, not under xdist)
    a process now gone.

    Segments of other live pto users on a shared machine are not ours to judge."""
    pid = _owner_pid(segment)
    if pid is None or pid == os.getpid():
        return True
    try:
        return _ours(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return XDIST_WORKER is None  # else maybe another worker's: judged at the run's end


# Process trees that legitimately outlive a test: a module-scoped fixture (tests/cluster's
# LocalCluster, whose host actors own brokers, workers and segments) adds a tree's root pid
# through the ``long_lived_roots`` fixture while it runs, and checks that tree itself when it
# ends. pto processes in such a tree, and segments a live process of it owns, are not leaks of
# the test that happens to be running.
_LONG_LIVED_ROOTS: set[int] = set()
# Session ids of the module-scoped runtimes (``rt4_module``...): the segments such a runtime
# keeps for reuse (``ptocache_<owner>_*``) after a test freed its tensors are not leaks. Its
# tensors (``pto_<owner>_*``) still are: a test that forgets to free one fails.
_LONG_LIVED_OWNERS: set[str] = set()


def _in_long_lived_tree(pid: int | None) -> bool:
    if not _LONG_LIVED_ROOTS or pid is None:
        return False
    try:
        lineage = [pid, *(a.pid for a in psutil.Process(pid).parents())]
        return any(p in _LONG_LIVED_ROOTS for p in lineage)
    except psutil.Error:  # gone: judged like any other process's leftovers
        return False


@pytest.fixture(scope="session")
def long_lived_roots() -> set[int]:
    """The set a module-scoped fixture adds its long-lived process trees' root pids to (and
    removes them from when it has checked and stopped them)."""
    return _LONG_LIVED_ROOTS


def _kept_by_long_lived(segment: str) -> bool:
    return segment.startswith("ptocache_") and segment.split("_")[1] in _LONG_LIVED_OWNERS


def _leaks(segments_before: set[str]) -> tuple[list[psutil.Process], list[str]]:
    procs = [p for p in _pto_processes() if _ours(p) and not _in_long_lived_tree(p.pid)]
    segments = [s for s in _pto_segments() - segments_before
                if _segment_is_ours(s) and not _in_long_lived_tree(_owner_pid(s))
                and not _kept_by_long_lived(s)]
    return procs, sorted(segments)


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test an xdist group: the tests of one module go to one worker, so its
    module-scoped runtime or package starts once, not once per worker; every test that starts
    Ray (tests/cluster, and those marked ``ray``) shares one group, so one worker runs them in
    turn, no two Ray instances compete for the cores and tests/cluster's modules share one
    LocalCluster."""
    for item in items:
        if "tests/cluster/" in item.nodeid or item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    # Longest groups first (xdist hands groups out in this order): the Ray group and the
    # stress, close and fault modules take minutes each and would otherwise end the run on
    # one worker while the other idles.
    items.sort(key=lambda item: 0 if item.get_closest_marker("ray") else
               1 if item.nodeid.startswith(_LONG_MODULES) else 2)


_LONG_MODULES = ("tests/stress/", "tests/integration/test_close.py",
                 "tests/integration/test_faults.py", "tests/bench/")


def _run_lock_paths() -> tuple[str, str]:
    base = os.path.join(tempfile.gettempdir(), f"pto-tests-{os.environ[RUN]}")
    return f"{base}.gate", f"{base}.lock"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under xdist, a test marked ``exclusive`` runs while no other worker runs a test (set-up
    and teardown of its fixtures included): one that sweeps or plants what another worker's
    broker janitor would also sweep. Others take the run's lock shared; an exclusive one
    first closes the gate, so a stream of shared holders cannot starve it."""
    if XDIST_WORKER is None:
        return (yield)
    gate_path, lock_path = _run_lock_paths()
    with open(gate_path, "a") as gate, open(lock_path, "a") as lock:
        if item.get_closest_marker("exclusive"):
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what the imports and collection made out of the collector's reach: the leak
    check's ``gc.collect()`` after every test then walks only what tests made (~1 ms
    instead of ~60-100 ms with Ray and numpy loaded)."""
    gc.collect()
    gc.freeze()


def _of_this_run(p: psutil.Process) -> bool:
    """Started by a process of this run (it inherited the run's marker)."""
    try:
        return p.environ().get(RUN) == os.environ[RUN]
    except psutil.Error:  # gone, or another user's
        return False


def _is_xdist_controller(config: pytest.Config) -> bool:
    return XDIST_WORKER is None and bool(getattr(config.option, "numprocesses", None))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SEGMENTS_AT_START] = _pto_segments()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under xdist, the controller's check of the whole run (see the module's docstring)."""
    if not _is_xdist_controller(session.config):
        return
    for path in _run_lock_paths():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    before = session.config.stash[_SEGMENTS_AT_START]
    procs, segs = _settled(lambda: (
        [p for p in _pto_processes() if _of_this_run(p)],
        sorted(s for s in _pto_segments() - before if _left_by_run(s))))
    if not (procs or segs):
        return
    described = _remove(procs, segs)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")  # after the progress dots (xdist leaves the line open)
        reporter.write_sep("=", "leaked by the run", red=True)
        reporter.write_line(f"{len(described)} process(es) {described}, "
                            f"{len(segs)} segment(s) {segs}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _left_by_run(segment: str) -> bool:
    """A segment whose owner is gone, or is a process of this run."""
    pid = _owner_pid(segment)
    if pid is None:
        return True
    try:
        return _of_this_run(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


_SEGMENTS_AT_START = pytest.StashKey[set[str]]()


def _settled(find: Callable[[], tuple[list[psutil.Process], list[str]]]
             ) -> tuple[list[psutil.Process], list[str]]:
    """``find()`` once it finds nothing, or what it still finds after GRACE_S."""
    deadline = time.monotonic() + GRACE_S
    procs, segs = find()
    while (procs or segs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        procs, segs = find()
    return procs, segs


def _remove(procs: list[psutil.Process], segs: list[str]) -> list[str]:
    """Kill the leaked processes and unlink the leaked segments (so one leak does not fail
    everything after it); returns the processes as described in the failure."""
    described = []
    for p in procs:
        try:
            described.append(f"pid {p.pid}: {' '.join(p.cmdline())}")
            p.kill()
        except psutil.Error:
            pass
    for name in segs:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    return described


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves pto processes or shared-memory segments behind."""
    segments_before = _pto_segments()
    yield
    gc.collect()  # handles kept alive only by reference cycles free their segments
    procs, segs = _settled(lambda: _leaks(segments_before))
    if not (procs or segs):
        return
    described = _remove(procs, segs)
    pytest.fail(
        f"leaked after {GRACE_S:.0f}s: {len(described)} process(es) {described}, "
        f"{len(segs)} segment(s) {segs}",
        pytrace=False,
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty package cache (PTO_CACHE_DIR) for the test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PTO_CACHE_DIR", str(path))
    return path


def _embedded(devices: list[int]):
    # Always an embedded broker, even if the developer's shell exports PTO_BROKER.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PTO_BROKER", raising=False)
        rt = pto.Runtime(level="host", platform="sim", devices=devices)
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def rt4():
    """An embedded host runtime: broker + 4 simulated chips (0..3), this test's alone."""
    yield from _embedded([0, 1, 2, 3])


@pytest.fixture
def rt1():
    """An embedded host runtime with a single simulated chip (0), this test's alone."""
    yield from _embedded([0])


def _shared(devices: list[int]):
    """An embedded runtime for every test of a module: its broker and workers are
    long-lived (not leaks of the test running), its tensors are not (see
    ``_LONG_LIVED_OWNERS``). For tests that only register and run: one that kills a
    worker, closes the runtime or counts processes needs its own (``rt4``, ``rt1``)."""
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    runtimes = _embedded(devices)
    rt = next(runtimes)
    brokers = [c for c in me.children() if c.pid not in before]
    owners = {_listen_owner(b) for b in brokers} - {None}
    _LONG_LIVED_ROOTS.update(b.pid for b in brokers)
    _LONG_LIVED_OWNERS.update(owners)
    try:
        yield rt
    finally:
        tree = [p for b in brokers for p in _tree(b)]
        runtimes.close()  # rt.close()
        _LONG_LIVED_ROOTS.difference_update(b.pid for b in brokers)
        _LONG_LIVED_OWNERS.difference_update(owners)
        _, alive = psutil.wait_procs(tree, timeout=GRACE_S)
        for p in alive:
            p.kill()
        assert not alive, f"a shared runtime's processes outlived its close(): {alive}"


def _tree(p: psutil.Process) -> list[psutil.Process]:
    try:
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return [p]


def _listen_owner(broker: psutil.Process) -> str | None:
    """The session id in an embedded broker's ``--listen ipc://DIR/<owner>.sock``."""
    try:
        cmd = broker.cmdline()
    except psutil.Error:
        return None
    if "--listen" not in cmd:
        return None
    address = cmd[cmd.index("--listen") + 1]
    return os.path.basename(address).removesuffix(".sock")


@pytest.fixture(scope="module")
def rt4_module():
    """``rt4`` shared by the tests of one module (see ``_shared``)."""
    yield from _shared([0, 1, 2, 3])


@pytest.fixture(scope="module")
def rt2_module():
    """An embedded runtime on chips 0 and 1 shared by the tests of one module."""
    yield from _shared([0, 1])


@pytest.fixture(scope="module")
def rt1_module():
    """``rt1`` shared by the tests of one module (see ``_shared``)."""
    yield from _shared([0])
