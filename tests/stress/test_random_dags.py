"""Stress: client processes run random task DAGs through one long-lived broker + 4 workers.

Each client (``dag_client.py``, a separate Python process) runs orchestrations of random
tasks over 16 shared tensors (inputs, outputs, inouts, numpy arrays, and with options
group tasks meeting in a barrier and scoped intermediates) and compares every tensor,
after every run, with a sequential numpy reference. After the load: no client segment is
left while the broker runs, its RSS is back within 10% of what it was after a warm-up, and
once it stops, no pto segment or process of it remains. Each test has a hard deadline, so
it can fail but never hang.

``test_chaos.py`` runs the same load while workers and a client are killed.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from ._harness import Client, StressBroker, segments_of, settle_rss, tail, wait_for

DEADLINE_S = 150
RSS_SLACK = 1.10

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE_S + 60)]

GRAPH = ["--groups", "0.03", "--scopes", "0.05"]


def warm_up(broker: StressBroker, tmp_path, deadline: float, n_clients: int,
            kills: int = 0) -> list[Client]:
    """The load in short (``n_clients`` clients x 3 runs, and ``kills`` worker kills under
    them), so that the broker's first-use allocations and the high-water marks of its
    tables are behind us when its RSS is taken as the baseline."""
    extra = ["--tolerate-failures"] if kills else []
    warm = [Client(tmp_path, 100 + i, broker.address, "--seed", str(77 + i), "--runs", "3",
                   "--tasks-per-run", "200", *GRAPH, *extra) for i in range(n_clients)]
    if kills:
        assert wait_for(lambda: all(c.connected() or c.proc.poll() is not None for c in warm),
                        60), [c.describe() for c in warm]
        for _ in range(kills):
            time.sleep(0.3)
            workers = broker.chip_workers()
            if workers:
                os.kill(random.choice(workers).pid, signal.SIGKILL)  # a worker of our broker
    for c in warm:
        if not c.wait(deadline):
            c.kill()
            pytest.fail(f"warm-up client did not finish:\n{c.describe()}")
        assert c.proc.returncode == 0, c.describe()
    if kills:
        assert broker.wait_workers(30), f"workers did not come back:\n{tail(broker.err)}"
    return warm


def our_pids(broker: StressBroker, clients: list[Client]) -> set[int]:
    """Every process the test started: the broker, the workers it had, the clients."""
    broker.descendants()
    return set(broker.seen) | {c.proc.pid for c in clients}


def client_segments(broker: StressBroker, clients: list[Client]) -> list[str]:
    """pto objects of our processes, but for the status segments of live workers."""
    return [s for s in segments_of(our_pids(broker, clients)) if not s.endswith("_status")]


def leftovers(broker: StressBroker, clients: list[Client]) -> list[str]:
    """After the broker stopped: every pto object any of our processes made and left."""
    return segments_of(our_pids(broker, clients))


def check_broker_settled(broker: StressBroker, everyone: list[Client], rss0: int,
                         figures: dict) -> None:
    """After the load: the broker holds no client's segment and its RSS is back near rss0."""
    assert wait_for(lambda: not client_segments(broker, everyone), 5), (
        client_segments(broker, everyone))
    rss = settle_rss(broker, int(rss0 * RSS_SLACK))
    figures["broker_rss_mb"] = (round(rss0 / 2**20, 1), round(rss / 2**20, 1))
    assert rss <= rss0 * RSS_SLACK, (
        f"broker RSS {rss / 2**20:.1f} MiB after the load vs {rss0 / 2**20:.1f} MiB "
        f"after the warm-up (> {RSS_SLACK - 1:.0%} growth)")


def stop_all(broker: StressBroker, clients: list[Client]) -> int | None:
    """Clean-up: kill the clients, SIGTERM the broker; its exit code (None: it hung)."""
    for c in clients:
        c.kill()
    return broker.stop()


def check_clean(broker: StressBroker, rc: int | None, clients: list[Client],
                warm: list[Client]) -> None:
    """After stop_all: the broker exited cleanly and nothing of anyone's remains."""
    stray = broker.stragglers()
    assert not stray, f"processes left after the broker stopped: {stray}"
    assert rc is not None, f"broker ignored SIGTERM for 15s; stderr tail:\n{tail(broker.err)}"
    assert broker.clean_exit(rc), f"broker exited rc={rc} on SIGTERM:\n{tail(broker.err)}"
    everyone = warm + clients
    assert wait_for(lambda: not leftovers(broker, everyone), 5), (
        f"pto segments left: {leftovers(broker, everyone)}")


def run_load(tmp_path, n_clients: int, client_args: list[str], expect_tasks: int,
             expect_checks: int) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    broker = StressBroker(tmp_path, workers=4)
    clients: list[Client] = []
    warm: list[Client] = []
    figures: dict = {}
    try:
        assert broker.wait_workers(30), f"workers did not start:\n{tail(broker.err)}"
        warm = warm_up(broker, tmp_path, deadline, n_clients)
        time.sleep(0.5)
        rss0 = broker.rss()
        t0 = time.monotonic()

        clients = [Client(tmp_path, i, broker.address, "--seed", str(1000 + i), *client_args)
                   for i in range(n_clients)]
        reports, failures = [], []
        for c in clients:
            if not c.wait(deadline):
                pytest.fail(f"client {c.index} still running at the {DEADLINE_S}s deadline:\n"
                            f"{c.describe()}")
            if c.proc.returncode != 0:
                failures.append(c.describe())
                continue
            reports.append(c.report())
        figures["seconds"] = round(time.monotonic() - t0, 1)
        assert broker.alive(), f"the broker died during the test:\n{tail(broker.err)}"
        assert not failures, "\n\n".join(failures)

        for r in reports:
            assert r["tasks"] >= expect_tasks and r["checks"] == expect_checks, r
            assert r["runs_ok"] == r["runs"] and r["hung"] is None, r
        wrong = {r["seed"]: (r["wrong"], r["first_wrong"]) for r in reports if r["wrong"]}
        assert not wrong, f"wrong results (seed: (count, first)): {wrong}"
        figures["tasks"] = sum(r["tasks"] for r in reports)
        figures["checks"] = sum(r["checks"] for r in reports)

        # Every client has exited: the broker holds nothing of theirs any more.
        check_broker_settled(broker, warm + clients, rss0, figures)
    finally:
        rc = stop_all(broker, clients)
    check_clean(broker, rc, clients, warm)
    print(f"\nstress figures: {figures}")
    return figures


def test_four_clients_random_dags_through_one_broker(tmp_path):
    """4 clients x 10 runs x 100 tasks (single tasks and numpy-array arguments only)."""
    run_load(tmp_path, 4, ["--runs", "10", "--tasks-per-run", "100", "--pool", "16"],
             expect_tasks=1000, expect_checks=10 * 16)


def test_eight_clients_2000_tasks_each_with_groups_and_scopes(tmp_path):
    """8 clients x 10 runs x 200 ops (groups with a barrier and scoped temporaries too)."""
    run_load(tmp_path, 8, ["--runs", "10", "--tasks-per-run", "200", "--pool", "16", *GRAPH],
             expect_tasks=2000, expect_checks=10 * 16)
