"""Views of a tensor (issue 4): ``h[i]``, ``h[a:b]``, ``h.reshape(...)``.

A view shares its tensor's segment; dependencies use byte ranges, so tasks writing disjoint
views run at once on different chips, and tasks on overlapping views are ordered.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import pto

from ._util import shm_path

pytestmark = pytest.mark.timeout(60)

DELAY = 0.4


def copy(src, dst):
    dst[:] = src


def fill(out, value, delay):
    time.sleep(delay)
    out[...] = value


def copy_after(src, dst, delay):
    time.sleep(delay)
    dst[...] = src


def stamp(out, delay):
    t0 = time.time()
    time.sleep(delay)
    out[:] = [t0, time.time(), pto.task().chip]


def describe(v, out):
    out[:] = [v.shape[0], v.ndim, v.size, v[0], v[-1]]


KERNELS = {"copy": copy, "fill": fill, "copy_after": copy_after, "stamp": stamp,
           "describe": describe}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


def run(rt, name, orch, **args):
    rt.register(name, orch=orch, kernels=KERNELS)
    return rt.run(name, args=args)


def test_views_read_and_write_the_right_bytes(rt4_module):
    base_np = np.arange(24, dtype=np.int64).reshape(6, 4)

    def orch(ctx, args):
        base = ctx.tensor(args["base"])
        rows = base[2:4]  # rows 2..3
        row = base[-1]  # row 5, an int index drops the first axis
        flat = base.reshape(24)
        got_rows = ctx.alloc((2, 4), np.int64)
        got_flat = ctx.alloc((5,), np.int64)
        info = ctx.alloc((5,), np.int64)
        ctx.submit(0, "copy", [In(rows), Out(got_rows)])
        ctx.submit(1, "copy", [In(flat[7:12]), Out(got_flat)])
        ctx.submit(2, "describe", [In(flat[3:9]), Out(info)])
        ctx.submit(3, "fill", [Out(row), S(-5), S(0.0)])  # overlaps no other task's bytes
        ctx.submit(0, "fill", [Out(base[0]), S(-1), S(0.0)])  # element 3: WAR after describe
        return base, got_rows, got_flat, info

    base, got_rows, got_flat, info = run(rt4_module, "views_rw", orch, base=base_np)
    np.testing.assert_array_equal(got_rows.numpy(), base_np[2:4])
    np.testing.assert_array_equal(got_flat.numpy(), base_np.reshape(24)[7:12])
    assert info.numpy().tolist() == [6, 1, 6, 3, 8]
    expected = base_np.copy()
    expected[5] = -5
    expected[0] = -1
    np.testing.assert_array_equal(base.numpy(), expected)


def test_view_attributes_and_host_side_numpy(rt4_module):
    def orch(ctx, args):
        return ctx.tensor(args["x"])

    x = np.arange(60, dtype=np.float32).reshape(10, 6)
    h = run(rt4_module, "views_attrs", orch, x=x)
    v = h[3:7]
    assert v.shape == (4, 6)
    assert v.dtype == np.float32
    assert v.nbytes == 4 * 6 * 4
    assert v.offset == 3 * 6 * 4
    assert v.name == h.name  # same segment
    np.testing.assert_array_equal(v.numpy(), x[3:7])
    r = v.reshape(2, 12)
    assert r.shape == (2, 12) and r.offset == v.offset
    np.testing.assert_array_equal(r.numpy(), x[3:7].reshape(2, 12))
    assert h[9].shape == (6,) and h[9].offset == 9 * 6 * 4
    assert h.reshape((60,))[5:8].offset == 5 * 4
    # a view is zero-copy: writing through it shows in the base
    v.numpy()[0, 0] = 1000.0
    assert h.numpy()[3, 0] == 1000.0
    with pytest.raises(ValueError):
        h.reshape(7, 7)


def test_tasks_writing_disjoint_halves_run_in_parallel(rt4_module):
    def orch(ctx, args):
        base = ctx.alloc((2, 3), np.float64)
        ctx.submit(0, "stamp", [Out(base[0]), S(DELAY)])
        ctx.submit(1, "stamp", [Out(base[1]), S(DELAY)])
        return base

    rt4_module.register("views_parallel", orch=orch, kernels=KERNELS)
    rt4_module.run("views_parallel", args={})  # warm-up: kernels shipped, workers hot
    t0 = time.monotonic()
    base = rt4_module.run("views_parallel", args={})
    wall = time.monotonic() - t0
    st = base.numpy()
    assert sorted(st[:, 2].tolist()) == [0.0, 1.0]
    assert st[:, 0].max() < st[:, 1].min(), f"writes to disjoint halves did not overlap: {st}"
    assert wall < 0.75, f"2 x {DELAY} s on disjoint halves took {wall:.2f} s"


def test_disjoint_halves_of_a_reshaped_flat_tensor_run_in_parallel(rt4_module):
    """The halves are views of a reshape of a view: byte ranges, not handles, decide."""

    def orch(ctx, args):
        flat = ctx.alloc((6,), np.float64)
        grid = flat.reshape(2, 3)
        ctx.submit(2, "stamp", [Out(grid[0]), S(DELAY)])
        ctx.submit(3, "stamp", [Out(flat[3:6]), S(DELAY)])
        return flat

    rt4_module.register("views_parallel2", orch=orch, kernels=KERNELS)
    rt4_module.run("views_parallel2", args={})
    t0 = time.monotonic()
    flat = rt4_module.run("views_parallel2", args={})
    wall = time.monotonic() - t0
    st = flat.numpy().reshape(2, 3)
    assert st[:, 0].max() < st[:, 1].min(), f"did not overlap: {st}"
    assert wall < 0.75, f"took {wall:.2f} s"


def test_overlapping_views_are_ordered_read_after_write(rt4_module):
    def orch(ctx, args):
        base = ctx.alloc((10,), np.float64)
        out = ctx.alloc((6,), np.float64)
        ctx.submit(0, "fill", [Out(base[0:6]), S(7.0), S(DELAY)])  # bytes of rows 0..5
        ctx.submit(1, "copy", [In(base[4:10]), Out(out)])  # overlaps rows 4, 5
        return out

    out = run(rt4_module, "views_raw", orch)
    np.testing.assert_array_equal(out.numpy(), [7, 7, 0, 0, 0, 0])


def test_overlapping_views_are_ordered_write_after_read_and_write_after_write(rt4_module):
    def orch(ctx, args):
        base = ctx.tensor(args["base"])
        seen = ctx.alloc((4,), np.float64)
        ctx.submit(0, "copy_after", [In(base[2:6]), Out(seen), S(DELAY)])  # slow reader
        ctx.submit(1, "fill", [Out(base[5:8]), S(-1.0), S(0.0)])  # WAR on row 5
        ctx.submit(2, "fill", [Out(base.reshape(2, 4)[1]), S(9.0), S(DELAY)])  # WAW rows 4..7
        ctx.submit(3, "fill", [Out(base[7:8]), S(3.0), S(0.0)])  # WAW on row 7, must be last
        return base, seen

    base, seen = run(rt4_module, "views_war", orch, base=np.arange(8, dtype=np.float64))
    np.testing.assert_array_equal(seen.numpy(), [2, 3, 4, 5])
    np.testing.assert_array_equal(base.numpy(), [0, 1, 2, 3, 9, 9, 9, 3])


def test_a_view_and_its_whole_tensor_are_ordered(rt4_module):
    def orch(ctx, args):
        base = ctx.alloc((8,), np.float64)
        whole = ctx.alloc((8,), np.float64)
        ctx.submit(0, "fill", [Out(base[3]), S(5.0), S(DELAY)])
        ctx.submit(1, "copy", [In(base), Out(whole)])
        return whole

    whole = run(rt4_module, "views_whole", orch)
    np.testing.assert_array_equal(whole.numpy(), [0, 0, 0, 5, 0, 0, 0, 0])


def test_a_step_slice_raises_value_error(rt4_module):
    def orch(ctx, args):
        base = ctx.alloc((8,), np.float64)
        return base[::2]

    rt4_module.register("views_step", orch=orch, kernels=KERNELS)
    with pytest.raises(ValueError):
        rt4_module.run("views_step", args={})

    def orch_ok(ctx, args):
        return ctx.alloc((8,), np.float64)

    h = run(rt4_module, "views_step_ok", orch_ok)
    with pytest.raises(ValueError):
        h[1:7:3]
    with pytest.raises(ValueError):
        h[::-1]


def test_freeing_a_view_raises_value_error_and_keeps_the_tensor(rt4_module):
    def orch(ctx, args):
        return ctx.tensor(args["x"])

    x = np.arange(10, dtype=np.int32)
    h = run(rt4_module, "views_free", orch, x=x)
    v = h[2:5]
    with pytest.raises(ValueError):
        v.free()
    with pytest.raises(ValueError):
        h.reshape(2, 5).free()
    np.testing.assert_array_equal(h.numpy(), x)  # the tensor is still there
    np.testing.assert_array_equal(v.numpy(), x[2:5])
    path = shm_path(h)
    assert path.exists()
    h.free()
    with pytest.raises(pto.TensorFreed):
        v.numpy()  # freeing the base frees its views
    del v
    assert not path.exists()
