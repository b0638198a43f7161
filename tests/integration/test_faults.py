"""Faults: workers, clients and brokers killed with SIGKILL, a full /dev/shm, segments
removed behind the runtime's back, and a million tasks from one orchestration.

Every wait here is bounded: a fault may fail a test, never hang it. Processes are killed
by pid, and only processes this test started (checked against our descendants).
The kernels that stand for "a long task" hang on their first attempt(s) only, counting
attempts with files in a per-test directory, so a rerun finishes at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import posix_ipc
import psutil
import pytest

import pto

from ._util import (
    REPO,
    ExternalBroker,
    children,
    is_alive,
    owner_of,
    read_line,
    segments_of,
    shm_path,
    stop_process,
    wait_dead,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]  # fault injection: a runtime each

In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar
HANG_S = 60  # a hanging attempt sleeps this long: far past every bound asserted here


# ---- kernels (module level: they travel to workers by value) -----------------------------


def fill(out, value):
    out[:] = value


def copy(src, dst):
    dst[:] = src


def noop():
    pass


def whoami(out):
    out[0] = os.getpid()


def attempts(marks) -> list[str]:
    """The attempt files in ``marks``, in order: ``<n>-<pid>``."""
    try:
        names = os.listdir(marks)
    except FileNotFoundError:
        return []
    return sorted((n for n in names if n[0].isdigit()), key=lambda n: int(n.split("-")[0]))


def hanging(marks: str, hang_first: int = 1, what=None):
    """A kernel that records each attempt and hangs in the first ``hang_first`` ones, then
    does ``what(*args)``."""

    def kernel(*args):
        n = len([m for m in os.listdir(marks) if m[0].isdigit()])
        open(os.path.join(marks, f"{n}-{os.getpid()}"), "w").close()
        if n < hang_first:
            time.sleep(HANG_S)
        if what is not None:
            what(*args)

    return kernel


def double(x, y):
    y[:] = x * 2


def bump(acc):
    acc += 1


# ---- helpers -------------------------------------------------------------------------


def our_process(pid: int) -> psutil.Process:
    """The process ``pid`` if this test started it (a descendant); fail otherwise."""
    mine = {p.pid: p for p in children()}
    assert pid in mine, f"pid {pid} is not a process of this test"
    return mine[pid]


def wait_attempt(marks, n: int, timeout: float = 15.0) -> int:
    """Wait for attempt ``n`` (0-based) to start; return the pid of the process running it."""
    assert wait_until(lambda: len(attempts(marks)) > n, timeout), (
        f"attempt {n} did not start within {timeout}s: {attempts(marks)}")
    return int(attempts(marks)[n].split("-")[1])


def kill9(pid: int, role: str = "worker") -> None:
    p = our_process(pid)
    assert role in " ".join(p.cmdline()), p.cmdline()
    os.kill(pid, signal.SIGKILL)


def worker_pid(rt, chip: int) -> int:
    """The pid of the worker serving ``chip`` (asked by running a task there)."""

    def orch(ctx, args):
        out = ctx.alloc(1, np.int64)
        ctx.submit(chip, "whoami", [Out(out)])
        return out

    rt.register("faults_whoami", orch=orch, kernels={"whoami": whoami})
    out = rt.run("faults_whoami")
    pid = int(out.numpy()[0])
    out.free()
    return pid


def assert_usable(rt, chips=None) -> None:
    """Every chip (or those given) runs a task and gives the right answer."""
    chips = rt.devices if chips is None else chips

    def orch(ctx, args):
        outs = []
        for chip in chips:
            o = ctx.alloc(4, np.float64)
            ctx.submit(chip, "fill", [Out(o), S(float(chip) + 0.5)])
            outs.append(o)
        return outs

    rt.register("faults_usable", orch=orch, kernels={"fill": fill})
    outs = rt.run("faults_usable")
    for chip, o in zip(chips, outs, strict=True):
        np.testing.assert_array_equal(o.numpy(), np.full(4, chip + 0.5))
        o.free()


@pytest.fixture
def marks(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    return str(d)


# ---- worker death --------------------------------------------------------------------


def test_worker_killed_mid_task_reruns_an_idempotent_task(rt4, marks):
    """kill -9 under a task with only inputs and outputs: the task reruns, the run succeeds."""

    def orch(ctx, x):
        x = ctx.tensor(x)
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(2, "slow_double", [In(x), Out(y)])
        return y

    rt4.register("faults_rerun", orch=orch,
                 kernels={"slow_double": hanging(marks, 1, double)})
    future = rt4.submit("faults_rerun", np.arange(16.0))
    first = wait_attempt(marks, 0)
    kill9(first)
    t0 = time.monotonic()
    y = future.result(timeout=20)
    took = time.monotonic() - t0
    np.testing.assert_array_equal(y.numpy(), np.arange(16.0) * 2)
    second = int(attempts(marks)[1].split("-")[1])
    assert len(attempts(marks)) == 2 and second != first, attempts(marks)
    print(f"\nrerun after kill -9: run done {took:.2f}s after the kill")
    assert took < 10, f"the rerun finished {took:.1f}s after the kill"
    assert worker_pid(rt4, 2) == second  # the chip's new worker
    assert_usable(rt4)


def test_tasks_queued_behind_a_killed_task_rerun_even_inout_ones(rt4, marks):
    """Tasks the dead worker had received but not started go back to the queue, whatever
    their kinds: the INOUT one runs exactly once."""

    def orch(ctx, args):
        x = ctx.tensor(np.arange(8.0))
        y = ctx.alloc(8, np.float64)
        acc = ctx.tensor(np.full(8, 10.0))
        z = ctx.alloc(8, np.float64)
        ctx.submit(1, "slow_double", [In(x), Out(y)])
        ctx.submit(1, "bump", [InOut(acc)])  # independent: already queued on the worker
        ctx.submit(1, "fill", [Out(z), S(3.0)])
        return y, acc, z

    rt4.register("faults_queued", orch=orch, kernels={
        "slow_double": hanging(marks, 1, double), "bump": bump, "fill": fill})
    future = rt4.submit("faults_queued")
    kill9(wait_attempt(marks, 0))
    y, acc, z = future.result(timeout=20)
    np.testing.assert_array_equal(y.numpy(), np.arange(8.0) * 2)
    np.testing.assert_array_equal(acc.numpy(), np.full(8, 11.0))
    np.testing.assert_array_equal(z.numpy(), np.full(8, 3.0))


@pytest.mark.parametrize("kind", ["inout", "output_existing", "no_dep"])
def test_worker_killed_under_an_overwriting_task_raises_worker_lost(rt4, marks, kind):
    """A started task that overwrites its data is not rerun: WorkerLost names chip and kernel,
    its dependents fail, independent tasks finish; the chip comes back."""
    arg = getattr(pto.Arg, kind)

    def orch(ctx, args):
        acc = ctx.tensor(np.full(8, 5.0))
        dep = ctx.alloc(8, np.float64)
        indep = ctx.alloc(8, np.float64)
        ctx.submit(2, "overwrite", [arg(acc)])
        ctx.submit(0, "copy", [In(acc), Out(dep)])  # depends on the lost task (not for no_dep)
        ctx.submit(1, "fill", [Out(indep), S(7.0)])
        args.update(acc=acc, dep=dep, indep=indep)

    rt4.register("faults_lost", orch=orch, kernels={
        "overwrite": hanging(marks, 1, bump), "copy": copy, "fill": fill})
    handles: dict = {}
    before = worker_pid(rt4, 2)
    future = rt4.submit("faults_lost", handles)
    pid = wait_attempt(marks, 0)
    assert pid == before
    kill9(pid)
    t0 = time.monotonic()
    with pytest.raises(pto.WorkerLost) as ei:
        future.result(timeout=20)
    took = time.monotonic() - t0
    err = ei.value
    assert isinstance(err, pto.TaskError)
    assert err.chip == 2 and err.kernel == "overwrite", (err.chip, err.kernel)
    assert "chip 2" in str(err) and "'overwrite'" in str(err), str(err)
    assert "died" in err.reason and "SIGKILL" in err.reason, err.reason
    print(f"\nWorkerLost ({kind}) {took:.2f}s after the kill")
    assert took < 5, f"WorkerLost came {took:.1f}s after the kill"
    assert len(attempts(marks)) == 1, f"the overwriting task was rerun: {attempts(marks)}"
    np.testing.assert_array_equal(handles["indep"].numpy(), np.full(8, 7.0))
    if kind != "no_dep":  # the dependent did not run
        assert err.failed >= 2, err.failed
        np.testing.assert_array_equal(handles["dep"].numpy(), np.zeros(8))
    for h in handles.values():
        h.free()
    # the chip is back, with a new worker
    assert_usable(rt4)
    assert worker_pid(rt4, 2) not in (pid, None)


def test_started_inout_task_is_not_rerun_when_a_janitor_took_the_dead_workers_status(
        rt4, marks):
    """Between a worker's death and the broker noticing it (its next tick), any other pto
    process may run its janitor (every broker start and embedded-runtime close reaps the
    segments of dead pids), and the dead worker's status segment is one of them. The
    broker must then still not rerun a started INOUT task: a second run of ``acc += 1``
    would report done with a wrong result. The broker is paused (SIGSTOP) for that window
    so the interleaving is certain."""

    def bump_then_hang(acc):
        n = len(attempts(marks))
        acc += 1  # the partial run's write is visible ...
        open(os.path.join(marks, f"{n}-{os.getpid()}"), "w").close()
        if n == 0:
            time.sleep(HANG_S)  # ... and then the worker dies

    def orch(ctx, args):
        acc = ctx.tensor(np.zeros(4))
        ctx.submit(1, "bump_then_hang", [InOut(acc)])
        return acc

    rt4.register("faults_janitor", orch=orch, kernels={"bump_then_hang": bump_then_hang})
    broker = next(p for p in children() if "broker" in " ".join(p.cmdline()))
    future = rt4.submit("faults_janitor")
    worker = our_process(wait_attempt(marks, 0))
    broker.suspend()
    try:
        kill9(worker.pid)
        assert wait_until(lambda: worker.status() == psutil.STATUS_ZOMBIE, 5, 0.005)
        pto.wire.shm.reap_dead_owners()  # what another pto process does when it starts or closes
    finally:
        broker.resume()
    try:
        acc = future.result(timeout=20)
    except pto.WorkerLost:
        pass  # right: a started overwriting task is not rerun
    else:
        pytest.fail(f"a started INOUT task was rerun after its worker died; the run reported "
                    f"done with acc = {acc.numpy().tolist()} (a single run gives [1, 1, 1, 1]);"
                    f" attempts: {attempts(marks)}")
    assert len(attempts(marks)) == 1, attempts(marks)
    assert_usable(rt4)


@pytest.mark.parametrize(("retries", "kills", "ok"), [(0, 1, False), (1, 2, False), (2, 2, True)])
def test_retries_bound_the_reruns_of_a_killed_task(rt1, marks, retries, kills, ok):
    def orch(ctx, x):
        x = ctx.tensor(x)
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "slow_double", [In(x), Out(y)], retries=retries)
        return y

    rt1.register("faults_retries", orch=orch,
                 kernels={"slow_double": hanging(marks, kills, double)})
    future = rt1.submit("faults_retries", np.arange(4.0))
    for k in range(kills):
        kill9(wait_attempt(marks, k))
    if ok:
        np.testing.assert_array_equal(future.result(timeout=20).numpy(), np.arange(4.0) * 2)
        assert len(attempts(marks)) == kills + 1
    else:
        with pytest.raises(pto.WorkerLost, match="slow_double"):
            future.result(timeout=20)
        assert len(attempts(marks)) == kills, attempts(marks)
    assert_usable(rt1)


def test_group_with_a_killed_member_fails_with_worker_lost_and_others_do_not_hang(rt4, marks):
    hang = hanging(marks, 1)

    def member(flags):
        t = pto.task()
        flags[t.rank] = 1
        if t.rank == 0:
            hang()
        t.barrier(timeout=HANG_S)

    def orch(ctx, args):
        flags = ctx.alloc(4, np.int64)
        ctx.submit_group([3, 1, 2], "member", [pto.Arg.output(flags)])
        return flags

    rt4.register("faults_group", orch=orch, kernels={"member": member})
    future = rt4.submit("faults_group")
    kill9(wait_attempt(marks, 0))
    t0 = time.monotonic()
    with pytest.raises(pto.WorkerLost) as ei:
        future.result(timeout=20)
    assert time.monotonic() - t0 < 5
    assert ei.value.kernel == "member" and ei.value.chip == 3, str(ei.value)
    assert len(attempts(marks)) == 1  # a group is never rerun
    assert_usable(rt4)


def test_host_worker_killed_mid_task_reruns_it(rt1, marks):
    def host_double(x, y):
        y[:] = x * 2

    slow = hanging(marks, 1, host_double)

    def orch(ctx, x):
        x = ctx.tensor(x)
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit_host(slow, [In(x), Out(y)])
        return y

    rt1.register("faults_host", orch=orch, kernels={})
    future = rt1.submit("faults_host", np.arange(6.0))
    kill9(wait_attempt(marks, 0))
    np.testing.assert_array_equal(future.result(timeout=20).numpy(), np.arange(6.0) * 2)
    assert len(attempts(marks)) == 2


def test_idle_worker_killed_is_restarted_and_serves_again(rt4):
    pids = {chip: worker_pid(rt4, chip) for chip in rt4.devices}
    victims = [our_process(pids[0]), our_process(pids[3])]
    for chip in (0, 3):
        kill9(pids[chip])
    assert wait_dead(victims, timeout=5) == []
    assert_usable(rt4)
    assert worker_pid(rt4, 0) != pids[0] and worker_pid(rt4, 3) != pids[3]
    assert worker_pid(rt4, 1) == pids[1]  # the others were left alone


def exit_now(out):
    os._exit(1)


def sys_exit(out):
    sys.exit(3)


def interrupt(out):
    raise KeyboardInterrupt("a kernel interrupted itself")


@pytest.mark.parametrize("kernel", [exit_now, sys_exit, interrupt],
                         ids=["os._exit", "sys.exit", "KeyboardInterrupt"])
def test_kernel_that_ends_its_process_fails_its_task_in_bounded_time(rt4, kernel):
    """A kernel that exits its worker (os._exit, sys.exit) or raises a BaseException:
    the task fails with a TaskError naming kernel and chip (WorkerLost if the worker
    died); it never reruns forever, and the chip serves the next run."""

    def orch(ctx, args):
        out = ctx.alloc(2, np.float64)
        ctx.submit(3, "quits", [Out(out)])
        return out

    rt4.register("faults_quits", orch=orch, kernels={"quits": kernel})
    future = rt4.submit("faults_quits")
    try:
        with pytest.raises(pto.TaskError) as ei:
            future.result(timeout=15)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"a kernel calling {kernel.__name__} left its run unfinished after 15 s "
                    f"(broker status: {pto.status(rt4.address)})")
    assert ei.value.kernel == "quits" and ei.value.chip == 3, str(ei.value)
    assert_usable(rt4)


# ---- client death --------------------------------------------------------------------

DOOMED_CLIENT = textwrap.dedent(
    """
    import os, sys, time, numpy as np, pto

    MARKS = sys.argv[1]

    def long_task(x, y):
        open(os.path.join(MARKS, "started"), "w").close()
        time.sleep(3)
        y[:] = x
        open(os.path.join(MARKS, "finished"), "w").close()

    def queued(y, i):
        open(os.path.join(MARKS, f"queued-{i}"), "w").close()

    def keep(ctx, args):
        return ctx.tensor(np.arange(4096.0))

    def work(ctx, args):
        x = ctx.tensor(np.ones(1024))
        y = ctx.alloc(1024, np.float64)
        ctx.submit(0, "long_task", [pto.Arg.input(x), pto.Arg.output(y)])
        for i in range(20):   # behind the long task on chip 0: queued, never started
            ctx.submit(0, "queued", [pto.Arg.inout(y), pto.Arg.scalar(i)])
        args.extend([x, y])

    rt = pto.Runtime(level="host", platform="sim")
    rt.register("keep", orch=keep, kernels={})
    rt.register("work", orch=work, kernels={"long_task": long_task, "queued": queued})
    kept = rt.run("keep")
    handles = []
    rt.submit("work", handles)
    print(os.getpid(), kept.name, *[h.name for h in handles], flush=True)
    time.sleep(600)
    """
)


def test_killed_client_loses_its_segments_within_2s_and_others_are_unaffected(broker, marks):
    env = dict(os.environ, PTO_BROKER=broker.address)
    proc = subprocess.Popen([sys.executable, "-c", DOOMED_CLIENT, marks], cwd=REPO, env=env,
                            stdout=subprocess.PIPE)
    try:
        with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
            pid, *names = read_line(proc, timeout=40).split()
            assert int(pid) == proc.pid
            owner = owner_of(names[0])
            assert all(shm_path(n).exists() for n in names), names
            assert wait_until(lambda: os.path.exists(os.path.join(marks, "started")), 15)
            assert_usable(rt, [1])  # another client works alongside

            proc.kill()
            t0 = time.monotonic()
            gone = wait_until(lambda: not segments_of(owner), timeout=10, interval=0.02)
            took = time.monotonic() - t0
            assert gone, f"segments of the killed client left: {segments_of(owner)}"
            print(f"\nkilled client's segments gone {took:.2f}s after kill -9")
            assert took < 2.0, f"the killed client's segments went only after {took:.2f}s"

            # The other client is unaffected; chip 0 serves it once the running task ends.
            assert_usable(rt, [1])
            t1 = time.monotonic()
            assert_usable(rt, [0, 1])
            assert time.monotonic() - t1 < 10
            # The running task was let finish; the queued ones were dropped.
            assert wait_until(lambda: os.path.exists(os.path.join(marks, "finished")), 10)
            time.sleep(0.5)
            queued = [m for m in os.listdir(marks) if m.startswith("queued-")]
            assert not queued, f"tasks of the dead client ran after its death: {queued}"
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()
    assert broker.proc.poll() is None


def test_a_starting_broker_removes_segments_of_dead_owners(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not psutil.pid_exists(dead.pid)
    name = f"/pto_{dead.pid}xdeadbeef_1"
    seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096)
    seg.close_fd()
    try:
        assert shm_path(name).exists()
        b = ExternalBroker(tmp_path, workers=1)
        try:
            assert wait_until(lambda: not shm_path(name).exists(), timeout=5), (
                f"the broker's start-up janitor left {name} of dead pid {dead.pid}")
        finally:
            b.stop()
    finally:
        if shm_path(name).exists():
            posix_ipc.unlink_shared_memory(name)


# ---- broker death --------------------------------------------------------------------


def _broker_process(root_pid: int) -> psutil.Process:
    for p in [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]:
        cmd = p.cmdline()
        if any(a == "-m" and b == "broker" for a, b in zip(cmd, cmd[1:], strict=False)):
            return p
    raise AssertionError(f"no broker process under pid {root_pid}")


@pytest.mark.parametrize("how", ["embedded-kill", "external-kill", "external-kill-unreaped",
                                 "external-frozen"])
def test_broker_lost_under_a_blocked_run_raises_broker_lost(tmp_path, marks, how, monkeypatch):
    """The broker dies (SIGKILL) or freezes (SIGSTOP) while ``rt.run`` waits for a task:
    the run raises BrokerLost within 3 s, later calls at once, and the workers go too.

    ``external-kill`` reaps the killed broker at once (as a shell does); in
    ``external-kill-unreaped`` it stays a zombie for a while (a parent that is slow to
    reap, e.g. PID 1 of a container); ``external-frozen`` is a broker that is alive but no
    longer answers (stopped, deadlocked, swapped out): only heartbeats can tell.
    """
    monkeypatch.delenv("PTO_BROKER", raising=False)
    ext = ExternalBroker(tmp_path, workers=2) if how.startswith("external") else None
    broker: psutil.Process | None = None
    try:
        rt = (pto.Runtime(level="host", platform="sim", broker=ext.address) if ext
              else pto.Runtime(level="host", platform="sim", devices=[0, 1]))
        blocked = None
        try:
            if ext:
                broker = _broker_process(ext.proc.pid)
            else:
                broker = next(p for p in children() if "broker" in " ".join(p.cmdline()))
            workers = [p for p in broker.children(recursive=True) if is_alive(p)]
            assert len(workers) >= 2, workers

            def orch(ctx, args):
                y = ctx.alloc(4, np.float64)
                ctx.submit(1, "slow", [Out(y)])
                return y

            rt.register("faults_broker", orch=orch, kernels={"slow": hanging(marks, 1)})
            outcome: dict = {}

            def call():  # rt.run in a thread, so a hang fails the test instead of hanging it
                try:
                    rt.run("faults_broker")
                except BaseException as exc:  # noqa: BLE001 - inspected below
                    outcome["error"] = exc
                outcome["at"] = time.monotonic()

            blocked = threading.Thread(target=call, daemon=True)
            blocked.start()
            assert wait_until(lambda: bool(attempts(marks)), 15), "the task never started"
            time.sleep(0.2)
            assert blocked.is_alive()  # rt.run is blocked in the task
            if how == "external-frozen":
                broker.suspend()  # SIGSTOP
            else:
                broker.kill()  # SIGKILL: no goodbye to anyone
            lost_at = time.monotonic()
            if how == "external-kill":
                ext.proc.wait(5)
            blocked.join(10)
            assert not blocked.is_alive(), f"rt.run still blocked 10 s after the broker ({how})"
            took = outcome["at"] - lost_at
            print(f"\nBrokerLost ({how}) {took:.2f}s after the broker was lost")
            assert isinstance(outcome.get("error"), pto.BrokerLost), outcome
            assert took < 3.0, f"BrokerLost came {took:.1f}s after the broker was lost"
            # every later call fails at once, and the workers are gone with their broker
            t0 = time.monotonic()
            with pytest.raises(pto.BrokerLost):
                rt.run("faults_broker")
            with pytest.raises(pto.BrokerLost):
                rt.register("faults_again", orch=orch, kernels={"slow": fill})
            assert time.monotonic() - t0 < 1
            assert wait_dead(workers, timeout=5) == [], "workers outlived their broker"
        finally:
            t0 = time.monotonic()
            rt.close()
            assert time.monotonic() - t0 < 10, "close() hung on a lost broker"
            if blocked is not None:
                blocked.join(5)
    finally:
        if broker is not None and how == "external-frozen":
            try:
                broker.resume()
            except psutil.Error:
                pass
        if ext:
            ext.stop()


# ---- shared memory -------------------------------------------------------------------


def test_alloc_beyond_dev_shm_raises_out_of_memory(rt1):
    def orch(ctx, args):
        return ctx.alloc(2**40, np.uint8)

    rt1.register("faults_oom", orch=orch, kernels={})
    with pytest.raises(pto.OutOfMemory) as ei:
        rt1.run("faults_oom")
    assert isinstance(ei.value, MemoryError) and isinstance(ei.value, pto.PtoError)
    msg = str(ei.value)
    assert "/dev/shm" in msg and str(2**40) in msg, msg
    assert_usable(rt1)


def test_segment_unlinked_behind_the_runtime_raises_a_clear_task_error(rt4):
    def make(ctx, args):
        return ctx.tensor(np.arange(8.0)), ctx.alloc(8, np.float64)

    def use(ctx, args):
        src, dst = args
        out = ctx.alloc(8, np.float64)
        ctx.submit(2, "copy", [In(src), Out(out)])
        ctx.submit(1, "copy", [In(out), Out(dst)])  # a dependent
        return out

    rt4.register("faults_make", orch=make, kernels={})
    rt4.register("faults_use", orch=use, kernels={"copy": copy})
    src, dst = rt4.run("faults_make")
    os.unlink(shm_path(src))  # no worker has mapped it yet
    with pytest.raises(pto.TaskError) as ei:
        rt4.run("faults_use", (src, dst))
    err = ei.value
    assert not isinstance(err, pto.WorkerLost)
    assert err.kernel == "copy" and err.chip == 2
    assert src.name in str(err) and "does not exist" in str(err), str(err)
    assert err.failed == 2
    src.free()  # already gone: harmless
    # the runtime goes on: a fresh tensor in place of the lost one
    src2 = rt4.run("faults_make")[0]
    out = rt4.run("faults_use", (src2, dst))
    np.testing.assert_array_equal(dst.numpy(), np.arange(8.0))
    for h in (src2, dst, out):
        h.free()
    assert_usable(rt4)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_million_tasks_from_one_orchestration_in_bounded_memory():
    n = 1_000_000

    def orch(ctx, n):
        peers = ctx.peers()
        for i in range(n):
            ctx.submit(peers[i & 1], "noop", [])
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PTO_BROKER", raising=False)
        rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    try:
        rt.register("faults_million", orch=orch, kernels={"noop": noop})
        assert rt.run("faults_million", 20_000) == 20_000  # warm-up
        me = psutil.Process()
        broker = next(p for p in children() if "broker" in " ".join(p.cmdline()))
        base = (me.memory_info().rss, broker.memory_info().rss)
        peak = list(base)
        done = threading.Event()

        def sample():
            while not done.wait(0.05):
                peak[0] = max(peak[0], me.memory_info().rss)
                peak[1] = max(peak[1], broker.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            assert rt.submit("faults_million", n).result(timeout=180) == n
        finally:
            done.set()
            sampler.join(5)
        took = time.monotonic() - t0
        grew = [(p - b) / 2**20 for p, b in zip(peak, base, strict=True)]
        print(f"\n1M tasks in {took:.1f}s; RSS growth client {grew[0]:.0f} MiB, "
              f"broker {grew[1]:.0f} MiB")
        assert grew[0] < 300, f"client RSS grew {grew[0]:.0f} MiB for 1M tasks"
        assert grew[1] < 300, f"broker RSS grew {grew[1]:.0f} MiB for 1M tasks"
        assert took < 150
    finally:
        rt.close()
