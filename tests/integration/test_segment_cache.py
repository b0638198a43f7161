"""Retired large segments are kept (as /dev/shm/ptocache_*) and reused by the next tensor
of the same size: zero-filled again, still mapped in the workers, never kept while a
numpy view of them lives, bounded, and gone when the runtime closes or its process dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pto
import pto.host.tensor

from ._util import REPO, read_line, shm_path, stop_process, wait_until

pytestmark = pytest.mark.timeout(60)

In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar
MIB = 1024 * 1024
N = 2 * MIB // 8  # float64 elements of a 2 MiB tensor: large enough to be kept


def sum_then_fill(x, seen, value):
    seen[0] = x.sum()  # what the tensor held when the task started: must be 0
    x[:] = value


def total(x, out):
    out[0] = x.sum()


def explode(x):
    x[:3] = 1.0
    raise RuntimeError("half-written")


KERNELS = {"sum_then_fill": sum_then_fill, "total": total, "explode": explode}


def cache_files(owner_name: str) -> set[str]:
    """The ptocache_ files of the runtime that owns tensor name ``owner_name``."""
    owner = owner_name.lstrip("/")[len("pto_"):].rsplit("_", 1)[0]
    return {f for f in os.listdir("/dev/shm") if f.startswith(f"ptocache_{owner}_")}


def handoff(ctx, args):
    """Chip 0 checks the new tensor is zero and fills it, chip 1 sums it."""
    data = ctx.alloc(N, np.float64)
    seen, out = ctx.alloc(1, np.float64), ctx.alloc(1, np.float64)
    ctx.submit(0, "sum_then_fill", [InOut(data), Out(seen), S(args["value"])])
    ctx.submit(1, "total", [In(data), Out(out)])
    args["names"].append(data.name)
    return seen, out


def test_a_retired_tensor_is_renamed_then_reused_zeroed_and_still_right(rt4):
    rt4.register("cache_handoff", orch=handoff, kernels=KERNELS)
    names: list[str] = []
    for value in (1.0, 2.0, 3.0, 4.0):
        seen, out = rt4.run("cache_handoff", {"value": value, "names": names})
        assert seen.numpy()[0] == 0.0, "a reused segment was not zeroed"
        assert out.numpy()[0] == value * N, "the consumer read stale or partial data"
        seen.free()
        out.free()
        # the tensor's own name is gone at once; its memory waits under a cache name
        assert wait_until(lambda: not shm_path(names[-1]).exists(), timeout=5)
        assert len(cache_files(names[-1])) == 1, cache_files(names[-1])
    assert len(set(names)) == 1, f"the segment was not reused: {names}"


def test_alloc_zero_false_leaves_a_reused_segment_as_it_was(rt4):
    """``alloc(zero=False)`` (a tensor about to be overwritten whole, as an L4 pull's
    destination) skips zeroing a reused segment; the default still zeroes it."""
    def fill_then_see(ctx, args):
        data = ctx.alloc(N, np.float64, zero=args["zero"])
        seen = ctx.alloc(1, np.float64)
        ctx.submit(0, "sum_then_fill", [InOut(data), Out(seen), S(args["value"])])
        args["names"].append(data.name)
        return seen

    rt4.register("cache_no_zero", orch=fill_then_see, kernels=KERNELS)
    names: list[str] = []
    rt4.run("cache_no_zero", {"zero": True, "value": 3.0, "names": names}).free()
    seen = rt4.run("cache_no_zero", {"zero": False, "value": 5.0, "names": names})
    assert seen.numpy()[0] == 3.0 * N, "zero=False zeroed the reused segment"
    seen.free()
    seen = rt4.run("cache_no_zero", {"zero": True, "value": 1.0, "names": names})
    assert seen.numpy()[0] == 0.0, "the default alloc did not zero the reused segment"
    seen.free()
    assert len(set(names)) == 1, f"the segment was not reused: {names}"


def test_a_tensor_with_a_live_numpy_view_is_unlinked_not_kept(rt4):
    def make(ctx, args):
        data = ctx.alloc(N, np.float64)
        seen = ctx.alloc(1, np.float64)
        ctx.submit(0, "sum_then_fill", [InOut(data), Out(seen), S(5.0)])
        return data

    rt4.register("cache_viewed", orch=make, kernels=KERNELS)
    data = rt4.run("cache_viewed")
    view = data.numpy()
    name = data.name
    data.free()
    assert not shm_path(name).exists()
    assert cache_files(name) == set(), "a segment still viewed here was kept for reuse"
    assert view[0] == 5.0 and view[-1] == 5.0  # the view keeps its bytes
    del view
    data2 = rt4.run("cache_viewed")
    assert data2.name != name
    data2.free()
    assert len(cache_files(name)) == 1


def test_a_failed_write_does_not_poison_the_next_tensor_on_that_segment(rt4):
    def fails(ctx, args):
        data = ctx.alloc(N, np.float64)
        ctx.submit(0, "explode", [Out(data)])
        args.append(data.name)

    def reads(ctx, args):
        data = ctx.alloc(N, np.float64)
        out = ctx.alloc(1, np.float64)
        ctx.submit(1, "total", [In(data), Out(out)])
        args.append(data.name)
        return out

    rt4.register("cache_fails", orch=fails, kernels=KERNELS)
    rt4.register("cache_reads", orch=reads, kernels=KERNELS)
    names: list[str] = []
    with pytest.raises(pto.TaskError, match="half-written"):
        rt4.run("cache_fails", names)
    assert wait_until(lambda: len(cache_files(names[0])) == 1, timeout=5)
    out = rt4.run("cache_reads", names)  # would fail "not run: task ... failed" if poisoned
    assert names[0] == names[1] and out.numpy()[0] == 0.0


def test_the_cache_is_bounded_and_unlinked_at_close(monkeypatch):
    monkeypatch.setenv("PTO_SEGMENT_POOL_BYTES", str(3 * MIB))  # read at start

    def five(ctx, args):
        return [ctx.alloc(MIB // 8, np.float64) for _ in range(5)]

    with pto.Runtime(level="host", platform="sim", devices=[0]) as rt:
        rt.register("cache_five", orch=five)
        handles = rt.run("cache_five")
        name = handles[0].name
        for h in handles:
            h.free()
        assert len(cache_files(name)) == 3, cache_files(name)
    assert cache_files(name) == set()


def test_no_cache_when_its_size_is_zero(monkeypatch):
    monkeypatch.setenv("PTO_SEGMENT_POOL_BYTES", "0")
    with pto.Runtime(level="host", platform="sim", devices=[0]) as rt:
        rt.register("cache_off", orch=lambda ctx, args: ctx.alloc(N, np.float64))
        h = rt.run("cache_off")
        name = h.name
        h.free()
        assert not shm_path(name).exists() and cache_files(name) == set()


KEEPER = textwrap.dedent(
    """
    import os, time, numpy as np, pto
    rt = pto.Runtime(level="host", platform="sim")
    rt.register("big", orch=lambda ctx, args: ctx.alloc(N, np.float64))
    h = rt.run("big")
    name = h.name
    h.free()
    print(name, flush=True)
    time.sleep(120)
    """
).replace("N,", f"{N},")


def test_a_killed_clients_cache_is_reclaimed_by_the_broker(broker):
    env = dict(os.environ, PTO_BROKER=broker.address)
    proc = subprocess.Popen([sys.executable, "-c", KEEPER], cwd=REPO, env=env,
                            stdout=subprocess.PIPE)
    try:
        name = read_line(proc, timeout=30).strip()
        assert len(cache_files(name)) == 1, cache_files(name)
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: not cache_files(name), timeout=10), (
            f"the broker's janitor left a dead client's kept segment: {cache_files(name)}")
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()
