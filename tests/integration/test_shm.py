"""Tensors are named POSIX shared-memory segments: names, modes, lifetime, zero copy."""

from __future__ import annotations

import gc
import mmap
import os
import re
import stat

import numpy as np
import posix_ipc
import pytest

import pto

from ._util import owner_of, pto_segments, segments_of, shm_path, wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)

NAME_RE = re.compile(r"^/pto_[^/_]+(_[^/]+)+$")  # /pto_<owner>_<id>


def negate(x, y):
    y[:] = -x


def copy(x, y):
    y[:] = x


def make_pair(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[-1], "negate", [pto.Arg.input(x), pto.Arg.output(y)])
    return x, y


def make_one(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "negate", [pto.Arg.input(x), pto.Arg.output(y)])
    return y


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 4), np.float64), ((7,), np.int32), ((2, 3, 5), np.float32), ((16,), np.uint8)],
)
def test_handle_attributes(rt4_module, shape, dtype):
    rt4_module.register("shm_attrs", orch=make_pair, kernels={"negate": negate})
    data = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    x, y = rt4_module.run("shm_attrs", args={"x": data})
    for h in (x, y):
        assert isinstance(h, pto.TensorHandle)
        assert tuple(h.shape) == shape
        assert np.dtype(h.dtype) == np.dtype(dtype)
        assert h.nbytes == data.nbytes
        assert isinstance(h.name, str) and NAME_RE.match(h.name), h.name
        view = h.numpy()
        assert view.shape == shape and view.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(x.numpy(), data)
    np.testing.assert_array_equal(y.numpy(), -data)
    assert x.name != y.name
    # both segments belong to one runtime: same owner part
    assert owner_of(x) == owner_of(y)


def test_segment_exists_with_mode_0600_and_free_unlinks(rt4_module):
    rt4_module.register("shm_mode", orch=make_pair, kernels={"negate": negate})
    x, y = rt4_module.run("shm_mode", args={"x": np.arange(32, dtype=np.float32)})
    for h in (x, y):
        path = shm_path(h)
        assert path.exists(), path
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.getuid()
        assert st.st_size >= h.nbytes
    xp, yp = shm_path(x), shm_path(y)
    x.free()
    assert wait_gone([xp], timeout=5) == []
    assert yp.exists()  # freeing one handle leaves the other alone
    np.testing.assert_array_equal(y.numpy(), -np.arange(32, dtype=np.float32))
    y.free()
    assert wait_gone([yp], timeout=5) == []


def test_every_pto_segment_follows_the_naming_scheme(rt4_module):
    rt4_module.register("shm_names", orch=make_pair, kernels={"negate": negate})
    x, y = rt4_module.run("shm_names", args={"x": np.ones(4)})
    for seg in pto_segments():
        assert NAME_RE.match("/" + seg), seg


def test_garbage_collected_handle_unlinks_its_segment(rt4_module):
    rt4_module.register("shm_gc", orch=make_one, kernels={"negate": negate})
    y = rt4_module.run("shm_gc", args={"x": np.arange(100, dtype=np.int64)})
    np.testing.assert_array_equal(y.numpy(), -np.arange(100))
    path = shm_path(y)
    assert path.exists()
    del y
    gc.collect()
    assert wait_gone([path], timeout=5) == [], "dropped handle's segment was not unlinked"


def test_a_dropped_result_is_freed_without_a_cyclic_collection(rt4_module):
    """Nothing of the run (its future, its callbacks) keeps a returned handle alive."""
    rt4_module.register("shm_nocycle", orch=make_one, kernels={"negate": negate})
    gc.collect()
    gc.disable()
    try:
        y = rt4_module.run("shm_nocycle", args={"x": np.arange(1 << 18, dtype=np.int64)})
        path = shm_path(y)
        del y
        # no wait_gone: it collects garbage, which would hide a cycle
        assert wait_until(lambda: not path.exists(), timeout=5), \
            "the run kept its returned handle alive"
    finally:
        gc.enable()


def test_ctx_tensor_of_a_handle_returns_that_handle(rt4_module):
    """One orchestration serves numpy inputs (L3) and the handles an L4 run passes in."""

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        assert ctx.tensor(x) is x
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "negate", [pto.Arg.input(ctx.tensor(x)), pto.Arg.output(y)])
        return y

    rt4_module.register("shm_same", orch=orch, kernels={"negate": negate})
    y = rt4_module.run("shm_same", args={"x": np.arange(8.0)})
    np.testing.assert_array_equal(y.numpy(), -np.arange(8.0))

    other = pto.Runtime(level="host", devices=[0])
    try:
        other.register("one", orch=make_one, kernels={"negate": negate})
        theirs = other.run("one", args={"x": np.arange(4.0)})  # refused here, by name

        def uses_theirs(ctx, args):
            return ctx.tensor(theirs)

        rt4_module.register("shm_foreign", orch=uses_theirs, kernels={})
        with pytest.raises(ValueError, match="belongs to another runtime"):
            rt4_module.run("shm_foreign")
        theirs.free()
    finally:
        other.close()


