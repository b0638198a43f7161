"""Prebuilt kernel objects in ``pto.compile``: ``.o``, ``.a``, ``.so`` files and object bytes,
built here by the system compiler, linked as they are (as kernels and as the
orchestration), hashed by their bytes (a rebuilt object is a new package), and every bad
input a CompileError naming file and symbol that leaves nothing in the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]

In, Out, InOut = pto.Arg.input, pto.Arg.output, pto.Arg.inout

VADD_C = r"""
#include <pto_kernel.h>
void vadd(const pto_arg *args, int32_t nargs) {          /* z = x + y (+ BIAS) */
    (void)nargs;
    const float *x = args[0].data, *y = args[1].data; float *z = args[2].data;
    int64_t n = args[2].nbytes / 4;
    for (int64_t i = n * pto_block_idx() / pto_block_num();
         i < n * (pto_block_idx() + 1) / pto_block_num(); i++) z[i] = x[i] + y[i] + BIAS;
}
"""
VSQUARE_C = r"""
#include <pto_kernel.h>
void vsquare(const pto_arg *args, int32_t nargs) {       /* w = z * z */
    (void)nargs;
    const float *z = args[0].data; float *w = args[1].data;
    for (int64_t i = 0; i < args[1].nbytes / 4; i++) w[i] = z[i] * z[i];
}
"""
ORCH_C = r"""
#include <pto_kernel.h>
/* args: x, y, z, w.  z = vadd(x, y) on 4 blocks, then w = vsquare(z). */
int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    if (nargs != 4) { pto_fail("want x, y, z, w; got %d", nargs); return PTO_ERR_INVALID; }
    int rc = pto_launch(chip, "vadd", args, 3, 4);
    if (rc != PTO_OK) return rc;
    pto_arg sq[2] = {args[2], args[3]};
    sq[0].kind = PTO_INPUT;
    return pto_launch(chip, "vsquare", sq, 2, 1);
}
"""


def cc(*args: str, cwd: Path) -> None:
    subprocess.run(["cc", "-O2", "-fPIC", "-I", pto.include_dir(), *args], cwd=cwd,
                   check=True, capture_output=True)


def build_vadd(d: Path, bias: str = "0.0f", out: str = "vadd.o") -> Path:
    (d / "vadd.c").write_text(VADD_C)
    cc(f"-DBIAS={bias}", "-c", "vadd.c", "-o", out, cwd=d)
    return d / out


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    (d / "vsquare.c").write_text(VSQUARE_C)
    (d / "orch.c").write_text(ORCH_C)
    return d


def entries(cache: Path) -> list[str]:
    """Everything in the cache's platform directory: entries and leftover temporaries."""
    sim = cache / "sim"
    return sorted(p.name for p in sim.iterdir()) if sim.exists() else []


