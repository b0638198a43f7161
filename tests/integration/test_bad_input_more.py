"""More wrong input (beyond test_bad_input.py and test_wire_robustness.py): each case fails
with a clear exception (type and message), or behaves as documented, and the runtime
serves the next run as if nothing happened.
"""

from __future__ import annotations

import fractions
import math
import threading
import time

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(60)

In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


# ---- kernels (module level: they travel to workers by value) -----------------------------


def fill(out, value):
    out[:] = value


def copy(src, dst):
    dst[:] = src


def as_int(out, k):
    out[:] = int(k)


def describe(out, x):
    """out = [is float, is nan, is +inf, the value if finite]"""
    out[0] = isinstance(x, float)
    out[1] = isinstance(x, float) and math.isnan(x)
    out[2] = x == math.inf
    out[3] = x if isinstance(x, (int, float)) and math.isfinite(x) else 0


def store(out, value):
    out[0] = value


def slow_fill(out, value):
    time.sleep(0.3)
    out[:] = value


KERNELS = {"fill": fill, "copy": copy, "as_int": as_int, "describe": describe, "store": store}


def assert_usable(rt, v: float = 5.0) -> None:
    """The runtime serves a normal run on every chip."""

    def good(ctx, args):
        outs = []
        for chip in ctx.peers():
            o = ctx.alloc(4, np.float64)
            ctx.submit(chip, "fill", [Out(o), S(v + chip)])
            outs.append(o)
        return outs

    rt.register("more_sanity", orch=good, kernels=KERNELS)
    for chip, o in zip(rt.devices, rt.run("more_sanity"), strict=True):
        np.testing.assert_array_equal(o.numpy(), np.full(4, v + chip))
        o.free()


def run_one(rt, submit, args=None):
    """Run an orchestration that calls ``submit(ctx, args)`` and returns its value."""
    rt.register("more_case", orch=submit, kernels=KERNELS)
    return rt.run("more_case", args)


def submit_scalar(value, kernel="fill", dtype=np.float64):
    def orch(ctx, args):
        out = ctx.alloc(4, dtype)
        ctx.submit(0, kernel, [Out(out), S(value)])
        return out

    return orch


# ---- scalars -------------------------------------------------------------------------


def test_scalar_that_does_not_fit_64_bits(rt1_module):
    for value in (2**64, 2**100, -(2**63) - 1, -(2**200)):
        with pytest.raises(OverflowError, match="scalar argument 1 of 'fill' does not fit in "
                                                "64 bits"):
            run_one(rt1_module, submit_scalar(value))
    assert_usable(rt1_module)


def test_scalar_at_the_64_bit_limits_arrives_exactly(rt1_module):
    hi = run_one(rt1_module, submit_scalar(2**64 - 1, "store", np.uint64))
    lo = run_one(rt1_module, submit_scalar(-(2**63), "store", np.int64))
    assert int(hi.numpy()[0]) == 2**64 - 1
    assert int(lo.numpy()[0]) == -(2**63)
    assert_usable(rt1_module)


def test_scalar_that_is_not_a_number(rt1_module):
    for value in ("3", b"3", None, [1, 2], {"a": 1}, object()):
        with pytest.raises(TypeError, match=r"scalar argument 1 of 'fill' must be a bool, int "
                                            r"or float, not " + type(value).__name__):
            run_one(rt1_module, submit_scalar(value))
    assert_usable(rt1_module)


def test_scalar_of_an_unsupported_numeric_type(rt1_module):
    for value in (1j, np.complex64(1 + 2j), fractions.Fraction(1, 3), np.array(3),
                  np.array([1.0])):
        with pytest.raises(TypeError, match="must be a bool, int or float, not "
                                            + type(value).__name__):
            run_one(rt1_module, submit_scalar(value))
    assert_usable(rt1_module)


def test_scalar_that_is_a_tensor_handle(rt1_module):
    def orch(ctx, args):
        out = ctx.alloc(4, np.float64)
        ctx.submit(0, "fill", [Out(out), S(out)])

    with pytest.raises(TypeError, match="not TensorHandle"):
        run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_nan_and_inf_scalars_reach_a_python_kernel_as_floats(rt1_module):
    for value in (float("nan"), np.float32("nan"), math.inf):

        def orch(ctx, args, value=value):
            out = ctx.alloc(4, np.float64)
            ctx.submit(0, "describe", [Out(out), S(value)])
            return out

        is_float, is_nan, is_inf, _ = run_one(rt1_module, orch).numpy().tolist()
        assert is_float == 1.0, value
        assert is_nan == float(math.isnan(value)) and is_inf == float(value == math.inf)
    assert_usable(rt1_module)


