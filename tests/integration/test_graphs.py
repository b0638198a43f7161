"""Captured graphs (``rt.capture`` / ``pto.Graph``): a replay gives what a live run of the
same orchestration gives, for pipelines, random DAGs on views, groups and compiled
packages; inputs are rebound, frozen values are checked, failures behave as live, and the
broker's work per replay stays a handful of messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import pto

from ._kernels import allreduce_inplace

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


@pytest.fixture(scope="module")
def rt(long_lived_roots):
    """One runtime for the tests that need no isolation (each closes its graphs)."""
    before = {p.pid for p in psutil.Process().children()}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PTO_BROKER", raising=False)
        runtime = pto.Runtime(level="host", platform="sim", devices=[0, 1, 2, 3])
    roots = {p.pid for p in psutil.Process().children()} - before
    long_lived_roots.update(roots)
    try:
        yield runtime
    finally:
        runtime.close()
        long_lived_roots.difference_update(roots)


# ---- kernels (travel by value) -------------------------------------------------------


def scale(x, y, factor):
    y[:] = x * factor


def axpy(x, y, a):
    y[...] = y * 0.5 + x * a


def accumulate(x, acc):
    acc[...] += x


def copy(x, y):
    y[...] = x


def fails_on_negative(x, y):
    if (x < 0).any():
        raise ValueError("negative input")
    y[...] = x + 1


def allreduce_or_fail(*bufs):
    if pto.task().rank == 1 and bufs[0][-1] < 0:  # nobody writes it before the barrier
        raise ValueError("rank 1 refuses negative data")
    allreduce_inplace(*bufs)


def host_fn(x):
    pass


# ---- orchestrations -----------------------------------------------------------------


def pipeline(ctx, args):  # the README's
    x = ctx.tensor(args["input"])
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "scale", [In(x), Out(y), S(2.0)])
        outs.append(y)
    return outs


def random_dag(ctx, args):
    """Seeded tasks on overlapping views of a few tensors: RAW, WAR and WAW everywhere."""
    rng = np.random.default_rng(args["seed"])
    a, b = ctx.tensor(args["a"]), ctx.tensor(args["b"])
    pool = [a, b] + [ctx.alloc(64, np.float64) for _ in range(4)]
    for _ in range(args["tasks"]):
        src, dst = rng.choice(len(pool), 2, replace=False)
        lo = int(rng.integers(0, 32))
        n = int(rng.integers(1, 32))
        lo2 = int(rng.integers(0, 64 - n + 1))
        chip = int(rng.integers(0, 4))
        kind = rng.integers(0, 3)
        xs, ys = pool[src][lo:lo + n], pool[dst][lo2:lo2 + n]
        if kind == 0:
            ctx.submit(chip, "axpy", [In(xs), InOut(ys), S(float(rng.random()))])
        elif kind == 1:
            ctx.submit(chip, "accumulate", [In(xs), InOut(ys)])
        else:
            ctx.submit(chip, "copy", [In(xs), Out(ys)])
    return pool


def accumulating(ctx, args):
    """An INOUT accumulator a fresh ctx.alloc hands out zeroed: replays must zero it."""
    x = ctx.tensor(args["x"])
    acc = ctx.alloc(x.shape, x.dtype)
    peers = ctx.peers()
    for i in range(5):
        ctx.submit(peers[i % len(peers)], "accumulate", [In(x), InOut(acc)])
    return {"acc": acc, "tag": args["tag"]}


def guarded(ctx, args):
    x = ctx.tensor(args["x"])
    y, z, w = (ctx.alloc(x.shape, x.dtype) for _ in range(3))
    ctx.submit(0, "fails", [In(x), Out(y)])
    ctx.submit(1, "copy", [In(y), Out(z)])       # depends on the failing one: skipped
    ctx.submit(2, "scale", [In(x), Out(w), S(3.0)])  # independent: runs
    return z, w


def groups(ctx, args):
    chips = args["chips"]
    shards = [ctx.tensor(args[f"s{i}"]) for i in range(len(chips))]
    ctx.submit_group(chips, "allreduce", [InOut(s) for s in shards])
    outs = [ctx.alloc(s.shape, s.dtype) for s in shards]
    for chip, s, o in zip(chips, shards, outs, strict=True):
        ctx.submit(chip, "scale", [In(s), Out(o), S(2.0)])
    return outs


def with_host(ctx, args):
    x = ctx.tensor(args["x"])
    ctx.submit_host(host_fn, [In(x)])


KERNELS = {"scale": scale, "axpy": axpy, "accumulate": accumulate, "copy": copy,
           "fails": fails_on_negative, "allreduce": allreduce_inplace}


@pytest.fixture(scope="module", autouse=True)
def registered(rt):
    for name, fn in [("pipeline", pipeline), ("dag", random_dag), ("acc", accumulating),
                     ("guarded", guarded), ("groups", groups), ("with_host", with_host)]:
        rt.register(name, orch=fn, kernels=KERNELS)
    rt.register("groups_fail", orch=groups, kernels={**KERNELS, "allreduce": allreduce_or_fail})


def live(rt, name, args):
    """A live run's value with handles as numpy copies (their segments freed)."""
    value = rt.run(name, args)
    if isinstance(value, dict):
        return {k: (v.numpy().copy() if hasattr(v, "numpy") else v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [v.numpy().copy() for v in value]
    return value.numpy().copy()


def graph_status(rt) -> dict:
    return pto.status(rt.address)


# ---- replay equals live -------------------------------------------------------------


def test_readme_pipeline_replays_as_it_runs_live(rt):
    data = np.arange(1024, dtype=np.float32)
    g = rt.capture("pipeline", args={"input": data})
    try:
        assert isinstance(g, pto.Graph) and pto.types.Graph is pto.Graph
        for k in range(3):
            args = {"input": data + k}
            want = live(rt, "pipeline", args)
            got = g.run(args)
            assert len(got) == 4
            for w, o in zip(want, got, strict=True):
                np.testing.assert_array_equal(o, w)
    finally:
        g.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_dag_on_overlapping_views_replays_as_live(rt, seed):
    rng = np.random.default_rng(100 + seed)
    example = {"a": rng.random(64), "b": rng.random(64), "seed": seed, "tasks": 60}
    g = rt.capture("dag", args=example)
    try:
        for _ in range(3):
            args = dict(example, a=rng.random(64), b=rng.random(64))
            want = live(rt, "dag", args)
            got = g.run(args)
            for i, (w, o) in enumerate(zip(want, got, strict=True)):
                np.testing.assert_array_equal(o, w, err_msg=f"tensor {i}, seed {seed}")
    finally:
        g.close()


@pytest.mark.parametrize("chips", [[1, 3], [0, 1, 2, 3]])
def test_group_allreduce_replays_as_live(rt, chips):
    rng = np.random.default_rng(7)
    args = {"chips": chips, **{f"s{i}": rng.standard_normal(999) for i in range(len(chips))}}
    g = rt.capture("groups", args=args)
    try:
        for _ in range(3):
            args.update({f"s{i}": rng.standard_normal(999) for i in range(len(chips))})
            want = live(rt, "groups", args)
            expected = 2 * sum(args[f"s{i}"] for i in range(len(chips)))
            got = g.run(args)
            for w, o in zip(want, got, strict=True):
                np.testing.assert_allclose(o, expected, rtol=1e-12)
                np.testing.assert_array_equal(o, w)
    finally:
        g.close()


def test_c_kernels_and_a_package_orchestration_as_a_task_replay_as_live(rt, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    orch_pkg = pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                           orch=VECTOR_ADD / "orch.c")
    add_pkg = pto.compile(kernels=[VECTOR_ADD / "add.c"])

    def packages(ctx, args):
        x = ctx.tensor(args["x"])
        z = ctx.alloc(x.shape, x.dtype)
        w = ctx.alloc(x.shape, x.dtype)
        ctx.submit(1, "vector_add", [In(x), In(x), Out(z), S(3.0), S(4)])  # its orchestration
        ctx.submit(2, "add", [In(z), In(x), Out(w)])
        return z, w

    rt.register("packages", orch=packages,
                kernels={"vector_add": orch_pkg, "add": add_pkg.kernel("add")})
    x = np.arange(1000, dtype=np.float32)
    g = rt.capture("packages", args={"x": x})
    try:
        for k in range(3):
            args = {"x": x * (k + 1)}
            want = live(rt, "packages", args)
            z, w = g.run(args)
            np.testing.assert_array_equal(z, 2 * args["x"] * 3)
            np.testing.assert_array_equal(z, want[0])
            np.testing.assert_array_equal(w, want[1])
    finally:
        g.close()


# ---- inputs, frozen values, outputs --------------------------------------------------


def test_inputs_rebound_over_100_replays_and_accumulators_start_from_zero(rt):
    rng = np.random.default_rng(5)
    g = rt.capture("acc", args={"x": np.zeros(16), "tag": "t"})
    try:
        futures = []
        for i in range(100):
            x = rng.random(16)
            if i % 2:
                out = g.run({"x": x, "tag": "t"})
                assert out["tag"] == "t"
                np.testing.assert_allclose(out["acc"], 5 * x)
            else:
                futures.append((x.copy(), g.submit({"x": x, "tag": "t"})))
                x[:] = -1  # a queued replay took its own copy
        for x, f in futures:
            np.testing.assert_allclose(f.result(timeout=30)["acc"], 5 * x)
        assert g.replays == 100
    finally:
        g.close()


def test_handle_inputs_and_copy_false(rt):
    h = rt.run("pipeline", {"input": np.ones(8, np.float32)})[0]  # a handle of this runtime
    g = rt.capture("acc", args={"x": np.ones(8, np.float32), "tag": 1})
    try:
        out = g.run({"x": h, "tag": 1}, copy=False)
        assert isinstance(out["acc"], pto.TensorHandle)
        np.testing.assert_array_equal(out["acc"].numpy(), np.full(8, 10.0))
        again = g.run({"x": np.ones(8, np.float32), "tag": 1}, copy=False)
        assert again["acc"].name == out["acc"].name  # the graph's own tensor, reused
        np.testing.assert_array_equal(out["acc"].numpy(), np.full(8, 5.0))
    finally:
        g.close()
        h.free()


def test_wrong_shape_or_dtype_of_an_input_is_a_value_error_naming_it(rt):
    g = rt.capture("acc", args={"x": np.zeros(16), "tag": "t"})
    try:
        with pytest.raises(ValueError, match=r"input args\['x'\].*shape \(8,\)"):
            g.run({"x": np.zeros(8), "tag": "t"})
        with pytest.raises(ValueError, match=r"input args\['x'\].*float32"):
            g.submit({"x": np.zeros(16, np.float32), "tag": "t"})
        with pytest.raises(ValueError, match=r"args\['x'\] must be a numpy array"):
            g.run({"x": [0.0] * 16, "tag": "t"})
        np.testing.assert_array_equal(g.run({"x": np.ones(16), "tag": "t"})["acc"], 5.0)
    finally:
        g.close()


def test_a_changed_non_tensor_value_is_a_value_error_naming_it(rt):
    g = rt.capture("dag", args={"a": np.zeros(64), "b": np.zeros(64), "seed": 1, "tasks": 5})
    try:
        with pytest.raises(ValueError, match=r"args\['seed'\] is 2.*captured with 1.*frozen"):
            g.run({"a": np.zeros(64), "b": np.zeros(64), "seed": 2, "tasks": 5})
        with pytest.raises(ValueError, match=r"args has keys"):
            g.run({"a": np.zeros(64), "b": np.zeros(64), "seed": 1})
        g.run({"a": np.zeros(64), "b": np.zeros(64), "seed": 1, "tasks": 5})
    finally:
        g.close()


def test_submit_host_is_refused_at_capture(rt):
    with pytest.raises(ValueError, match="submit_host.*cannot be captured"):
        rt.capture("with_host", args={"x": np.zeros(4)})
    assert graph_status(rt)["graphs"] == []


# ---- failures -----------------------------------------------------------------------


def test_a_kernel_failure_fails_the_replay_as_live_then_a_good_replay_runs(rt):
    g = rt.capture("guarded", args={"x": np.zeros(4)})
    try:
        with pytest.raises(pto.TaskError) as live_err:
            rt.run("guarded", {"x": -np.ones(4)})
        with pytest.raises(pto.TaskError) as err:
            g.run({"x": -np.ones(4)})
        e = err.value
        assert (e.kernel, e.chip) == ("fails", 0) == (live_err.value.kernel,
                                                      live_err.value.chip)
        assert "negative input" in e.reason
        z, w = g.run({"x": np.ones(4)})
        np.testing.assert_array_equal(z, 2.0)
        np.testing.assert_array_equal(w, 3.0)
        f = g.submit({"x": -np.ones(4)})
        assert isinstance(f.exception(timeout=30), pto.TaskError)
    finally:
        g.close()


def test_a_failed_group_member_fails_the_replay_and_the_next_one_meets_again(rt):
    chips = [0, 2, 3]
    ok = {"chips": chips, **{f"s{i}": np.full(64, i + 1.0) for i in range(3)}}
    g = rt.capture("groups_fail", args=ok)
    try:
        with pytest.raises(pto.TaskError) as err:
            g.run({**ok, "s0": -np.ones(64)})
        assert err.value.kernel == "allreduce" and err.value.chip == 2
        assert "rank 1 refuses" in err.value.reason
        for _ in range(3):  # the group's barrier works again
            for out in g.run(ok):
                np.testing.assert_array_equal(out, 2 * 6.0)
    finally:
        g.close()


def test_closed_graph_refuses_replays(rt):
    g = rt.capture("pipeline", args={"input": np.ones(4, np.float32)})
    g.close()
    with pytest.raises(pto.PtoError, match="closed"):
        g.run({"input": np.ones(4, np.float32)})
    assert graph_status(rt)["graphs"] == []


# ---- the broker's work per replay, status ---------------------------------------------


def test_broker_messages_per_replay_do_not_grow_with_the_graph(rt):
    example = {"a": np.zeros(64), "b": np.zeros(64), "seed": 9, "tasks": 300}
    g = rt.capture("dag", args=example)
    try:
        g.run(example)
        before = graph_status(rt)["graph_messages"]
        for _ in range(10):
            g.run(example)
        per_replay = (graph_status(rt)["graph_messages"] - before) / 10
        (mine,) = [x for x in graph_status(rt)["graphs"] if x["name"] == "dag"]
        chips = len(mine["chips"])
        print(f"\n{mine['tasks']} tasks on {chips} chips: {per_replay} broker messages/replay")
        assert per_replay <= 2 + 2 * chips
        assert mine["replays"] == 11 and mine["failed"] == 0
    finally:
        g.close()


def test_status_shows_graphs_and_replays(rt):
    g = rt.capture("pipeline", args={"input": np.ones(4, np.float32)})
    try:
        for _ in range(3):
            g.run({"input": np.ones(4, np.float32)})
        (row,) = graph_status(rt)["graphs"]
        assert row["name"] == "pipeline" and row["replays"] == 3 and row["tasks"] == 4
        assert row["chips"] == [0, 1, 2, 3]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        text = subprocess.run([sys.executable, "-m", "pto", "status", "--broker", rt.address],
                              capture_output=True, text=True, env=env, timeout=60).stdout
        assert "GRAPH" in text and "pipeline" in text, text
        js = subprocess.run([sys.executable, "-m", "pto", "status", "--broker", rt.address,
                             "--json"], capture_output=True, text=True, env=env,
                            timeout=60).stdout
        assert json.loads(js)["graphs"][0]["replays"] == 3
    finally:
        g.close()


def test_a_traced_runtime_shows_one_slice_per_replay_with_its_tasks(tmp_path):
    path = tmp_path / "trace.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PTO_BROKER", raising=False)
        with pto.Runtime(level="host", platform="sim", devices=[0, 1], trace=str(path)) as rt2:
            rt2.register("acc", orch=accumulating, kernels=KERNELS)
            g = rt2.capture("acc", args={"x": np.ones(4), "tag": 0})
            for _ in range(2):
                g.run({"x": np.ones(4), "tag": 0})
    events = json.load(open(path))["traceEvents"]
    replays = [e for e in events if e.get("cat") == "graph"]
    tasks = [e for e in events if e.get("cat") == "graph-task"]
    assert [e["name"] for e in replays] == ["graph acc"] * 2
    assert len(tasks) == 10 and {e["name"] for e in tasks} == {"accumulate"}
    for r in replays:
        inside = [t for t in tasks if t["args"]["replay"] == r["args"]["replay"]]
        assert len(inside) == 5
        for t in inside:
            assert r["ts"] <= t["ts"] and t["ts"] + t["dur"] <= r["ts"] + r["dur"] + 1


def test_replays_of_two_graphs_and_live_runs_interleave(rt):
    g1 = rt.capture("acc", args={"x": np.ones(4), "tag": 0})
    g2 = rt.capture("pipeline", args={"input": np.ones(4, np.float32)})
    try:
        f1 = [g1.submit({"x": np.full(4, i, float), "tag": 0}) for i in range(20)]
        f2 = [g2.submit({"input": np.full(4, i, np.float32)}) for i in range(20)]
        for i in range(5):
            np.testing.assert_array_equal(live(rt, "pipeline",
                                               {"input": np.full(4, i, np.float32)})[0], 2 * i)
        for i, (a, b) in enumerate(zip(f1, f2, strict=True)):
            np.testing.assert_array_equal(a.result(timeout=60)["acc"], 5 * i)
            np.testing.assert_array_equal(b.result(timeout=60)[3], 2 * i)
    finally:
        g1.close()
        g2.close()


def test_capture_with_an_external_broker(tmp_path):
    from ._util import ExternalBroker

    broker = ExternalBroker(tmp_path, workers=2)
    try:
        with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt2:
            rt2.register("acc", orch=accumulating, kernels=KERNELS)
            g = rt2.capture("acc", args={"x": np.ones(4), "tag": 0})
            t = time.monotonic()
            out = g.run({"x": np.full(4, 2.0), "tag": 0})
            np.testing.assert_array_equal(out["acc"], 10.0)
            assert time.monotonic() - t < 30
    finally:
        broker.stop()
