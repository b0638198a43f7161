"""allreduce: a group task on every chip sums one shard per chip, in C and in Python.

Run:  python examples/allreduce/run.py

Each chip's buffer starts as its own shard; the group kernel (reduce-scatter, barrier,
all-gather) leaves the sum of all shards in every buffer. The members run at once on
their chips' workers and synchronize through a shared-memory barrier, not the broker.
"""

from pathlib import Path

import numpy as np

import pto

HERE = Path(__file__).resolve().parent


def allreduce_py(*bufs):
    """The same algorithm as allreduce.c, on numpy views of the shared buffers."""
    task = pto.task()
    rank, world = task.rank, task.world
    mine, n = bufs[rank], bufs[0].shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    for k, other in enumerate(bufs):
        if k != rank:
            mine[lo:hi] += other[lo:hi]
    task.barrier()
    for k, other in enumerate(bufs):
        if k != rank:
            klo, khi = n * k // world, n * (k + 1) // world
            mine[klo:khi] = other[klo:khi]
    task.barrier()


def allreduce(ctx, args):
    kernel, chips = args["kernel"], args["chips"]
    bufs = [ctx.tensor(shard) for shard in args["shards"]]
    ctx.submit_group(chips, kernel, [pto.Arg.inout(b) for b in bufs])
    return bufs


def main() -> None:
    pkg = pto.compile(platform="sim", kernels=[HERE / "allreduce.c"])
    rng = np.random.default_rng(0)
    with pto.Runtime(level="host", platform="sim", devices=[0, 1, 2, 3]) as rt:
        rt.register("allreduce", orch=allreduce,
                    kernels={"allreduce_c": pkg.kernel("allreduce"),
                             "allreduce_py": allreduce_py})
        for chips in ([0, 1], [0, 1, 2, 3]):
            shards = [rng.standard_normal(100_003).astype(np.float32) for _ in chips]
            expected = np.sum(shards, axis=0, dtype=np.float32)
            for kernel in ("allreduce_c", "allreduce_py"):
                bufs = rt.run("allreduce", {"kernel": kernel, "chips": chips, "shards": shards})
                for buf in bufs:
                    np.testing.assert_allclose(buf.numpy(), expected, rtol=1e-5, atol=1e-5)
                print(f"{kernel} on chips {chips}: every buffer holds the sum (matches numpy)")


if __name__ == "__main__":
    main()
