"""pto.compile: the package cache (hit, miss, invalidation, concurrent builds), compile
errors, missing symbols, platforms, and the ABI shared between pto_kernel.h and Python."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import pto
from pto.chip.compiler import kernel_registration
from pto.chip.runner import load_sim_kernel, load_sim_orch
from pto.wire.args import ParamType
from pto.wire.dtypes import DTYPE_CODES, bfloat16

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

ADD_C = """\
#include <pto_kernel.h>
#include "common.h"
void add(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    const float *x = (const float *)args[0].data, *y = (const float *)args[1].data;
    float *z = (float *)args[2].data;
    for (int64_t i = 0; i < args[2].nbytes / 4; i++) z[i] = x[i] + y[i] + OFFSET;
}
"""
MUL_CPP = """\
#include <pto_kernel.h>
extern "C" void mul(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    const float *x = static_cast<const float *>(args[0].data);
    float *z = static_cast<float *>(args[1].data);
    float f = static_cast<float>(args[2].scalar.f);
    for (int64_t i = 0; i < args[1].nbytes / 4; i++) z[i] = x[i] * f;
}
"""


@pytest.fixture
def src(tmp_path) -> Path:
    """A source folder with add.c (including common.h) and mul.cpp."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "add.c").write_text(ADD_C)
    (d / "common.h").write_text("#define OFFSET 0.0f\n")
    (d / "mul.cpp").write_text(MUL_CPP)
    return d


def entries(cache: Path) -> list[Path]:
    sim = cache / "sim"
    return sorted(p for p in sim.iterdir()) if sim.exists() else []


def run_add(pkg: pto.CompiledPackage, x: np.ndarray) -> np.ndarray:
    z = np.zeros_like(x)
    load_sim_kernel("add", kernel_registration("add", pkg.kernel("add"))[1])(
        [x, x, z], [ParamType.INPUT, ParamType.INPUT, ParamType.OUTPUT])
    return z


# ---- building and the cache --------------------------------------------------------------


def test_compile_builds_a_package_with_c_and_cxx_kernels(cache, src):
    pkg = pto.compile(platform="sim", kernels=[src / "add.c", {"source": str(src / "mul.cpp"),
                                                                 "name": "mul"}])
    assert pkg.kernels == ("add", "mul")
    assert pkg.orch is None
    assert re.fullmatch(r"[0-9a-f]{64}", pkg.sha256)
    assert Path(pkg.path).is_file() and Path(pkg.path).parent.parent == cache / "sim"
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(run_add(pkg, x), 2 * x)
    z = np.zeros_like(x)
    load_sim_kernel("mul", kernel_registration("mul", pkg.kernel("mul"))[1])(
        [x, z, 2.5], [ParamType.INPUT, ParamType.OUTPUT, ParamType.SCALAR])
    np.testing.assert_array_equal(z, x * 2.5)


def test_second_compile_is_a_cache_hit(cache, src):
    first = pto.compile(kernels=[src / "add.c"])
    built = os.stat(first.path)
    start = time.perf_counter()
    second = pto.compile(kernels=[src / "add.c"])
    assert time.perf_counter() - start < 2.0
    assert second == first
    again = os.stat(second.path)
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # not rebuilt
    assert len(entries(cache)) == 1


def test_cache_key_ignores_where_the_sources_live(cache, src, tmp_path):
    moved = tmp_path / "moved"
    src.rename(moved)
    a = pto.compile(kernels=[moved / "add.c"])
    moved.rename(src)
    b = pto.compile(kernels=[src / "add.c"])
    assert a.sha256 == b.sha256
    assert len(entries(cache)) == 1


@pytest.mark.parametrize("change", ["source", "header", "flags", "name", "orch"])
def test_cache_misses_when_an_input_changes(cache, src, change):
    base = pto.compile(kernels=[src / "add.c"])
    x = np.arange(4, dtype=np.float32)
    kernels, flags, orch = [src / "add.c"], (), None
    if change == "source":
        (src / "add.c").write_text(ADD_C + "\n/* edited */\n")
    elif change == "header":
        (src / "common.h").write_text("#define OFFSET 100.0f\n")
    elif change == "flags":
        flags = ("-O1",)
    elif change == "name":
        kernels = [{"source": src / "add.c", "name": "add"}, src / "mul.cpp"]
    elif change == "orch":
        (src / "orch.c").write_text("#include <pto_kernel.h>\nint pto_orchestrate(pto_chip *c, "
                                    "const pto_arg *a, int32_t n) { return pto_launch(c, \"add\", "
                                    "a, n, 1); }\n")
        orch = src / "orch.c"
    pkg = pto.compile(kernels=kernels, flags=flags, orch=orch)
    assert pkg.sha256 != base.sha256
    assert len(entries(cache)) == 2
    if change == "header":  # the new header is really compiled in
        np.testing.assert_array_equal(run_add(pkg, x), 2 * x + 100)
        np.testing.assert_array_equal(run_add(base, x), 2 * x)


