"""A package's orchestration run as a task logs its launches (kernel, block_dim, result,
time.monotonic() start and end), as traces show them: only that call's launches, at most
LAUNCHES_KEPT of them with the rest counted."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import pto
from pto.chip.simlib import LAUNCHES_KEPT
from pto.chip.simtasks import package_kernel, package_orchestration
from pto.wire.args import ParamType

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
IN, OUT, SCALAR = ParamType.INPUT, ParamType.OUTPUT, ParamType.SCALAR

MANY_C = r"""
#include <pto_kernel.h>
void noop(const pto_arg *args, int32_t nargs) { (void)args; (void)nargs; }
void fails(const pto_arg *args, int32_t nargs) { (void)args; (void)nargs; pto_fail("no"); }
int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    int64_t n = args[0].scalar.i;
    for (int64_t i = 0; i < n; i++) pto_launch(chip, "noop", args, nargs, 1 + (int32_t)(i % 3));
    pto_launch(chip, "fails", args, nargs, 2);
    return 0;
}
"""


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "many.c").write_text(MANY_C)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {
            "vector_add": pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                                      orch=VECTOR_ADD / "orch.c"),
            "many": pto.compile(kernels=[{"source": src / "many.c", "name": k}
                                         for k in ("noop", "fails")], orch=src / "many.c"),
        }


def test_an_orchestration_call_logs_each_launch_with_its_blocks_and_times(pkgs):
    pkg = pkgs["vector_add"]
    orch = package_orchestration("compute", pkg.path, pkg.sha256, pkg.orch)
    x = np.arange(100, dtype=np.float32)
    z = np.zeros_like(x)
    before = time.monotonic()
    orch([x, x, z, 2.0, 3], [IN, IN, OUT, SCALAR, SCALAR])
    after = time.monotonic()
    np.testing.assert_array_equal(z, 4 * x)
    spans = orch.last_launches
    assert [(s.kernel, s.block_dim, s.rc) for s in spans] == [("add", 3, 0), ("scale", 3, 0)]
    assert before <= spans[0].start <= spans[0].end <= spans[1].start <= spans[1].end <= after
    assert orch.launches_dropped == 0


def test_launches_of_kernel_tasks_between_calls_are_not_kept(pkgs):
    pkg = pkgs["vector_add"]
    orch = package_orchestration("compute", pkg.path, pkg.sha256, pkg.orch)
    add = package_kernel("add", pkg.path, pkg.sha256, "add", 2)
    x = np.ones(8, np.float32)
    z = np.zeros_like(x)
    orch([x, x, z, 1.0], [IN, IN, OUT, SCALAR])
    for _ in range(3):
        add([x, x, z], [IN, IN, OUT])  # a kernel task on the same chip: not an orchestration's
    orch([x, x, z, 1.0], [IN, IN, OUT, SCALAR])
    assert [s.kernel for s in orch.last_launches] == ["add", "scale"]


def test_failed_launches_are_logged_and_beyond_the_limit_only_counted(pkgs):
    pkg = pkgs["many"]
    orch = package_orchestration("many", pkg.path, pkg.sha256, pkg.orch)
    with pytest.raises(RuntimeError, match="returned 0 but a launch failed"):
        orch([5], [SCALAR])
    assert [(s.kernel, s.block_dim, s.rc) for s in orch.last_launches] == [
        ("noop", 1, 0), ("noop", 2, 0), ("noop", 3, 0), ("noop", 1, 0), ("noop", 2, 0),
        ("fails", 2, -3)]
    n = LAUNCHES_KEPT + 900
    with pytest.raises(RuntimeError):
        orch([n], [SCALAR])
    assert len(orch.last_launches) == LAUNCHES_KEPT
    assert orch.launches_dropped == n + 1 - LAUNCHES_KEPT
