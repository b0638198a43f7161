"""The client's segment store alone (real shared memory, no broker): retiring, keeping
for reuse, and making room when /dev/shm is full."""

from __future__ import annotations

import os
import threading

import pytest

from pto.host.tensor import TensorStore
from pto.wire import shm
from pto.wire.errors import OutOfMemory

MIB = 1024 * 1024


@pytest.fixture
def store():
    notes: list[tuple[int, bool]] = []
    s = TensorStore(shm.new_owner(), threading.RLock(), lambda t, kept: notes.append((t, kept)))
    s.notes = notes
    yield s
    s.close()


def exists(name: str) -> bool:
    return os.path.exists(shm.SHM_DIR + name)


def test_small_segments_are_unlinked_and_large_ones_kept(store):
    small, big = store.create(4096), store.create(2 * MIB)
    store.release(small)
    store.release(big)
    assert not exists(small.name) and not exists(big.name)
    assert exists(shm.cache_name(store.owner, big.tensor_id)) and store.pooled == 2 * MIB
    assert store.notes == [(small.tensor_id, False), (big.tensor_id, True)]
    again = store.create(2 * MIB)
    assert again.tensor_id == big.tensor_id and exists(again.name) and store.pooled == 0
    assert store.create(3 * MIB).tensor_id != big.tensor_id  # another size: a new segment


def test_reuse_zeroes_unless_told_the_bytes_will_all_be_written(store):
    seg = store.create(MIB)
    seg.buf[:] = 9
    store.release(seg)
    zeroed = store.create(MIB)
    assert zeroed.tensor_id == seg.tensor_id and not zeroed.buf.any()
    zeroed.buf[:] = 9
    store.release(zeroed)
    raw = store.create(MIB, zero=False)
    assert raw.tensor_id == seg.tensor_id and raw.buf[0] == 9


def test_a_segment_viewed_here_is_not_kept(store):
    seg = store.create(MIB)
    view = seg.buf[10:20]
    store.release(seg)
    assert store.pooled == 0 and store.notes == [(seg.tensor_id, False)]
    assert view.size == 10  # still readable: the mapping goes with the view


def test_a_full_shm_drops_kept_segments_and_retries(store, monkeypatch):
    seg = store.create(2 * MIB)
    store.release(seg)
    kept = shm.cache_name(store.owner, seg.tensor_id)
    real_create, calls = shm.create, []

    def full_once(name, nbytes):
        calls.append(name)
        if len(calls) == 1:
            raise OutOfMemory("no room")
        return real_create(name, nbytes)

    monkeypatch.setattr(shm, "create", full_once)
    other = store.create(5 * MIB)
    assert len(calls) == 2 and exists(other.name)
    assert not exists(kept) and store.pooled == 0 and (seg.tensor_id, False) in store.notes


def test_out_of_memory_with_nothing_kept_is_raised(store, monkeypatch):
    def full(name, nbytes):
        raise OutOfMemory("no room")

    monkeypatch.setattr(shm, "create", full)
    with pytest.raises(OutOfMemory):
        store.create(2 * MIB)


def test_close_unlinks_live_and_kept_segments(store):
    live, kept = store.create(2 * MIB), store.create(2 * MIB)
    store.release(kept)
    names = [live.name, shm.cache_name(store.owner, kept.tensor_id)]
    assert all(map(exists, names))
    store.close()
    assert not any(map(exists, names))


def test_a_kept_segment_removed_behind_our_back_is_replaced(store):
    seg = store.create(2 * MIB)
    store.release(seg)
    os.unlink(shm.SHM_DIR + shm.cache_name(store.owner, seg.tensor_id))
    again = store.create(2 * MIB)
    assert again.tensor_id != seg.tensor_id and exists(again.name)
    assert store.notes[-1] == (seg.tensor_id, False)  # workers drop their mapping of the old one
