"""numpy arrays passed straight to Arg.input/output/inout in ctx.submit."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import pto

from ._util import owner_of, pto_segments, wait_until

pytestmark = pytest.mark.timeout(60)


def affine(x, y, a, b):
    y[:] = x * a + b


def inc(x, delay):
    time.sleep(delay)
    x += 1


KERNELS = {"affine": affine, "inc": inc}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def test_numpy_input_and_output_copied_back(rt4_module):
    def orch(ctx, args):
        ctx.submit(2, "affine", [In(args["x"]), Out(args["y"]), S(3), S(1)])

    rt4_module.register("np_io", orch=orch, kernels=KERNELS)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.zeros((3, 4), dtype=np.float32)
    assert rt4_module.run("np_io", args={"x": x, "y": y}) is None
    np.testing.assert_array_equal(y, x * 3 + 1)
    np.testing.assert_array_equal(x, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_numpy_inout_updated_in_place(rt4_module):
    def orch(ctx, args):
        ctx.submit(1, "inc", [InOut(args["z"]), S(0.0)])

    rt4_module.register("np_inout", orch=orch, kernels=KERNELS)
    z = np.arange(10, dtype=np.int64)
    ident = id(z)
    rt4_module.run("np_inout", args={"z": z})
    assert id(z) == ident
    np.testing.assert_array_equal(z, np.arange(10) + 1)


def test_numpy_args_on_every_chip_mixed_with_handles(rt4_module):
    def orch(ctx, args):
        h = ctx.tensor(args["x"])
        for chip, y in zip(ctx.peers(), args["ys"], strict=True):
            ctx.submit(chip, "affine", [In(h), Out(y), S(chip), S(0.5)])
        mid = ctx.alloc(h.shape, h.dtype)
        ctx.submit(0, "affine", [In(args["x"]), Out(mid), S(-1), S(0)])
        return mid

    rt4_module.register("np_mixed", orch=orch, kernels=KERNELS)
    x = np.linspace(0, 1, 16)
    ys = [np.full(16, np.nan) for _ in range(4)]
    mid = rt4_module.run("np_mixed", args={"x": x, "ys": ys})
    for chip, y in enumerate(ys):
        np.testing.assert_allclose(y, x * chip + 0.5)
    np.testing.assert_allclose(mid.numpy(), -x)


def test_non_contiguous_numpy_input(rt1_module):
    def orch(ctx, args):
        ctx.submit(0, "affine", [In(args["x"]), Out(args["y"]), S(1), S(0)])

    rt1_module.register("np_strided", orch=orch, kernels=KERNELS)
    base = np.arange(40, dtype=np.int32).reshape(5, 8)
    x = base[::2, 1::3]  # a strided view
    y = np.zeros(x.shape, dtype=np.int32)
    rt1_module.run("np_strided", args={"x": x, "y": y})
    np.testing.assert_array_equal(y, x)


def test_numpy_arg_segments_are_released_after_the_run(rt4_module):
    def orch(ctx, args):
        ctx.submit(0, "affine", [In(args["x"]), Out(args["y"]), S(2), S(0)])
        ctx.submit(1, "inc", [InOut(args["z"]), S(0.0)])

    rt4_module.register("np_leak", orch=orch, kernels=KERNELS)
    rt4_module.register("np_owner", orch=lambda ctx, args: ctx.alloc((1,), np.int8),
                        kernels=KERNELS)
    probe = rt4_module.run("np_owner", args={})
    owner = owner_of(probe)
    probe.free()
    gc.collect()
    before = pto_segments()
    for _ in range(5):
        x, y, z = np.ones(1000), np.zeros(1000), np.zeros(1000)
        rt4_module.run("np_leak", args={"x": x, "y": y, "z": z})
        np.testing.assert_array_equal(y, np.full(1000, 2.0))
        np.testing.assert_array_equal(z, np.ones(1000))

    def ours():
        gc.collect()
        return {s for s in pto_segments() - before if s.rsplit("_", 1)[0] == owner}

    assert wait_until(lambda: not ours(), timeout=5), f"leftover: {ours()}"


def test_numpy_output_not_touched_when_its_task_fails(rt1_module):
    def boom(x, y):
        raise RuntimeError("numpy-output-failure")

    def orch(ctx, args):
        ctx.submit(0, "boom", [In(args["x"]), Out(args["y"])])

    rt1_module.register("np_fail", orch=orch, kernels={"boom": boom})
    y = np.full(4, 42.0)
    with pytest.raises(pto.TaskError, match="numpy-output-failure"):
        rt1_module.run("np_fail", args={"x": np.zeros(4), "y": y})
    np.testing.assert_array_equal(y, np.full(4, 42.0))


def slow_affine(x, y, a, b):
    time.sleep(0.3)
    y[:] = x * a + b


def test_one_numpy_array_is_one_tensor_within_a_run(rt4_module):
    """The same array as one task's output and another's input orders them (RAW)."""

    def orch(ctx, args):
        ctx.submit(0, "slow_affine", [In(args["x"]), Out(args["mid"]), S(2), S(0)])
        ctx.submit(1, "affine", [In(args["mid"]), Out(args["y"]), S(1), S(1)])

    rt4_module.register("np_same", orch=orch, kernels={**KERNELS, "slow_affine": slow_affine})
    x = np.arange(8.0)
    mid, y = np.zeros(8), np.zeros(8)
    rt4_module.run("np_same", args={"x": x, "mid": mid, "y": y})
    np.testing.assert_array_equal(mid, x * 2)
    np.testing.assert_array_equal(y, x * 2 + 1)
