"""Wrong use of the API fails fast with a clear exception and leaves the runtime usable."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import pto

from ._util import children, owner_of, pto_segments, wait_dead, wait_until

pytestmark = pytest.mark.timeout(60)


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def copy(src, dst):
    dst[:] = src


KERNELS = {"fill": fill, "copy": copy}
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def make_target(ctx, args):
    return ctx.alloc((8,), np.float64)


def good(ctx, args):
    o = ctx.alloc((4,), np.int64)
    ctx.submit(ctx.peers()[-1], "fill", [Out(o), S(args.get("v", 1)), S(0.0)])
    return o


def assert_usable(rt, v=5):
    rt.register("bad_sanity", orch=good, kernels=KERNELS)
    o = rt.run("bad_sanity", args={"v": v})
    np.testing.assert_array_equal(o.numpy(), np.full(4, v))
    o.free()


def test_unknown_kernel_name(rt4_module):
    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        ctx.submit(0, "no_such_kernel", [Out(a)])
        return a

    rt4_module.register("bad_kernel", orch=orch, kernels=KERNELS)
    with pytest.raises(KeyError, match="no_such_kernel"):
        rt4_module.run("bad_kernel", args={})
    assert_usable(rt4_module)


@pytest.mark.parametrize("chip", [4, 99, -1])
def test_unknown_chip(rt4_module, chip):
    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        ctx.submit(chip, "fill", [Out(a), S(1.0), S(0.0)])
        return a

    rt4_module.register("bad_chip", orch=orch, kernels=KERNELS)
    with pytest.raises(ValueError):
        rt4_module.run("bad_chip", args={})
    assert_usable(rt4_module)


def test_chip_not_in_this_runtime(rt1_module):
    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        ctx.submit(1, "fill", [Out(a), S(1.0), S(0.0)])
        return a

    rt1_module.register("bad_chip1", orch=orch, kernels=KERNELS)
    with pytest.raises(ValueError):
        rt1_module.run("bad_chip1", args={})
    assert_usable(rt1_module)


def test_unregistered_run_name(rt1_module):
    with pytest.raises(KeyError, match="never_registered"):
        rt1_module.run("never_registered", args={})
    assert_usable(rt1_module)


@pytest.mark.parametrize("bad", ["handle", "array", "number", "string"])
def test_argument_that_is_not_an_arg(rt1_module, bad):
    def orch(ctx, args):
        a = ctx.alloc((8,), np.float64)
        raw = {"handle": a, "array": np.zeros(8), "number": 3.0, "string": "x"}[bad]
        ctx.submit(0, "copy", [raw, Out(a)])
        return a

    rt1_module.register("bad_notarg", orch=orch, kernels=KERNELS)
    with pytest.raises(TypeError):
        rt1_module.run("bad_notarg", args={})
    assert_usable(rt1_module)


@pytest.mark.parametrize("kernel", [42, None, np.zeros(3)])
def test_non_callable_kernel_at_register(rt1_module, kernel):
    with pytest.raises(TypeError):
        rt1_module.register("bad_register", orch=good, kernels={"fill": kernel})
    assert_usable(rt1_module)


def test_freed_handle_numpy(rt1_module):
    rt1_module.register("bad_freed_make", orch=make_target, kernels=KERNELS)
    h = rt1_module.run("bad_freed_make", args={})
    h.free()
    with pytest.raises(pto.TensorFreed) as ei:
        h.numpy()
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, pto.PtoError)


@pytest.mark.parametrize("arg", ["input", "output", "inout"])
def test_freed_handle_in_submit(rt1_module, arg):
    def orch(ctx, args):
        b = ctx.alloc((8,), np.float64)
        ctor = getattr(pto.Arg, arg)
        ctx.submit(0, "copy", [ctor(args["h"]), Out(b)])
        return b

    rt1_module.register("bad_freed_make", orch=make_target, kernels=KERNELS)
    rt1_module.register("bad_freed_use", orch=orch, kernels=KERNELS)
    h = rt1_module.run("bad_freed_make", args={})
    h.free()
    with pytest.raises(pto.TensorFreed):
        rt1_module.run("bad_freed_use", args={"h": h})
    assert_usable(rt1_module)


@pytest.mark.timeout(30)
def test_unreachable_broker_raises_broker_lost_in_bounded_time():
    before = {p.pid for p in children()}
    addr = "ipc:///tmp/definitely-not-here.sock"
    t0 = time.monotonic()
    with pytest.raises(pto.BrokerLost) as ei:
        pto.Runtime(level="host", broker=addr, timeout=1)
    elapsed = time.monotonic() - t0
    assert addr in str(ei.value)
    assert isinstance(ei.value, pto.PtoError)
    assert elapsed < 6, f"took {elapsed:.1f}s with timeout=1"
    # and it did not start an embedded broker instead
    assert not [p for p in children() if p.pid not in before]


@pytest.mark.timeout(30)
def test_unreachable_broker_from_env(monkeypatch):
    addr = "ipc:///tmp/definitely-not-here-either.sock"
    monkeypatch.setenv("PTO_BROKER", addr)
    t0 = time.monotonic()
    with pytest.raises(pto.BrokerLost, match="definitely-not-here-either"):
        pto.Runtime(level="host", timeout=1)
    assert time.monotonic() - t0 < 6


def test_orchestration_that_raises(rt4_module):
    class OrchBroke(Exception):
        pass

    def orch(ctx, args):
        a = ctx.tensor(np.arange(1000.0))
        b = ctx.alloc((1000,), np.float64)
        ctx.submit(0, "copy", [In(a), Out(b)])
        ctx.submit(1, "fill", [Out(args["t"]), S(6.0), S(0.3)])
        raise OrchBroke("orchestration gave up here")

    rt4_module.register("bad_orch_t", orch=make_target, kernels=KERNELS)
    rt4_module.register("bad_orch", orch=orch, kernels=KERNELS)
    t = rt4_module.run("bad_orch_t", args={})
    owner = owner_of(t)
    gc.collect()
    before_segs = pto_segments()
    before_procs = {p.pid for p in children()}
    with pytest.raises(OrchBroke, match="orchestration gave up here"):
        rt4_module.run("bad_orch", args={"t": t})

    def ours():
        gc.collect()
        return {s for s in pto_segments() - before_segs if s.rsplit("_", 1)[0] == owner}

    assert wait_until(lambda: not ours(), timeout=5), f"leaked segments: {ours()}"
    assert {p.pid for p in children()} == before_procs
    assert_usable(rt4_module)


@pytest.mark.parametrize("bad", ["kernel", "chip", "not_arg"])
def test_tasks_submitted_before_a_bad_submit_still_finish(rt4_module, bad):
    """A submit error propagates out of run() once the tasks submitted before it finished."""

    def orch(ctx, args):
        ctx.submit(1, "fill", [Out(args["t"]), S(6.0), S(0.3)])
        a = ctx.alloc((8,), np.float64)
        if bad == "kernel":
            ctx.submit(0, "no_such_kernel", [Out(a)])
        elif bad == "chip":
            ctx.submit(42, "fill", [Out(a), S(1.0), S(0.0)])
        else:
            ctx.submit(0, "copy", [a, Out(a)])
        return a

    rt4_module.register("bad_prior_t", orch=make_target, kernels=KERNELS)
    rt4_module.register("bad_prior", orch=orch, kernels=KERNELS)
    t = rt4_module.run("bad_prior_t", args={})
    with pytest.raises((KeyError, ValueError, TypeError)):
        rt4_module.run("bad_prior", args={"t": t})
    np.testing.assert_array_equal(t.numpy(), np.full(8, 6.0))
    assert_usable(rt4_module)


def test_output_given_a_read_only_numpy_array(rt1_module):
    ro = np.zeros(8)
    ro.flags.writeable = False

    def orch(ctx, args):
        ctx.submit(0, "fill", [Out(args["ro"]), S(1.0), S(0.0)])

    rt1_module.register("bad_ro", orch=orch, kernels=KERNELS)
    with pytest.raises((ValueError, TypeError), match="(?i)read.?only|writeable|writable"):
        rt1_module.run("bad_ro", args={"ro": ro})
    np.testing.assert_array_equal(ro, np.zeros(8))
    assert_usable(rt1_module)


def test_inout_given_a_read_only_numpy_array(rt1_module):
    ro = np.zeros(8)
    ro.flags.writeable = False

    def orch(ctx, args):
        ctx.submit(0, "fill", [pto.Arg.inout(args["ro"]), S(1.0), S(0.0)])

    rt1_module.register("bad_ro_inout", orch=orch, kernels=KERNELS)
    with pytest.raises((ValueError, TypeError)):
        rt1_module.run("bad_ro_inout", args={"ro": ro})
    np.testing.assert_array_equal(ro, np.zeros(8))


@pytest.mark.parametrize("how", ["tensor", "alloc", "arg_input", "arg_output"])
def test_unsupported_dtype(rt1_module, how):
    objs = np.array([object(), None, 3], dtype=object)

    def orch(ctx, args):
        if how == "tensor":
            ctx.tensor(objs)
        elif how == "alloc":
            ctx.alloc((3,), object)
        elif how == "arg_input":
            b = ctx.alloc((3,), np.float64)
            ctx.submit(0, "copy", [In(objs), Out(b)])
        else:
            a = ctx.alloc((3,), np.float64)
            ctx.submit(0, "copy", [In(a), Out(objs)])

    rt1_module.register("bad_dtype", orch=orch, kernels=KERNELS)
    with pytest.raises(TypeError):
        rt1_module.run("bad_dtype", args={})
    assert_usable(rt1_module)


def test_bad_runtime_arguments_leave_no_processes():
    """A Runtime that cannot start does not leave children behind."""
    before = {p.pid for p in children()}
    with pytest.raises(ValueError):
        pto.Runtime(level="host", platform="sim", devices=[])
    with pytest.raises(ValueError):
        pto.Runtime(level="no-such-level", platform="sim", devices=[0])
    new = [p for p in children() if p.pid not in before]
    assert wait_dead(new, timeout=5) == []
