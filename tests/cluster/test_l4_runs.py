"""L4 runs on a 2-host LocalCluster, through the public API only (issue 13).

L3 entries run on the hosts; a tensor one host produced reaches a run on the other host
through Ray's object store and must match numpy; on one host it is handed over without a
copy (the consumer sees the producer's very segment); runs overlap through ``rt.submit``;
``ref[0]`` / ``ref["k"]`` pick parts of a run's result; one L3 orchestration serves both
``level="host"`` (numpy in) and ``level="cluster"`` (Refs in). What runs shows: ``trace=``
(a track per host, its chips within, transfers with their bytes) and ``pto status --cluster``.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


# -- kernels (Python: they get numpy views) ------------------------------------------------

def scale(x, y, factor):
    y[...] = x * factor


def total(x, out):
    out[...] = x.sum()


def add(a, b, out):
    out[...] = a + b


def one(out):
    out[...] = 1


KERNELS = {"scale": scale, "total": total, "add": add, "one": one}


# -- L3 entries (run on a host, inside its host actor) ---------------------------------------

def scaled(ctx, args):
    """x * factor on the host's first chip; x is numpy (copied in once) or a Ref's handle."""
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "scale", [In(x), Out(y), S(args["factor"])])
    return y


def summed(ctx, x):
    """The sum of a tensor, as a 1-element tensor, computed on the host's last chip."""
    x = ctx.tensor(x)
    out = ctx.alloc((1,), x.dtype)
    ctx.submit(ctx.peers()[-1], "total", [In(x), Out(out)])
    return out


def added(ctx, args):
    a, b = ctx.tensor(args[0]), ctx.tensor(args[1])
    out = ctx.alloc(a.shape, a.dtype)
    ctx.submit(ctx.peers()[0], "add", [In(a), In(b), Out(out)])
    return out


def produce_named(ctx, args):
    """A tensor and the name of its segment on this host."""
    y = scaled(ctx, args)
    return y, y.name


def segment_name(ctx, handle):
    """The name of the segment this host gives the received tensor."""
    return ctx.tensor(handle).name


def parts(ctx, args):
    """A dict result: a tensor under "y", a plain value under "n"."""
    y = scaled(ctx, args)
    return {"y": y, "n": int(np.prod(y.shape)), "host_pid": os.getpid()}


def met(ctx, args):
    """Announce ``mine``, wait (bounded) until the other run announced ``theirs``, then a task."""
    open(args["mine"], "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(args["theirs"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{args['theirs']} never appeared: the runs did not overlap")
        time.sleep(0.01)
    out = ctx.alloc((1,), np.float32)
    ctx.submit(ctx.peers()[0], "one", [Out(out)])
    return out


def held(ctx, args):
    """Waits (bounded) until the file ``args`` exists: a run that stays in flight."""
    deadline = time.monotonic() + 60
    while not os.path.exists(args) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.path.exists(args)


ENTRIES = {"held": held, "scaled": scaled, "summed": summed, "added": added,
           "produce_named": produce_named, "segment_name": segment_name, "parts": parts,
           "met": met}


@pytest.fixture(scope="module")
def l4(rt):
    """The module's runtime with every L3 entry above registered on every host."""
    for name, fn in ENTRIES.items():
        rt.register(name, orch=fn, kernels=KERNELS)
    return rt


def test_hosts_and_chips(l4, cluster):
    assert l4.hosts == [0, 1] == list(range(cluster.hosts))
    assert [l4.chips(h) for h in l4.hosts] == [[0, 1], [0, 1]]


