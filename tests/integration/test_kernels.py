"""What a Python kernel sees: numpy views (inputs read-only), Python scalars, pto.task()."""

from __future__ import annotations

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)


def inspect_args(x, y, z, info):
    # info: [isinstance ndarray x3, writeable x3, x.shape == y.shape, ok dtype]
    info[:] = [
        isinstance(x, np.ndarray),
        isinstance(y, np.ndarray),
        isinstance(z, np.ndarray),
        x.flags.writeable,
        y.flags.writeable,
        z.flags.writeable,
        x.shape == (3, 4) and y.shape == (3, 4) and z.shape == (3, 4),
        x.dtype == np.float32 and y.dtype == np.float32 and z.dtype == np.float32,
    ]
    y[:] = x
    z += 1


def scalar_types(a, x, b, c, out):
    out[:] = [
        type(a) is int,
        type(b) is float,
        type(c) is int,
        a,
        b,
        c,
        x.sum(),
    ]


def write_input(x, y):
    x[0] = 99.0
    y[:] = x


def task_info(out):
    t = pto.task()
    out[:] = [t.rank, t.world, t.chip]


def inc(x):
    x += 1


def test_views_inputs_read_only_outputs_writable(rt4_module):
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        z = ctx.tensor(args["z"])
        info = ctx.alloc((8,), np.int64)
        ctx.submit(
            1,
            "inspect",
            [pto.Arg.input(x), pto.Arg.output(y), pto.Arg.inout(z), pto.Arg.output(info)],
        )
        return y, z, info

    rt4_module.register("k_views", orch=orch, kernels={"inspect": inspect_args})
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y, z, info = rt4_module.run("k_views", args={"x": x, "z": np.full((3, 4), 5, np.float32)})
    assert info.numpy().tolist() == [1, 1, 1, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(y.numpy(), x)
    np.testing.assert_array_equal(z.numpy(), np.full((3, 4), 6, np.float32))


def test_scalars_arrive_as_python_numbers_in_argument_order(rt4_module):
    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        out = ctx.alloc((7,), np.float64)
        ctx.submit(
            2,
            "scalars",
            [
                pto.Arg.scalar(3),
                pto.Arg.input(x),
                pto.Arg.scalar(2.5),
                pto.Arg.scalar(-(2**40)),
                pto.Arg.output(out),
            ],
        )
        return out

    rt4_module.register("k_scalars", orch=orch, kernels={"scalars": scalar_types})
    out = rt4_module.run("k_scalars", args={"x": np.arange(4, dtype=np.int32)})
    assert out.numpy().tolist() == [1.0, 1.0, 1.0, 3.0, 2.5, float(-(2**40)), 6.0]


def test_kernel_writing_to_an_input_fails_with_task_error(rt4_module):
    def make(ctx, args):
        return ctx.tensor(args["x"])

    def orch(ctx, args):
        y = ctx.alloc(args["x"].shape, args["x"].dtype)
        ctx.submit(3, "write_input", [pto.Arg.input(args["x"]), pto.Arg.output(y)])
        return y

    rt4_module.register("k_ro_make", orch=make, kernels={"write_input": write_input})
    rt4_module.register("k_ro", orch=orch, kernels={"write_input": write_input})
    x = rt4_module.run("k_ro_make", args={"x": np.arange(5, dtype=np.float64)})
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("k_ro", args={"x": x})
    err = ei.value
    assert err.kernel == "write_input"
    assert err.chip == 3
    assert "write_input" in str(err)
    assert "read-only" in str(err) or "read only" in str(err) or "writeable" in str(err), str(err)
    np.testing.assert_array_equal(x.numpy(), np.arange(5, dtype=np.float64))  # input intact


def test_pto_task_inside_a_single_task(rt4_module):
    def orch(ctx, args):
        outs = {}
        for chip in ctx.peers():
            o = ctx.alloc((3,), np.int64)
            ctx.submit(chip, "task_info", [pto.Arg.output(o)])
            outs[chip] = o
        return outs

    rt4_module.register("k_task", orch=orch, kernels={"task_info": task_info})
    outs = rt4_module.run("k_task", args={})
    assert sorted(outs) == [0, 1, 2, 3]
    for chip, o in outs.items():
        assert o.numpy().tolist() == [0, 1, chip]


def test_closure_kernel_travels_by_value(rt4_module):
    """A kernel defined inside a test, capturing a local, works as written."""
    offset = 17

    def add_offset(x, y):
        y[:] = x + offset

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "add_offset", [pto.Arg.input(x), pto.Arg.output(y)])
        return y

    rt4_module.register("k_closure", orch=orch, kernels={"add_offset": add_offset})
    y = rt4_module.run("k_closure", args={"x": np.arange(3, dtype=np.int64)})
    np.testing.assert_array_equal(y.numpy(), np.arange(3) + 17)


def test_same_kernel_name_in_two_registrations_is_independent(rt4_module):
    def twice(x):
        x *= 2

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        ctx.submit(1, "op", [pto.Arg.inout(x)])
        return x

    rt4_module.register("k_name_a", orch=orch, kernels={"op": inc})
    rt4_module.register("k_name_b", orch=orch, kernels={"op": twice})
    a = rt4_module.run("k_name_a", args={"x": np.full(4, 5)})
    b = rt4_module.run("k_name_b", args={"x": np.full(4, 5)})
    np.testing.assert_array_equal(a.numpy(), np.full(4, 6))
    np.testing.assert_array_equal(b.numpy(), np.full(4, 10))
