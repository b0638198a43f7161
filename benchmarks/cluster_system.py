"""L4 (issues 13, 19): pto's cluster runtime and plain Ray, on the same 2-host LocalCluster.

One child process starts ``pto.LocalCluster(hosts=2, chips=2)``, joins it as a Ray driver
and opens ``Runtime(level="cluster")`` on it; plain Ray's tasks and actors run on the very
same two nodes (pinned with node affinity), so both sides see the same machine, load and
object stores. The case (``--cases cluster``) measures, side by side:

- cross-host handoff of S MiB: an L3 run on host 0 writes S bytes of float64 ones, one on
  host 1 sums them; plain Ray: a task on node 0 returns ``np.ones``, a task on node 1 sums;
- same-host consecutive L3 runs (each one task on the Ref it got, 0 bytes copied): the
  per-run cost of a chain of K runs on host 0, vs a bare Ray actor call's round trip;
- an empty L4 run over 2 hosts (one empty L3 run each) vs one actor call on each node;
- N small L3 runs (one task each) from one L4 orchestration: runs/s vs N plain Ray tasks.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pto

from .common import MiB, median
from .peer_tasks import consume, produce

In, Out = pto.Arg.input, pto.Arg.output
HOST_LABEL = "pto.host"  # LocalCluster's label naming each node's host index

# ---- pto: kernels, L3 entries and L4 orchestrations -----------------------------------------


def fill_ones(y):
    y[...] = 1.0


def sum_into(x, out):
    out[0] = x.sum()


def touch(x):
    """A no-op task reading its tensor."""


KERNELS = {"fill_ones": fill_ones, "sum_into": sum_into, "touch": touch}


def produce_l3(ctx, n):
    y = ctx.alloc((n,), np.float64)
    ctx.submit(ctx.peers()[0], "fill_ones", [Out(y)])
    return y


def consume_l3(ctx, x):
    x = ctx.tensor(x)
    out = ctx.alloc((1,), np.float64)
    ctx.submit(ctx.peers()[-1], "sum_into", [In(x), Out(out)])
    return out


def step_l3(ctx, x):
    """One task on the tensor it got, which it passes on (same host: the same segment)."""
    x = ctx.tensor(x)
    ctx.submit(ctx.peers()[0], "touch", [In(x)])
    return x


def empty_l3(ctx, _):
    return None


def small_l3(ctx, _):
    y = ctx.alloc((16,), np.float64)
    ctx.submit(ctx.peers()[0], "fill_ones", [Out(y)])
    return None


def handoff_l4(ctx, n):
    return ctx.submit(1, "consume", args=ctx.submit(0, "produce", args=n))


def chain_l4(ctx, k):
    x = ctx.submit(0, "produce", args=1024)
    for _ in range(k):
        x = ctx.submit(0, "step", args=x)
    return ctx.submit(0, "consume", args=x)


def empty_l4(ctx, _):
    return [ctx.submit(h, "empty") for h in ctx.hosts()]


def many_l4(ctx, n):
    hosts = ctx.hosts()
    for i in range(n):
        ctx.submit(hosts[i % len(hosts)], "small")


# ---- plain Ray: the same work as tasks and actors ---------------------------------------------

_produce, _consume = ray.remote(produce), ray.remote(consume)


@ray.remote
def _small(i):
    return float(np.full(16, float(i)).sum())


@ray.remote(num_cpus=0)
class _Echo:
    def ping(self, x=None):
        return x


class ClusterSystem:
    key = "cluster"
    label = "pto L4 / Ray on a 2-host LocalCluster"

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self) -> ClusterSystem:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        store_mib = max(256, 3 * max(self.cfg.cluster_handoff_mib))
        t0 = time.perf_counter()
        self.cluster = pto.LocalCluster(hosts=2, chips=2, object_store_mib=store_mib)
        self.start_s = time.perf_counter() - t0
        try:
            ray.init(address=self.cluster.address, logging_level="warning", log_to_driver=False)
            self.nodes = _nodes_by_host()
            t0 = time.perf_counter()
            self.rt = pto.Runtime(level="cluster", cluster=self.cluster.address)
            self.open_s = time.perf_counter() - t0
            for name, fn in (("produce", produce_l3), ("consume", consume_l3),
                             ("step", step_l3), ("empty", empty_l3), ("small", small_l3)):
                self.rt.register(name, orch=fn, kernels=KERNELS)
            for name, fn in (("handoff", handoff_l4), ("chain", chain_l4),
                             ("empty2", empty_l4), ("many", many_l4)):
                self.rt.register(name, orch=fn)
            self.echo = [_Echo.options(scheduling_strategy=self._on(h)).remote() for h in (0, 1)]
            ray.get([e.ping.remote() for e in self.echo])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "rt", None) is not None:
            self.rt.close()
        self.cluster.stop()  # also drops this process's Ray connection

    def _on(self, host: int) -> NodeAffinitySchedulingStrategy:
        return NodeAffinitySchedulingStrategy(self.nodes[host], soft=False)

    def _moved(self) -> dict:
        return self.rt.stats()["total"]

    # -- the operations the case times --------------------------------------------------------

    def handoff_l4(self, nbytes: int) -> float:
        return float(self.rt.run("handoff", args=nbytes // 8)[0])

    def handoff_ray(self, nbytes: int) -> float:
        made = _produce.options(scheduling_strategy=self._on(0)).remote(nbytes // 8)
        return ray.get(_consume.options(scheduling_strategy=self._on(1)).remote(made))

    def chain_l4(self, k: int) -> float:
        return float(self.rt.run("chain", args=k)[0])

    def actor_trip(self) -> None:
        ray.get(self.echo[0].ping.remote())

    def empty_l4(self) -> None:
        self.rt.run("empty2")

    def empty_ray(self) -> None:
        ray.get([e.ping.remote() for e in self.echo])

    def many_l4(self, n: int) -> None:
        self.rt.run("many", args=n)

    def many_ray(self, n: int) -> None:
        ray.get([_small.options(scheduling_strategy=self._on(i % 2)).remote(i)
                 for i in range(n)])


def _nodes_by_host() -> dict[int, str]:
    """Ray node id of each host (LocalCluster labels its nodes with their host index)."""
    nodes = {}
    for node in ray.nodes():
        label = (node.get("Labels") or {}).get(HOST_LABEL)
        if node.get("Alive") and label is not None:
            nodes[int(label)] = node["NodeID"]
    return nodes


# ---- the case -------------------------------------------------------------------------------

PTO, RAY = "pto-l4", "ray-2nodes"
LABELS = {PTO: "pto L4", RAY: "plain Ray"}


def _row(system: str, what: str, **values) -> dict:
    return {"system": system, "label": f"{LABELS[system]}: {what}", "kind": "runtime", **values}


def _median_s(fn, *args, repeats: int) -> float:
    fn(*args)  # warm-up, as in every case
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return median(times)


def cluster_case(system: ClusterSystem, cfg) -> list[dict]:
    """Every measurement, each in its own section: one that fails is an error row, and the
    others still run."""
    rows = [{"system": "cluster", "label": "LocalCluster(hosts=2, chips=2) start / runtime open",
             "kind": "setup", "ms": system.start_s * 1e3, "open_ms": system.open_s * 1e3}]
    # the small runs first: what the large handoffs leave (object stores, kept segments) must
    # not weigh on them
    sections = [("same-host runs", _same_host, None), ("empty L4 run", _empty, None),
                (f"{cfg.cluster_runs:,} small runs", _many, None)]
    sections += [(f"handoff {mib} MiB", _handoff, mib) for mib in cfg.cluster_handoff_mib]
    for what, measure, arg in sections:
        try:
            rows += measure(system, cfg, arg)
        except Exception as exc:  # noqa: BLE001 - a failed measurement is a result
            rows.append(_row(PTO, what, error=f"{type(exc).__name__}: {exc}"))
    return rows


def _handoff(system: ClusterSystem, cfg, mib: int) -> list[dict]:
    nbytes = mib * MiB
    for name, fn in ((PTO, system.handoff_l4), (RAY, system.handoff_ray)):
        value = fn(nbytes)
        if value != nbytes // 8:
            raise AssertionError(f"{name} cross-host handoff of {mib} MiB summed to {value}")
    before = system._moved()
    t_pto = _median_s(system.handoff_l4, nbytes, repeats=cfg.repeats)
    after = system._moved()
    # one copy per hop: producer's mapping -> tcp -> the consumer's new segment (the
    # warm-up call of _median_s is counted too)
    pto_copied = (after["bytes_in"] - before["bytes_in"]) // (cfg.repeats + 1)
    t_ray = _median_s(system.handoff_ray, nbytes, repeats=cfg.repeats)
    return [_row(PTO, f"handoff {mib} MiB host 0 -> 1", measure="handoff", size_mib=mib,
                 ms=t_pto * 1e3,
                 ratio_to_ray=t_pto / t_ray, bytes_copied=pto_copied),
            _row(RAY, f"handoff {mib} MiB node 0 -> 1", size_mib=mib, ms=t_ray * 1e3,
                 bytes_copied=nbytes)]


def _same_host(system: ClusterSystem, cfg, _) -> list[dict]:
    k, trips = cfg.cluster_chain, cfg.cluster_trips
    before = system._moved()
    t_k = _median_s(system.chain_l4, k, repeats=cfg.repeats)
    t_0 = _median_s(system.chain_l4, 0, repeats=cfg.repeats)
    after = system._moved()
    t_trip = _median_s(lambda: [system.actor_trip() for _ in range(trips)],
                       repeats=cfg.repeats) / trips
    per_run = (t_k - t_0) / k
    return [_row(PTO, f"same-host run, chain of {k} on host 0", measure="same_host",
                 us=per_run * 1e6,
                 ratio_to_ray=per_run / t_trip,
                 bytes_copied=after["bytes_in"] - before["bytes_in"],
                 handoffs=after["local_handoffs"] - before["local_handoffs"]),
            _row(RAY, "actor call round trip (node 0)", us=t_trip * 1e6)]


def _empty(system: ClusterSystem, cfg, _) -> list[dict]:
    trips = cfg.cluster_trips
    t_pto = _median_s(lambda: [system.empty_l4() for _ in range(trips)],
                      repeats=cfg.repeats) / trips
    t_ray = _median_s(lambda: [system.empty_ray() for _ in range(trips)],
                      repeats=cfg.repeats) / trips
    return [_row(PTO, "empty L4 run over 2 hosts", measure="empty", us=t_pto * 1e6,
                 ratio_to_ray=t_pto / t_ray),
            _row(RAY, "an actor call on each node", us=t_ray * 1e6)]


def _many(system: ClusterSystem, cfg, _) -> list[dict]:
    n = cfg.cluster_runs
    t_pto = _median_s(system.many_l4, n, repeats=cfg.repeats)
    t_ray = _median_s(system.many_ray, n, repeats=cfg.repeats)
    return [_row(PTO, f"{n:,} small L3 runs from one L4 run", measure="many",
                 runs_per_s=n / t_pto,
                 ratio_to_ray=t_pto / t_ray),
            _row(RAY, f"{n:,} small tasks over 2 nodes", runs_per_s=n / t_ray)]
