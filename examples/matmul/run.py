"""matmul: one tiled C kernel, run on one chip (L2) and on four chips (L3).

Run:  python examples/matmul/run.py

L2: a single launch of the kernel with ``block_dim`` blocks; each block computes the
row tiles given by ``pto_block_idx()``. L3: the same package on chips 0..3 through the
broker, each chip computing a quarter of the rows of C; the quarters are assembled in
numpy. Both are checked against ``numpy.matmul``.
"""

import time
from pathlib import Path

import numpy as np

import pto

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels" / "matmul.c"
FLAGS = ["-O3", "-march=native"]  # built on this machine, for it (the cache key includes the CPU)


def build() -> pto.CompiledPackage:
    """The matmul package (compiled once, then taken from the cache)."""
    return pto.compile(platform="sim", kernels=[SOURCE], flags=FLAGS)


def row_slices(ctx, args):
    """L3 orchestration: chip i computes rows [r_i, r_i+1) of C = A @ B."""
    a, b = args["a"], args["b"]
    b_shared = ctx.tensor(b)  # one copy in shared memory, read by every chip
    chips = ctx.peers()
    bounds = np.linspace(0, a.shape[0], len(chips) + 1).astype(int)
    parts = []
    for chip, lo, hi in zip(chips, bounds[:-1], bounds[1:], strict=True):
        a_rows = ctx.tensor(a[lo:hi])  # each chip gets its own rows of A
        c_rows = ctx.alloc((hi - lo, b.shape[1]), a.dtype)
        ctx.submit(chip, "matmul", [pto.Arg.input(a_rows), pto.Arg.input(b_shared),
                                    pto.Arg.output(c_rows)])
        parts.append(c_rows)
    return parts


def main() -> None:
    pkg = build()
    rng = np.random.default_rng(0)
    m, k, n = 512, 384, 256
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    expected = a @ b

    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        rt.register("matmul", pkg=pkg)
        c = np.empty((m, n), np.float32)
        for block_dim in (1, 4, 16):
            c[...] = np.nan
            start = time.perf_counter()
            rt.run("matmul", args=[pto.Arg.input(a), pto.Arg.input(b), pto.Arg.output(c)],
                   block_dim=block_dim)
            took = time.perf_counter() - start
            np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-3)
            print(f"L2 matmul {m}x{k} @ {k}x{n}, block_dim {block_dim:>2}: matches numpy "
                  f"({2 * m * n * k / took / 1e9:.1f} GFLOP/s)")

    with pto.Runtime(level="host", platform="sim", devices=[0, 1, 2, 3]) as rt:
        rt.register("matmul_rows", orch=row_slices, kernels={"matmul": pkg})
        parts = rt.run("matmul_rows", args={"a": a, "b": b})
        c = np.concatenate([p.numpy() for p in parts])
        np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-3)
        print(f"L3 matmul on chips {rt.devices} ({len(parts)} row slices): matches numpy")


if __name__ == "__main__":
    main()
