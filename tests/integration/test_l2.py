"""L2: one simulated chip in this process. Correctness of the example kernels (vector_add,
matmul) across dtypes, sizes and block counts; what kernels see; argument checks; errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pto
from pto.wire.dtypes import bfloat16

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
MATMUL = REPO / "examples" / "matmul" / "kernels" / "matmul.c"
DATA = REPO / "tests" / "data" / "kernels"
PROBES = ["where_am_i", "sleep_ms", "pointers", "describe", "fail_with", "half_roundtrip",
          "concurrency"]
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The packages every test here uses, built once into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        probe = [{"source": DATA / "probe.c", "name": k} for k in PROBES]
        orch = {name: pto.compile(kernels=probe + [{"source": DATA / "orchs.c",
                                                    "name": "launch_inside"}],
                                  orch={"source": DATA / "orchs.c", "name": name})
                for name in ORCHS}
        return {
            "vector_add": pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                                      orch=VECTOR_ADD / "orch.c"),
            "matmul": pto.compile(kernels=[MATMUL], flags=["-O2"]),
            "probe": pto.compile(kernels=probe),
            **orch,
        }


ORCHS = ("returns_42", "launches_unknown", "ignores_failure", "nested_launch", "many_launches")


@pytest.fixture
def chip(packages):
    """Chip 3 with 4 cores, and the packages whose kernel names are unique registered."""
    with pto.Runtime(level="chip", platform="sim", device=3, cores=4) as rt:
        for name in ("vector_add", "matmul"):
            rt.register(name, pkg=packages[name])
        register_probes(rt, packages)
        yield rt


def register_probes(rt, packages) -> None:
    """Each probe kernel under its own name: a package of several kernels and no
    orchestration stands for no single one."""
    for kernel in PROBES:
        rt.register(kernel, pkg=packages["probe"].kernel(kernel))


@pytest.fixture
def orch_chip(packages):
    """Chip 3 for the misbehaving orchestrations (their packages share kernel names, so
    they are only run by registered name)."""
    with pto.Runtime(level="chip", platform="sim", device=3, cores=4) as rt:
        for name in ORCHS:
            rt.register(name, pkg=packages[name])
        yield rt


def random_array(rng, n, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.standard_normal(n) * 10).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min // 2, info.max // 2, n, dtype=dtype, endpoint=True)


def bf16_from_float(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (as pto_float_to_bf16)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_float(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


# ---- correctness -----------------------------------------------------------------------------


def test_runtime_level_chip_is_the_chip_runtime():
    from pto.chip.runtime import ChipRuntime

    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        assert isinstance(rt, ChipRuntime)
        assert rt.device == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_vector_add_orchestration(chip, dtype, n):
    rng = np.random.default_rng(n)
    x, y = random_array(rng, n, dtype), random_array(rng, n, dtype)
    alpha = 3 if np.dtype(dtype).kind == "i" else 0.5
    z = np.full(n, 99, dtype)
    chip.run("vector_add", args=[In(x), In(y), Out(z), S(alpha)])
    np.testing.assert_array_equal(z, ((x + y) * np.asarray(alpha, dtype)).astype(dtype))


@pytest.mark.parametrize("block_dim", [1, 2, 3, 4, 5, 8, 13, 16])
def test_vector_add_orchestration_block_dim(chip, block_dim):
    x = np.arange(1001, dtype=np.float64)
    z = np.zeros_like(x)
    chip.run("vector_add", args=[In(x), In(x), Out(z), S(2.0), S(block_dim)])
    np.testing.assert_array_equal(z, 4 * x)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.uint16, np.uint32,
                                   np.uint64, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("block_dim", list(range(1, 17)))
def test_add_kernel_every_block_dim(chip, dtype, block_dim):
    rng = np.random.default_rng(block_dim)
    n = 37 * block_dim + 5  # uneven shares
    x, y = random_array(rng, n, dtype), random_array(rng, n, dtype)
    z = np.zeros(n, dtype)
    chip.run("add", args=[In(x), In(y), Out(z)], block_dim=block_dim)
    np.testing.assert_array_equal(z, x + y)


@pytest.mark.parametrize("block_dim", [1, 4, 16])
def test_add_kernel_float16(chip, block_dim):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4099) * 100).astype(np.float16)
    y = (rng.standard_normal(4099) * 100).astype(np.float16)
    z = np.zeros_like(x)
    chip.run("add", args=[In(x), In(y), Out(z)], block_dim=block_dim)
    expected = (x.astype(np.float32) + y.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(z, expected)


def test_add_kernel_bfloat16_raw_storage(chip):
    rng = np.random.default_rng(1)
    xf, yf = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(
        np.float32)
    x = bf16_from_float(xf).view(bfloat16)
    y = bf16_from_float(yf).view(bfloat16)
    z = np.zeros(1000, bfloat16)
    chip.run("add", args=[In(x), In(y), Out(z)], block_dim=4)
    expected = bf16_from_float(bf16_to_float(x.view(np.uint16)) + bf16_to_float(y.view(np.uint16)))
    np.testing.assert_array_equal(z.view(np.uint16), expected)


def test_half_conversions_of_the_header_match_numpy(chip):
    h = np.array([0, 1, -1, 0.5, 65504, -65504, 6.1e-5, 5.96e-8, 1e-6, np.inf, -np.inf, 1234.5,
                  0.1, -2.75, 3e-7], np.float16)
    f = np.zeros(len(h), np.float32)
    back = np.zeros_like(h)
    chip.run("half_roundtrip", args=[In(h), Out(f), Out(back)])
    np.testing.assert_array_equal(f, h.astype(np.float32))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(back, (h.astype(np.float32) * 3).astype(np.float16))
    nan = np.array([np.nan], np.float16)
    f1, b1 = np.zeros(1, np.float32), np.zeros(1, np.float16)
    chip.run("half_roundtrip", args=[In(nan), Out(f1), Out(b1)])
    assert np.isnan(f1[0]) and np.isnan(b1[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (17, 33, 9), (64, 64, 64), (100, 70, 130),
                                     (3, 300, 600)])
@pytest.mark.parametrize("block_dim", [1, 3, 16])
def test_matmul(chip, dtype, m, k, n, block_dim):
    rng = np.random.default_rng(m * k * n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = np.full((m, n), np.nan, dtype)
    chip.run("matmul", args=[In(a), In(b), Out(c)], block_dim=block_dim)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol * k)


def test_matmul_shape_mismatch_is_a_task_error(chip):
    a, b, c = np.ones((4, 5), np.float32), np.ones((6, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(pto.TaskError, match="shapes do not agree"):
        chip.run("matmul", args=[In(a), In(b), Out(c)])


# ---- what a kernel sees ------------------------------------------------------------------------


@pytest.mark.parametrize("block_dim", [1, 2, 7, 16])
def test_block_idx_num_rank_world_chip(chip, block_dim):
    out = np.full((block_dim, 6), -9, np.int64)
    chip.run("where_am_i", args=[Out(out)], block_dim=block_dim)
    assert out[:, 0].tolist() == list(range(block_dim))
    assert (out[:, 1] == block_dim).all()
    assert (out[:, 2:] == [0, 1, 3, 0]).all()  # rank 0 of 1 on chip 3; barrier passes


def test_orchestration_launches_many_block_counts(orch_chip):
    out = np.full((16, 6), -9, np.int64)
    orch_chip.run("many_launches", args=[Out(out)])
    assert out[:, 0].tolist() == list(range(16))  # the last launch had 16 blocks


def test_blocks_run_concurrently_on_the_chip_cores(chip):
    out = np.zeros(2, np.int64)
    start = time.perf_counter()
    chip.run("concurrency", args=[Out(out)], block_dim=8)  # 8 blocks x 20 ms on 4 cores
    took = time.perf_counter() - start
    assert out[0] == 8
    assert out[1] == 4  # every core ran a block at once, and never more than the cores
    assert took < 0.15  # two rounds of 20 ms, not the 160 ms of one block at a time


def test_single_core_chip_runs_blocks_one_at_a_time(packages):
    with pto.Runtime(level="chip", platform="sim", device=0, cores=1) as rt:
        register_probes(rt, packages)
        out = np.zeros(2, np.int64)
        rt.run("concurrency", args=[Out(out)], block_dim=3)
        assert out.tolist() == [3, 1]


def test_arrays_are_passed_by_pointer_and_outputs_written_in_place(chip):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ptrs = np.zeros(2, np.int64)
    chip.run("pointers", args=[In(x), Out(ptrs)])
    assert ptrs.tolist() == [x.ctypes.data, ptrs.ctypes.data]
    view = np.zeros(20, np.float64)[5:15]  # a contiguous view: its own address, not a copy
    chip.run("pointers", args=[In(view), Out(ptrs)])
    assert ptrs[0] == view.ctypes.data


def test_argument_descriptions(chip):
    x = np.zeros((3, 5), np.int16)
    out = np.zeros(8 * 6, np.int64)
    chip.run("describe", args=[In(x), S(7), S(-2.5), S(True), S(2**64 - 1), InOut(out)])
    rows = out.reshape(6, 8)
    assert rows[0, :6].tolist() == [1, 3, 2, 30, 3, 5]  # INPUT, INT16, 2-d, 30 bytes, 3 x 5
    assert rows[1, :2].tolist() == [0, 5] and rows[1, 6] == 7  # SCALAR INT64
    assert rows[2, :2].tolist() == [0, 13] and rows[2, 7] == -2500  # SCALAR FLOAT64
    assert rows[3, :2].tolist() == [0, 1] and rows[3, 6] == 1  # SCALAR BOOL
    assert rows[4, :2].tolist() == [0, 9] and rows[4, 6] == -1  # SCALAR UINT64, all bits set
    assert rows[5, :4].tolist() == [3, 5, 1, 8 * 6 * 8]  # INOUT INT64


def test_calls_release_the_gil(packages):
    # Two chips sleeping 300 ms each in C, from two threads: overlapping only without the GIL.
    rts = [pto.Runtime(level="chip", platform="sim", device=d) for d in (0, 1)]
    try:
        for rt in rts:
            register_probes(rt, packages)
        threads = [threading.Thread(target=rt.run, args=("sleep_ms", [S(300)])) for rt in rts]
        start = time.perf_counter()
        for t in threads:
            t.start()
        ticks = 0
        while any(t.is_alive() for t in threads):
            ticks += 1  # the main thread keeps running Python meanwhile
            time.sleep(0.001)
        assert time.perf_counter() - start < 0.55
        assert ticks > 50
    finally:
        for rt in rts:
            rt.close()


# ---- errors --------------------------------------------------------------------------------


def test_kernel_failure_is_a_task_error_naming_kernel_and_chip(chip):
    with pytest.raises(pto.TaskError) as ei:
        chip.run("fail_with", args=[S(5)], block_dim=8)
    err = ei.value
    assert err.kernel == "fail_with" and err.chip == 3
    assert "chip 3" in str(err) and "fail_with" in str(err)
    assert "probe-3c1e: block 5 refused value 5" in str(err)
    chip.run("fail_with", args=[S(9)], block_dim=8)  # no block 9: passes, error state cleared


def test_orchestration_non_zero_return(orch_chip):
    with pytest.raises(pto.TaskError) as ei:
        orch_chip.run("returns_42", args=[])
    err = ei.value
    assert err.kernel == "returns_42" and err.chip == 3
    assert "returned 42" in str(err) and "orchs-9d2b" in str(err)


def test_orchestration_launching_an_unknown_kernel(orch_chip):
    with pytest.raises(pto.TaskError, match=r"unknown kernel 'no_such_kernel'.*where_am_i"):
        orch_chip.run("launches_unknown", args=[])


def test_failed_launch_fails_the_run_even_if_the_orchestration_ignores_it(orch_chip):
    with pytest.raises(pto.TaskError, match="returned 0 but a launch failed.*probe-3c1e"):
        orch_chip.run("ignores_failure", args=[S(-1)])


def test_launch_from_inside_a_kernel_is_refused(orch_chip):
    with pytest.raises(pto.TaskError, match=r"pto_launch\('launch_inside'\) called from inside"):
        orch_chip.run("nested_launch", args=[])


def test_non_contiguous_array(chip):
    x = np.arange(20, dtype=np.float32)
    z = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="not C-contiguous"):
        chip.run("add", args=[In(x[::2]), In(x[:10]), Out(z)])
    c = np.ones((3, 4), np.float32)
    f = np.asfortranarray(c)
    with pytest.raises(ValueError, match=r"argument 2 of 'add' \(output\) is not C-contiguous"):
        chip.run("add", args=[In(c), In(c), Out(f)])
    assert (f == 1).all()  # nothing was written


def test_read_only_array_as_output(chip):
    x = np.ones(4, np.float32)
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        chip.run("add", args=[In(x), In(x), Out(ro)])
    with pytest.raises(ValueError, match="read-only"):
        chip.run("vector_add", args=[In(x), In(x), InOut(ro), S(1.0)])
    out = np.zeros(4, np.float32)
    chip.run("add", args=[In(ro), In(x), Out(out)])  # read-only is fine as an input
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("dtype", [np.complex64, object, np.dtype(">f4"), "datetime64[s]"])
def test_unsupported_dtype(chip, dtype):
    x = np.zeros(4, dtype)
    with pytest.raises(TypeError, match="unsupported tensor dtype|not a numpy"):
        chip.run("add", args=[In(x), In(x), Out(x)])


@pytest.mark.parametrize("args, exc, text", [
    ([np.zeros(3)], TypeError, "not a pto.Arg"),
    ((pto.Arg.input(np.zeros(3)) for _ in range(1)), TypeError, "list of pto.Arg"),
    ([pto.Arg.input([1.0, 2.0])], TypeError, "must be a numpy array"),
    ([pto.Arg.scalar("2")], TypeError, "bool, int or float"),
    ([pto.Arg.scalar(2**64)], OverflowError, "64 bits"),
    ([pto.Arg.input(np.zeros((1,) * 9))], ValueError, "at most 8"),
])
def test_bad_arguments(chip, args, exc, text):
    with pytest.raises(exc, match=text):
        chip.run("describe", args=args)


def test_bad_names_and_block_dims(chip):
    with pytest.raises(KeyError, match="nothing registered as 'nope'"):
        chip.run("nope", args=[])
    with pytest.raises(ValueError, match="block_dim"):
        chip.run("add", args=[], block_dim=0)
    with pytest.raises(ValueError, match="picks its own block_dim"):
        chip.run("vector_add", args=[], block_dim=4)


def test_a_package_of_several_kernels_without_orchestration_is_refused_at_register(chip,
                                                                                  packages):
    # Even under the name of one of its kernels: that is no reason to pick it silently.
    for name in ("probe", "where_am_i"):
        with pytest.raises(ValueError, match="no orchestration and 7 kernels") as ei:
            chip.register(name, pkg=packages["probe"])
        hint = "pkg.kernel('where_am_i')" if name == "where_am_i" else "pkg.kernel("
        assert f"register({name!r}, pkg={hint}" in str(ei.value)
    with pytest.raises(ValueError, match="no orchestration and 2 kernels"):
        chip.register("two", kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"])


def test_a_registered_kernel_ref_launches_with_its_block_dim(chip, packages):
    chip.register("where", pkg=packages["probe"].kernel("where_am_i", block_dim=3))
    out = np.zeros((4, 6), np.int64)
    chip.run("where", args=[Out(out)])  # 3 blocks, as registered
    assert out[:3, 0].tolist() == [0, 1, 2] and out[:3, 1].tolist() == [3, 3, 3]
    assert out[3].tolist() == [0] * 6
    out[:] = 0
    chip.run("where", args=[Out(out)], block_dim=4)  # the run's block_dim wins
    assert out[:, 0].tolist() == [0, 1, 2, 3]


def test_kernel_name_in_several_packages_is_ambiguous(orch_chip):
    with pytest.raises(ValueError, match="several registered packages"):
        orch_chip.run("where_am_i", args=[])


# ---- registration and life ---------------------------------------------------------------------


def test_register_from_sources_and_run_by_kernel_name(tmp_path, monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    x = np.arange(6, dtype=np.int32)
    z = np.zeros_like(x)
    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        pkg = rt.register("vector_add", orch=VECTOR_ADD / "orch.c",
                          kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"])
        assert pkg.kernels == ("add", "scale") and pkg.orch == "pto_orchestrate"
        rt.run("vector_add", args=[In(x), In(x), Out(z), S(5)])
        np.testing.assert_array_equal(z, 10 * x)
        rt.register("just_matmul", kernels=[MATMUL])  # no orch, one kernel: runs by either name
        a = np.eye(3, dtype=np.float32)
        c = np.zeros((3, 3), np.float32)
        rt.run("just_matmul", args=[In(a), In(a), Out(c)])
        np.testing.assert_array_equal(c, a)
        rt.run("matmul", args=[In(a), In(2 * a), Out(c)], block_dim=2)
        np.testing.assert_array_equal(c, 2 * a)


def test_register_errors(chip, packages):
    with pytest.raises(ValueError, match="not both"):
        chip.register("x", pkg=packages["probe"], kernels=[MATMUL])
    with pytest.raises(TypeError, match="C source"):
        chip.register("x", orch=lambda ctx, args: None)
    with pytest.raises(TypeError, match="pto.compile"):
        chip.register("x", pkg="package.so")
    with pytest.raises(ValueError, match="needs orch"):
        chip.register("x")


def test_close(packages):
    rt = pto.Runtime(level="chip", platform="sim", device=0)
    register_probes(rt, packages)
    rt.run("where_am_i", args=[Out(np.zeros((4, 6), np.int64))], block_dim=4)  # starts threads
    rt.close()
    rt.close()
    with pytest.raises(pto.PtoError, match="closed"):
        rt.run("where_am_i", args=[])
    with pytest.raises(pto.PtoError, match="closed"):
        register_probes(rt, packages)


def test_core_threads_stop_on_close(packages):
    import psutil

    me = psutil.Process()
    before = me.num_threads()
    with pto.Runtime(level="chip", platform="sim", device=0, cores=6) as rt:
        register_probes(rt, packages)
        rt.run("where_am_i", args=[Out(np.zeros((6, 6), np.int64))], block_dim=6)
        assert me.num_threads() == before + 5  # the caller is the sixth core
    assert me.num_threads() == before
