"""Closing is fast: an embedded runtime's close() (a broker stopping workers that never
connected: tests/unit/test_supervisor.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import pto


def double(x, y):
    y[:] = x * 2


def one_task(ctx, x):
    x = ctx.tensor(x)
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(0, "double", [pto.Arg.input(x), pto.Arg.output(y)])
    return y


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_close_of_an_embedded_runtime_takes_under_0_3s_at_p99():
    closes = []
    for i in range(100):
        rt = pto.Runtime(level="host", platform="sim", devices=[0])
        if i % 10 == 0:  # a runtime that ran something closes as fast
            rt.register("one_task", orch=one_task, kernels={"double": double})
            y = rt.run("one_task", np.ones(4, np.float32))
            assert (y.numpy() == 2).all()
            del y
        t0 = time.perf_counter()
        rt.close()
        closes.append(time.perf_counter() - t0)
    closes.sort()
    p99 = closes[98]
    assert p99 <= 0.3, f"close p99 {p99:.3f}s; slowest {closes[-5:]}"
