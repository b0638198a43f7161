"""pto through its public API: an embedded broker and one worker per chip (4 chips).

Every case is one orchestration, timed around ``rt.run`` (plus reading the result):
the orchestration builds the graph in this process, the broker resolves dependencies,
the workers run the Python kernels on views of shared memory.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time

import numpy as np
import psutil

import pto

from .common import median, quantile
from .noop import many_noops, noop, one_noop

# ---- kernels and orchestrations ------------------------------------------------------


def inc(x):
    x[0] += 1


def fill(x):
    x[:] = 1.0


def total(x, out):
    out[0] = x.sum()


def chain(ctx, args):
    """``n`` tasks, each INOUT on one small tensor, on one chip or alternating between two."""
    chips = ctx.peers()[: args["chips"]]
    x = ctx.alloc((1,), np.int64)
    for i in range(args["n"]):
        ctx.submit(chips[i % len(chips)], "inc", [pto.Arg.inout(x)])
    return x


def handoff(ctx, args):
    """Chip A writes ``n`` float64 ones, chip B sums them into a 1-element tensor."""
    a, b = ctx.peers()[:2]
    data = ctx.alloc((args["n"],), np.float64)  # freed once both tasks are done
    out = ctx.alloc((1,), np.float64)
    ctx.submit(a, "fill", [pto.Arg.output(data)])
    ctx.submit(b, "total", [pto.Arg.input(data), pto.Arg.output(out)])
    return out


# ---- random DAGs (scaling) ------------------------------------------------------------

POOL = 64  # tensors the random tasks name
POOL_ELEMS = 8
RUN_LIMIT_S = 300.0  # one random DAG run; longer is reported as an error
LONG_S = 60.0  # stop repeating a size once its runs took this long in all


def bump(acc, *inputs):
    acc[0] += 1  # so the driver can count finished tasks: sum of acc[0] over the pool


def make_pool(ctx, args):
    return [ctx.alloc((POOL_ELEMS,), np.int64) for _ in range(POOL)]


def random_dag(ctx, args):
    """Each task: INOUT on one pool tensor, INPUT on 0-2 others, on a random chip."""
    peers, pool, progress = ctx.peers(), args["pool"], args["progress"]
    inout, inp, submit = pto.Arg.inout, pto.Arg.input, ctx.submit
    for i, (chip, w, reads) in enumerate(args["ops"]):
        submit(peers[chip], "bump", [inout(pool[w])] + [inp(pool[r]) for r in reads])
        progress[0] = i + 1


def _finished(views: list[np.ndarray]) -> int:
    return sum(int(v[0]) for v in views)


def make_ops(n: int, seed: int, chips: int) -> list[tuple[int, int, list[int]]]:
    rng = random.Random(seed)
    ops = []
    for _ in range(n):
        w, *reads = rng.sample(range(POOL), rng.randint(1, 3))
        ops.append((rng.randrange(chips), w, reads))
    return ops


class RssSampler:
    """Samples the broker's RSS and the live task count in a thread while in ``with``."""

    def __init__(self, proc: psutil.Process, live, interval: float = 0.005):
        self.proc, self.live, self.interval = proc, live, interval
        self.samples: list[tuple[int, int]] = []

    def _sample(self) -> None:
        try:
            self.samples.append((self.proc.memory_info().rss, self.live()))
        except psutil.Error:
            pass  # the broker is gone: the run reports why

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def broker_process(address: str) -> psutil.Process:
    """The embedded broker: our child process with ``-m broker`` (serving ``address``)."""
    brokers = [p for p in psutil.Process().children(recursive=True)
               if "-m broker" in " ".join(p.cmdline())]
    ours = [p for p in brokers if address in p.cmdline()]
    if not (ours or brokers):
        raise RuntimeError("no embedded broker process found")
    return (ours or brokers)[-1]


# ---- fairness: a small client next to a flooding one ----------------------------------


