"""Kernels and orchestrations that several integration test modules run (they travel to the
workers by value, as any user module's do)."""

from __future__ import annotations

import pto

BARRIER_S = 20.0  # group members must meet well within this; a hang becomes a kernel error


def allreduce_inplace(*bufs):
    """Buffer k belongs to rank k and ends holding the sum of all (reduce-scatter, all-gather)."""
    t = pto.task()
    rank, world = t.rank, t.world
    mine, n = bufs[rank], bufs[0].shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    for k, other in enumerate(bufs):
        if k != rank:
            mine[lo:hi] += other[lo:hi]
    t.barrier(timeout=BARRIER_S)
    for k, other in enumerate(bufs):
        if k != rank:
            klo, khi = n * k // world, n * (k + 1) // world
            mine[klo:khi] = other[klo:khi]
    t.barrier(timeout=BARRIER_S)


def everywhere(ctx, args):
    """Kernel "k" on every chip with the chip's number + 2 as its scalar; one output each."""
    x = ctx.tensor(args["x"])
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "k", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(chip + 2)])
        outs.append(y)
    return outs