def test_a_tensor_made_on_host_0_is_reduced_on_host_1(l4):
    data = np.random.default_rng(1).standard_normal(4096).astype(np.float32)

    def cross(ctx, args):
        assert ctx.hosts() == [0, 1]
        y = ctx.submit(0, "scaled", args={"x": args, "factor": 3.0})
        return {"y": y, "sum": ctx.submit(1, "summed", args=y)}

    l4.register("cross", orch=cross)
    before = l4.stats()["total"]
    result = l4.run("cross", args=data)
    after = l4.stats()["total"]
    np.testing.assert_allclose(result["y"], data * 3.0, rtol=1e-6)
    np.testing.assert_allclose(result["sum"], [(data * 3.0).sum()], rtol=1e-4)
    assert isinstance(result["y"], np.ndarray) and result["y"].dtype == np.float32
    # exactly one tensor crossed hosts (y into host 1), with its bytes
    assert after["transfers"] - before["transfers"] == 1
    assert after["bytes_in"] - before["bytes_in"] == data.nbytes


def test_runs_on_both_hosts_then_a_cross_host_sum(l4):
    data = np.arange(1000, dtype=np.float64)

    def scatter_gather(ctx, args):
        chunks = np.array_split(args, len(ctx.hosts()))
        partials = [ctx.submit(h, "scaled", args={"x": c, "factor": 2.0})
                    for h, c in zip(ctx.hosts(), chunks, strict=True)]
        sums = [ctx.submit(h, "summed", args=p) for h, p in zip(ctx.hosts(), partials,
                                                                 strict=True)]
        return ctx.submit(0, "added", args=sums)  # host 1's partial sum crosses to host 0

    l4.register("scatter_gather", orch=scatter_gather)
    np.testing.assert_allclose(l4.run("scatter_gather", args=data), [2.0 * data.sum()])


def test_same_host_handoffs_copy_nothing(l4):
    data = np.linspace(0, 1, 2048, dtype=np.float32)

    def same_host(ctx, args):
        made = ctx.submit(1, "produce_named", args={"x": args, "factor": 2.0})
        seen_here = ctx.submit(1, "segment_name", args=made[0])
        seen_there = ctx.submit(0, "segment_name", args=made[0])
        again = ctx.submit(1, "scaled", args={"x": made[0], "factor": 0.5})
        return {"made": made, "here": seen_here, "there": seen_there, "again": again}

    l4.register("same_host", orch=same_host)
    result = l4.run("same_host", args=data)
    y, producer_segment = result["made"]
    np.testing.assert_allclose(y, data * 2.0, rtol=1e-6)
    np.testing.assert_allclose(result["again"], data, rtol=1e-6)
    assert result["here"] == producer_segment  # the consumer got the producer's segment
    assert result["there"] != producer_segment  # the other host got a copy of its own

    def consecutive(ctx, args):
        x = ctx.submit(0, "scaled", args={"x": args, "factor": 1.0})
        for _ in range(4):
            x = ctx.submit(0, "scaled", args={"x": x, "factor": 2.0})
        return ctx.submit(0, "summed", args=x)

    l4.register("consecutive", orch=consecutive)
    before = l4.stats()["total"]
    np.testing.assert_allclose(l4.run("consecutive", args=data), [16.0 * data.sum()],
                               rtol=1e-5)
    after = l4.stats()["total"]
    assert after["transfers"] == before["transfers"]  # nothing crossed hosts
    assert after["bytes_in"] == before["bytes_in"]    # no byte copied
    assert after["local_handoffs"] - before["local_handoffs"] == 5


def test_ref_indexing_picks_parts_of_a_result(l4):
    data = np.ones(16, dtype=np.float32)

    def indexed(ctx, args):
        result = ctx.submit(0, "parts", args={"x": args, "factor": 4.0})
        named = ctx.submit(1, "produce_named", args={"x": result["y"], "factor": 0.25})
        return {"y": result["y"], "n": result["n"], "pair": named, "first": named[0],
                "summed": ctx.submit(1, "summed", args=named[0])}

    l4.register("indexed", orch=indexed)
    out = l4.run("indexed", args=data)
    np.testing.assert_allclose(out["y"], data * 4.0)
    assert out["n"] == 16 and isinstance(out["n"], int)
    assert isinstance(out["pair"], tuple) and len(out["pair"]) == 2
    np.testing.assert_allclose(out["pair"][0], data)
    assert isinstance(out["pair"][1], str)
    np.testing.assert_allclose(out["first"], data)
    np.testing.assert_allclose(out["summed"], [16.0])