def test_nan_scalar_where_the_kernel_needs_an_int_fails_the_task(rt1_module):
    for value in (float("nan"), math.inf):
        with pytest.raises(pto.TaskError) as ei:
            run_one(rt1_module, submit_scalar(value, "as_int"))
        err = ei.value
        assert err.kernel == "as_int" and err.chip == 0
        assert "cannot convert float" in err.reason and "to integer" in err.reason, err.reason
    assert_usable(rt1_module)


# ---- tensor arguments ----------------------------------------------------------------


def test_tensor_argument_that_is_not_a_tensor(rt1_module):
    for kind in ("input", "output", "inout", "no_dep", "output_existing"):
        for value in (3.0, "x", [1.0, 2.0], None):

            def orch(ctx, args, kind=kind, value=value):
                out = ctx.alloc(2, np.float64)
                ctx.submit(0, "copy", [getattr(pto.Arg, kind)(value), Out(out)])

            with pytest.raises(TypeError, match="argument 0 of 'copy': a tensor argument takes "
                                                "a TensorHandle or a numpy array, not "):
                run_one(rt1_module, orch)
    assert_usable(rt1_module)


@pytest.mark.parametrize("kind", [7, -1, "bogus", None])
def test_argument_of_an_unknown_kind(rt1_module, kind):
    """``pto.Arg(kind, value)`` with a kind that is no ``pto.ParamType``."""

    def orch(ctx, args):
        out = ctx.alloc(2, np.float64)
        ctx.submit(0, "fill", [pto.Arg(kind, out), S(1.0)])
        return out

    with pytest.raises((ValueError, TypeError), match="(?i)kind|ParamType"):
        run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_args_that_are_not_a_list(rt1_module):
    for bad in (Out(np.zeros(2)), {"out": Out(np.zeros(2))}, None, "fill"):

        def orch(ctx, args, bad=bad):
            ctx.submit(0, "fill", bad)

        with pytest.raises(TypeError, match="must be a list of pto.Arg"):
            run_one(rt1_module, orch)
    assert_usable(rt1_module)


# ---- chips, kernels, retries ---------------------------------------------------------


def test_chip_id_that_is_not_an_int(rt4_module):
    for chip in (True, False, 1.0, "0", None):

        def orch(ctx, args, chip=chip):
            ctx.submit(chip, "fill", [Out(ctx.alloc(2)), S(1.0)])

        with pytest.raises(ValueError, match=f"unknown chip {chip!r}; this runtime has chips"):
            run_one(rt4_module, orch)
    assert_usable(rt4_module)


def test_numpy_integer_chip_id_is_accepted(rt4_module):
    def orch(ctx, args):
        out = ctx.alloc(2, np.float64)
        ctx.submit(np.int64(3), "fill", [Out(out), S(3.0)])
        return out

    assert run_one(rt4_module, orch).numpy().tolist() == [3.0, 3.0]


def test_bad_retries(rt1_module):
    for retries in (-1, 1.5, True, "1", None):

        def orch(ctx, args, retries=retries):
            ctx.submit(0, "fill", [Out(ctx.alloc(2)), S(1.0)], retries=retries)

        with pytest.raises(ValueError, match="retries must be an int >= 0"):
            run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_kernel_name_that_is_not_a_string(rt1_module):
    for kernel in (42, None, b"fill", ("fill",)):

        def orch(ctx, args, kernel=kernel):
            ctx.submit(0, kernel, [Out(ctx.alloc(2)), S(1.0)])

        with pytest.raises(KeyError, match="unknown kernel"):
            run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_submit_host_with_a_non_callable(rt1_module):
    def orch(ctx, args):
        ctx.submit_host("fill", [Out(ctx.alloc(2))])

    with pytest.raises(TypeError, match="submit_host needs a callable"):
        run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_group_chip_list_of_the_wrong_type(rt4_module):
    for chips, error in ((3, TypeError), (None, TypeError), ([0, True], ValueError),
                         ([0, 1.0], ValueError), ("01", ValueError)):

        def orch(ctx, args, chips=chips):
            ctx.submit_group(chips, "fill", [Out(ctx.alloc(2)), S(1.0)])

        with pytest.raises(error, match="chip"):
            run_one(rt4_module, orch)
    assert_usable(rt4_module)


