"""What every part of the suite shares: the run configuration and the statistics."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

MiB = 1 << 20

CASES = ("noop", "roundtrip", "chain", "handoff", "scaling", "fairness", "graph", "launch",
         "cluster")


@dataclass
class Config:
    """Sizes of every case; ``quick`` shrinks them so the whole suite takes a minute or two."""

    quick: bool = False
    repeats: int = 5
    noop_tasks: int = 20_000
    trips: int = 1_000  # single-task round trips per repeat
    chain_tasks: int = 1_000
    handoff_mib: list[int] = field(default_factory=lambda: [1, 64, 512])
    scaling_tasks: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000])
    devices: int = 4  # pto chips
    # fairness: another client of the same broker floods this many no-op tasks on 2 chips
    # while a small client times single-task runs, for at most ``fairness_limit_s``
    flood_tasks: int = 400_000
    fairness_limit_s: float = 120.0
    # cluster (L4 on a 2-host LocalCluster, pto and plain Ray side by side)
    cluster_handoff_mib: list[int] = field(default_factory=lambda: [1, 64, 256])
    cluster_chain: int = 50  # consecutive same-host L3 runs in one L4 run
    cluster_trips: int = 200  # actor calls / empty L4 runs per repeat
    cluster_runs: int = 1_000  # small L3 runs from one L4 orchestration
    # graph (captured graphs, issue 20): replays per timed repeat, and the three graphs
    graph_replays: int = 40
    graph_dag_tasks: int = 1_000
    graph_chain_tasks: int = 16
    graph_noop_tasks: int = 10_000
    seed: int = 7

    @classmethod
    def make(cls, quick: bool, repeats: int | None) -> Config:
        if not quick:
            return cls(repeats=repeats or 5)
        return cls(quick=True, repeats=repeats or 3, noop_tasks=2_000, trips=300,
                   chain_tasks=200, handoff_mib=[1, 64], scaling_tasks=[1_000, 10_000],
                   flood_tasks=40_000, fairness_limit_s=60.0, cluster_handoff_mib=[1, 64],
                   cluster_chain=20, cluster_trips=50, cluster_runs=200, graph_replays=10)

    def to_dict(self) -> dict:
        return asdict(self)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank from below: no interpolation)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def p99(xs: list[float]) -> float:
    return quantile(xs, 0.99)


def timed(fn, *args) -> float:
    """Seconds one call of ``fn(*args)`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