def test_the_result_keeps_the_structure_the_orchestration_returned(l4):
    def shaped(ctx, args):
        y = ctx.submit(1, "scaled", args={"x": np.full(3, 2.0), "factor": 1.0})
        return [y, (7, "text"), {"nested": [y, None]}]

    l4.register("shaped", orch=shaped)
    out = l4.run("shaped")
    assert isinstance(out, list) and len(out) == 3
    np.testing.assert_array_equal(out[0], [2.0, 2.0, 2.0])
    assert out[1] == (7, "text")
    np.testing.assert_array_equal(out[2]["nested"][0], [2.0, 2.0, 2.0])
    assert out[2]["nested"][1] is None


def test_submitted_runs_overlap(l4, tmp_path):
    def pair(ctx, args):
        return ctx.submit(args["host"], "met", args=args)

    l4.register("pair", orch=pair)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # each run waits for the other to start: only runs in flight together both finish
    first = l4.submit("pair", args={"host": 0, "mine": a, "theirs": b})
    second = l4.submit("pair", args={"host": 1, "mine": b, "theirs": a})
    assert isinstance(first, cf.Future) and isinstance(second, cf.Future)
    done, pending = cf.wait([first, second], timeout=60)
    assert not pending, "the two runs did not finish"
    np.testing.assert_array_equal(first.result(), [1.0])
    np.testing.assert_array_equal(second.result(), [1.0])


def test_many_submitted_runs_all_finish(l4):
    def small(ctx, args):
        return ctx.submit(args % 2, "scaled", args={"x": np.full(8, float(args)), "factor": 2.0})

    l4.register("small", orch=small)
    futures = [l4.submit("small", args=i) for i in range(20)]
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(timeout=60), np.full(8, 2.0 * i))


def test_one_l3_orchestration_serves_level_host_and_level_cluster(l4):
    """The same ``scaled`` function: numpy in at L3, a Ref (a handle on the host) in at L4."""
    data = np.arange(64, dtype=np.float32)
    with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as host_rt:
        host_rt.register("scaled", orch=scaled, kernels=KERNELS)
        at_l3 = host_rt.run("scaled", args={"x": data, "factor": 2.0}).numpy().copy()

    def twice(ctx, args):
        once = ctx.submit(0, "scaled", args={"x": args, "factor": 2.0})
        return ctx.submit(1, "scaled", args={"x": once, "factor": 1.0})  # a Ref in

    l4.register("twice", orch=twice)
    np.testing.assert_array_equal(l4.run("twice", args=data), at_l3)
    np.testing.assert_array_equal(at_l3, data * 2.0)


def test_intermediates_are_freed_once_no_ref_remains(l4, cluster):
    """Tensors a run returned stay on their host only while a Ref names them."""
    from .conftest import host_pids, segments_of, wait_until

    def chain(ctx, args):
        x = ctx.submit(0, "scaled", args={"x": np.ones(1 << 16, np.float32), "factor": 2.0})
        y = ctx.submit(1, "scaled", args={"x": x, "factor": 2.0})
        return ctx.submit(1, "summed", args=y)

    l4.register("freeing_chain", orch=chain)
    baseline = {s for s in segments_of(host_pids(cluster)) if s.startswith("pto_")}
    np.testing.assert_allclose(l4.run("freeing_chain"), [4.0 * (1 << 16)])

    def grown():
        gc.collect()  # as the per-test leak check does: Refs only a cycle holds go too
        now = {s for s in segments_of(host_pids(cluster)) if s.startswith("pto_")}
        return sorted(now - baseline)

    left = wait_until(grown)
    assert not left, f"tensors no Ref names still held on the hosts: {left}"


