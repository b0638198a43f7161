"""The task bodies the peers run (Ray, Dask, the pools); pto's kernels, which work on
shared-memory views instead of returning values, are in pto_system.py."""

from __future__ import annotations

import numpy as np


def noop(*_):
    return None


def inc(x):
    return x + 1


def produce(n):
    return np.ones(n)


def consume(a):
    return float(a.sum())
