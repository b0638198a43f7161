"""Compiled C kernels at L3: on four chips through the embedded broker, mixed with Python
kernels, and crashing (a SIGSEGV or abort kills only that chip's worker, the task fails
with a TaskError naming kernel, chip and signal, and the chip comes back). A package with
an orchestration registered as a kernel is one task running that whole orchestration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
MATMUL = REPO / "examples" / "matmul" / "kernels" / "matmul.c"
DATA = REPO / "tests" / "data" / "kernels"
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {
            "vector_add": pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                                      orch=VECTOR_ADD / "orch.c"),
            "matmul": pto.compile(kernels=[MATMUL]),
            "probe": pto.compile(kernels=[{"source": DATA / "probe.c", "name": k}
                                          for k in ("where_am_i", "fail_with", "pointers")]),
            "crash": pto.compile(kernels=[{"source": DATA / "crash.c", "name": k}
                                          for k in ("segv", "abort_now")]),
        }


def twice(x, y):
    """A Python kernel between C kernels."""
    y[...] = 2 * x


def add_on_every_chip(ctx, args):
    outs = []
    for chip in ctx.peers():
        x = ctx.tensor(args["x"] + chip)
        z = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "add", [In(x), In(x), Out(z)])
        outs.append(z)
    return outs


def test_c_kernels_on_four_chips(rt4_module, pkgs):
    rt4_module.register("l3c_add", orch=add_on_every_chip,
                 kernels={"add": pkgs["vector_add"].kernel("add")})
    x = np.arange(1000, dtype=np.float32)
    for _ in range(3):  # the library is loaded once per worker, then reused
        outs = rt4_module.run("l3c_add", args={"x": x})
        for chip, z in enumerate(outs):
            np.testing.assert_array_equal(z.numpy(), 2 * (x + chip))


def test_matmul_row_slices_on_four_chips(rt4_module, pkgs):
    def rows(ctx, args):
        a, b = args["a"], args["b"]
        shared_b = ctx.tensor(b)
        bounds = np.linspace(0, len(a), len(ctx.peers()) + 1).astype(int)
        parts = []
        for chip, lo, hi in zip(ctx.peers(), bounds[:-1], bounds[1:], strict=True):
            c = ctx.alloc((hi - lo, b.shape[1]), a.dtype)
            ctx.submit(chip, "matmul", [In(ctx.tensor(a[lo:hi])), In(shared_b), Out(c)])
            parts.append(c)
        return parts

    rt4_module.register("l3c_matmul", orch=rows, kernels={"matmul": pkgs["matmul"].kernel("matmul",
                                                                                block_dim=3)})
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((203, 64)).astype(dtype)
        b = rng.standard_normal((64, 45)).astype(dtype)
        parts = rt4_module.run("l3c_matmul", args={"a": a, "b": b})
        np.testing.assert_allclose(np.concatenate([p.numpy() for p in parts]), a @ b, rtol=1e-4,
                                   atol=1e-4)


def test_c_and_python_kernels_in_one_graph(rt4_module, pkgs):
    def graph(ctx, args):
        x = ctx.tensor(args["x"])
        s = ctx.alloc(x.shape, x.dtype)
        d = ctx.alloc(x.shape, x.dtype)
        out = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "add", [In(x), In(x), Out(s)])        # C:      s = 2x
        ctx.submit(1, "twice", [In(s), Out(d)])              # Python: d = 4x
        ctx.submit(2, "scaled_add", [In(d), In(s), Out(out)])  # C, another name: out = 6x
        ctx.submit(3, "scale", [InOut(out), S(0.5)])         # C, inout: out = 3x
        return out

    vector_add = pkgs["vector_add"]
    kernels = {"add": vector_add.kernel("add"), "scale": vector_add.kernel("scale"),
               "twice": twice,
               "scaled_add": pkgs["vector_add"].kernel("add", block_dim=4)}
    rt4_module.register("l3c_mixed", orch=graph, kernels=kernels)
    x = np.linspace(-5, 5, 999).astype(np.float64)
    np.testing.assert_allclose(rt4_module.run("l3c_mixed", args={"x": x}).numpy(), 3 * x)


def test_task_context_seen_from_c(rt4_module, pkgs):
    def probe(ctx, args):
        outs = []
        for chip in ctx.peers():
            out = ctx.alloc((1, 6), np.int64)
            ctx.submit(chip, "where_am_i", [Out(out)])
            outs.append(out)
        return outs

    rt4_module.register("l3c_probe", orch=probe,
                 kernels={"where_am_i": pkgs["probe"].kernel("where_am_i")})
    outs = rt4_module.run("l3c_probe", args=None)
    for chip, out in enumerate(outs):
        assert out.numpy().tolist() == [[0, 1, 0, 1, chip, 0]]  # block 0 of 1, rank 0 of 1


def test_c_kernel_failure_names_kernel_chip_and_message(rt4_module, pkgs):
    def fail(ctx, args):
        ctx.submit(1, "fail_with", [S(0)])

    rt4_module.register("l3c_fail", orch=fail,
                        kernels={"fail_with": pkgs["probe"].kernel("fail_with")})
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run("l3c_fail", args=None)
    err = ei.value
    assert err.kernel == "fail_with" and err.chip == 1
    assert "probe-3c1e: block 0 refused value 0" in str(err)
    assert not isinstance(err, pto.WorkerLost)


def run_crash_then_recover(rt, pkgs, kernel: str, signal_name: str) -> None:
    def crash(ctx, args):
        ctx.submit(2, kernel, [])

    rt.register(f"l3c_{kernel}", orch=crash, kernels={kernel: pkgs["crash"].kernel(kernel)})
    rt.register("l3c_add", orch=add_on_every_chip,
                kernels={"add": pkgs["vector_add"].kernel("add")})
    with pytest.raises(pto.TaskError) as ei:
        rt.run(f"l3c_{kernel}", args=None)
    err = ei.value
    assert isinstance(err, pto.WorkerLost)
    assert err.kernel == kernel and err.chip == 2
    assert kernel in str(err) and "chip 2" in str(err) and signal_name in str(err)
    # The chip's worker is restarted: the next run uses every chip, chip 2 included.
    x = np.arange(16, dtype=np.int64)
    outs = rt.run("l3c_add", args={"x": x})
    for chip, z in enumerate(outs):
        np.testing.assert_array_equal(z.numpy(), 2 * (x + chip))


@pytest.mark.slow
def test_segfaulting_kernel_fails_its_task_and_the_chip_comes_back(rt4, pkgs):
    run_crash_then_recover(rt4, pkgs, "segv", "SIGSEGV")
    run_crash_then_recover(rt4, pkgs, "segv", "SIGSEGV")  # and again, on the new worker


@pytest.mark.slow
def test_aborting_kernel_fails_its_task_and_the_chip_comes_back(rt4, pkgs):
    run_crash_then_recover(rt4, pkgs, "abort_now", "SIGABRT")


@pytest.mark.slow
def test_crash_does_not_touch_independent_tasks(rt4, pkgs):
    def make(ctx, args):
        return [ctx.alloc((8,), np.int32) for _ in range(3)]

    def graph(ctx, args):
        for chip, z in zip((0, 1, 3), args["outs"], strict=True):
            x = ctx.tensor(np.full(8, chip + 1, np.int32))
            ctx.submit(chip, "add", [In(x), In(x), Out(z)])
        ctx.submit(2, "segv", [])

    rt4.register("l3c_make", orch=make)
    rt4.register("l3c_partial", orch=graph, kernels={"add": pkgs["vector_add"].kernel("add"),
                                                     "segv": pkgs["crash"].kernel("segv")})
    outs = rt4.run("l3c_make", args=None)
    with pytest.raises(pto.WorkerLost, match="SIGSEGV"):
        rt4.run("l3c_partial", args={"outs": outs})
    for chip, z in zip((0, 1, 3), outs, strict=True):
        np.testing.assert_array_equal(z.numpy(), np.full(8, 2 * (chip + 1)))


def test_registration_errors(rt1_module, pkgs):
    with pytest.raises(ValueError, match="no kernel 'mul'"):
        pkgs["vector_add"].kernel("mul")
    # Several kernels and no orchestration: refused, even under one kernel's own name.
    for name in ("where_am_i", "compute"):
        with pytest.raises(ValueError, match="no orchestration and 3 kernels") as ei:
            rt1_module.register("l3c_bad", orch=add_on_every_chip, kernels={name: pkgs["probe"]})
        assert f"kernels={{'{name}': pkg.kernel(" in str(ei.value)
    with pytest.raises(KeyError):
        rt1_module.run("l3c_bad")  # nothing half-registered
    with pytest.raises(TypeError, match="callable or a compiled package"):
        rt1_module.register("l3c_bad", orch=add_on_every_chip, kernels={"add": str(MATMUL)})


def test_missing_package_file_fails_the_task(rt1, tmp_path, monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "lonely.c"  # a package no worker has loaded yet
    src.write_text("#include <pto_kernel.h>\nvoid lonely(const pto_arg *a, int32_t n) {}\n")
    pkg = pto.compile(kernels=[src])
    Path(pkg.path).rename(Path(pkg.path).with_suffix(".gone"))

    def one(ctx, args):
        ctx.submit(0, "lonely", [])

    rt1.register("l3c_lonely", orch=one, kernels={"lonely": pkg})
    with pytest.raises(pto.TaskError, match="not found") as ei:
        rt1.run("l3c_lonely", args=None)
    assert ei.value.kernel == "lonely"
    assert json.loads(pto.chip.compiler.kernel_registration("lonely", pkg)[1])["path"] == pkg.path