def test_a_run_past_its_timeout_raises_and_the_runtime_serves_on(l4, tmp_path):
    release = tmp_path / "release"

    def waits(ctx, args):
        return ctx.submit(0, "held", args=args)

    l4.register("waits", orch=waits)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            l4.run("waits", args=str(release), timeout=1.0)
        assert time.monotonic() - t0 < 10, "the timeout was not kept"
    finally:
        release.touch()  # the L3 run, if it started, ends

    def after_timeout(ctx, args):
        return ctx.submit(0, "scaled", args={"x": np.ones(2), "factor": 3.0})

    l4.register("after_timeout", orch=after_timeout)
    np.testing.assert_array_equal(l4.run("after_timeout"), [3.0, 3.0])


# -- what runs show --------------------------------------------------------------------------

@pytest.mark.slow
def test_trace_has_a_track_per_host_with_its_chips_and_transfers(cluster, tmp_path):
    path = tmp_path / "cluster-trace.json"
    data = np.ones(1024, dtype=np.float32)

    def traced(ctx, args):
        y = ctx.submit(0, "scaled", args={"x": args, "factor": 2.0})
        return ctx.submit(1, "summed", args=y)  # y crosses from host 0 to host 1

    with pto.Runtime(level="cluster", cluster=cluster.address, trace=str(path)) as traced_rt:
        traced_rt.register("scaled", orch=scaled, kernels=KERNELS)
        traced_rt.register("summed", orch=summed, kernels=KERNELS)
        traced_rt.register("traced", orch=traced)
        np.testing.assert_allclose(traced_rt.run("traced", args=data), [2048.0])
    events = json.loads(path.read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    host_pid = {h: next(pid for pid, name in processes.items() if name.startswith(f"host {h}"))
                for h in (0, 1)}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    for h, pid in host_pid.items():
        runs = [e for e in events if e["pid"] == pid and e.get("cat") == "l3run"]
        assert runs, f"no L3 run on host {h}'s track"
        chip_tracks = [name for (p, _), name in threads.items() if p == pid and "chip" in name]
        assert chip_tracks, f"host {h} shows no chip track: {threads}"
        kernels = [e for e in events if e["pid"] == pid and e.get("ph") == "X"]
        assert kernels, f"no kernel ran on host {h}'s chips in the trace"
    transfers = [e for e in events if e.get("cat") == "transfer" and e.get("ph") in ("b", "X")]
    assert [e["pid"] for e in transfers] == [host_pid[1]], transfers
    assert transfers[0]["args"]["bytes"] == data.nbytes
    assert transfers[0]["args"]["from_host"] == 0


@pytest.mark.slow
def test_pto_status_lists_hosts_chips_and_running_runs(l4, cluster, tmp_path):
    release = tmp_path / "release"

    def holds(ctx, args):
        return ctx.submit(1, "held", args=args)

    l4.register("holds", orch=holds)
    future = l4.submit("holds", args=str(release))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    try:
        deadline = time.monotonic() + 60
        while True:  # until the run is seen in flight (it starts within moments)
            proc = subprocess.run([sys.executable, "-m", "pto", "status", "--cluster",
                                   cluster.address], capture_output=True, text=True,
                                  timeout=90, env=env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            if ": held for" in proc.stdout or time.monotonic() > deadline:
                break
        text = proc.stdout
        assert "2 pto host node(s)" in text, text
        for h in (0, 1):
            assert f"host {h}: " in text and "chips [0, 1]" in text, text
        assert ": held for" in text, f"the run in flight is not listed:\n{text}"
        as_json = subprocess.run([sys.executable, "-m", "pto", "status", "--cluster",
                                  cluster.address, "--json"], capture_output=True, text=True,
                                 timeout=90, env=env)
        st = json.loads(as_json.stdout)
        assert [n["chips"] for n in st["hosts"]] == [2, 2]
    finally:
        release.touch()
    assert future.result(timeout=60) is True
