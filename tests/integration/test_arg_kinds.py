"""Argument kinds beyond input/output/inout/scalar (issue 4).

``pto.Arg.no_dep(h)``: writable, takes part in no dependency.
``pto.Arg.output_existing(h)``: an output over an existing tensor, never zeroed or
reallocated; a write for dependencies.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)

DELAY = 0.4


def write_head(out, value, delay):
    time.sleep(delay)
    out[:4] = value


def copy(src, dst, delay):
    time.sleep(delay)
    dst[...] = src


def stamp_row(shared, row, delay):
    """Write [start, end, chip] into row ``row`` of a shared tensor."""
    t0 = time.time()
    time.sleep(delay)
    shared[row] = [t0, time.time(), pto.task().chip]


KERNELS = {"write_head": write_head, "copy": copy, "stamp_row": stamp_row}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar
NoDep, OutEx = pto.Arg.no_dep, pto.Arg.output_existing


def test_kinds_are_named_by_param_type():
    x = np.zeros(2)
    assert pto.Arg.no_dep(x).kind == pto.ParamType.NO_DEP
    assert pto.Arg.output_existing(x).kind == pto.ParamType.OUTPUT_EXISTING
    assert len({int(k) for k in pto.ParamType}) == len(pto.ParamType) >= 6


def test_output_existing_keeps_the_untouched_bytes(rt4_module):
    def orch(ctx, args):
        t = ctx.tensor(args["t"])
        ctx.submit(1, "write_head", [OutEx(t), S(-1.0), S(0.0)])
        return t

    rt4_module.register("outex", orch=orch, kernels=KERNELS)
    t = rt4_module.run("outex", args={"t": np.arange(8, dtype=np.float64)})
    np.testing.assert_array_equal(t.numpy(), [-1, -1, -1, -1, 4, 5, 6, 7])

    # ... also over a tensor from an earlier run, and over a view of it
    def again(ctx, args):
        h = args["h"]
        ctx.submit(2, "write_head", [OutEx(h), S(-2.0), S(0.0)])
        ctx.submit(3, "write_head", [OutEx(h[4:8]), S(-3.0), S(0.0)])
        return h

    rt4_module.register("outex_again", orch=again, kernels=KERNELS)
    h = rt4_module.run("outex_again", args={"h": t})
    assert h.name == t.name  # not reallocated
    np.testing.assert_array_equal(t.numpy(), [-2] * 4 + [-3] * 4)


def test_output_existing_is_a_write_for_dependencies(rt4_module):
    def orch(ctx, args):
        t = ctx.tensor(args["t"])
        before = ctx.alloc((8,), np.float64)
        after = ctx.alloc((8,), np.float64)
        ctx.submit(0, "copy", [In(t), Out(before), S(DELAY)])  # slow reader first
        ctx.submit(1, "write_head", [OutEx(t), S(-1.0), S(DELAY)])  # WAR, then slow writer
        ctx.submit(2, "copy", [In(t), Out(after), S(0.0)])  # RAW after the writer
        return before, after

    rt4_module.register("outex_deps", orch=orch, kernels=KERNELS)
    before, after = rt4_module.run("outex_deps", args={"t": np.arange(8, dtype=np.float64)})
    np.testing.assert_array_equal(before.numpy(), np.arange(8))
    np.testing.assert_array_equal(after.numpy(), [-1, -1, -1, -1, 4, 5, 6, 7])


def stamps_of(rt, name, kind):
    def orch(ctx, args):
        shared = ctx.alloc((2, 3), np.float64)
        ctx.submit(0, "stamp_row", [kind(shared), S(0), S(DELAY)])
        ctx.submit(1, "stamp_row", [kind(shared), S(1), S(DELAY)])
        return shared

    rt.register(name, orch=orch, kernels=KERNELS)
    rt.run(name, args={})  # warm-up: kernels shipped, workers hot
    t0 = time.monotonic()
    shared = rt.run(name, args={})
    return shared.numpy().copy(), time.monotonic() - t0


def test_no_dep_does_not_order_tasks(rt4_module):
    st, wall = stamps_of(rt4_module, "nodep", NoDep)
    assert st[:, 2].tolist() == [0.0, 1.0]  # both wrote the tensor
    assert st[:, 0].max() < st[:, 1].min(), f"NO_DEP tasks did not overlap: {st.tolist()}"
    assert wall < 0.75, f"2 x {DELAY} s with NO_DEP on one tensor took {wall:.2f} s"


def test_the_same_graph_with_inout_is_ordered(rt4_module):
    """The control for the NO_DEP test: with INOUT the two tasks must not overlap."""
    st, wall = stamps_of(rt4_module, "inout_ctrl", InOut)
    assert st[:, 2].tolist() == [0.0, 1.0]
    assert st[0, 1] <= st[1, 0], f"INOUT tasks overlapped: {st.tolist()}"
    assert wall >= 2 * DELAY


def test_no_dep_args_of_a_later_task_do_not_wait_for_a_writer(rt4_module):
    def orch(ctx, args):
        shared = ctx.alloc((2, 3), np.float64)
        ctx.submit(0, "stamp_row", [Out(shared), S(0), S(DELAY)])  # a real writer
        ctx.submit(1, "stamp_row", [NoDep(shared), S(1), S(DELAY)])  # does not wait for it
        return shared

    rt4_module.register("nodep_after_writer", orch=orch, kernels=KERNELS)
    rt4_module.run("nodep_after_writer", args={})
    st = rt4_module.run("nodep_after_writer", args={}).numpy()
    assert st[:, 0].max() < st[:, 1].min(), f"the NO_DEP task waited: {st.tolist()}"