def test_header_found_through_an_include_flag_is_part_of_the_key(cache, src, tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "offset.h").write_text("#define OFFSET 1.0f\n")
    (src / "common.h").write_text('#include <offset.h>\n')
    flags = ["-I", str(inc)]
    a = pto.compile(kernels=[src / "add.c"], flags=flags)
    (inc / "offset.h").write_text("#define OFFSET 2.0f\n")
    b = pto.compile(kernels=[src / "add.c"], flags=flags)
    assert a.sha256 != b.sha256
    x = np.zeros(3, np.float32)
    np.testing.assert_array_equal(run_add(b, x), np.full(3, 2.0, np.float32))


def test_cache_misses_when_pto_kernel_h_changes(cache, src, tmp_path, monkeypatch):
    from pto.chip import compiler

    include = tmp_path / "include"
    include.mkdir()
    header = include / "pto_kernel.h"
    header.write_text((Path(pto.include_dir()) / "pto_kernel.h").read_text())
    monkeypatch.setattr(compiler, "_INCLUDE_DIR", include)
    a = pto.compile(kernels=[src / "add.c"])
    header.write_text(header.read_text() + "\n/* a new comment */\n")
    b = pto.compile(kernels=[src / "add.c"])
    assert a.sha256 != b.sha256


def test_entry_holds_library_manifest_and_log_only(cache, src):
    pkg = pto.compile(kernels=[src / "add.c"])
    names = {p.name for p in Path(pkg.path).parent.iterdir()}
    assert names == {"package.so", "package.json", "build.log", "pto_sim_table.c"}
    manifest = json.loads((Path(pkg.path).parent / "package.json").read_text())
    assert manifest["sha256"] == pkg.sha256 and manifest["kernels"] == ["add"]
    assert oct(os.stat(Path(pkg.path).parent).st_mode & 0o777) == "0o700"


CONCURRENT = """
import os, sys, time
import pto
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.001)
pkg = pto.compile(kernels=[sys.argv[2]], orch=sys.argv[3], flags=["-O2", "-DPROCS=4"])
print(pkg.sha256, pkg.path)
"""


def test_four_processes_compiling_at_once_all_succeed_with_one_entry(cache, src, tmp_path):
    (src / "orch.c").write_text("#include <pto_kernel.h>\nint pto_orchestrate(pto_chip *c, "
                                "const pto_arg *a, int32_t n) { return pto_launch(c, \"add\", a, "
                                "n, 2); }\n")
    go = tmp_path / "go"
    env = {**os.environ, "PTO_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(go), str(src / "add.c"),
                               str(src / "orch.c")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    time.sleep(0.5)  # let all four start and wait at the gate
    go.touch()
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = {tuple(out.split()) for out, _ in outs}
    assert len(results) == 1  # one key, one path
    (sha, path), = results
    assert [p.name for p in entries(cache)] == [sha]  # one entry, no temporary dirs left
    x = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(run_add(pto.compile(
        kernels=[src / "add.c"], orch=src / "orch.c", flags=["-O2", "-DPROCS=4"]), x), 2 * x)
    assert Path(path).is_file()


# ---- errors --------------------------------------------------------------------------------


def test_compile_error_carries_compiler_output_with_file_and_line(cache, tmp_path):
    bad = tmp_path / "broken_kernel.c"
    bad.write_text("#include <pto_kernel.h>\nvoid broken_kernel(const pto_arg *a, int32_t n) {\n"
                   "    int x = ;\n}\n")
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[bad])
    err = ei.value
    assert isinstance(err, pto.PtoError)
    assert "broken_kernel.c:3:" in str(err)
    assert "error" in str(err)
    assert "broken_kernel.c:3:" in err.stderr
    assert err.command and str(bad) in err.command
    assert entries(cache) == [] or not any(p.name.startswith(".tmp") for p in entries(cache))


def test_compile_error_in_a_header(cache, tmp_path):
    (tmp_path / "k.c").write_text('#include "missing_header_x.h"\nvoid k(void) {}\n')
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[tmp_path / "k.c"])
    assert "missing_header_x.h" in str(ei.value) and "k.c:1" in str(ei.value)