def run_l2(pkg: pto.CompiledPackage, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    z, w = np.zeros_like(x), np.zeros_like(x)
    with pto.Runtime(level="chip", platform="sim", device=0) as rt:
        rt.register("pipeline", pkg=pkg)
        rt.run("pipeline", args=[In(x), In(y), Out(z), Out(w)])
    return z, w


X = np.arange(64, dtype=np.float32)
Y = np.full(64, 0.5, np.float32)


# ---- each kind of prebuilt input works -------------------------------------------------------


def test_an_object_file_beside_a_source_kernel_and_an_orchestration(cache, src):
    obj = build_vadd(src)
    pkg = pto.compile(kernels=[obj, src / "vsquare.c"], orch=src / "orch.c")
    assert pkg.kernels == ("vadd", "vsquare")
    z, w = run_l2(pkg, X, Y)
    np.testing.assert_array_equal(z, X + Y)
    np.testing.assert_array_equal(w, (X + Y) ** 2)


def test_object_bytes_a_static_archive_and_a_prebuilt_orchestration(cache, src):
    obj = build_vadd(src)
    cc("-c", "vsquare.c", "-o", "vsquare.o", cwd=src)
    cc("-c", "orch.c", "-o", "orch.o", cwd=src)
    subprocess.run(["ar", "rcs", "libkernels.a", "vadd.o", "vsquare.o"], cwd=src, check=True)
    by_bytes = pto.compile(kernels=[{"object": obj.read_bytes(), "name": "vadd"},
                                    {"source": src / "vsquare.o", "name": "vsquare"}],
                           orch=src / "orch.o")
    from_archive = pto.compile(kernels=[{"source": src / "libkernels.a", "name": "vadd"},
                                        {"source": src / "libkernels.a", "name": "vsquare"}],
                               orch={"object": (src / "orch.o").read_bytes(),
                                     "name": "pto_orchestrate"})
    assert by_bytes.sha256 != from_archive.sha256
    for pkg in (by_bytes, from_archive):
        z, w = run_l2(pkg, X, Y)
        np.testing.assert_array_equal(w, (X + Y) ** 2)


def test_a_shared_library_is_kept_in_the_package(cache, src):
    build_vadd(src, out="vadd.o")
    cc("-shared", "-Wl,-soname,libvadd.so.1", "vadd.o", "-o", "libvadd.so", cwd=src)
    pkg = pto.compile(kernels=[{"source": src / "libvadd.so", "name": "vadd"},
                               src / "vsquare.c"], orch=src / "orch.c")
    (src / "libvadd.so").unlink()  # the package holds its own copy, under the SONAME
    assert (Path(pkg.path).parent / "libvadd.so.1").is_file()
    code = ("import numpy as np, pto, sys\n"
            "pkg = pto.CompiledPackage(sys.argv[1], sys.argv[2], ('vadd', 'vsquare'), "
            "'pto_orchestrate')\n"
            "x = np.arange(8, dtype=np.float32); z, w = np.zeros_like(x), np.zeros_like(x)\n"
            "with pto.Runtime(level='chip', platform='sim') as rt:\n"
            "    rt.register('p', pkg=pkg)\n"
            "    rt.run('p', [pto.Arg.input(x), pto.Arg.input(x), pto.Arg.output(z), "
            "pto.Arg.output(w)])\n"
            "assert (w == (2 * x) ** 2).all(), w\n")
    # A fresh process: nothing of the library is loaded yet.
    subprocess.run([sys.executable, "-c", code, pkg.path, pkg.sha256], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


# ---- the cache key: bytes, not paths ------------------------------------------------------------


def test_an_object_rebuilt_at_the_same_path_is_a_new_package(cache, src):
    obj = build_vadd(src, bias="0.0f")
    first = pto.compile(kernels=[obj, src / "vsquare.c"], orch=src / "orch.c")
    assert pto.compile(kernels=[obj, src / "vsquare.c"], orch=src / "orch.c") == first
    build_vadd(src, bias="100.0f")  # new code, same path
    second = pto.compile(kernels=[obj, src / "vsquare.c"], orch=src / "orch.c")
    assert second.sha256 != first.sha256 and second.path != first.path
    np.testing.assert_array_equal(run_l2(first, X, Y)[0], X + Y)
    np.testing.assert_array_equal(run_l2(second, X, Y)[0], X + Y + 100)
    # The same object moved elsewhere is the same package: contents, not paths.
    moved = src / "elsewhere"
    moved.mkdir()
    os.rename(obj, moved / "vadd.o")
    again = pto.compile(kernels=[moved / "vadd.o", src / "vsquare.c"], orch=src / "orch.c")
    assert again.sha256 == second.sha256


def test_a_file_named_in_flags_is_hashed_by_its_bytes(cache, src):
    (src / "helper.c").write_text("float helper_bias(void) { return BIAS; }\n")
    (src / "uses.c").write_text("#include <pto_kernel.h>\nfloat helper_bias(void);\n"
                                "void uses(const pto_arg *a, int32_t n) { (void)n; "
                                "*(float *)a[0].data = helper_bias(); }\n")
    cc("-DBIAS=1.0f", "-c", "helper.c", "-o", "helper.o", cwd=src)
    first = pto.compile(kernels=[src / "uses.c"], flags=[str(src / "helper.o")])
    cc("-DBIAS=2.0f", "-c", "helper.c", "-o", "helper.o", cwd=src)
    second = pto.compile(kernels=[src / "uses.c"], flags=[str(src / "helper.o")])
    assert first.sha256 != second.sha256
    out = np.zeros(1, np.float32)
    with pto.Runtime(level="chip", platform="sim") as rt:
        rt.register("uses", pkg=second)
        rt.run("uses", [Out(out)])
    assert out[0] == 2.0


# ---- bad input: a clear error, nothing left in the cache ----------------------------------------


def test_a_missing_symbol_names_the_file_and_the_symbol(cache, src):
    obj = build_vadd(src)
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[{"source": obj, "name": "vsub"}])
    msg = str(ei.value)
    assert str(obj) in msg and "'vsub'" in msg and "vadd" in msg  # what it does define
    assert entries(cache) == []


def test_an_orchestration_object_without_its_symbol(cache, src):
    obj = build_vadd(src)
    with pytest.raises(pto.CompileError, match="orchestration 'pto_orchestrate'") as ei:
        pto.compile(kernels=[src / "vsquare.c"], orch=obj)
    assert str(obj) in str(ei.value)
    assert entries(cache) == []


def test_a_cxx_object_without_extern_c_gets_a_hint(cache, src):
    (src / "k.cpp").write_text("#include <pto_kernel.h>\n"
                               "void vk(const pto_arg *a, int n) { (void)a; (void)n; }\n")
    subprocess.run(["c++", "-fPIC", "-c", "k.cpp", "-o", "k.o", "-I", pto.include_dir()],
                   cwd=src, check=True, capture_output=True)
    with pytest.raises(pto.CompileError, match='extern "C"') as ei:
        pto.compile(kernels=[{"source": src / "k.o", "name": "vk"}])
    assert "_Z2vk" in str(ei.value) and str(src / "k.o") in str(ei.value)


@pytest.mark.parametrize("make, text", [
    (lambda d: (d / "bad.o").write_text("not an object\n"), "not an ELF object"),
    (lambda d: (d / "bad.o").write_bytes(b""), "not an ELF object"),
    (lambda d: (d / "bad.a").write_bytes(b"!<arch>\n"), "an empty archive"),
    (lambda d: (d / "bad.o").write_bytes(foreign(build_vadd(d).read_bytes())), "built for"),
    (lambda d: cc("vadd.c", "-shared", "-o", "bad.so", cwd=d) or (d / "bad.so").write_bytes(
        foreign((d / "bad.so").read_bytes())), "built for"),
])
def test_an_input_that_is_not_an_object_for_this_machine(cache, src, make, text):
    (src / "vadd.c").write_text(VADD_C.replace("BIAS", "0"))
    make(src)
    bad = next(p for p in src.iterdir() if p.stem == "bad")
    with pytest.raises(pto.CompileError, match=text) as ei:
        pto.compile(kernels=[{"source": bad, "name": "vadd"}])
    assert str(bad) in str(ei.value)
    assert entries(cache) == []


def test_an_executable_is_not_an_object(cache, src):
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["cc", "main.c", "-o", "main.o"], cwd=src, check=True)
    with pytest.raises(pto.CompileError, match="an executable, not a relocatable object"):
        pto.compile(kernels=[{"source": src / "main.o", "name": "main"}])


