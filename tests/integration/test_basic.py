"""End-to-end runs through an embedded broker and real worker processes."""

from __future__ import annotations

import numpy as np
import pytest

import pto

from ._util import children, wait_dead

pytestmark = pytest.mark.timeout(60)


# ---- kernels (module level: they travel to the workers by value) ----------------------


def scale(x, y, factor):
    y[:] = x * factor


def whoami(x, y, info):
    y[:] = x + 1
    t = pto.task()
    info[:] = [t.chip, t.rank, t.world]


def add(a, b, c):
    c[:] = a + b


# ---- orchestrations --------------------------------------------------------------------


def one_scale(ctx, args):
    x = ctx.tensor(args["input"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "scale", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(2.0)])
    return y


def scale_everywhere(ctx, args):
    x = ctx.tensor(args["input"])
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "scale", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(chip + 1)])
        outs.append(y)
    return outs


def test_devices(rt1_module, rt4_module):
    assert rt1_module.devices == [0]
    assert rt4_module.devices == [0, 1, 2, 3]


def test_end_to_end_one_device(rt1_module):
    rt1_module.register("basic_one", orch=one_scale, kernels={"scale": scale})
    data = np.arange(8, dtype=np.float32)
    y = rt1_module.run("basic_one", args={"input": data})
    assert isinstance(y, pto.TensorHandle)
    out = y.numpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data * 2)
    np.testing.assert_array_equal(data, np.arange(8, dtype=np.float32))  # input untouched
    del out
    y.free()


def test_end_to_end_four_devices(rt4_module):
    rt4_module.register("basic_four", orch=scale_everywhere, kernels={"scale": scale})
    data = np.linspace(-3, 3, 64).reshape(8, 8)
    outs = rt4_module.run("basic_four", args={"input": data})
    assert isinstance(outs, list) and len(outs) == 4
    for chip, h in zip([0, 1, 2, 3], outs, strict=True):
        np.testing.assert_allclose(h.numpy(), data * (chip + 1))
        assert h.shape == (8, 8)
    # Distinct tensors: four distinct segments.
    assert len({h.name for h in outs}) == 4
    for h in outs:
        h.free()


def test_kernels_run_on_the_chip_they_were_submitted_to(rt4_module):
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        res = []
        for chip in reversed(ctx.peers()):
            y = ctx.alloc(x.shape, x.dtype)
            info = ctx.alloc((3,), np.int64)
            ctx.submit(chip, "whoami", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.output(info)])
            res.append((chip, y, info))
        return res

    rt4_module.register("basic_whoami", orch=orch, kernels={"whoami": whoami})
    res = rt4_module.run("basic_whoami", args={"x": np.zeros(4, dtype=np.int32)})
    assert [chip for chip, _, _ in res] == [3, 2, 1, 0]
    for chip, y, info in res:
        np.testing.assert_array_equal(y.numpy(), np.ones(4, dtype=np.int32))
        assert info.numpy().tolist() == [chip, 0, 1]


def test_peers_are_the_runtime_devices(rt4_module):
    seen = {}

    def orch(ctx, args):
        seen["peers"] = list(ctx.peers())
        return None

    rt4_module.register("basic_peers", orch=orch, kernels={"scale": scale})
    assert rt4_module.run("basic_peers", args={}) is None
    assert seen["peers"] == [0, 1, 2, 3]


def test_run_returns_plain_values(rt1_module):
    def orch(ctx, args):
        return {"answer": 42, "echo": args["v"], "pi": 3.5}

    rt1_module.register("basic_plain", orch=orch, kernels={"scale": scale})
    expected = {"answer": 42, "echo": "hello", "pi": 3.5}
    assert rt1_module.run("basic_plain", args={"v": "hello"}) == expected

    def orch_int(ctx, args):
        return 7

    rt1_module.register("basic_int", orch=orch_int, kernels={"scale": scale})
    assert rt1_module.run("basic_int", args={}) == 7


def test_run_returns_tuple_of_handles(rt4_module):
    def orch(ctx, args):
        a = ctx.tensor(args["a"])
        b = ctx.tensor(args["b"])
        c = ctx.alloc(a.shape, a.dtype)
        d = ctx.alloc(a.shape, a.dtype)
        ctx.submit(1, "add", [pto.Arg.input(a), pto.Arg.input(b), pto.Arg.output(c)])
        ctx.submit(2, "scale", [pto.Arg.input(c), pto.Arg.output(d), pto.Arg.scalar(10)])
        return c, d, "tag"

    rt4_module.register("basic_tuple", orch=orch, kernels={"add": add, "scale": scale})
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.full((2, 3), 5, dtype=np.int64)
    c, d, tag = rt4_module.run("basic_tuple", args={"a": a, "b": b})
    assert tag == "tag"
    np.testing.assert_array_equal(c.numpy(), a + b)
    np.testing.assert_array_equal(d.numpy(), (a + b) * 10)
    assert c.dtype == np.int64 and d.shape == (2, 3)


def test_handles_stay_valid_across_runs_and_feed_later_runs(rt4_module):
    """A handle returned by one run is still readable after later runs, and can be their input."""

    def make(ctx, args):
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(3, "scale", [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(3.0)])
        return y

    def reuse(ctx, args):
        z = ctx.alloc(args["h"].shape, args["h"].dtype)
        ctx.submit(0, "scale", [pto.Arg.input(args["h"]), pto.Arg.output(z), pto.Arg.scalar(-1.0)])
        return z

    rt4_module.register("basic_make", orch=make, kernels={"scale": scale})
    rt4_module.register("basic_reuse", orch=reuse, kernels={"scale": scale})
    x = np.arange(10, dtype=np.float64)
    first = rt4_module.run("basic_make", args={"x": x})
    others = [rt4_module.run("basic_make", args={"x": x + i}) for i in range(1, 4)]
    second = rt4_module.run("basic_reuse", args={"h": first})
    np.testing.assert_array_equal(first.numpy(), x * 3)
    np.testing.assert_array_equal(second.numpy(), x * -3)
    for i, h in enumerate(others, start=1):
        np.testing.assert_array_equal(h.numpy(), (x + i) * 3)


def test_many_runs_in_a_row(rt4_module):
    rt4_module.register("basic_loop", orch=scale_everywhere, kernels={"scale": scale})
    for i in range(20):
        data = np.full(16, float(i))
        outs = rt4_module.run("basic_loop", args={"input": data})
        for chip, h in enumerate(outs):
            np.testing.assert_array_equal(h.numpy(), data * (chip + 1))
            h.free()


@pytest.mark.timeout(90)
def test_context_manager_stops_its_processes():
    before = {p.pid for p in children()}
    with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
        assert rt.devices == [0, 1]
        started = [p for p in children() if p.pid not in before]
        # an embedded broker and one worker per device, as child processes
        assert len(started) >= 3, started
        rt.register("basic_cm", orch=one_scale, kernels={"scale": scale})
        y = rt.run("basic_cm", args={"input": np.ones(4)})
        np.testing.assert_array_equal(y.numpy(), np.full(4, 2.0))
        del y
    assert wait_dead(started, timeout=10) == []
    rt.close()  # idempotent
