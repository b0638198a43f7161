"""Dask distributed: ``LocalCluster(processes=True, n_workers=2, threads_per_worker=1)``;
one ``client.submit`` per task (``pure=False``, so every task is new).

A chain passes each future to the next submit; a tensor handoff pins the producer to one
worker and the consumer to the other, so the array travels between worker processes.
"""

from __future__ import annotations

import logging

from dask.distributed import Client, LocalCluster

from .peer_tasks import consume, inc, noop, produce


class DaskSystem:
    key = "dask"
    label = "Dask (LocalCluster, 2 procs x 1 thread)"
    labels = {"chain": "Dask: future passed to the next submit"}

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self) -> DaskSystem:
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(2, timeout=60)
        self.workers = sorted(self.client.scheduler_info()["workers"])
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.cluster.close()

    def _submit(self, fn, *args, **kw):
        return self.client.submit(fn, *args, pure=False, **kw)

    def noop(self, n: int) -> None:
        self.client.gather([self._submit(noop) for _ in range(n)])

    def roundtrip(self) -> None:
        self._submit(noop).result()

    def chain(self, n: int) -> int:
        fut = self._submit(inc, 0)
        for _ in range(n - 1):
            fut = self._submit(inc, fut)
        return fut.result()

    def handoff(self, nbytes: int) -> float:
        data = self._submit(produce, nbytes // 8, workers=self.workers[:1],
                            allow_other_workers=False)
        total = self._submit(consume, data, workers=self.workers[1:],
                             allow_other_workers=False)
        return total.result()

    def handoff_copied(self, nbytes: int) -> tuple[int, str]:
        return nbytes, "by design: sent worker->worker over TCP (plus kernel socket copies)"
