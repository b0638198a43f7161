"""Ray, local: ``ray.init(num_cpus=2)``; one ``.remote()`` call per task.

A chain passes each task's ObjectRef to the next (Ray resolves it before running); a
tensor handoff passes the producer's ObjectRef to the consumer, so the array goes through
Ray's shared-memory object store (one copy in, read zero-copy by the consumer).
"""

from __future__ import annotations

import os

import ray

from .common import MiB
from .peer_tasks import consume, inc, noop, produce

# the peers' task bodies as Ray remote functions
_noop, _inc, _produce, _consume = (ray.remote(f) for f in (noop, inc, produce, consume))


class RaySystem:
    key = "ray"
    label = "Ray (local, num_cpus=2)"
    labels = {"chain": "Ray: ObjectRef passed to the next task"}

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self) -> RaySystem:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        store = max(1024, 3 * max(self.cfg.handoff_mib)) * MiB
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=store, logging_level="warning")
        return self

    def __exit__(self, *exc) -> None:
        ray.shutdown()

    def noop(self, n: int) -> None:
        ray.get([_noop.remote() for _ in range(n)])

    def roundtrip(self) -> None:
        ray.get(_noop.remote())

    def chain(self, n: int) -> int:
        ref = _inc.remote(0)
        for _ in range(n - 1):
            ref = _inc.remote(ref)
        return ray.get(ref)

    def handoff(self, nbytes: int) -> float:
        return ray.get(_consume.remote(_produce.remote(nbytes // 8)))

    def handoff_copied(self, nbytes: int) -> tuple[int, str]:
        return nbytes, "by design: producer's result copied into the object store once"
