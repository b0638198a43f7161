"""What the broker counts for ``/metrics`` and the dashboard (``--metrics-port``).

The broker loop is single-threaded and owns its state, so this is split in two: the loop
calls the ``on_*`` hooks (plain integer adds per message; a submit's per-chip count is one
list comprehension) and, every tick, ``publish``, which builds one immutable
snapshot dict and swaps it in. The HTTP thread (``broker.metrics_http``) only ever reads
``snapshot``: it never touches the scheduler, the peers or the counters below.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from pto.wire import protocol as P

# Task latency, sampled: the last task of each Submit message, from reaching the broker
# to its result leaving it (for a run submitted in one message: the run's latency).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
# One loop round's work (the poll's wait excluded).
LOOP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
                0.1, 0.5)
_HISTORY_S = 300  # tasks/s kept for the dashboard's chart: 5 minutes at 1 s
_SAMPLES_PER_CLIENT = 256  # runs being timed at once per client (bounds memory)
_RECENT = 30  # failures and worker deaths the dashboard lists
_REASON_CHARS = 600


def chip_label(chip: int) -> str:
    """``0``, ``1``, ... for chips; ``host`` (``host1``, ...) for host workers and the host
    queue."""
    if chip >= 0:
        return str(chip)
    return "host" if chip == -1 else f"host{-1 - chip}"


class Histogram:
    """Bucket counts (not cumulative), sum and count: updated by the loop only."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def frozen(self) -> dict[str, Any]:
        """Cumulative buckets as Prometheus wants them: [(le, count), ..., ("+Inf", n)]."""
        total, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            buckets.append((bound, total))
        return {"buckets": buckets, "sum": self.sum, "count": self.count}


