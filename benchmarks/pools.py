"""The standard library's process pools: ``multiprocessing.Pool(2)`` and
``concurrent.futures.ProcessPoolExecutor(2)`` (default start method, fork on Linux).

Every task is one submission (``apply_async`` / ``submit``); ``map`` with a chunksize is
reported separately as a batched row. Pools have no dependencies between tasks, so a chain
is a sequence of submit-and-wait, and a tensor goes worker -> driver -> worker pickled.
"""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .peer_tasks import consume, inc, noop, produce


def _pickled_bytes(nbytes: int) -> int:
    """Length of a float64 array of ``nbytes`` pickled the way the pools pickle it."""
    small = np.ones(128)
    header = len(pickle.dumps(small, protocol=pickle.DEFAULT_PROTOCOL)) - small.nbytes
    return header + nbytes


class _Pool:
    processes = 2
    batch_label = "map, chunksize=n/8 (batched, not per-task)"

    def __init__(self, cfg):
        self.cfg = cfg
        self.label = f"{self.name}({self.processes})"
        self.labels = {"chain": f"{self.label}: submit + wait in turn (no dependencies)"}

    def _call(self, fn, *args):  # one task, waited for
        raise NotImplementedError

    def roundtrip(self) -> None:
        self._call(noop)

    def chain(self, n: int) -> int:
        x = 0
        for _ in range(n):
            x = self._call(inc, x)
        return x

    def handoff(self, nbytes: int) -> float:
        data = self._call(produce, nbytes // 8)  # worker -> driver, pickled
        return self._call(consume, data)  # driver -> worker, pickled

    def handoff_copied(self, nbytes: int) -> tuple[int, str]:
        return 2 * _pickled_bytes(nbytes), "counted: pickled array, worker->driver->worker"


class PoolSystem(_Pool):
    key, name = "pool", "multiprocessing.Pool"

    def __enter__(self) -> PoolSystem:
        self.pool = multiprocessing.Pool(self.processes)
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()
        self.pool.join()

    def _call(self, fn, *args):
        return self.pool.apply_async(fn, args).get()

    def noop(self, n: int) -> None:
        for r in [self.pool.apply_async(noop) for _ in range(n)]:
            r.get()

    def noop_batched(self, n: int) -> None:
        self.pool.map(noop, range(n), chunksize=max(1, n // 8))


class ExecutorSystem(_Pool):
    key, name = "executor", "ProcessPoolExecutor"

    def __enter__(self) -> ExecutorSystem:
        self.ex = ProcessPoolExecutor(self.processes)
        return self

    def __exit__(self, *exc) -> None:
        self.ex.shutdown(wait=True)

    def _call(self, fn, *args):
        return self.ex.submit(fn, *args).result()

    def noop(self, n: int) -> None:
        for f in [self.ex.submit(noop) for _ in range(n)]:
            f.result()

    def noop_batched(self, n: int) -> None:
        list(self.ex.map(noop, range(n), chunksize=max(1, n // 8)))
