"""vector_add: C kernels and a C orchestration on one simulated chip (L2), checked
against numpy.

Run:  python examples/vector_add/run.py

The orchestration (kernels/orch.c) computes z = (x + y) * alpha as two launches,
``add`` then ``scale``, each split into blocks across the chip's cores. The arrays are
passed to C by pointer: z is written in place, nothing is copied.
"""

from pathlib import Path

import numpy as np

import pto

HERE = Path(__file__).resolve().parent
KERNELS = [HERE / "kernels" / "add.c", HERE / "kernels" / "scale.c"]


def main() -> None:
    pkg = pto.compile(platform="sim", kernels=KERNELS, orch=HERE / "kernels" / "orch.c")
    rng = np.random.default_rng(0)
    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        rt.register("vector_add", pkg=pkg)
        for dtype, alpha in [(np.float32, 0.5), (np.float64, 3.0), (np.int32, 3), (np.int64, -2)]:
            n = 1_000_003  # not a multiple of the block count: the last block is short
            x = (rng.standard_normal(n) * 100).astype(dtype)
            y = (rng.standard_normal(n) * 100).astype(dtype)
            z = np.zeros(n, dtype)
            args = [pto.Arg.input(x), pto.Arg.input(y), pto.Arg.output(z), pto.Arg.scalar(alpha)]
            rt.run("vector_add", args=args)
            np.testing.assert_allclose(z, (x + y) * np.asarray(alpha, dtype), rtol=1e-6)
            print(f"vector_add {np.dtype(dtype).name:>7} x {n}: matches numpy")
        # Without the orchestration: launch one kernel by name, with 16 blocks.
        x = np.arange(10, dtype=np.float32)
        z = np.empty_like(x)
        rt.run("add", args=[pto.Arg.input(x), pto.Arg.input(x), pto.Arg.output(z)], block_dim=16)
        np.testing.assert_array_equal(z, 2 * x)
        print("add (one launch of 16 blocks): matches numpy")


if __name__ == "__main__":
    main()