# ---- registration --------------------------------------------------------------------


def test_register_with_a_bad_name(rt1_module):
    for name in ("", None, 42, b"name"):
        with pytest.raises(TypeError, match="non-empty name"):
            rt1_module.register(name, orch=submit_scalar(1.0), kernels=KERNELS)
    assert_usable(rt1_module)


def test_register_with_a_non_callable_orchestration(rt1_module):
    for orch in (None, 42, "orch", np.zeros(2)):
        with pytest.raises(TypeError, match="orch for 'more_bad_orch' must be callable"):
            rt1_module.register("more_bad_orch", orch=orch, kernels=KERNELS)
        with pytest.raises(KeyError, match="more_bad_orch"):  # and nothing was registered
            rt1_module.run("more_bad_orch")
    assert_usable(rt1_module)


def test_register_with_a_bad_kernel_name(rt1_module):
    for kname in ("", 3, None):
        with pytest.raises(TypeError, match="kernel names must be non-empty strings"):
            rt1_module.register("more_bad_kname", orch=submit_scalar(1.0), kernels={kname: fill})
    assert_usable(rt1_module)


def test_register_a_kernel_that_cannot_be_pickled(rt1_module):
    lock = threading.Lock()

    def locked_fill(out, value):
        with lock:
            out[:] = value

    with pytest.raises(TypeError, match="cannot be sent to workers"):
        rt1_module.register("more_unpicklable", orch=submit_scalar(1.0),
                            kernels={"fill": locked_fill})
    assert_usable(rt1_module)


def test_run_with_a_name_that_is_not_a_string(rt1_module):
    for name in (None, 42, ("x",)):
        with pytest.raises(KeyError, match="no orchestration registered as"):
            rt1_module.run(name)
    with pytest.raises((KeyError, TypeError)):
        rt1_module.run(["unhashable"])
    assert_usable(rt1_module)


# ---- orchestrations ------------------------------------------------------------------


def test_orchestration_returning_none(rt4_module):
    """An orchestration without a return value: run() returns None once its tasks ran."""
    target = np.zeros(4)

    def orch(ctx, args):
        ctx.submit(2, "fill", [Out(args), S(9.0)])  # no return statement

    assert run_one(rt4_module, orch, target) is None
    np.testing.assert_array_equal(target, np.full(4, 9.0))  # the task did run first
    assert_usable(rt4_module)


def test_orchestration_returning_odd_values(rt1_module):
    gen = (i for i in range(3))

    def orch(ctx, args):
        return gen, print, Ellipsis

    value = run_one(rt1_module, orch)
    assert value == (gen, print, Ellipsis)
    assert_usable(rt1_module)


def test_orchestration_raising_after_submitting_through_rt_submit(rt4_module):
    """The async path: the future carries the orchestration's error, raised only once the
    tasks it submitted have finished."""
    target = run_one(rt4_module, lambda ctx, args: ctx.alloc(4, np.float64))

    class Late(Exception):
        pass

    def orch(ctx, args):
        h = ctx.alloc(4, np.float64)
        ctx.submit(1, "slow_fill", [Out(h), S(4.0)])
        ctx.submit(2, "copy", [In(h), Out(args)])
        raise Late("gave up after two submits")

    rt4_module.register("more_late", orch=orch, kernels={"slow_fill": slow_fill, "copy": copy})
    future = rt4_module.submit("more_late", target)
    with pytest.raises(Late, match="gave up after two submits"):
        future.result(timeout=20)
    np.testing.assert_array_equal(target.numpy(), np.full(4, 4.0))  # both tasks ran first
    target.free()
    assert_usable(rt4_module)


def test_orchestration_raising_keyboard_interrupt(rt1_module):
    def orch(ctx, args):
        ctx.submit(0, "fill", [Out(ctx.alloc(2)), S(1.0)])
        raise KeyboardInterrupt("ctrl-c in the orchestration")

    with pytest.raises(KeyboardInterrupt, match="ctrl-c"):
        run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_context_used_after_its_run_ended(rt1_module):
    """A ``ctx`` kept past its orchestration cannot add tasks to a run that is over."""
    kept = []

    def orch(ctx, args):
        kept.append(ctx)

    run_one(rt1_module, orch)
    ctx = kept.pop()
    out = np.zeros(2)
    with pytest.raises((pto.PtoError, RuntimeError), match="(?i)run|orchestration"):
        ctx.submit(0, "fill", [Out(out), S(1.0)])
    assert_usable(rt1_module)


