"""The original runtime's own usage block (its pull request, in
../shared/reference/unified-runtime-pr.txt) runs as written: platform "sim" for "a2a3", and
its ``kernels=[...]`` filled in with two C kernels that ``orch.cpp``, a C++ orchestration,
launches. At L2 it runs on one chip; at L3 ``kernels={"compute": pkg}`` makes the whole
package one task, and the orchestration's result comes back from every chip."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(180)

REFERENCE = Path("/work/shared/reference/unified-runtime-pr.txt")

VINC_C = r"""
#include <pto_kernel.h>
void vinc(const pto_arg *args, int32_t nargs) {            /* y = x + 1, split over blocks */
    (void)nargs;
    const float *x = (const float *)args[0].data; float *y = (float *)args[1].data;
    int64_t n = args[1].nbytes / 4;
    for (int64_t i = n * pto_block_idx() / pto_block_num();
         i < n * (pto_block_idx() + 1) / pto_block_num(); i++) y[i] = x[i] + 1;
}
"""
VDOUBLE_C = r"""
#include <pto_kernel.h>
void vdouble(const pto_arg *args, int32_t nargs) {         /* y *= 2, in place */
    (void)nargs;
    float *y = (float *)args[0].data;
    int64_t n = args[0].nbytes / 4;
    for (int64_t i = n * pto_block_idx() / pto_block_num();
         i < n * (pto_block_idx() + 1) / pto_block_num(); i++) y[i] *= 2;
}
"""
ORCH_CPP = r"""
#include <pto_kernel.h>
// The L2 program: y = 2 * (x + 1), as two launches on the chip.
extern "C" int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    if (nargs != 2) { pto_fail("orch.cpp takes x, y; got %d arguments", nargs); return 1; }
    int rc = pto_launch(chip, "vinc", args, 2, 4);
    if (rc != PTO_OK) return rc;
    pto_arg inplace[1] = {args[1]};
    inplace[0].kind = PTO_INOUT;
    return pto_launch(chip, "vdouble", inplace, 1, 2);
}
"""


def usage_block() -> str:
    """The original's usage block, from ``import pto`` to its last ``rt.close()``."""
    text = REFERENCE.read_text()
    start = text.index("import pto\n")
    end = text.rindex("rt.close()", start, text.index("Test plan")) + len("rt.close()")
    return text[start:end] + "\n"


def as_here(block: str) -> str:
    """The only two changes: the platform, and the kernels the original elides as [...]."""
    block = block.replace('platform="a2a3"', 'platform="sim"')
    return block.replace("kernels=[...]", 'kernels=["vinc.c", "vdouble.c"]')


class _KeepRunResults(ast.NodeTransformer):
    """``rt.run(...)`` as a statement -> ``_results.append(_keep(rt.run(...)))``: the block's
    own code unchanged, its results observed before its ``rt.close()`` frees them."""

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        call = node.value
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "run"):
            keep = ast.Call(ast.Name("_keep", ast.Load()), [call], [])
            append = ast.Attribute(ast.Name("_results", ast.Load()), "append", ast.Load())
            return ast.copy_location(ast.Expr(ast.Call(append, [keep], [])), node)
        return node


def my_orch_func(ctx, args):
    """The L3 orchestration the block registers: the package as one task on every chip."""
    x = ctx.tensor(args["input"])
    outs = []
    for chip in ctx.peers():
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "compute", [pto.Arg.input(x), pto.Arg.output(y)])
        outs.append(y)
    return outs


def keep(value):
    if isinstance(value, list):
        return [v.numpy().copy() for v in value]
    return value


def test_the_reference_block_is_the_one_run_here():
    block = usage_block()
    assert block.count("pto.Runtime(") == 2 and 'kernels={"compute": pkg}' in block
    assert 'pkg = pto.compile(platform="a2a3", orch="orch.cpp", kernels=[...])' in block
    changed = [line for line in as_here(block).splitlines() if line not in block.splitlines()]
    assert all(re.search(r'platform="sim"|kernels=\["vinc.c", "vdouble.c"\]', line)
               for line in changed)


def test_the_original_usage_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "vinc.c").write_text(VINC_C)
    (tmp_path / "vdouble.c").write_text(VDOUBLE_C)
    (tmp_path / "orch.cpp").write_text(ORCH_CPP)
    x = np.linspace(-3, 3, 1000).astype(np.float32)
    y = np.zeros_like(x)
    data = np.arange(4096, dtype=np.float32)
    tree = ast.fix_missing_locations(_KeepRunResults().visit(ast.parse(as_here(usage_block()))))
    results: list = []
    scope = {"x": x, "y": y, "data": data, "my_orch_func": my_orch_func, "_keep": keep,
             "_results": results}
    exec(compile(tree, "unified-runtime-pr usage", "exec"), scope)  # noqa: S102
    l2_value, l3_outs = results
    assert l2_value is None
    np.testing.assert_array_equal(y, 2 * (x + 1))  # L2: written in place
    assert len(l3_outs) == 4  # L3: the orchestration's result from each of the 4 chips
    for out in l3_outs:
        np.testing.assert_array_equal(out, 2 * (data + 1))
    assert scope["pkg"].orch == "pto_orchestrate"
    assert scope["pkg"].kernels == ("vinc", "vdouble")
