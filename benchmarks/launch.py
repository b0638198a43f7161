"""L2 launch overhead and matmul throughput on the simulated chip.

    python benchmarks/launch.py           # ~20 s
    python benchmarks/launch.py --quick   # a few seconds

(a) ``pto_launch`` from a C orchestration: N launches of a no-op kernel, wall time / N,
    with block_dim 1 (runs in the launching thread) and block_dim = cores (every core
    of the chip takes part).
(b) ``rt.run`` from Python: one launch of the no-op kernel per call, with no arguments
    and with three numpy arrays (the cost of packing ``pto_arg``s and the ctypes call);
    and with block_dim = cores after the cores went to sleep (a futex wake-up).
(c) the tiled C matmul of examples/matmul (-O3 -march=native) in GFLOP/s at
    block_dim 1 and = cores, next to ``numpy.matmul`` (BLAS, its own threads).

Times are medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import pto
from pto.chip.simlib import default_cores

HERE = Path(__file__).resolve().parent
MATMUL_C = HERE.parent / "examples" / "matmul" / "kernels" / "matmul.c"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: first launches start core threads, first touches fault pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def launch_overhead(rt, n: int, repeats: int, cores: int) -> list[tuple[str, float]]:
    rows = []
    for block_dim in sorted({1, cores}):
        args = [pto.Arg.scalar(n), pto.Arg.scalar(block_dim)]
        t = median_time(lambda a=args: rt.run("launch_loop", args=a), repeats)
        rows.append((f"pto_launch from C, block_dim {block_dim}", t / n * 1e6))
    return rows


def wake_up(rt, cores: int, samples: int) -> list[tuple[str, float]]:
    """rt.run of one no-op launch after 2 ms idle: with one block (what idling costs the
    caller itself), and over every core (the cores have gone to sleep: a futex wake-up)."""
    rows = []
    for block_dim in sorted({1, cores}):
        times = []
        for _ in range(samples):
            time.sleep(0.002)  # longer than the cores spin before they block
            start = time.perf_counter()
            rt.run("noop", args=[], block_dim=block_dim)
            times.append(time.perf_counter() - start)
        rows.append((f"rt.run after 2 ms idle, block_dim {block_dim}",
                     statistics.median(times) * 1e6))
    return rows


def run_overhead(rt, n: int, repeats: int) -> list[tuple[str, float]]:
    arrays = [np.zeros(1024, np.float32) for _ in range(3)]
    cases = {
        "rt.run from Python, no arguments": [],
        "rt.run from Python, 3 arrays": [pto.Arg.input(arrays[0]), pto.Arg.input(arrays[1]),
                                         pto.Arg.output(arrays[2])],
    }
    rows = []
    for label, args in cases.items():
        def many(a=args):
            for _ in range(n):
                rt.run("noop", args=a)
        rows.append((label, median_time(many, repeats) / n * 1e6))
    return rows


def matmul_rates(sizes: list[int], repeats: int, cores: int) -> list[tuple[int, str, float]]:
    pkg = pto.compile(platform="sim", kernels=[MATMUL_C], flags=["-O3", "-march=native"])
    rows = []
    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        rt.register("matmul", pkg=pkg)
        for size in sizes:
            rng = np.random.default_rng(size)
            a = rng.standard_normal((size, size)).astype(np.float32)
            b = rng.standard_normal((size, size)).astype(np.float32)
            c = np.empty((size, size), np.float32)
            flops = 2.0 * size**3
            args = [pto.Arg.input(a), pto.Arg.input(b), pto.Arg.output(c)]
            for block_dim in sorted({1, cores}):
                t = median_time(lambda a=args, bd=block_dim: rt.run("matmul", a, block_dim=bd),
                                repeats)
                np.testing.assert_allclose(c, a @ b, rtol=1e-3, atol=1e-2)
                rows.append((size, f"pto C matmul, block_dim {block_dim}", flops / t / 1e9))
            t = median_time(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), repeats)
            rows.append((size, "numpy.matmul", flops / t / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer launches and repeats")
    opts = parser.parse_args()
    n_launch, n_run, repeats = (20_000, 2_000, 3) if opts.quick else (200_000, 20_000, 7)
    sizes = [256, 512] if opts.quick else [256, 512, 1024]
    cores = default_cores()

    pkg = pto.compile(platform="sim", kernels=[HERE / "kernels" / "noop.c"],
                      orch=HERE / "kernels" / "launch_loop.c", flags=["-O2"])
    print(f"simulated chip: {cores} cores; python {sys.version.split()[0]}, "
          f"numpy {np.__version__}\n")
    with pto.Runtime(level="chip", platform="sim", device=0, cores=cores) as rt:
        rt.register("launch_loop", pkg=pkg)
        rows = (launch_overhead(rt, n_launch, repeats, cores) + run_overhead(rt, n_run, repeats)
                + wake_up(rt, cores, 200 if opts.quick else 1000))
    print(f"{'L2 launch overhead (no-op kernel)':<44} {'µs/launch':>10}")
    for label, us in rows:
        print(f"{label:<44} {us:>10.2f}")

    print(f"\n{'matmul float32, n x n @ n x n':<44} {'n':>5} {'GFLOP/s':>9}")
    for size, label, rate in matmul_rates(sizes, repeats, cores):
        print(f"{label:<44} {size:>5} {rate:>9.1f}")


if __name__ == "__main__":
    main()