def test_scope_end_without_scope_begin(rt1_module):
    def orch(ctx, args):
        ctx.scope_end()

    with pytest.raises(RuntimeError, match="scope_end"):
        run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_pto_task_outside_a_kernel():
    with pytest.raises(RuntimeError, match="only available inside a running kernel"):
        pto.task()


# ---- shapes, dtypes, views -----------------------------------------------------------


def test_alloc_with_negative_dims(rt1_module):
    for shape in (-1, (2, -3), (0, -1)):
        with pytest.raises(ValueError, match="shape must not have negative dimensions"):
            run_one(rt1_module, lambda ctx, args, shape=shape: ctx.alloc(shape))
    assert_usable(rt1_module)


def test_alloc_with_non_int_dims(rt1_module):
    for shape in (2.5, "4", (2, None), (True, 2), None, (2.0,)):
        with pytest.raises(TypeError, match="shape must be an int or a sequence of ints"):
            run_one(rt1_module, lambda ctx, args, shape=shape: ctx.alloc(shape))
    assert_usable(rt1_module)


def test_alloc_with_a_bad_dtype(rt1_module):
    for dtype in ("not-a-dtype", 3.5, "U8", np.dtype("V4")):
        with pytest.raises(TypeError):
            run_one(rt1_module, lambda ctx, args, dtype=dtype: ctx.alloc(4, dtype))
    assert_usable(rt1_module)


def test_alloc_whose_byte_size_overflows(rt1_module):
    """2**62 float64 elements = 2**65 bytes: more than any size a segment can have."""
    with pytest.raises((pto.OutOfMemory, OverflowError, ValueError)) as ei:
        run_one(rt1_module, lambda ctx, args: ctx.alloc(2**62, np.float64))
    msg = str(ei.value)
    assert "byte" in msg or str(2**62) in msg or str(2**65) in msg, (
        f"the error does not say what was too large: {type(ei.value).__name__}: {msg}")
    assert_usable(rt1_module)


def test_zero_size_tensor_works(rt1_module):
    def orch(ctx, args):
        a, b = ctx.alloc(0, np.float64), ctx.alloc((3, 0), np.int32)
        ctx.submit(0, "fill", [Out(a), S(1.0)])
        return a, b

    a, b = run_one(rt1_module, orch)
    assert a.shape == (0,) and a.nbytes == 0 and a.numpy().size == 0
    assert b.shape == (3, 0) and b.numpy().shape == (3, 0)
    assert_usable(rt1_module)


def test_kernel_writing_an_output_of_the_wrong_shape(rt1_module):
    def orch(ctx, args):
        out = ctx.alloc(4, np.float64)
        ctx.submit(0, "copy", [In(np.arange(5.0)), Out(out)])

    with pytest.raises(pto.TaskError) as ei:
        run_one(rt1_module, orch)
    assert ei.value.kernel == "copy" and "broadcast" in ei.value.reason, ei.value.reason
    assert_usable(rt1_module)


def test_kernel_called_with_the_wrong_number_of_arguments(rt1_module):
    def orch(ctx, args):
        ctx.submit(0, "fill", [Out(ctx.alloc(2)), S(1.0), S(2.0)])

    with pytest.raises(pto.TaskError) as ei:
        run_one(rt1_module, orch)
    assert ei.value.kernel == "fill"
    assert "takes 2 positional arguments but 3 were given" in ei.value.reason, ei.value.reason
    assert_usable(rt1_module)


def test_bad_views(rt1_module):
    for key, error, match in ((slice(None, None, 2), ValueError, "contiguous"),
                              (8, IndexError, "index 8 is out of range for 8 rows"),
                              (-9, IndexError, "index -9 is out of range for 8 rows"),
                              ("a", TypeError, "int or a slice"),
                              ((0, 1), TypeError, "int or a slice")):

        def orch(ctx, args, key=key):
            return ctx.alloc((8, 2), np.float64)[key]

        with pytest.raises(error, match=match):
            run_one(rt1_module, orch)
    assert_usable(rt1_module)


def test_view_misuse_outside_a_run(rt1_module):
    h, one = run_one(rt1_module, lambda ctx, args: (ctx.alloc((8,), np.float64), ctx.alloc(1)))
    with pytest.raises(ValueError, match="cannot reshape"):
        h.reshape(3, 3)
    with pytest.raises(ValueError, match="is a view: free the tensor it views"):
        h[2:4].free()
    with pytest.raises(IndexError, match="0-d"):
        one.reshape(())[0]
    h.free()
    one.free()
    assert_usable(rt1_module)


