"""A compiled package as one L3 task: ``kernels={"compute": pkg}`` with an orchestration runs
that orchestration on the task's chip with the task's arguments (all its launches, with
their block_dim), alone or as the members of a group; its failures are TaskErrors naming
the registered kernel, the chip and the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
DATA = REPO / "tests" / "data" / "kernels"
PROBES = ("where_am_i", "fail_with")
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar

GROUP_C = r"""
#include <pto_kernel.h>
/* out[rank] = {rank, world, chip, blocks}: one row per member of the group. */
void stamp(const pto_arg *args, int32_t nargs) {
    (void)nargs;
    int64_t *row = (int64_t *)args[0].data + 4 * pto_rank();
    row[0] = pto_rank(); row[1] = pto_world(); row[2] = pto_chip_id(); row[3] = pto_block_num();
}
int pto_orchestrate(pto_chip *chip, const pto_arg *args, int32_t nargs) {
    int rc = pto_barrier();            /* every member reached its orchestration */
    if (rc != PTO_OK) return rc;
    return pto_launch(chip, "stamp", args, nargs, 1);
}
"""


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "group.c").write_text(GROUP_C)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        probe = [{"source": DATA / "probe.c", "name": k} for k in PROBES]
        return {
            "vector_add": pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                                      orch=VECTOR_ADD / "orch.c"),
            "group": pto.compile(kernels=[{"source": src / "group.c", "name": "stamp"}],
                                 orch=src / "group.c"),
            **{name: pto.compile(kernels=probe, orch={"source": DATA / "orchs.c", "name": name})
               for name in ("returns_42", "ignores_failure", "launches_unknown",
                            "many_launches")},
        }


def vector_add_on_every_chip(ctx, args):
    """z = (x + y) * alpha on each chip, each one task running the package's orchestration."""
    outs = []
    for chip in ctx.peers():
        x = ctx.tensor(args["x"] + chip)
        z = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, args["kernel"], [In(x), In(x), Out(z), S(3.0), S(4)])
        outs.append(z)
    return outs


def test_a_package_with_an_orchestration_runs_it_as_one_task_on_every_chip(rt4_module, pkgs):
    rt4_module.register("l3p_va", orch=vector_add_on_every_chip,
                 kernels={"compute": pkgs["vector_add"]})
    x = np.arange(1000, dtype=np.float32)
    outs = rt4_module.run("l3p_va", args={"x": x, "kernel": "compute"})
    for chip, z in enumerate(outs):
        np.testing.assert_array_equal(z.numpy(), (2 * (x + chip)) * 3)


def test_a_key_naming_one_of_its_kernels_still_runs_the_orchestration(rt4_module, pkgs):
    # "add" is also a kernel of the package: the orchestration (add, then scale) still runs.
    rt4_module.register("l3p_add", orch=vector_add_on_every_chip,
                        kernels={"add": pkgs["vector_add"]})
    x = np.arange(10, dtype=np.float64)
    outs = rt4_module.run("l3p_add", args={"x": x, "kernel": "add"})
    np.testing.assert_array_equal(outs[0].numpy(), 6 * x)  # (x + x) * 3, not x + x


def test_every_launch_of_the_orchestration_runs_with_its_block_dim(rt4_module, pkgs):
    def one(ctx, args):
        out = ctx.alloc((16, 6), np.int64)
        ctx.submit(2, "launches", [Out(out)])
        return out

    rt4_module.register("l3p_many", orch=one, kernels={"launches": pkgs["many_launches"]})
    out = rt4_module.run("l3p_many", args=None).numpy()
    assert out[:, 0].tolist() == list(range(16))  # its last launch: 16 blocks
    assert out[:, 1].tolist() == [16] * 16
    assert out[:, 4].tolist() == [2] * 16  # on the task's chip


@pytest.mark.parametrize("orch, text", [
    ("returns_42", "returned 42: orchs-9d2b: gave up before launching anything"),
    ("ignores_failure", "returned 0 but a launch failed with PTO_ERR_KERNEL: block"),
    ("launches_unknown", "PTO_ERR_UNKNOWN_KERNEL"),
])
def test_a_failing_orchestration_is_a_task_error_naming_kernel_chip_and_reason(rt4_module, pkgs,
                                                                             orch, text):
    def one(ctx, args):
        ctx.submit(1, "pipeline_step", [S(0)])

    rt4_module.register(f"l3p_{orch}", orch=one, kernels={"pipeline_step": pkgs[orch]})
    with pytest.raises(pto.TaskError) as ei:
        rt4_module.run(f"l3p_{orch}", args=None)
    err = ei.value
    assert err.kernel == "pipeline_step" and err.chip == 1
    assert text in err.reason and "C orchestration" in err.reason
    assert not isinstance(err, pto.WorkerLost)


def test_group_members_each_run_the_orchestration_as_their_rank(rt4_module, pkgs):
    def group(ctx, args):
        out = ctx.alloc((4, 4), np.int64)
        ctx.submit_group([3, 1, 0, 2], "step", [Out(out)])
        return out

    rt4_module.register("l3p_group", orch=group, kernels={"step": pkgs["group"]})
    out = rt4_module.run("l3p_group", args=None).numpy()
    assert out.tolist() == [[0, 4, 3, 1], [1, 4, 1, 1], [2, 4, 0, 1], [3, 4, 2, 1]]


def test_ambiguous_group_member_is_refused_at_register(rt1_module, tmp_path, monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    probe = pto.compile(kernels=[{"source": DATA / "probe.c", "name": k} for k in PROBES])

    def group(ctx, args):
        out = ctx.alloc((1, 6), np.int64)
        ctx.submit_group([0], "where_am_i", [Out(out)])
        return out

    with pytest.raises(ValueError, match="pkg.kernel\\('where_am_i'\\)"):
        rt1_module.register("l3p_bad_group", orch=group, kernels={"where_am_i": probe})
    rt1_module.register("l3p_good_group", orch=group,
                 kernels={"where_am_i": probe.kernel("where_am_i")})
    assert rt1_module.run("l3p_good_group", args=None).numpy().tolist() == [[0, 1, 0, 1, 0, 0]]
