"""Stress under faults: the random-DAG load of ``test_random_dags.py`` while a chaos thread
SIGKILLs a random chip worker every ~0.5 s and another SIGKILLs one random client once.

Two variants: the chaos thread kills any live chip worker (also one just restarted and
not yet connected, which the broker restarts with a back-off), or only workers that have
served for 2.5 s (every kill hits a connected worker mid-load: what is measured is the
rerun/``WorkerLost`` logic under a steady stream of kills). The clients keep starting runs
for 15 s (~30 worker kills), so the chaos is sustained, not a handful of kills.

What must hold: the broker survives and restarts every worker; every surviving client's
runs end (done, or a ``pto.TaskError``/``pto.WorkerLost`` for a run that lost a task: the
client then starts over from fresh tensors) within a deadline; every run that reports done
is exactly right; the killed client's segments go; afterwards no segment, no process, and
the broker's RSS is back within 10% of what it was after a warm-up.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from ._harness import Client, StressBroker, owner_pid, pto_segments, tail, wait_for
from .test_random_dags import (
    GRAPH,
    check_broker_settled,
    check_clean,
    stop_all,
    warm_up,
)

DEADLINE_S = 180
N_CLIENTS = 8
KILL_EVERY_S = 0.5
LOAD_S = 15  # clients keep starting runs (past their 2,000 tasks) this long: steady chaos
RUN_TIMEOUT_S = 45  # a run of ~200 tasks that has not ended by then counts as hung
CLIENT_KILL_AFTER_RUNS = 1  # the victim has done this many runs (so it holds tensors) ...
CLIENT_KILL_AFTER_S = 5.0  # ... or has been connected this long, whichever comes first

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE_S + 60)]


class WorkerChaos(threading.Thread):
    """SIGKILL a random live chip worker every ~KILL_EVERY_S seconds until stopped."""

    def __init__(self, broker: StressBroker, rng: random.Random, clients: list[Client],
                 min_age: float):
        super().__init__(daemon=True, name="worker-chaos")
        self.broker, self.rng, self.clients, self.min_age = broker, rng, clients, min_age
        self.stop = threading.Event()
        self.kills: list[int] = []
        self.t0 = time.monotonic()
        self.progress: list[tuple[float, int, int]] = []  # (t, kills, runs ended so far)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.5, 1.5) * KILL_EVERY_S):
                now = time.time()
                workers = [w for w in self.broker.chip_workers()
                           if now - w.create_time() >= self.min_age]
                if workers:
                    victim = self.rng.choice(workers)
                    try:
                        os.kill(victim.pid, signal.SIGKILL)  # a worker of our broker
                        self.kills.append(victim.pid)
                    except ProcessLookupError:
                        pass
                runs = sum(c.runs_done() for c in self.clients)
                self.progress.append((time.monotonic() - self.t0, len(self.kills), runs))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def longest_stall(self) -> tuple[float, float, int]:
        """(start, length, kills) of the longest stretch in which no run ended."""
        best = (0.0, 0.0, 0)
        start = None
        for i, (t, kills, runs) in enumerate(self.progress):
            if i == 0 or runs != self.progress[i - 1][2]:
                start = (t, kills)
            length = t - start[0]
            if length > best[1]:
                best = (round(start[0], 1), round(length, 1), kills - start[1])
        return best


class ClientChaos(threading.Thread):
    """SIGKILL one client once it has done a few runs; time how long its segments last."""

    def __init__(self, victim: Client):
        super().__init__(daemon=True, name="client-chaos")
        self.victim = victim
        self.stop = threading.Event()
        self.killed_at: float | None = None
        self.reclaimed_s: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            while not self.stop.wait(0.05):
                if self.victim.proc.poll() is not None:
                    return  # finished before we got to it
                if (self.victim.runs_done() >= CLIENT_KILL_AFTER_RUNS
                        or time.monotonic() - t0 > CLIENT_KILL_AFTER_S):
                    break
            else:
                return
            pid = self.victim.proc.pid
            mine = lambda: [s for s in pto_segments() if owner_pid(s) == pid]  # noqa: E731
            self.victim.proc.kill()
            self.killed_at = time.monotonic()
            self.victim.proc.wait(10)
            if wait_for(lambda: not mine(), 10, 0.02):
                self.reclaimed_s = time.monotonic() - self.killed_at
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.parametrize("min_age", [0.0, 2.5], ids=["any-worker", "serving-workers"])
def test_chaos_workers_and_a_client_killed_under_load(tmp_path, min_age):
    """Kill a random chip worker (alive for at least ``min_age`` s) every ~0.5 s."""
    deadline = time.monotonic() + DEADLINE_S
    rng = random.Random(int(os.environ.get("PTO_CHAOS_SEED", "5")))
    broker = StressBroker(tmp_path, workers=4)
    clients: list[Client] = []
    warm: list[Client] = []
    chaos = client_chaos = None
    figures: dict = {}
    try:
        assert broker.wait_workers(30), f"workers did not start:\n{tail(broker.err)}"
        warm = warm_up(broker, tmp_path, deadline, N_CLIENTS, kills=3)
        time.sleep(0.5)
        rss0 = broker.rss()
        t0 = time.monotonic()

        clients = [Client(tmp_path, i, broker.address, "--seed", str(2000 + i), "--runs", "10",
                          "--tasks-per-run", "200", "--pool", "16", *GRAPH,
                          "--tolerate-failures", "--run-timeout", str(RUN_TIMEOUT_S),
                          "--min-seconds", str(LOAD_S))
                   for i in range(N_CLIENTS)]
        # Workers die only once every client is connected: a Runtime waits at start until
        # every chip it uses has a worker, and that is not what this test is about.
        assert wait_for(lambda: all(c.connected() or c.proc.poll() is not None
                                    for c in clients), 60), [c.describe() for c in clients]
        victim = rng.choice(clients)
        chaos = WorkerChaos(broker, rng, clients, min_age)
        client_chaos = ClientChaos(victim)
        chaos.start()
        client_chaos.start()

        hung = []
        for c in clients:
            if not c.wait(deadline):
                hung.append(c.describe())
        chaos.stop.set()
        client_chaos.stop.set()
        chaos.join(5)
        client_chaos.join(15)
        figures["seconds"] = round(time.monotonic() - t0, 1)
        figures["longest_stall_s"] = chaos.longest_stall()[1]
        assert not hung, f"clients still running at the {DEADLINE_S}s deadline:\n" + "\n\n".join(
            hung)
        assert chaos.error is None and client_chaos.error is None, (chaos.error,
                                                                     client_chaos.error)
        assert broker.alive(), f"the broker died during the test:\n{tail(broker.err)}"
        figures["worker_kills"] = len(chaos.kills)
        assert len(chaos.kills) >= 5, f"only {len(chaos.kills)} worker kills: not much chaos"

        # The victim: killed mid-work, its segments reclaimed by the broker.
        assert client_chaos.killed_at is not None, (
            f"client {victim.index} finished before it could be killed:\n{victim.describe()}")
        figures["client_segments_reclaimed_s"] = (
            round(client_chaos.reclaimed_s, 2) if client_chaos.reclaimed_s is not None else None)
        assert client_chaos.reclaimed_s is not None, (
            f"the killed client's segments were still there 10 s later: "
            f"{[s for s in pto_segments() if owner_pid(s) == victim.proc.pid]}")

        # The survivors: every run ended, failed ones only with a TaskError, done ones right.
        failures, reports = [], []
        for c in clients:
            if c is victim:
                continue
            if c.proc.returncode == 0:
                reports.append(c.report())
            else:
                failures.append(c.describe())
        start, length, kills = chaos.longest_stall()
        assert not failures, (
            f"{len(failures)} client(s) failed (rc 3: a run did not end within "
            f"{RUN_TIMEOUT_S}s); longest stretch without any run ending: {length}s from "
            f"t={start}s, during which {kills} workers were killed ({len(chaos.kills)} kills "
            f"in all)\n\n" + "\n\n".join(failures))
        for r in reports:
            assert r["hung"] is None, r
            assert r["runs_ok"] + r["runs_failed"] == r["runs"], r
            assert r["checks"] == r["runs_ok"] * 16, r
            assert r["tasks"] >= 2000 and r["runs"] >= 10, r
        wrong = {r["seed"]: (r["wrong"], r["first_wrong"]) for r in reports if r["wrong"]}
        assert not wrong, f"wrong results in runs that reported done: {wrong}"
        errors: dict[str, int] = {}
        for r in reports:
            for kind, n in r["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        samples = [s for r in reports for s in r["error_samples"]]
        figures.update(
            tasks=sum(r["tasks"] for r in reports),
            tasks_in_runs_done=sum(r["tasks_ok"] for r in reports),
            runs_ok=sum(r["runs_ok"] for r in reports),
            runs_failed=sum(r["runs_failed"] for r in reports),
            errors=errors,
        )
        assert figures["runs_ok"] > 0, figures
        # A run may only fail because a worker died under one of its tasks.
        assert set(errors) <= {"WorkerLost"}, (
            f"runs failed with other errors than WorkerLost: {errors}; e.g. {samples[:3]}")

        # The broker recovers: every chip has a worker, nothing of the clients is left.
        assert broker.wait_workers(30), f"workers did not come back:\n{tail(broker.err)}"
        check_broker_settled(broker, warm + clients, rss0, figures)
    finally:
        for t in (chaos, client_chaos):
            if t is not None:
                t.stop.set()
        rc = stop_all(broker, clients)
    check_clean(broker, rc, clients, warm)
    print(f"\nchaos figures: {figures}")