def test_missing_kernel_symbol_is_named(cache, tmp_path):
    (tmp_path / "mul.c").write_text("#include <pto_kernel.h>\n"
                                    "void multiply(const pto_arg *a, int32_t n) {}\n")
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[tmp_path / "mul.c"])
    msg = str(ei.value)
    assert "missing symbol" in msg and "kernel 'mul'" in msg and "mul.c" in msg


def test_missing_cxx_symbol_hints_at_extern_c(cache, tmp_path):
    (tmp_path / "scale.cpp").write_text("#include <cstdint>\nstruct pto_arg;\n"
                                        "void scale(const pto_arg *, int32_t) {}\n")
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[tmp_path / "scale.cpp"])
    assert "kernel 'scale'" in str(ei.value) and 'extern "C"' in str(ei.value)


def test_missing_orchestration_symbol_is_named(cache, src, tmp_path):
    (tmp_path / "orch.c").write_text("#include <pto_kernel.h>\nint orchestrate(pto_chip *c, "
                                     "const pto_arg *a, int32_t n) { return 0; }\n")
    with pytest.raises(pto.CompileError) as ei:
        pto.compile(kernels=[src / "add.c"], orch=tmp_path / "orch.c")
    assert "orchestration 'pto_orchestrate'" in str(ei.value)
    pkg = pto.compile(kernels=[src / "add.c"], orch={"source": tmp_path / "orch.c",
                                                      "name": "orchestrate"})
    assert pkg.orch == "orchestrate"


@pytest.mark.parametrize("platform", ["a2a3", "a5"])
def test_hardware_platforms_need_ascend(cache, src, platform):
    with pytest.raises(ValueError, match="Ascend hardware") as ei:
        pto.compile(platform=platform, kernels=[src / "add.c"])
    assert platform in str(ei.value) and "sim" in str(ei.value)
    with pytest.raises(ValueError, match="Ascend"):
        pto.Runtime(level="chip", platform=platform)


def test_unknown_platform(cache, src):
    with pytest.raises(ValueError, match="unknown platform 'gpu'"):
        pto.compile(platform="gpu", kernels=[src / "add.c"])


@pytest.mark.parametrize("kernels, exc, text", [
    (["does_not_exist.c"], FileNotFoundError, "not found"),
    (["notes.txt"], ValueError, "C (.c) or C++"),
    ([{"source": "add.c", "name": "not an identifier"}], ValueError, "not a C identifier"),
    ([{"source": "add.c", "name": "pto_add"}], ValueError, "reserved"),
    ([{"source": "add.c", "symbol": "add"}], ValueError, "'source' (a path) or 'object'"),
    ([{"source": "add.c", "object": b"", "name": "add"}], ValueError, "'source' (a path) or"),
    ([{"source": b"\x7fELF", "name": "add"}], ValueError, "{'object': bytes, 'name'"),
    ([{"object": b"\x7fELF"}], ValueError, "{'object': bytes, 'name'"),
    (["missing.o"], FileNotFoundError, "kernel object not found"),
    (["add.c", {"source": "mul.cpp", "name": "add"}], ValueError, "two kernels are named 'add'"),
    ([42], TypeError, "a path (a source, or a .o/.a/.so object)"),
    ([], ValueError, "at least one kernel"),
])
def test_bad_kernel_specs(cache, src, monkeypatch, kernels, exc, text):
    monkeypatch.chdir(src)
    (src / "notes.txt").write_text("")
    with pytest.raises(exc, match=re.escape(text)):
        pto.compile(kernels=kernels)


def test_flags_must_be_a_list_of_strings(cache, src):
    with pytest.raises(TypeError, match="list of strings"):
        pto.compile(kernels=[src / "add.c"], flags="-O3")


