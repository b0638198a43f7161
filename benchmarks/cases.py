"""The cases, measured the same way for every system: warm up, repeat, take the median.

A system is an object from one of the system modules (``pools``, ``floors``,
``pto_system``, ``ray_system``, ``dask_system``); a case uses the methods it has and
skips a system that has none. Each case returns result rows: dicts with ``system``
(key), ``label``, ``kind`` (``runtime``, ``batched`` or ``floor``) and numbers.
"""

from __future__ import annotations

import time

from .common import MiB, median, p99, quantile, timed


def _row(system, case: str, **values) -> dict:
    kind = "floor" if system.key == "floor" else "runtime"
    label = getattr(system, "labels", {}).get(case, system.label)
    return {"system": system.key, "label": label, "kind": kind, **values}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def noop(system, cfg) -> list[dict]:
    """``noop_tasks`` independent no-op tasks, one submission each; wall time to all done."""
    n = cfg.noop_tasks
    system.noop(min(n, 200))  # warm-up: workers started, functions shipped
    t = median([timed(system.noop, n) for _ in range(cfg.repeats)])
    rows = [_row(system, "noop", tasks=n, tasks_per_s=n / t, us_per_task=t / n * 1e6)]
    if hasattr(system, "noop_batched"):
        system.noop_batched(min(n, 200))
        t = median([timed(system.noop_batched, n) for _ in range(cfg.repeats)])
        rows.append({**rows[0], "system": f"{system.key}-batched", "kind": "batched",
                     "label": f"{system.label}: {system.batch_label}",
                     "tasks_per_s": n / t, "us_per_task": t / n * 1e6})
    return rows


def _with_variant(system, case: str, variant: str, suffix: str):
    """(method name, method, row system key) for ``case`` and its ``variant``, those the
    system has; the variant's rows go under ``<key>-<suffix>``."""
    for name, key in ((case, system.key), (variant, f"{system.key}-{suffix}")):
        method = getattr(system, name, None)
        if method is not None:
            yield name, method, key


def roundtrip(system, cfg) -> list[dict]:
    """One no-op task, submitted and waited for; ``trips`` per repeat. Median and p99 are
    the medians of each repeat's; p99.9 and max are over every trip of every repeat (one
    repeat holds too few trips for a p99.9)."""
    rows = []
    # roundtrip_relay: the floors' four-hop relay (a second floor row)
    for name, trip, key in _with_variant(system, "roundtrip", "roundtrip_relay", "relay"):
        for _ in range(min(cfg.trips, 50)):
            trip()
        medians, p99s, every = [], [], []
        for _ in range(cfg.repeats):
            us = []
            for _ in range(cfg.trips):
                t0 = time.perf_counter_ns()
                trip()
                us.append((time.perf_counter_ns() - t0) / 1e3)
            medians.append(median(us))
            p99s.append(p99(us))
            every += us
        rows.append({**_row(system, name, trips=cfg.trips, median_us=median(medians),
                            p99_us=median(p99s), p999_us=quantile(every, 0.999),
                            max_us=max(every)), "system": key})
    return rows


def chain(system, cfg) -> list[dict]:
    """``chain_tasks`` tasks, each depending on the one before."""
    n = cfg.chain_tasks
    rows = []
    # chain_across: a variant whose every dependency crosses chips (pto only)
    for name, run, key in _with_variant(system, "chain", "chain_across", "across"):
        run(min(n, 20))
        times = []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            value = run(n)
            times.append(time.perf_counter() - t0)
            if value != n:
                raise AssertionError(f"{system.key} {name} of {n} tasks ended at {value}")
        t = median(times)
        rows.append({**_row(system, name, tasks=n, us_per_task=t / n * 1e6), "system": key})
    return rows


def handoff(system, cfg) -> list[dict]:
    """Producer writes S bytes (float64 ones), a consumer elsewhere sums; driver gets it."""
    system.handoff(MiB)
    rows = []
    for mib in cfg.handoff_mib:
        nbytes = mib * MiB
        times = []
        try:
            system.handoff(nbytes)  # warm-up at this size, as in every case
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                value = system.handoff(nbytes)
                times.append(time.perf_counter() - t0)
                if value != nbytes // 8:
                    raise AssertionError(f"{system.key} handoff of {mib} MiB summed to {value}")
        except Exception as exc:  # noqa: BLE001 - a failed size is a result; try the others
            rows.append(_row(system, "handoff", size_mib=mib, error=_error(exc)))
            continue
        copied, basis = system.handoff_copied(nbytes)
        rows.append(_row(system, "handoff", size_mib=mib, ms=median(times) * 1e3,
                         bytes_copied=copied, copied_basis=basis))
    if hasattr(system, "memcpy"):
        rows.append(system.memcpy(cfg.repeats))
    return rows


def scaling(system, cfg) -> list[dict]:
    """Random DAGs of growing size (only systems with a ``scaling`` method: pto)."""
    if not hasattr(system, "scaling"):
        return []
    rows = []
    for n in cfg.scaling_tasks:
        try:
            rows.append(_row(system, "scaling", **system.scaling(n)))
        except Exception as exc:  # noqa: BLE001 - a failed size is a result; try the others
            rows.append(_row(system, "scaling", tasks=n, error=_error(exc)))
    return rows


def cluster(system, cfg) -> list[dict]:
    """L4 on a 2-host LocalCluster, pto and plain Ray on the same nodes (only the cluster
    system: benchmarks/cluster_system.py holds the case, which needs Ray)."""
    if not hasattr(system, "handoff_l4"):
        return []
    from .cluster_system import cluster_case

    return cluster_case(system, cfg)


def fairness(system, cfg) -> list[dict]:
    """A small client's single-task runs while another client of the same broker floods
    ``flood_tasks`` no-op tasks on 2 chips, next to the same runs with the broker idle
    (only systems with a ``fairness`` method: pto)."""
    if not hasattr(system, "fairness"):
        return []
    got = system.fairness(cfg.flood_tasks, cfg.trips, cfg.fairness_limit_s)
    return [_row(system, "fairness", **got["idle"]),
            {**_row(system, "fairness_flood", **got["flood"]), "system": f"{system.key}-flood"}]


def graph(system, cfg) -> list[dict]:
    """Captured graphs replayed vs the same work live, in the same run (only systems with
    a ``graph`` method: pto; benchmarks/pto_graph.py holds the case)."""
    if not hasattr(system, "graph"):
        return []
    return system.graph()
