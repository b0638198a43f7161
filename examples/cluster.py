"""L4: a tensor scattered over a cluster's hosts, an L3 pipeline on each, a cross-host reduction.

Each host gets a block of rows. On its host, an L3 pipeline (as in examples/pipeline.py) runs
the C kernel pipeline_compute.c on every chip and reduces the chips' results, then sums the
block's columns. The hosts' column sums are added on host 0: host 1's partial crosses hosts
(streamed from host 1's shared memory into host 0's), host 0's own is handed over in
place. Checked against numpy.

Run:  python examples/cluster.py   (starts a 2-host, 2-chip pto.LocalCluster on this machine)
On a real Ray cluster (see docs/cluster.md):  RAY_ADDRESS=HEAD_IP:6379 python examples/cluster.py
"""

import os
from pathlib import Path

import numpy as np

import pto

COMPUTE_C = Path(__file__).resolve().parent / "pipeline_compute.c"  # y = x * factor + sin(x)
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def reduce_sum(*args):
    """Sums every input into the last argument (the output)."""
    *inputs, total = args
    total[...] = 0
    for part in inputs:
        total += part


def column_sums(x, out):
    out[...] = x.sum(axis=0)


def host_pipeline(ctx, block):
    """L3, on one host: every chip computes its f(block), one chip sums them, then columns."""
    x = ctx.tensor(block)  # the block arrives as numpy: one copy into this host's shm
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "compute", [In(x), Out(y), S(2.0)])
        outs.append(y)
    total = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "reduce_sum", [In(o) for o in outs] + [Out(total)])
    sums = ctx.alloc((x.shape[1],), x.dtype)
    ctx.submit(ctx.peers()[-1], "column_sums", [In(total), Out(sums)])
    return sums


def add_partials(ctx, partials):
    """L3, on one host: the sum of the hosts' partials (each a handle in this host's shm)."""
    parts = [ctx.tensor(p) for p in partials]
    total = ctx.alloc(parts[0].shape, parts[0].dtype)
    ctx.submit(ctx.peers()[0], "reduce_sum", [In(p) for p in parts] + [Out(total)])
    return total


def scatter_reduce(ctx, data):
    """L4, in this process: one block of rows per host, then the reduction on host 0."""
    blocks = np.array_split(data, len(ctx.hosts()))
    partials = [ctx.submit(host, "host_pipeline", args=block)
                for host, block in zip(ctx.hosts(), blocks, strict=True)]
    return ctx.submit(ctx.hosts()[0], "add_partials", args=partials)


def run(address: str | None) -> None:
    data = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
    compute = pto.compile(platform="sim", kernels=[{"source": COMPUTE_C, "name": "compute"}])
    kernels = {"compute": compute, "reduce_sum": reduce_sum, "column_sums": column_sums}
    with pto.Runtime(level="cluster", cluster=address) as rt:
        rt.register("host_pipeline", orch=host_pipeline, kernels=kernels)  # shipped to every host
        rt.register("add_partials", orch=add_partials, kernels=kernels)
        rt.register("scatter_reduce", orch=scatter_reduce)  # no kernels: an L4 orchestration
        result = rt.run("scatter_reduce", args=data)
        chips = len(rt.chips(0))  # every host here has the same number of chips
        expected = chips * (data * 2.0 + np.sin(data)).sum(axis=0)
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-3)
        moved = rt.stats()["total"]
        print(f"{len(rt.hosts)} hosts x {chips} chips: column sums {result.shape} {result.dtype}, "
              f"result matches numpy; {moved['transfers']} tensor(s), {moved['bytes_in']} B "
              "crossed hosts")


def main() -> None:
    if os.environ.get("RAY_ADDRESS"):
        run(os.environ["RAY_ADDRESS"])
        return
    with pto.LocalCluster(hosts=2, chips=2) as cluster:  # two simulated hosts: Ray nodes
        run(cluster.address)


if __name__ == "__main__":
    main()
