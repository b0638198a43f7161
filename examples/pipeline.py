"""The main example: one input fanned out to every chip, then reduced on one.

The per-chip step is a C kernel (pipeline_compute.c, built with pto.compile and cached);
the reduction is a Python kernel. The result is checked against numpy.

Run:  python examples/pipeline.py   (starts its own broker and 4 workers)
With a running broker:  PTO_BROKER=ipc://... python examples/pipeline.py
"""

from pathlib import Path

import numpy as np

import pto

COMPUTE_C = Path(__file__).resolve().parent / "pipeline_compute.c"  # y = x * factor + sin(x)


def reduce_sum(*args):
    """Sums every input into the last argument (the output)."""
    *inputs, total = args
    total[...] = 0
    for part in inputs:
        total += part


def pipeline(ctx, args):
    x = ctx.tensor(args["input"])  # one copy into shared memory; never copied again
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "compute", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(2.0)])
        outs.append(y)
    total = ctx.alloc(x.shape, x.dtype)
    reduce_args = [pto.Arg.input(o) for o in outs] + [pto.Arg.output(total)]
    ctx.submit(ctx.peers()[0], "reduce_sum", reduce_args)
    return total


def main() -> None:
    data = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    compute = pto.compile(platform="sim", kernels=[{"source": COMPUTE_C, "name": "compute"}])
    with pto.Runtime(level="host", platform="sim", devices=[0, 1, 2, 3]) as rt:
        kernels = {"compute": compute, "reduce_sum": reduce_sum}  # a C and a Python kernel
        rt.register("pipeline", orch=pipeline, kernels=kernels)
        total = rt.run("pipeline", args={"input": data})
        result = total.numpy()
        expected = len(rt.devices) * (data * 2.0 + np.sin(data))
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
        print(f"pipeline on chips {rt.devices}: result {result.shape} {result.dtype} matches numpy "
              f"(sum {float(result.sum()):.3f})")


if __name__ == "__main__":
    main()
