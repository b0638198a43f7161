"""Scopes and the lifetime of tensors (issue 4).

Tensors allocated in ``ctx.scope()`` are intermediates: freed once their tasks finish and no
handle remains, and at the latest when the orchestration returns, unless returned. A loop
of 10,000 scoped 1 MiB intermediates keeps ``/dev/shm`` bounded. Dropped handles are freed
by garbage collection once no task needs them.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import pto

from ._util import SHM_DIR, owner_of, segments_of, shm_path, wait_gone

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


def times(x, out, k):
    out[:] = x * k


def accumulate(tmp, acc):
    acc += tmp


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


def copy(src, dst):
    dst[:] = src


def add(a, b, out):
    out[:] = a + b


KERNELS = {"times": times, "accumulate": accumulate, "fill": fill, "copy": copy, "add": add}
In, Out, InOut, S = pto.Arg.input, pto.Arg.output, pto.Arg.inout, pto.Arg.scalar


class ShmSampler:
    """Samples, in a thread, the total bytes of the /dev/shm files of one runtime (its
    tensors and the retired segments it keeps for reuse)."""

    def __init__(self, owner: str, interval: float = 0.002):
        bare = owner.split("_", 1)[1]  # "pto_<owner>" -> "<owner>"
        self.prefixes = (f"pto_{bare}_", f"ptocache_{bare}_")
        self.interval = interval
        self.peak = 0
        self.peak_files = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        total = files = 0
        with os.scandir(SHM_DIR) as it:
            for entry in it:
                if not entry.name.startswith(self.prefixes):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                total += max(st.st_size, st.st_blocks * 512)
                files += 1
        if total > self.peak:
            self.peak, self.peak_files = total, files
        self.samples += 1
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> ShmSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def runtime_owner(rt) -> str:
    """The segment-name prefix of ``rt`` (from a throw-away tensor)."""
    rt.register("_probe", orch=lambda ctx, args: ctx.alloc((1,), np.int8), kernels={})
    h = rt.run("_probe", args={})
    owner = owner_of(h)
    h.free()
    return owner


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_scoped_1mib_intermediates_keep_shm_below_64mib(rt4):
    iters = 10_000
    n = MIB // 8  # float64 elements in 1 MiB

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        acc = ctx.alloc(x.shape, x.dtype)
        for i in range(iters):
            with ctx.scope():
                tmp = ctx.alloc(x.shape, x.dtype)  # 1 MiB, dropped at the next iteration
                ctx.submit(i % 2, "times", [In(x), Out(tmp), S(i)])
                ctx.submit(2 + i % 2, "accumulate", [In(tmp), InOut(acc)])
        return acc

    rt4.register("scoped_loop", orch=orch, kernels=KERNELS)
    owner = runtime_owner(rt4)
    x = (np.arange(n) % 7).astype(np.float64)
    t0 = time.monotonic()
    with ShmSampler(owner) as sampler:
        acc = rt4.run("scoped_loop", args={"x": x})
        sampler.sample()
    wall = time.monotonic() - t0
    assert sampler.samples > 100, sampler.samples
    np.testing.assert_array_equal(acc.numpy(), x * (iters * (iters - 1) // 2))
    assert sampler.peak < 64 * MIB, (
        f"peak /dev/shm use {sampler.peak / MIB:.1f} MiB in {sampler.peak_files} files "
        f"({wall:.1f} s run)"
    )
    acc.free()
    assert wait_gone([shm_path(acc)]) == []


def test_a_scoped_loop_frees_intermediates_while_it_runs(rt4):
    """A shorter loop (not slow): 300 x 1 MiB scoped tensors, peak well under 300 MiB."""
    iters = 300
    n = MIB // 8

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        acc = ctx.alloc(x.shape, x.dtype)
        for i in range(iters):
            with ctx.scope():
                tmp = ctx.alloc(x.shape, x.dtype)
                ctx.submit(0, "times", [In(x), Out(tmp), S(i)])
                ctx.submit(1, "accumulate", [In(tmp), InOut(acc)])
        return acc

    rt4.register("scoped_short", orch=orch, kernels=KERNELS)
    owner = runtime_owner(rt4)
    x = np.ones(n)
    with ShmSampler(owner) as sampler:
        acc = rt4.run("scoped_short", args={"x": x})
    np.testing.assert_array_equal(acc.numpy(), np.full(n, iters * (iters - 1) // 2))
    assert sampler.peak < 64 * MIB, f"peak {sampler.peak / MIB:.1f} MiB"
    assert segments_of(owner) == {shm_path(acc).name}


def test_returned_scoped_tensors_survive_and_the_others_are_gone(rt4_module):
    kept_by_orch: list = []  # the orchestration keeps handles it does not return
    names: dict[str, list[str]] = {"gone": [], "kept": []}

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        ret_list, ret_dict = [], {}
        for i in range(6):
            with ctx.scope():
                a = ctx.alloc(x.shape, x.dtype)
                b = ctx.alloc(x.shape, x.dtype)
                ctx.submit(i % 4, "times", [In(x), Out(a), S(i)])
                ctx.submit((i + 1) % 4, "times", [In(a), Out(b), S(10)])
                kept_by_orch.append(a)  # not returned: must go anyway
                names["gone"].append(a.name)
                if i % 2:
                    ret_list.append(b)
                else:
                    ret_dict[i] = b
                names["kept"].append(b.name)
        with ctx.scope():  # nested scopes, a tuple in the return value
            with ctx.scope():
                inner = ctx.alloc(x.shape, x.dtype)
                ctx.submit(0, "copy", [In(x), Out(inner)])
            outer_only = ctx.alloc(x.shape, x.dtype)
            ctx.submit(1, "copy", [In(inner), Out(outer_only)])
            kept_by_orch.append(outer_only)
            names["gone"].append(outer_only.name)
        return {"list": ret_list, "dict": ret_dict, "nested": (inner,)}

    rt4_module.register("escape", orch=orch, kernels=KERNELS)
    x = np.arange(1000, dtype=np.float64)
    out = rt4_module.run("escape", args={"x": x})
    gc.collect()
    # returned: valid and right, although allocated in a scope
    for i, b in zip((1, 3, 5), out["list"], strict=True):
        np.testing.assert_array_equal(b.numpy(), x * i * 10)
    assert sorted(out["dict"]) == [0, 2, 4]
    for i, b in out["dict"].items():
        np.testing.assert_array_equal(b.numpy(), x * i * 10)
    np.testing.assert_array_equal(out["nested"][0].numpy(), x)
    for name in names["kept"]:
        assert shm_path(name).exists(), name
    # not returned: gone when the run ended, although the orchestration still holds them
    assert len(kept_by_orch) == 7
    still = [n for n in names["gone"] if shm_path(n).exists()]
    assert still == [], f"scoped tensors not returned survived the run: {still}"
    for h in kept_by_orch:
        with pytest.raises(pto.TensorFreed):
            h.numpy()
    # returned scoped handles stay usable as inputs of a later run
    def again(ctx, args):
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(2, "add", [In(args["a"]), In(args["b"]), Out(y)])
        return y

    rt4_module.register("escape_again", orch=again, kernels=KERNELS)
    y = rt4_module.run("escape_again", args={"a": out["list"][0], "b": out["dict"][0]})
    np.testing.assert_array_equal(y.numpy(), x * 10)
    kept_by_orch.clear()


def test_a_dropped_handle_is_freed_once_its_tasks_finish(rt4_module):
    """The orchestration drops its only handle to ``x`` while a task that reads x still
    waits (behind a 0.6 s task): x must outlive the handle until that task ran, then go."""
    names: list[str] = []

    def orch(ctx, args):
        gate = ctx.alloc((4,), np.float64)
        x = ctx.tensor(args["x"])
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "fill", [Out(gate), S(1.0), S(0.6)])
        ctx.submit(1, "add", [In(x), In(gate[0:1]), Out(y)])  # waits for gate
        names.append(x.name)
        del x
        return y

    rt4_module.register("drop", orch=orch, kernels=KERNELS)
    x = np.arange(16, dtype=np.float64)
    rt4_module.run("drop", args={"x": x}).free()  # warm-up
    names.clear()
    fut = rt4_module.submit("drop", args={"x": x})
    gc.collect()
    assert not fut.done()
    assert shm_path(names[0]).exists(), "a dropped tensor went while a task still needs it"
    y = fut.result(timeout=20)
    np.testing.assert_array_equal(y.numpy(), x + 1.0)
    assert wait_gone([shm_path(names[0])], timeout=5) == [], "dropped tensor not freed"


def test_gc_of_dropped_result_handles_frees_their_segments(rt4_module):
    def orch(ctx, args):
        outs = []
        for chip in ctx.peers():
            o = ctx.alloc((MIB // 8,), np.float64)
            ctx.submit(chip, "fill", [Out(o), S(chip), S(0.0)])
            outs.append(o)
        return outs

    rt4_module.register("results", orch=orch, kernels=KERNELS)
    outs = rt4_module.run("results", args={})
    paths = [shm_path(o) for o in outs]
    assert all(p.exists() for p in paths)
    keep = outs[2]
    del outs
    gone = [p for i, p in enumerate(paths) if i != 2]
    assert wait_gone(gone, timeout=5) == [], "dropped handles were not freed by GC"
    assert paths[2].exists()
    np.testing.assert_array_equal(keep.numpy(), np.full(MIB // 8, 2.0))
    # a view keeps its tensor alive
    view = keep[10:20]
    del keep
    gc.collect()
    assert paths[2].exists()
    np.testing.assert_array_equal(view.numpy(), np.full(10, 2.0))
    del view
    assert wait_gone([paths[2]], timeout=5) == []


def test_scope_begin_and_scope_end(rt4_module):
    names: list[str] = []

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        total = ctx.alloc(x.shape, x.dtype)
        for i in range(3):
            ctx.scope_begin()
            tmp = ctx.alloc(x.shape, x.dtype)
            names.append(tmp.name)
            ctx.submit(i, "times", [In(x), Out(tmp), S(i + 1)])
            ctx.submit(3, "accumulate", [In(tmp), InOut(total)])
            ctx.scope_end()
        after = ctx.alloc(x.shape, x.dtype)  # outside any scope: lives while referenced
        ctx.submit(0, "copy", [In(total), Out(after)])
        return total, after, tmp

    rt4_module.register("begin_end", orch=orch, kernels=KERNELS)
    x = np.arange(8, dtype=np.float64)
    total, after, last_tmp = rt4_module.run("begin_end", args={"x": x})
    np.testing.assert_array_equal(total.numpy(), x * 6)
    np.testing.assert_array_equal(after.numpy(), x * 6)
    np.testing.assert_array_equal(last_tmp.numpy(), x * 3)  # returned: escapes its scope
    assert [shm_path(n).exists() for n in names] == [False, False, True]


def test_scope_end_without_begin_raises_runtime_error(rt4_module):
    def orch(ctx, args):
        with ctx.scope():
            pass
        ctx.scope_end()

    def nested(ctx, args):
        ctx.scope_begin()
        ctx.scope_begin()
        ctx.scope_end()
        ctx.scope_end()
        ctx.scope_end()

    rt4_module.register("bad_scope", orch=orch, kernels=KERNELS)
    rt4_module.register("bad_scope_nested", orch=nested, kernels=KERNELS)
    with pytest.raises(RuntimeError):
        rt4_module.run("bad_scope", args={})
    with pytest.raises(RuntimeError):
        rt4_module.run("bad_scope_nested", args={})
