"""What every part of the suite shares: the run configuration and the statistics."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

MiB = 1 << 20

CASES = ("noop", "roundtrip", "chain", "handoff", "scaling", "launch")


@dataclass
class Config:
    """Sizes of every case; ``quick`` shrinks them so the whole suite takes a minute or two."""

    quick: bool = False
    repeats: int = 5
    noop_tasks: int = 20_000
    trips: int = 500  # single-task round trips per repeat
    chain_tasks: int = 1_000
    handoff_mib: list[int] = field(default_factory=lambda: [1, 64, 512])
    scaling_tasks: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000])
    devices: int = 4  # pto chips
    seed: int = 7

    @classmethod
    def make(cls, quick: bool, repeats: int | None) -> Config:
        if not quick:
            return cls(repeats=repeats or 5)
        return cls(quick=True, repeats=repeats or 3, noop_tasks=2_000, trips=100,
                   chain_tasks=200, handoff_mib=[1, 64], scaling_tasks=[1_000, 10_000])

    def to_dict(self) -> dict:
        return asdict(self)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def timed(fn, *args) -> float:
    """Seconds one call of ``fn(*args)`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