def test_intermediate_tensors_do_not_outlive_the_run(rt4_module):
    """Tensors the orchestration made but did not return are reclaimed after the run."""

    def orch(ctx, args):
        x = ctx.tensor(args["x"])
        tmp = ctx.alloc(x.shape, x.dtype)
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(0, "negate", [pto.Arg.input(x), pto.Arg.output(tmp)])
        ctx.submit(1, "negate", [pto.Arg.input(tmp), pto.Arg.output(y)])
        return y

    rt4_module.register("shm_tmp", orch=orch, kernels={"negate": negate})
    gc.collect()
    before = pto_segments()
    y = rt4_module.run("shm_tmp", args={"x": np.arange(8.0)})
    np.testing.assert_array_equal(y.numpy(), np.arange(8.0))
    mine = shm_path(y).name
    owner = owner_of(mine)

    def ours() -> set[str]:
        gc.collect()
        return {s for s in pto_segments() - before if s.rsplit("_", 1)[0] == owner}

    assert wait_until(lambda: ours() == {mine}, timeout=5), f"leftover: {ours() - {mine}}"


def test_numpy_is_a_zero_copy_view_of_the_named_segment(rt4_module):
    rt4_module.register("shm_view", orch=make_one, kernels={"negate": negate})
    y = rt4_module.run("shm_view", args={"x": np.arange(16, dtype=np.float64)})
    shm = posix_ipc.SharedMemory(y.name)
    try:
        mm = mmap.mmap(shm.fd, y.nbytes)
    finally:
        shm.close_fd()
    try:
        raw = np.frombuffer(mm, dtype=np.float64, count=16)
        np.testing.assert_array_equal(raw, -np.arange(16, dtype=np.float64))
        view = y.numpy()
        raw2 = np.ndarray((16,), dtype=np.float64, buffer=mm)
        raw2[3] = 1234.5  # a write through the segment shows up in the handle's view
        assert view[3] == 1234.5
        assert y.numpy()[3] == 1234.5
        del raw, raw2, view
    finally:
        mm.close()


def test_client_writes_are_seen_by_kernels(rt4_module):
    """Bytes written into a segment after the workers started are visible to them."""

    def reuse(ctx, args):
        z = ctx.alloc(args["h"].shape, args["h"].dtype)
        ctx.submit(2, "copy", [pto.Arg.input(args["h"]), pto.Arg.output(z)])
        return z

    rt4_module.register("shm_make", orch=make_one, kernels={"negate": negate})
    rt4_module.register("shm_reuse", orch=reuse, kernels={"copy": copy})
    y = rt4_module.run("shm_make", args={"x": np.zeros(8, dtype=np.int32)})
    shm = posix_ipc.SharedMemory(y.name)
    try:
        mm = mmap.mmap(shm.fd, y.nbytes)
    finally:
        shm.close_fd()
    np.ndarray((8,), dtype=np.int32, buffer=mm)[:] = np.arange(8) * 11
    mm.close()
    z = rt4_module.run("shm_reuse", args={"h": y})
    np.testing.assert_array_equal(z.numpy(), np.arange(8) * 11)


def test_alloc_is_zero_filled_and_tensor_copies_its_source(rt4_module):
    def orch(ctx, args):
        src = args["x"]
        x = ctx.tensor(src)
        src[:] = -1  # the copy happened at ctx.tensor(); later changes are not seen
        z = ctx.alloc((5, 3), np.float32)
        return x, z

    rt4_module.register("shm_zero", orch=orch, kernels={"copy": copy})
    x, z = rt4_module.run("shm_zero", args={"x": np.arange(6, dtype=np.int16)})
    np.testing.assert_array_equal(x.numpy(), np.arange(6, dtype=np.int16))
    assert z.numpy().shape == (5, 3) and z.numpy().dtype == np.float32
    assert not z.numpy().any()


@pytest.mark.timeout(90)
def test_close_unlinks_every_segment():
    rt = pto.Runtime(level="host", platform="sim", devices=[0, 1])
    try:
        rt.register("shm_close", orch=make_pair, kernels={"negate": negate})
        handles = []
        for i in range(3):
            handles.extend(rt.run("shm_close", args={"x": np.full(64, float(i))}))
        paths = [shm_path(h) for h in handles]
        assert all(p.exists() for p in paths)
        owner = owner_of(handles[0])
    finally:
        rt.close()
    assert wait_gone(paths, timeout=5) == []
    assert not segments_of(owner)
    # handles of a closed runtime refuse to hand out views of unmapped memory
    with pytest.raises(pto.TensorFreed):
        handles[0].numpy()
    rt.close()  # idempotent


def test_reap_pid_removes_what_a_dead_child_left_and_nothing_else():
    """The broker's fallback for a worker killed before it said hello (shm.reap_pid)."""
    import subprocess
    import sys

    from pto.wire import shm

    code = ("import os; from pto.wire import shm; "
            "n = shm.segment_name(shm.new_owner(), 'status'); shm.create(n, 16); "
            "print(n, flush=True); os._exit(0)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    name = child.stdout.strip()
    path = shm_path(name)
    assert path.exists()
    mine = shm.segment_name(shm.new_owner(), "keep")
    shm.create(mine, 16)
    try:
        assert shm.reap_pid(shm.owner_pid(shm.owner_of(name))) == 1
        assert not path.exists()
        assert shm_path(mine).exists()
    finally:
        shm.unlink(mine)
