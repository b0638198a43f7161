"""prebuilt: a kernel object built outside pto next to a source kernel, in one
orchestration, at L2 and as one L3 task on each of 4 chips, checked against numpy.

Run:  python examples/prebuilt/run.py [add_custom.o]

Like the original runtime's AscendC example: ``build_kernel.sh`` compiles
``kernels/add_custom.c`` (z = x + y) to an object with the system compiler and
``pto.include_dir()``; ``pto.compile`` links that object as it is beside
``kernels/square.c`` (w = z * z, from source) and the orchestration ``kernels/orch.c``
that launches both. Without an argument, the object is built into a temporary directory.
The package's cache key hashes the object's bytes: rebuild it and the next run gets a new
package.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import pto

HERE = Path(__file__).resolve().parent
N = 100_003  # not a multiple of the block count: the last block is short


def build_object(out: Path) -> Path:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["sh", str(HERE / "build_kernel.sh"), str(out)], check=True, env=env)
    return out


def on_every_chip(ctx, args):
    """One task per chip, each the whole orchestration, on inputs shifted by the chip id."""
    outs = []
    for chip in ctx.peers():
        x = ctx.tensor(args["x"] + chip)
        y = ctx.tensor(args["y"])
        z, w = ctx.alloc(x.shape, x.dtype), ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "add_square", [pto.Arg.input(x), pto.Arg.input(y),
                                        pto.Arg.output(z), pto.Arg.output(w)])
        outs.append((z, w))
    return outs


def check(x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.ndarray) -> None:
    np.testing.assert_array_equal(z, x + y)
    np.testing.assert_allclose(w, (x + y) ** 2, rtol=1e-6)


def main(obj: Path) -> None:
    pkg = pto.compile(platform="sim", kernels=[obj, HERE / "kernels" / "square.c"],
                      orch=HERE / "kernels" / "orch.c")
    print(f"package {pkg.sha256[:12]}: kernels {pkg.kernels}, orchestration {pkg.orch}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(N).astype(np.float32)
    y = rng.standard_normal(N).astype(np.float32)

    with pto.Runtime(level="chip", platform="sim", device=0) as rt:  # L2: in this process
        rt.register("add_square", pkg=pkg)
        z, w = np.zeros_like(x), np.zeros_like(x)
        rt.run("add_square", args=[pto.Arg.input(x), pto.Arg.input(y), pto.Arg.output(z),
                                   pto.Arg.output(w)])
        check(x, y, z, w)
        print(f"L2: z = x + y (prebuilt object), w = z * z (source) x {N}: matches numpy")

    with pto.Runtime(level="host", platform="sim", devices=[0, 1, 2, 3]) as rt:  # L3
        rt.register("pipeline", orch=on_every_chip, kernels={"add_square": pkg})
        outs = rt.run("pipeline", args={"x": x, "y": y})
        for chip, (z, w) in enumerate(outs):
            check(x + chip, y, z.numpy(), w.numpy())
        print(f"L3: the orchestration as one task on each of {len(outs)} chips: matches numpy")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]).resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(build_object(Path(tmp) / "add_custom.o"))