def foreign(elf: bytes) -> bytes:
    """The same ELF file claiming another CPU (e_machine 0x5a: a machine this is not)."""
    data = bytearray(elf)
    data[18:20] = (0x5A).to_bytes(2, "little" if data[5] == 1 else "big")
    return bytes(data)


def test_a_shared_library_that_cannot_be_loaded_names_file_and_symbol(cache, src):
    (src / "dep.c").write_text("float dep_value(void) { return 1; }\n")
    (src / "k.c").write_text("#include <pto_kernel.h>\nfloat dep_value(void);\n"
                             "void vk(const pto_arg *a, int32_t n) { (void)n; "
                             "*(float *)a[0].data = dep_value(); }\n")
    cc("-shared", "dep.c", "-o", "libdep.so", cwd=src)
    cc("-shared", "k.c", "-L.", "-ldep", "-o", "libk.so", cwd=src)
    (src / "libdep.so").unlink()  # libk.so now needs a library that is nowhere
    with pytest.raises(pto.CompileError, match="cannot be loaded") as ei:
        pto.compile(kernels=[{"source": src / "libk.so", "name": "vk"}])
    msg = str(ei.value)
    assert str(src / "libk.so") in msg and "'vk'" in msg and "libdep.so" in msg
    assert entries(cache) == []


def test_a_failed_link_leaves_no_cache_entry(cache, src):
    obj = build_vadd(src)
    # twice.c defines vadd a second time: both link, and the link fails.
    (src / "twice.c").write_text(VADD_C.replace("BIAS", "0") + "void twice(const pto_arg *a, "
                                 "int32_t n) { vadd(a, n); }\n")
    with pytest.raises(pto.CompileError, match="multiple definition of `vadd'"):
        pto.compile(kernels=[obj, src / "twice.c"])
    assert entries(cache) == []


def test_bytes_need_a_name(cache, src):
    with pytest.raises(ValueError, match="'name'"):
        pto.compile(kernels=[{"object": build_vadd(src).read_bytes()}])


# ---- concurrency -----------------------------------------------------------------------------


def test_four_processes_compiling_the_same_objects_leave_one_entry(cache, src):
    obj = build_vadd(src)
    code = ("import pto, sys\n"
            "pkg = pto.compile(kernels=[sys.argv[1], sys.argv[2]], orch=sys.argv[3])\n"
            "print(pkg.sha256)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(obj), str(src / "vsquare.c"),
                               str(src / "orch.c")], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    keys = {p.communicate(timeout=150)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(keys) == 1 and entries(cache) == sorted(keys)