def flood_client(address: str, chips: int, n: int, pipe) -> None:
    """Another client of the broker at ``address`` (run in its own process): says "ready"
    once warm, waits for "go", runs ``n`` no-op tasks over ``chips`` chips, sends the
    seconds they took."""
    with pto.Runtime(level="host", broker=address, devices=list(range(chips))) as rt:
        rt.register("many_noops", orch=many_noops, kernels={"noop": noop})
        rt.run("many_noops", {"n": 200})  # warm-up: the kernel reaches both workers
        pipe.send("ready")
        if pipe.recv() != "go":
            return
        t0 = time.perf_counter()
        rt.run("many_noops", {"n": n})
        pipe.send(time.perf_counter() - t0)


def _latencies(rt: pto.Runtime, runs: int | None, until=None) -> list[float]:
    """Milliseconds per ``rt.run("one_noop")``: ``runs`` of them, or until ``until()``."""
    ms = []
    while (len(ms) < runs) if runs is not None else not until():
        t0 = time.perf_counter_ns()
        rt.run("one_noop")
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    return ms


def _stats(ms: list[float]) -> dict:
    return {"runs": len(ms), "median_ms": median(ms), "p99_ms": quantile(ms, 0.99),
            "max_ms": max(ms)}


# ---- the system ----------------------------------------------------------------------


def _runtime(devices: int) -> pto.Runtime:
    os.environ.pop("PTO_BROKER", None)  # always an embedded broker
    return pto.Runtime(level="host", platform="sim", devices=list(range(devices)))


