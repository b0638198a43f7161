"""``ctx``, what an L4 orchestration function receives: it places L3 runs on hosts.

``ctx.submit(host, entry, args)`` hands the call to the runtime's ``place`` (which checks
it at once, so an error names the call that made it, and sends or queues the run) and
returns a ``pto.Ref`` without waiting. Refs anywhere in ``args`` are the run's
dependencies. This module knows the runtime only through the ``Placer`` protocol below
(pto/cluster/runtime.py imports this module, never the reverse).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .refs import Ref


class Placer(Protocol):
    """What ``ctx`` needs of its runtime."""

    hosts: list[int]

    def chips(self, host: int) -> list[int]: ...

    def place(self, run: Any, host: Any, entry: Any, args: Any) -> Ref: ...


class ClusterContext:
    """What an L4 orchestration function receives as ``ctx``.

    >>> def scatter(ctx, args):
    ...     parts = [ctx.submit(h, "partial_sum", args=chunk)
    ...              for h, chunk in zip(ctx.hosts(), np.array_split(args, len(ctx.hosts())))]
    ...     return ctx.submit(0, "add_all", args=parts)
    """

    def __init__(self, placer: Placer, run: Any):
        self._placer = placer
        self._run = run
        self._ended = False

    def hosts(self) -> list[int]:
        """The host ids, ``0..N-1`` in the cluster's stable order."""
        return list(self._placer.hosts)

    def chips(self, host: int) -> list[int]:
        """The chips (device ids) of ``host``."""
        return self._placer.chips(host)

    def submit(self, host: int, entry: str, args: Any = None) -> Ref:
        """Run L3 entry ``entry`` on ``host`` once the runs its Ref args come from are done.

        Returns at once. Each Ref (or ``ref[i]``/``ref["k"]``) in ``args`` reaches the entry
        as its value, with every tensor a ``TensorHandle`` in that host's shared memory.
        """
        if self._ended:
            raise RuntimeError(f"cannot submit {entry!r}: this ctx belongs to an L4 run whose "
                               "orchestration has returned")
        return self._placer.place(self._run, host, entry, args)

    def end(self) -> None:
        """The orchestration has returned: later submits through this ctx are refused."""
        self._ended = True

    def __repr__(self) -> str:
        return f"<pto L4 ctx hosts={self.hosts()}>"


def check_host(host: Any, hosts: list[int]) -> None:
    if not isinstance(host, (int, np.integer)) or isinstance(host, bool) or host not in hosts:
        raise ValueError(f"unknown host {host!r}; this cluster has hosts {hosts}")
