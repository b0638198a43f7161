"""No-op task throughput and single-task round trip: pto vs multiprocessing peers.

    python benchmarks/noop.py            # 20,000 tasks x 5 repeats, 1,000 round trips
    python benchmarks/noop.py --quick    # a few seconds

(a) throughput: one orchestration submits N independent no-op tasks (no arguments),
    round-robin over the chips; wall time of ``rt.run``, median of the repeats.
(b) round trip: ``rt.run`` of an orchestration that submits one no-op task; median and
    p99 over many runs.
(c) the same two numbers for ``multiprocessing.Pool(2)`` (``map`` with a chunksize;
    ``apply``) and ``concurrent.futures.ProcessPoolExecutor(2)`` (``map`` with a
    chunksize; ``submit().result()``).

The peers run first, before pto starts any thread or socket, so their fork is clean.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import pto


def noop():
    pass


def noop_arg(_):
    pass


# ---- pto -------------------------------------------------------------------------------


def many_noops(ctx, args):
    peers = ctx.peers()
    for i in range(args["n"]):
        ctx.submit(peers[i % len(peers)], "noop", [])


def one_noop(ctx, args):
    ctx.submit(ctx.peers()[0], "noop", [])


def bench_pto(devices: int, n: int, repeats: int, trips: int) -> tuple[float, list[float]]:
    os.environ.pop("PTO_BROKER", None)  # always the embedded broker
    with pto.Runtime(level="host", platform="sim", devices=list(range(devices))) as rt:
        rt.register("many_noops", orch=many_noops, kernels={"noop": noop})
        rt.register("one_noop", orch=one_noop, kernels={"noop": noop})
        rt.run("many_noops", args={"n": 4 * devices})  # warm-up: ships the kernel
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.run("many_noops", args={"n": n})
            times.append(time.perf_counter() - t0)
        for _ in range(min(trips, 50)):
            rt.run("one_noop", args={})
        rtts = []
        for _ in range(trips):
            t0 = time.perf_counter_ns()
            rt.run("one_noop", args={})
            rtts.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times), rtts


# ---- peers -----------------------------------------------------------------------------


def bench_pool(n: int, repeats: int, trips: int) -> tuple[float, list[float]]:
    chunk = max(1, n // (4 * 2))  # what Pool.map picks by default for 2 processes
    with multiprocessing.Pool(2) as pool:
        pool.map(noop_arg, range(8), chunksize=1)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pool.map(noop_arg, range(n), chunksize=chunk)
            times.append(time.perf_counter() - t0)
        rtts = []
        for _ in range(trips):
            t0 = time.perf_counter_ns()
            pool.apply(noop)
            rtts.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times), rtts


def bench_executor(n: int, repeats: int, trips: int) -> tuple[float, list[float]]:
    chunk = max(1, n // (4 * 2))
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(noop_arg, range(8)))  # warm-up: starts the processes
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(noop_arg, range(n), chunksize=chunk))
            times.append(time.perf_counter() - t0)
        rtts = []
        for _ in range(trips):
            t0 = time.perf_counter_ns()
            ex.submit(noop).result()
            rtts.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times), rtts


# ---- report ----------------------------------------------------------------------------


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pto no-op throughput and round-trip latency")
    ap.add_argument("--tasks", type=int, default=20000, help="tasks per throughput run")
    ap.add_argument("--repeats", type=int, default=5, help="throughput runs (median)")
    ap.add_argument("--devices", type=int, default=4, help="simulated chips for pto")
    ap.add_argument("--trips", type=int, default=1000, help="single-task round trips")
    ap.add_argument("--quick", action="store_true", help="2,000 tasks x 3, 200 round trips")
    a = ap.parse_args(argv)
    if a.quick:
        a.tasks, a.repeats, a.trips = min(a.tasks, 2000), min(a.repeats, 3), min(a.trips, 200)

    print(f"no-op tasks: {a.tasks} x {a.repeats} repeats (median); {a.trips} round trips; "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    results = {}
    results["multiprocessing.Pool(2)"] = bench_pool(a.tasks, a.repeats, a.trips)
    results["ProcessPoolExecutor(2)"] = bench_executor(a.tasks, a.repeats, a.trips)
    ours = f"pto host, {a.devices} chips"
    results[ours] = bench_pto(a.devices, a.tasks, a.repeats, a.trips)

    print(f"\n{'':28} {'tasks/s':>12} {'us/task':>9} {'rtt med us':>11} {'rtt p99 us':>11}")
    for name, (t, rtts) in results.items():
        print(f"{name:28} {a.tasks / t:12,.0f} {t / a.tasks * 1e6:9.2f} "
              f"{statistics.median(rtts):11.1f} {p99(rtts):11.1f}")

    t_ours, rtt_ours = results[ours]
    print("\nratios (pto vs peer; >1 means pto is better):")
    for name, (t, rtts) in results.items():
        if name != ours:
            print(f"  vs {name:26} throughput x{t / t_ours:.2f}, "
                  f"round trip x{statistics.median(rtts) / statistics.median(rtt_ours):.2f}")
    print("  (DESIGN.md figure to beat, upstream C++ host dispatch: 43 us/run + 8 us/task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
