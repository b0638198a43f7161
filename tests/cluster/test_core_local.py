"""L4 without a cluster address: a local one-host Ray, shared by the runtimes of a process.

``pto.Runtime(level="cluster")`` with no ``cluster=`` and no ``RAY_ADDRESS`` starts Ray on
this machine with one host of ``len(devices)`` chips; two runtimes open at once share that
Ray connection, and it ends (no Ray process left) when the last of them closes.
"""

from __future__ import annotations

import numpy as np
import pytest

import pto

from .conftest import ray_processes, wait_until


def scaled(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[-1], "scale", [pto.Arg.input(x), pto.Arg.output(y),
                                          pto.Arg.scalar(args["factor"])])
    return y


def scale(x, y, factor):
    y[:] = x * factor


def twice(ctx, data):
    first = ctx.submit(0, "scaled", args={"x": data, "factor": 2.0})
    return ctx.submit(0, "scaled", args={"x": first, "factor": 3.0})


@pytest.fixture
def no_ray(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():  # a connection another module left must not be joined
        ray.shutdown()
    yield ray
    assert not wait_until(ray_processes), "the local Ray outlived its last runtime"


@pytest.mark.slow  # starts a Ray instance of its own
def test_a_local_one_host_ray_shared_by_two_runtimes_ends_with_the_last(no_ray):
    data = np.arange(6, dtype=np.float32)
    with pto.Runtime(level="cluster", devices=[0, 1], timeout=120) as first:
        assert first.hosts == [0] and first.chips(0) == [0, 1]
        first.register("scaled", orch=scaled, kernels={"scale": scale})
        first.register("twice", orch=twice)
        np.testing.assert_array_equal(first.run("twice", args=data), data * 6.0)
        stats = first.stats()["total"]
        assert stats["local_handoffs"] == 1 and stats["transfers"] == stats["bytes_in"] == 0
        second = pto.Runtime(level="cluster", timeout=120)  # joins the same Ray
        second.register("scaled", orch=scaled, kernels={"scale": scale})
        second.register("twice", orch=twice)
    assert no_ray.is_initialized(), "closing one runtime cut the other off"
    try:
        np.testing.assert_array_equal(second.run("twice", args=data), data * 6.0)
    finally:
        second.close()
    assert not no_ray.is_initialized()
