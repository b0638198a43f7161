"""The simulated chip seen from the host (pto.chip.simlib): the group hook of pto_task_ctx
(rank, world, and the barrier that pto_barrier() calls), and argument packing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pto
from pto.chip.simlib import PTO_ERR_BARRIER, open_package, pack_args
from pto.wire.args import ParamType

pytestmark = pytest.mark.timeout(60)

PROBE = Path(__file__).resolve().parents[1] / "data" / "kernels" / "probe.c"
OUT = int(ParamType.OUTPUT)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PTO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        pkg = pto.compile(kernels=[{"source": PROBE, "name": "barrier_twice"},
                                   {"source": PROBE, "name": "where_am_i"}])
    return open_package(pkg.path, pkg.sha256)


@pytest.fixture
def chip(lib):
    chip = lib.new_chip(device=5, cores=2)
    yield chip
    chip.close()


def run_barrier_twice(chip, block_dim=1):
    out = np.full(4, -99, np.int64)
    rc = chip.run(b"barrier_twice", pack_args([out], [OUT], "barrier_twice"), block_dim)
    return rc, out.tolist()


def test_lone_task_is_rank_0_of_1_and_passes_barriers(chip):
    assert run_barrier_twice(chip) == (0, [0, 0, 0, 1])


def test_group_member_calls_the_host_barrier(chip):
    calls = []
    chip.set_task(2, 4, barrier=lambda: calls.append("wait"))
    assert run_barrier_twice(chip) == (0, [0, 0, 2, 4])
    assert calls == ["wait", "wait"]
    chip.set_task(0, 1)
    assert run_barrier_twice(chip) == (0, [0, 0, 0, 1])
    assert calls == ["wait", "wait"]  # a lone task never calls it


def test_failing_host_barrier_fails_the_launch_and_keeps_the_exception(chip):
    class Aborted(Exception):
        pass

    def abort():
        raise Aborted("member 3 failed")

    chip.set_task(1, 4, barrier=abort)
    rc, out = run_barrier_twice(chip)
    assert rc != 0 and out[:2] == [PTO_ERR_BARRIER, PTO_ERR_BARRIER]
    assert isinstance(chip.barrier_error, Aborted)
    assert "pto_barrier failed for rank 1 of 4" in chip.error_message()


def test_group_member_without_a_barrier_gets_an_error(chip):
    chip.set_task(1, 2)
    rc, out = run_barrier_twice(chip)
    assert rc != 0 and out[0] == -5  # PTO_ERR_UNSUPPORTED
    assert "no group barrier" in chip.error_message()


def test_group_barrier_needs_a_single_block_launch(chip):
    chip.set_task(0, 2, barrier=lambda: None)
    rc, out = run_barrier_twice(chip, block_dim=2)
    assert rc != 0
    assert "needs a launch of one block" in chip.error_message()


def test_pack_args_fields():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    argv = pack_args([x, 3, 2.5, True], [1, 0, 0, 0], "k")
    assert argv[0].data == x.ctypes.data and argv[0].nbytes == 48
    assert (argv[0].kind, argv[0].dtype, argv[0].ndim) == (1, 13, 2)
    assert list(argv[0].shape)[:2] == [2, 3]
    assert (argv[1].dtype, argv[1].scalar.i) == (5, 3)
    assert (argv[2].dtype, argv[2].scalar.f) == (13, 2.5)
    assert (argv[3].dtype, argv[3].scalar.i) == (1, 1)
    with pytest.raises(ValueError, match="unknown kind 99"):
        pack_args([x], [99], "k")