def test_no_compiler(cache, src, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-9f1")
    with pytest.raises(pto.CompileError, match="no-such-cc-9f1"):
        pto.compile(kernels=[src / "add.c"])


# ---- the seam with L3 ----------------------------------------------------------------------


def test_kernel_registration(cache, src):
    pkg = pto.compile(kernels=[src / "add.c", src / "mul.cpp"])
    kind, blob = kernel_registration("add", pkg.kernel("add"))
    assert kind == "sim"
    spec = json.loads(blob)
    assert spec == {"path": pkg.path, "sha256": pkg.sha256, "symbol": "add", "block_dim": 1}
    kind, blob = kernel_registration("times", pkg.kernel("mul", block_dim=4))
    assert json.loads(blob)["symbol"] == "mul" and json.loads(blob)["block_dim"] == 4
    # Two kernels, no orchestration: ambiguous, even under the name of one of its kernels.
    for name in ("add", "compute"):
        with pytest.raises(ValueError, match=r"no orchestration and 2 kernels \(add, mul\)") as ei:
            kernel_registration(name, pkg)
        assert "pkg.kernel(" in str(ei.value) and f"kernels={{'{name}': " in str(ei.value)
    with pytest.raises(ValueError, match="no kernel 'sub'"):
        pkg.kernel("sub")
    with pytest.raises(ValueError, match="block_dim"):
        pkg.kernel("add", block_dim=0)
    for bad in (42, "add.c", None, np.zeros(2)):
        with pytest.raises(TypeError, match="must be callable or a compiled package"):
            kernel_registration("add", bad)


def test_a_lone_kernel_stands_for_its_package_and_an_orchestration_for_everything(cache, src):
    alone = pto.compile(kernels=[src / "add.c"])
    kind, blob = kernel_registration("anything", alone)
    assert kind == "sim" and json.loads(blob)["symbol"] == "add"
    (src / "orch.c").write_text("#include <pto_kernel.h>\nint pto_orchestrate(pto_chip *c, "
                                "const pto_arg *a, int32_t n) { return pto_launch(c, \"add\", "
                                "a, n, 2); }\n")
    whole = pto.compile(kernels=[src / "add.c", src / "mul.cpp"], orch=src / "orch.c")
    kind, blob = kernel_registration("add", whole)  # the orchestration, not kernel 'add'
    assert kind == "sim-orch"
    assert json.loads(blob) == {"path": whole.path, "sha256": whole.sha256,
                                "orch": "pto_orchestrate"}
    assert kernel_registration("add", whole.kernel("add"))[0] == "sim"
    x = np.arange(4, dtype=np.float32)
    z = np.zeros_like(x)
    load_sim_orch("pipeline", blob)([x, x, z], [ParamType.INPUT, ParamType.INPUT,
                                                ParamType.OUTPUT])
    np.testing.assert_array_equal(z, 2 * x)


def test_loaded_kernel_reports_failure_and_missing_package(cache, tmp_path):
    (tmp_path / "fails.c").write_text('#include <pto_kernel.h>\nvoid fails(const pto_arg *a, '
                                      'int32_t n) { pto_fail("fails-5e0c %d", n); }\n')
    pkg = pto.compile(kernels=[tmp_path / "fails.c"])
    fn = load_sim_kernel("renamed", kernel_registration("fails", pkg)[1])
    with pytest.raises(RuntimeError, match="fails-5e0c 1") as ei:
        fn([3], [ParamType.SCALAR])
    assert "PTO_ERR_KERNEL" in str(ei.value) and "'fails'" in str(ei.value)
    gone = json.loads(kernel_registration("fails", pkg)[1])
    gone["sha256"] = "0" * 64
    gone["path"] = str(tmp_path / "nowhere" / "package.so")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sim_kernel("fails", json.dumps(gone).encode())


# ---- the ABI -------------------------------------------------------------------------------


def header_constants() -> dict[str, int]:
    text = (Path(pto.include_dir()) / "pto_kernel.h").read_text()
    return {name: int(value) for name, value in re.findall(r"\b(PTO_[A-Z0-9_]+) = (-?\d+)", text)}


def test_include_dir_holds_the_header():
    assert (Path(pto.include_dir()) / "pto_kernel.h").is_file()


def test_header_constants_match_python():
    consts = header_constants()
    for kind in ParamType:
        assert consts[f"PTO_{kind.name}"] == int(kind)
    for dtype, code in DTYPE_CODES.items():
        assert consts[f"PTO_{dtype.name.upper()}"] == code, dtype
    assert consts["PTO_BFLOAT16"] == pto.wire.dtypes.dtype_code(bfloat16) == 11


def test_header_compiles_standalone_as_strict_c_and_cxx(tmp_path):
    for lang, name, std in (("c", "t.c", "-std=c99"), ("c++", "t.cpp", "-std=c++11")):
        (tmp_path / name).write_text("#include <pto_kernel.h>\nint main(void) { return "
                                     "sizeof(pto_arg) == 104 ? 0 : 1; }\n")
        cmd = ["cc" if lang == "c" else "c++", std, "-Wall", "-Wextra", "-Wpedantic", "-Werror",
               "-I", pto.include_dir(), str(tmp_path / name), "-o", str(tmp_path / "t")]
        subprocess.run(cmd, check=True, capture_output=True)
        subprocess.run([str(tmp_path / "t")], check=True)


def test_package_data_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\s*"pto\.chip" = \[[^]]*"include/\*\.h"',
                     text)
    assert '"sim/*.c"' in text
