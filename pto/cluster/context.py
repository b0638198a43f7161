"""``ctx``, what an L4 orchestration function receives: it places L3 runs on hosts.

``ctx.submit(host, entry, args)`` checks its arguments at once (so an error names the call
that made it), sends the run to that host's actor through Ray and returns a ``pto.Ref``
without waiting. Refs anywhere in ``args`` are the run's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .refs import Ref, split_refs

if TYPE_CHECKING:
    from .runtime import ClusterRuntime, _L4Run


class ClusterContext:
    """What an L4 orchestration function receives as ``ctx``.

    >>> def scatter(ctx, args):
    ...     parts = [ctx.submit(h, "partial_sum", args=chunk)
    ...              for h, chunk in zip(ctx.hosts(), np.array_split(args, len(ctx.hosts())))]
    ...     return ctx.submit(0, "add_all", args=parts)
    """

    def __init__(self, rt: ClusterRuntime, run: _L4Run):
        self._rt = rt
        self._run = run
        self._ended = False  # set when the orchestration returns: no more submits

    def hosts(self) -> list[int]:
        """The host ids, ``0..N-1`` in the cluster's stable order."""
        return self._rt.hosts

    def chips(self, host: int) -> list[int]:
        """The chips (device ids) of ``host``."""
        return self._rt.chips(host)

    def submit(self, host: int, entry: str, args: Any = None) -> Ref:
        """Run L3 entry ``entry`` on ``host`` once the runs its Ref args come from are done.

        Returns at once. Each Ref (or ``ref[i]``/``ref["k"]``) in ``args`` reaches the entry
        as its value, with every tensor a ``TensorHandle`` in that host's shared memory.
        """
        if self._ended:
            raise RuntimeError(f"cannot submit {entry!r}: this ctx belongs to an L4 run whose "
                               "orchestration has returned")
        self._rt._check_host(host)
        self._rt._check_l3_entry(entry)
        template, outputs = split_refs(args, self._rt._token)
        return self._rt._submit_l3(self._run, int(host), entry, template, outputs)

    def __repr__(self) -> str:
        return f"<pto L4 ctx hosts={self.hosts()}>"


def check_host(host: Any, hosts: list[int]) -> None:
    if not isinstance(host, (int, np.integer)) or isinstance(host, bool) or host not in hosts:
        raise ValueError(f"unknown host {host!r}; this cluster has hosts {hosts}")