class BrokerMetrics:
    """Counters of one broker, updated by its loop, published as ``snapshot``."""

    def __init__(self) -> None:
        self.client_submitted: dict[int, int] = {}
        self.client_done: dict[int, int] = {}
        self.client_failed: dict[int, int] = {}
        self.chip_submitted: dict[int, int] = {}
        self.chip_done: dict[int, int] = {}
        self.chip_failed: dict[int, int] = {}
        self.restarts: dict[int, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.loop = Histogram(LOOP_BUCKETS)
        self._timing: dict[int, dict[int, float]] = {}  # client -> {last task of a Submit: t}
        self._failures: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self._deaths: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self._history: deque[tuple[float, int, int, int]] = deque(maxlen=_HISTORY_S + 1)
        # what clients that left counted: their own series go (a long-lived broker sees
        # clients come and go), the totals keep them
        self._departed = {"submitted": 0, "done": 0, "failed": 0}
        self.snapshot: dict[str, Any] = {"clients": [], "chips": [], "owners": []}

    # ---- hooks: the broker loop's thread only ------------------------------------------

    def on_submit(self, client: int, tasks: Sequence[P.PackedTaskSpec]) -> None:
        self.client_submitted[client] = self.client_submitted.get(client, 0) + len(tasks)
        per_chip = self.chip_submitted
        chips = [spec.chip for spec in tasks]
        for chip in set(chips):  # a message names few chips: list.count runs in C
            per_chip[chip] = per_chip.get(chip, 0) + chips.count(chip)
        timing = self._timing.setdefault(client, {})
        if tasks and len(timing) < _SAMPLES_PER_CLIENT:
            timing[tasks[-1].task] = time.monotonic()

    def on_report(self, chip: int, done: int, failed: int) -> None:
        """A worker of ``chip`` reported ``done`` tasks finished and ``failed`` failed."""
        if done:
            self.chip_done[chip] = self.chip_done.get(chip, 0) + done
        if failed:
            self.chip_failed[chip] = self.chip_failed.get(chip, 0) + failed

    def on_results(self, client: int, done: list[int], failed: list[P.Failure]) -> None:
        """The results the broker sends ``client`` this round."""
        if done:
            self.client_done[client] = self.client_done.get(client, 0) + len(done)
        if failed:
            self.client_failed[client] = self.client_failed.get(client, 0) + len(failed)
            now = time.time()
            for f in failed[-_RECENT:]:
                self._failures.append({"time": now, "client": client, "task": f.task,
                                       "kernel": f.kernel, "chip": chip_label(f.chip),
                                       "reason": f.reason[:_REASON_CHARS], "lost": f.lost})
        timing = self._timing.get(client)
        if timing:
            ended = timing.keys() & done
            if failed:
                ended |= timing.keys() & {f.task for f in failed}
            now_m = time.monotonic()
            for task in ended:
                self.latency.observe(now_m - timing.pop(task))

    def on_worker_lost(self, chip: int, pid: int, how: str) -> None:
        self.restarts[chip] = self.restarts.get(chip, 0) + 1
        self._deaths.append({"time": time.time(), "chip": chip_label(chip), "pid": pid,
                             "how": how})

    def on_client_gone(self, client: int) -> None:
        self._timing.pop(client, None)
        for key, counts in (("submitted", self.client_submitted), ("done", self.client_done),
                            ("failed", self.client_failed)):
            self._departed[key] += counts.pop(client, 0)

    def on_round(self, started: float) -> None:
        """A loop round that began (after its poll) at ``started`` (time.perf_counter())."""
        self.loop.observe(time.perf_counter() - started)

    # ---- publishing: the loop's thread, every tick ---------------------------------------

    def publish(self, address: str, started: float, workers: Iterable[Any],
                clients: Iterable[Any], sched: Any) -> None:
        """Build the snapshot the HTTP thread serves from the broker's peers (``workers``:
        ``broker.peers.WorkerPeer``, ``clients``: ``ClientPeer``) and ``sched``'s queues."""
        now, wall = time.monotonic(), time.time()
        queues = sched.queue_lengths()
        chips = []
        for w in sorted(workers, key=lambda w: (w.device < 0, abs(w.device))):
            held = sched.in_flight(w.device)
            status = w.status.read()
            task = next((t for t in held if t.gid == status[0]), None) if status else None
            chips.append({
                "chip": chip_label(w.device), "pid": w.pid, "busy": bool(held),
                "running": sched.kernel_name(task) if task is not None else None,
                "inflight": len(held), "done": self.chip_done.get(w.device, 0),
                "failed": self.chip_failed.get(w.device, 0),
                "restarts": self.restarts.get(w.device, 0),
            })
        rows = []
        for c in sorted(clients, key=lambda c: c.index):
            submitted = self.client_submitted.get(c.index, 0)
            done = self.client_done.get(c.index, 0)
            failed = self.client_failed.get(c.index, 0)
            rows.append({"client": c.index, "pid": c.pid, "owner": c.owner,
                         "submitted": submitted, "done": done, "failed": failed,
                         "unfinished": max(submitted - done - failed, 0)})
        gone = self._departed
        totals = {"submitted": gone["submitted"] + sum(self.client_submitted.values()),
                  "done": gone["done"] + sum(self.client_done.values()),
                  "failed": gone["failed"] + sum(self.client_failed.values()),
                  "restarts": sum(self.restarts.values())}
        if not self._history or now - self._history[-1][0] >= 1.0:
            self._history.append((now, totals["submitted"], totals["done"], totals["failed"]))
        self.snapshot = {
            "time": wall, "address": address, "uptime_s": round(now - started, 3),
            "chips": chips, "clients": rows, "totals": totals,
            "queues": {chip_label(q): n for q, n in queues.items()},
            "chip_counts": {
                chip_label(c): {"submitted": self.chip_submitted.get(c, 0),
                                "done": self.chip_done.get(c, 0),
                                "failed": self.chip_failed.get(c, 0)}
                for c in sorted({*self.chip_submitted, *self.chip_done, *self.chip_failed})},
            "restarts": {chip_label(c): n for c, n in self.restarts.items()},
            "latency": self.latency.frozen(), "loop": self.loop.frozen(),
            "rates": _rates(tuple(self._history), now),
            "failures": list(self._failures)[::-1], "deaths": list(self._deaths)[::-1],
            "owners": [c["owner"] for c in rows],
        }


def _rates(history: tuple[tuple[float, int, int, int], ...],
           now: float) -> list[dict[str, float]]:
    """Tasks finished and failed per second between history points, oldest first (``t``:
    seconds before now, negative)."""
    out = []
    for (t0, _, d0, f0), (t1, _, d1, f1) in zip(history, history[1:], strict=False):
        dt = max(t1 - t0, 1e-9)
        out.append({"t": round(t1 - now, 2), "done": round((d1 - d0) / dt, 1),
                    "failed": round((f1 - f0) / dt, 1)})
    return out
