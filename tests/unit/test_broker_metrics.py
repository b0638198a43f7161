"""broker.metrics without processes: the counters the loop keeps and the snapshot it
publishes (the HTTP side against a real broker: tests/integration/test_metrics.py)."""

from __future__ import annotations

import msgspec
import pytest

from broker.metrics import BrokerMetrics, Histogram, chip_label
from broker.metrics_http import _quantile, status_json
from pto.wire import protocol as P


class FakeStatus:
    def __init__(self, running: int):
        self.running = running

    def read(self):
        return (self.running, 0)


class Worker:
    def __init__(self, device: int, pid: int, running: int = 0):
        self.device, self.pid, self.status = device, pid, FakeStatus(running)


class Client:
    def __init__(self, index: int, pid: int):
        self.index, self.pid, self.owner = index, pid, f"{pid}xabc"


class Task:
    def __init__(self, gid: int):
        self.gid = gid


class Sched:
    """What publish reads of the scheduler: queue lengths, in-flight tasks, kernel names."""

    def __init__(self, queues, held):
        self.queues, self.held = queues, held

    def queue_lengths(self):
        return self.queues

    def in_flight(self, worker):
        return self.held.get(worker, [])

    def kernel_name(self, task):
        return f"kernel{task.gid}"


def specs(chips):
    return [P.PackedTaskSpec(i + 1, c, 1, msgspec.Raw(b"\x90")) for i, c in enumerate(chips)]


def failure(task, chip=0, reason="ValueError: boom\ntraceback..."):
    return P.Failure(task, "bad", chip, reason, task)


def test_histogram_buckets_are_cumulative_with_an_infinite_last():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 0.5):
        h.observe(v)
    frozen = h.frozen()
    assert frozen["buckets"] == [(0.001, 2), (0.01, 3), (float("inf"), 4)]
    assert frozen["count"] == 4 and frozen["sum"] == pytest.approx(0.5065)
    assert _quantile(frozen, 0.5) == pytest.approx(1.0)  # ms: the bucket holding the median
    assert _quantile(frozen, 0.99) is None  # above every bound


def test_counts_per_client_and_chip_and_a_gone_clients_totals_kept():
    m = BrokerMetrics()
    m.on_submit(1, specs([0, 0, 1, -1]))
    m.on_submit(2, specs([1]))
    m.on_report(0, done=2, failed=0)
    m.on_report(1, done=1, failed=1)
    m.on_results(1, [1, 2, 3], [])
    m.on_results(2, [], [failure(1, chip=1)])
    m.on_worker_lost(1, 77, "killed by SIGKILL")
    workers = [Worker(0, 10, running=5), Worker(1, 11), Worker(-1, 12)]
    sched = Sched({0: 3, 1: 0, -1: 0}, {0: [Task(4), Task(5)]})
    m.publish("ipc://x", 0.0, workers, [Client(1, 100), Client(2, 200)], sched)
    s = m.snapshot
    assert s["totals"] == {"submitted": 5, "done": 3, "failed": 1, "restarts": 1}
    assert s["chip_counts"] == {"host": {"submitted": 1, "done": 0, "failed": 0},
                                "0": {"submitted": 2, "done": 2, "failed": 0},
                                "1": {"submitted": 2, "done": 1, "failed": 1}}
    assert [(c["chip"], c["busy"], c["running"], c["inflight"]) for c in s["chips"]] == [
        ("0", True, "kernel5", 2), ("1", False, None, 0), ("host", False, None, 0)]
    assert s["queues"] == {"0": 3, "1": 0, "host": 0}
    assert [(c["client"], c["unfinished"]) for c in s["clients"]] == [(1, 1), (2, 0)]
    assert s["failures"][0]["reason"].startswith("ValueError: boom")
    assert s["deaths"][0] == {**s["deaths"][0], "chip": "1", "pid": 77}
    assert s["owners"] == ["100xabc", "200xabc"]

    m.on_client_gone(1)  # its series go, the totals keep what it did
    m.publish("ipc://x", 0.0, workers, [Client(2, 200)], sched)
    assert m.snapshot["totals"]["submitted"] == 5 and m.snapshot["totals"]["done"] == 3
    assert [c["client"] for c in m.snapshot["clients"]] == [2]
    out = status_json(m.snapshot, {"tensors": 0, "bytes": 0, "cached_bytes": 0})
    assert "owners" not in out and out["latency_ms"]["count"] == 1  # client 2's failed task


def test_latency_is_sampled_per_submit_and_bounded():
    m = BrokerMetrics()
    m.on_submit(1, specs([0, 0, 0]))  # times task 3, the message's last
    m.on_results(1, [1, 2], [])
    assert m.latency.count == 0
    m.on_results(1, [3], [])
    assert m.latency.count == 1
    for i in range(1000):  # a client that never gets results: the samples stay bounded
        m.on_submit(2, [P.PackedTaskSpec(i, 0, 1, msgspec.Raw(b"\x90"))])
    assert m.snapshot is not None and m.latency.count == 1
    m.on_client_gone(2)
    m.on_results(2, list(range(1000)), [])
    assert m.latency.count == 1


def test_chip_labels():
    assert [chip_label(c) for c in (0, 7, -1, -2)] == ["0", "7", "host", "host1"]