class PtoSystem:
    key = "pto"
    labels = {
        "chain": "pto: INOUT on one tensor, one chip (queued behind on the worker)",
        "chain_across": "pto: INOUT on one tensor, chips 0/1 alternating (waits on the workers)",
        "handoff": "pto: chip 0 writes, chip 1 sums (shared memory)",
        "fairness": "pto: small client's 1-task runs, broker idle (2 chips)",
        "fairness_flood": "pto: same, while another client floods no-ops on both chips",
    }

    def __init__(self, cfg):
        self.cfg = cfg
        self.label = f"pto host, {cfg.devices} chips"

    def __enter__(self) -> PtoSystem:
        self.rt = _runtime(self.cfg.devices)
        self.rt.register("many_noops", orch=many_noops, kernels={"noop": noop})
        self.rt.register("one_noop", orch=one_noop, kernels={"noop": noop})
        self.rt.register("chain", orch=chain, kernels={"inc": inc})
        self.rt.register("handoff", orch=handoff, kernels={"fill": fill, "total": total})
        return self

    def __exit__(self, *exc) -> None:
        self.rt.close()

    def noop(self, n: int) -> None:
        self.rt.run("many_noops", {"n": n})

    def roundtrip(self) -> None:
        self.rt.run("one_noop")

    def chain(self, n: int, chips: int = 1) -> int:
        x = self.rt.run("chain", {"n": n, "chips": chips})
        value = int(x.numpy()[0])
        x.free()
        return value

    def chain_across(self, n: int) -> int:
        return self.chain(n, chips=2)

    def handoff(self, nbytes: int) -> float:
        out = self.rt.run("handoff", {"n": nbytes // 8})
        value = float(out.numpy()[0])
        out.free()
        return value

    def handoff_copied(self, nbytes: int) -> tuple[int, str]:
        return 0, ("by construction: tensors are POSIX shm segments mapped by every process; "
                   "messages carry handles only")

    def scaling(self, n: int) -> dict:
        """A seeded random DAG of ``n`` tasks on a fresh runtime; tasks/s and broker RSS."""
        ops = make_ops(n, self.cfg.seed + n, self.cfg.devices)
        with _runtime(self.cfg.devices) as rt:
            rt.register("make_pool", orch=make_pool)
            rt.register("dag", orch=random_dag, kernels={"bump": bump})
            pool = rt.run("make_pool")
            progress = [0]
            args = {"ops": ops, "pool": pool, "progress": progress}
            rt.run("dag", {**args, "ops": ops[:200]})  # warm-up: ships the kernel
            views = [h.numpy() for h in pool]
            broker = broker_process(rt.address)
            base = broker.memory_info().rss
            try:
                times, samples = [], []
                for _ in range(self.cfg.repeats):
                    for v in views:
                        v[:] = 0
                    progress[0] = 0
                    sampler = RssSampler(broker, lambda: progress[0] - _finished(views))
                    with sampler:
                        t0 = time.perf_counter()
                        future = rt.submit("dag", args)
                        try:
                            future.result(timeout=RUN_LIMIT_S)
                        except TimeoutError:
                            raise TimeoutError(f"a {n:,}-task DAG did not finish within "
                                               f"{RUN_LIMIT_S:.0f}s") from None
                        times.append(time.perf_counter() - t0)
                    samples += sampler.samples
                    done = _finished(views)
                    if done != n:
                        raise AssertionError(f"random DAG: {done} of {n} tasks counted")
                    if sum(times) > LONG_S:
                        break  # enough for a big DAG on a slow path: fewer repeats
            finally:
                views.clear()  # no view may outlive its segment
            for h in pool:
                h.free()
        peak_rss = max(rss for rss, _ in samples)
        peak_live = max(1, max(live for _, live in samples))
        t = median(times)
        return {"tasks": n, "repeats": len(times), "seconds": t, "tasks_per_s": n / t,
                "broker_base_rss_mib": base / 2**20, "broker_peak_rss_mib": peak_rss / 2**20,
                "peak_live_tasks": peak_live,
                "bytes_per_live_task": max(0, peak_rss - base) / peak_live,
                "samples": len(samples)}

    def graph(self) -> list[dict]:
        from .pto_graph import graph_case

        return graph_case(self.rt, self.cfg)

    def fairness(self, flood_tasks: int, runs: int, limit_s: float) -> dict:
        """A small client's single-task runs on a fresh 2-chip broker: ``runs`` of them
        idle, then as many as fit while another client process runs ``flood_tasks``
        no-op tasks over both chips (at most ``limit_s``: the flood is then killed). The
        same flood alone first (the small client waits), for the flood's solo
        throughput: what the flood keeps of it next to the small client."""
        chips = 2
        with _runtime(chips) as rt:
            rt.register("one_noop", orch=one_noop, kernels={"noop": noop})
            _latencies(rt, 50)  # warm-up
            idle = _latencies(rt, runs)
            solo_s, _ = _flood(rt.address, chips, flood_tasks, limit_s, None)
            flood_s, during = _flood(rt.address, chips, flood_tasks, limit_s, rt)
        if not during:
            raise RuntimeError("no run of the small client finished during the flood")
        flood_row = {**_stats(during), "flood_tasks": flood_tasks,
                     "flood_finished": flood_s is not None}
        if flood_s is None or solo_s is None:
            flood_row["note"] = f"flood cut short: not done after {limit_s:.0f} s"
        if flood_s is not None:
            flood_row.update(flood_s=flood_s, flood_tasks_per_s=flood_tasks / flood_s)
        if solo_s is not None:
            flood_row.update(solo_s=solo_s, solo_tasks_per_s=flood_tasks / solo_s)
        if flood_s is not None and solo_s is not None:
            flood_row["flood_vs_solo"] = solo_s / flood_s
        return {"idle": _stats(idle), "flood": flood_row}


def _flood(address: str, chips: int, n: int, limit_s: float,
           small: pto.Runtime | None) -> tuple[float | None, list[float]]:
    """Run ``flood_client`` in another process against the broker at ``address`` and,
    if ``small`` is given, time its single-task runs meanwhile. Returns the flood's
    seconds (None if cut short at ``limit_s``) and the small client's milliseconds."""
    ours, theirs = multiprocessing.Pipe()
    flood = multiprocessing.get_context("spawn").Process(
        target=flood_client, args=(address, chips, n, theirs))
    flood.start()
    flood_s, during = None, []
    try:
        if not ours.poll(60) or ours.recv() != "ready":
            raise RuntimeError("the flooding client did not start within 60 s")
        ours.send("go")
        deadline = time.monotonic() + limit_s
        if small is not None:
            during = _latencies(small, None, lambda: ours.poll()
                                or time.monotonic() > deadline or not flood.is_alive())
        else:
            while not ours.poll(0.05) and time.monotonic() < deadline and flood.is_alive():
                pass
        if ours.poll():
            flood_s = ours.recv()
    finally:
        if flood_s is None and flood.is_alive():
            flood.kill()  # bounded: a flood still running at the limit is cut short
        flood.join(30)
    return flood_s, during