# ---- handles: freed, double-freed, of another runtime --------------------------------


def test_double_free_is_harmless_and_the_handle_stays_unusable(rt1_module):
    h = run_one(rt1_module, lambda ctx, args: ctx.alloc(4, np.float64))
    view = h[1:3]
    h.free()
    h.free()  # documented: harmless
    for use in (h.numpy, view.numpy, lambda: h[0:2], lambda: h.reshape(2, 2)):
        with pytest.raises(pto.TensorFreed, match="was freed"):
            use()
    assert h.freed and "freed" in repr(h)
    assert_usable(rt1_module)


def test_freed_handle_as_a_later_runs_output(rt1_module):
    h = run_one(rt1_module, lambda ctx, args: ctx.alloc(4, np.float64))
    h.free()

    def orch(ctx, args):
        ctx.submit(0, "fill", [Out(args), S(1.0)])

    with pytest.raises(pto.TensorFreed, match="was freed"):
        run_one(rt1_module, orch, h)
    assert_usable(rt1_module)


def test_freed_handle_returned_through_a_container(rt1_module):
    """A freed handle stays freed even when an orchestration hands it back."""
    h = run_one(rt1_module, lambda ctx, args: ctx.alloc(4, np.float64))
    h.free()
    back = run_one(rt1_module, lambda ctx, args: {"h": [args]}, h)
    with pytest.raises(pto.TensorFreed):
        back["h"][0].numpy()
    assert_usable(rt1_module)


def test_handle_of_a_closed_runtime(rt1_module):
    with pto.Runtime(level="host", platform="sim", devices=[0]) as other:
        other.register("mk", orch=lambda ctx, args: ctx.tensor(np.arange(4.0)), kernels={})
        theirs = other.run("mk")
    with pytest.raises(pto.TensorFreed, match="closed runtime"):
        theirs.numpy()
    theirs.free()  # harmless after close

    def orch(ctx, args):
        ctx.submit(0, "copy", [In(args), Out(ctx.alloc(4, np.float64))])

    with pytest.raises(ValueError, match="another runtime|closed"):
        run_one(rt1_module, orch, theirs)
    assert_usable(rt1_module)


# ---- runtimes ------------------------------------------------------------------------


def test_runtime_with_bad_devices():
    for devices in ([-1], [True], [0, 0], [0.0], "ab", 3, [None]):
        with pytest.raises((ValueError, TypeError), match="devices must"):
            pto.Runtime(level="host", platform="sim", devices=devices)


def test_runtime_with_device_and_devices():
    with pytest.raises(ValueError, match="device= or devices="):
        pto.Runtime(level="host", platform="sim", device=0, devices=[0])


def test_runtime_on_a_platform_this_machine_lacks():
    with pytest.raises(ValueError, match="platform 'a2a3'.*sim"):
        pto.Runtime(level="host", platform="a2a3", devices=[0])


@pytest.mark.parametrize("address", ["http://localhost:5555", "ipc://", "tcp://127.0.0.1",
                                     "no-scheme-at-all"])
def test_runtime_with_a_malformed_broker_address(address):
    """Every error a user sees is a pto error (or a ValueError) naming the address."""
    t0 = time.monotonic()
    with pytest.raises((ValueError, pto.PtoError)) as ei:
        pto.Runtime(level="host", platform="sim", broker=address, timeout=2)
    assert address in str(ei.value), str(ei.value)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("timeout", [-1, 0], ids=repr)
def test_runtime_with_a_non_positive_timeout(timeout):
    with pytest.raises(ValueError, match="timeout"):
        pto.Runtime(level="host", platform="sim", devices=[0], timeout=timeout)


def test_closed_runtime_refuses_everything():
    rt = pto.Runtime(level="host", platform="sim", devices=[0])
    rt.register("mk", orch=lambda ctx, args: ctx.alloc(2), kernels={})
    h = rt.run("mk")
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(pto.PtoError, match="closed"):
        rt.run("mk")
    with pytest.raises(pto.PtoError, match="closed"):
        rt.submit("mk")
    with pytest.raises(pto.PtoError, match="closed"):
        rt.register("mk2", orch=lambda ctx, args: None)
    with pytest.raises(pto.TensorFreed, match="closed runtime"):
        h.numpy()
