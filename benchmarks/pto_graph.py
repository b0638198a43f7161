"""The ``graph`` case (issue 20): captured graphs replayed vs the same work run live, in
the same run, next to the original runtime's published per-run model (43.3 us per run +
8.08 us per task, its C++ engine).

- a 1,000-task random DAG on 4 chips (the scaling case's generator; its tensors belong to
  the graph: each replay starts from zeroed counters, checked after every replay);
- a 16-task chain alternating two chips, against a single-task ``rt.run`` round trip;
- 10,000 independent no-op tasks.
"""

from __future__ import annotations

import time

import numpy as np

import pto

from .common import median
from .noop import many_noops, noop, one_noop
from .pto_system import POOL, POOL_ELEMS, bump, chain, inc, make_ops

MODEL_RUN_US, MODEL_TASK_US = 43.3, 8.08  # the original runtime's host dispatch model


def graph_dag(ctx, args):
    """The scaling case's random DAG over a pool the graph owns (zeroed every replay:
    each task's INOUT counter is read before written)."""
    peers = ctx.peers()
    pool = [ctx.alloc((POOL_ELEMS,), np.int64) for _ in range(POOL)]
    inout, inp, submit = pto.Arg.inout, pto.Arg.input, ctx.submit
    for chip, w, reads in args["ops"]:
        submit(peers[chip], "bump", [inout(pool[w])] + [inp(pool[r]) for r in reads])
    return pool


def _counted(pool) -> int:
    return sum(int(h.numpy()[0]) for h in pool)


def _best_of(fn, repeats: int, per: int) -> float:
    """Median over ``repeats`` of the mean seconds of ``per`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times.append((time.perf_counter() - t0) / per)
    return median(times)


def _row(case: str, label: str, n: int, replay_s: float, live_s: float, versus: str) -> dict:
    model_us = MODEL_RUN_US + MODEL_TASK_US * n
    return {"system": f"pto-{case}", "label": label, "kind": "runtime", "tasks": n,
            "replay_us": replay_s * 1e6, "replay_tasks_per_s": n / replay_s,
            "live_us": live_s * 1e6, "live_tasks_per_s": n / live_s,
            "vs_live": live_s / replay_s, "versus": versus,
            "model_us": model_us, "model_tasks_per_s": n / (model_us / 1e6)}


def graph_case(rt: pto.Runtime, cfg) -> list[dict]:
    rt.register("graph_dag", orch=graph_dag, kernels={"bump": bump})
    rt.register("graph_chain", orch=chain, kernels={"inc": inc})
    rt.register("graph_noops", orch=many_noops, kernels={"noop": noop})
    rt.register("graph_one", orch=one_noop, kernels={"noop": noop})
    reps, per = cfg.repeats, cfg.graph_replays
    rows = []

    n = cfg.graph_dag_tasks
    args = {"ops": make_ops(n, cfg.seed + n, cfg.devices)}
    g = rt.capture("graph_dag", args=args)
    try:
        def replay_dag() -> None:
            pool = g.run(args, copy=False)
            if _counted(pool) != n:
                raise AssertionError(f"graph replay counted {_counted(pool)} of {n} tasks")

        def live_dag() -> None:
            pool = rt.run("graph_dag", args)
            counted = _counted(pool)
            for h in pool:
                h.free()
            if counted != n:
                raise AssertionError(f"live run counted {counted} of {n} tasks")

        replay_dag(), live_dag()  # warm-up
        live_s = _best_of(live_dag, reps, max(1, per // 10))
        replay_s = _best_of(replay_dag, reps, per)
        rows.append(_row("graph-dag", f"pto: {n:,}-task random DAG, {cfg.devices} chips",
                         n, replay_s, live_s, "live run of the same DAG"))
    finally:
        g.close()

    n = cfg.graph_chain_tasks
    chain_args = {"n": n, "chips": 2}
    g = rt.capture("graph_chain", args=chain_args)
    try:
        def replay_chain() -> None:
            if int(g.run(chain_args, copy=False).numpy()[0]) != n:
                raise AssertionError("chain replay: wrong count")

        for _ in range(20):
            replay_chain()
            rt.run("graph_one")
        live_s = _best_of(lambda: rt.run("graph_one"), reps, per * 5)
        replay_s = _best_of(replay_chain, reps, per * 5)
        rows.append(_row("graph-chain", f"pto: {n}-task chain alternating 2 chips", n,
                         replay_s, live_s, "a single-task rt.run round trip"))
    finally:
        g.close()

    n = cfg.graph_noop_tasks
    g = rt.capture("graph_noops", args={"n": n})
    try:
        g.run({"n": n})
        rt.run("graph_noops", {"n": n})
        live_s = _best_of(lambda: rt.run("graph_noops", {"n": n}), reps, 1)
        replay_s = _best_of(lambda: g.run({"n": n}), reps, max(1, per // 4))
        rows.append(_row("graph-noop", f"pto: {n:,} independent no-op tasks, {cfg.devices} "
                         "chips", n, replay_s, live_s, "live run of the same tasks"))
    finally:
        g.close()
    return rows
