"""Tensors as the client sees them: handles onto shared-memory segments it owns.

A segment's release is requested by ``handle.free()``, by the garbage collection of its
last handle, by the end of a run for tensors allocated in a scope and not returned, or by
``Runtime.close()``; it is retired once that has happened *and* no submitted task uses
it any more. Bytes waiting only for tasks to finish are counted, so an orchestration
that allocates faster than tasks run is held back (``wait_for_room``) instead of filling
/dev/shm.

Retiring a large segment (``POOL_MIN_BYTES`` and up) keeps it, up to
``PTO_SEGMENT_POOL_BYTES`` in all, for the next ``alloc`` of the same size: on tmpfs,
allocating, zeroing and mapping fresh pages in every process costs far more than the
tasks' own work on them, and a kept segment stays mapped in every worker that used it.
A kept segment is renamed ``/ptocache_<owner>_<id>`` (its tensor name is gone, as after
an unlink), zeroed when reused, never kept while a numpy view of it is alive here, and
unlinked at the latest when the runtime closes (or by the broker's janitor if this
process dies). Other segments are unlinked, and workers drop their mapping when the
broker forwards the free.
"""

from __future__ import annotations

import itertools
import mmap
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from math import prod
from typing import Any

import numpy as np

from ..wire import config, shm
from ..wire.dtypes import dtype_code
from ..wire.errors import OutOfMemory, TensorFreed

POOL_MIN_BYTES = 1024 * 1024  # the smallest retired segment kept for reuse


class _Mapping:
    """A segment as this process maps it; outlives its tensor when kept for reuse."""

    __slots__ = ("tensor_id", "name", "nbytes", "mm", "buf")

    def __init__(self, tensor_id: int, name: str, nbytes: int, mm: mmap.mmap):
        self.tensor_id, self.name, self.nbytes, self.mm = tensor_id, name, nbytes, mm
        self.buf = np.frombuffer(mm, dtype=np.uint8, count=nbytes)

    def viewed(self) -> bool:
        # numpy views collapse their base to ``buf``: references beyond our attribute
        # (and getrefcount's argument) are views somebody may still read.
        return sys.getrefcount(self.buf) > 2


class Segment:
    """One tensor's shared-memory segment and the bookkeeping of its release."""

    __slots__ = ("tensor_id", "name", "nbytes", "mapping", "gen", "users", "handles", "released",
                 "freed", "store", "__weakref__")

    def __init__(self, store: TensorStore, mapping: _Mapping, gen: int):
        self.store = store
        self.mapping = mapping
        self.tensor_id = mapping.tensor_id
        self.name = mapping.name
        self.nbytes = mapping.nbytes
        self.gen = gen  # tells this tensor from later ones reusing its segment
        self.users = 0  # submitted tasks not yet finished
        self.handles = 0  # live TensorHandle objects
        self.released = False  # release requested: retire once users == 0
        self.freed = False  # released by the user or a scope: handles are unusable

    @property
    def buf(self) -> np.ndarray:
        return self.mapping.buf


class TensorStore:
    """Creates a runtime's segments, retires each exactly once, keeps some for reuse."""

    def __init__(self, owner: str, lock: threading.RLock,
                 notify_free: Callable[[int, bool], None], settings: config.Config | None = None):
        settings = settings or config.load()
        # Bytes of released tensors still waiting for their tasks before alloc() waits.
        self.release_backlog_bytes = settings.release_backlog_bytes
        self.pool_bytes = settings.segment_pool_bytes  # bytes of retired segments kept (0: none)
        self.owner = owner
        self.lock = lock
        self.room = threading.Condition(lock)
        self._ids = itertools.count(1)
        self._gens = itertools.count(1)
        self._live: dict[int, tuple[_Mapping, int]] = {}  # tensor_id -> (mapping, gen) in use
        self._pool: OrderedDict[int, _Mapping] = OrderedDict()  # kept, oldest first
        self.pooled = 0  # bytes in _pool
        self._notify_free = notify_free  # (tensor_id, kept): the broker and workers learn of it
        self.backlog = 0  # bytes released but still used by tasks
        self.closed = False

    def create(self, nbytes: int, zero: bool = True) -> Segment:
        """A segment of ``nbytes``: a kept one of that size (zeroed unless not ``zero``),
        or a new one (always zero)."""
        if self.closed:
            raise TensorFreed("the runtime is closed")
        mapping = self._reuse(nbytes)
        if mapping is not None:
            if zero:
                mapping.buf[:] = 0
        else:
            tensor_id = next(self._ids)
            name = shm.segment_name(self.owner, tensor_id)
            try:
                mm = shm.create(name, nbytes)
            except OutOfMemory:
                if not self._drain_pool():
                    raise
                mm = shm.create(name, nbytes)  # kept segments made room
            mapping = _Mapping(tensor_id, name, nbytes, mm)
        seg = Segment(self, mapping, next(self._gens))
        with self.lock:
            self._live[seg.tensor_id] = (mapping, seg.gen)
        weakref.finalize(seg, self._collect, seg.tensor_id, seg.gen)
        return seg

    def _reuse(self, nbytes: int) -> _Mapping | None:
        with self.lock:
            if nbytes < POOL_MIN_BYTES:
                return None
            tensor_id = next((t for t, m in self._pool.items() if m.nbytes == nbytes), None)
            if tensor_id is None:
                return None
            mapping = self._pool.pop(tensor_id)
            self.pooled -= nbytes
            name = shm.segment_name(self.owner, tensor_id)
            if not shm.rename(mapping.name, name):  # removed behind our back
                self._drop(tensor_id, mapping)
                return None  # make a new one
            mapping.name = name
            return mapping

    def release(self, seg: Segment, freed: bool = True) -> None:
        """Retire ``seg`` now, or as soon as the tasks using it finish."""
        with self.lock:
            seg.freed = seg.freed or freed
            if seg.released:
                return
            seg.released = True
            if seg.users == 0:
                self._retire(seg.tensor_id)
            else:
                self.backlog += seg.nbytes

    def use(self, segments: list[Segment]) -> None:
        """A task was submitted with these segments: they stay until ``release_use``."""
        with self.lock:
            for seg in segments:
                seg.users += 1

    def interrupt_waits(self) -> None:
        """Wake ``wait_for_room`` callers so they look at ``lost()`` again."""
        with self.lock:
            self.room.notify_all()

    def handle_gone(self, seg: Segment) -> None:
        with self.lock:
            seg.handles -= 1
            if seg.handles == 0:
                self.release(seg, freed=False)

    def release_use(self, seg: Segment) -> None:
        """A task using ``seg`` finished (caller holds the lock)."""
        seg.users -= 1
        if seg.users == 0 and seg.released:
            self.backlog -= seg.nbytes
            self._retire(seg.tensor_id)
            self.room.notify_all()

    def wait_for_room(self, lost: Callable[[], BaseException | None]) -> None:
        """Block while the release backlog is over its bound (tasks will shrink it)."""
        with self.lock:
            while self.backlog > self.release_backlog_bytes and not self.closed:
                error = lost()
                if error is not None:
                    raise error
                self.room.wait()  # notified as tasks end, and by interrupt_waits()

    def _collect(self, tensor_id: int, gen: int) -> None:
        # The segment object is gone, so no handle nor task refers to that tensor any more.
        with self.lock:
            entry = self._live.get(tensor_id)
            if entry is not None and entry[1] == gen:
                self._retire(tensor_id)

    def _retire(self, tensor_id: int) -> None:
        entry = self._live.pop(tensor_id, None)
        if entry is None:
            return
        mapping = entry[0]
        if (not self.closed and POOL_MIN_BYTES <= mapping.nbytes <= self.pool_bytes
                and not mapping.viewed()):
            kept = shm.cache_name(self.owner, tensor_id)
            if shm.rename(mapping.name, kept):
                mapping.name = kept
                self._pool[tensor_id] = mapping
                self.pooled += mapping.nbytes
                self._notify_free(tensor_id, True)
                while self.pooled > self.pool_bytes:
                    self._evict()
                return
        self._drop(tensor_id, mapping)

    def _evict(self) -> None:
        tensor_id, mapping = self._pool.popitem(last=False)
        self.pooled -= mapping.nbytes
        self._drop(tensor_id, mapping)

    def _drop(self, tensor_id: int, mapping: _Mapping) -> None:
        """Unlink a segment for good: workers unmap it when told, and so do we."""
        shm.unlink(mapping.name)
        if not self.closed:
            self._notify_free(tensor_id, False)
        _unmap(mapping)

    def _drain_pool(self) -> bool:
        """Unlink every kept segment (to make room); True if there was any."""
        with self.lock:
            had = bool(self._pool)
            while self._pool:
                self._evict()
            return had

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for mapping, _ in self._live.values():
                shm.unlink(mapping.name)
            self._live.clear()
            self._drain_pool()
            self.room.notify_all()

    def live_names(self) -> list[str]:
        with self.lock:
            return [mapping.name for mapping, _ in self._live.values()]


_NO_BYTES = np.empty(0, np.uint8)


def segment_of(handle: TensorHandle) -> Segment:
    """The segment a handle views (for the runtime's bookkeeping, not for users)."""
    return handle._seg


def usable_segment(handle: TensorHandle) -> Segment:
    """``segment_of(handle)``, or ``TensorFreed`` if the handle may no longer be used."""
    handle._check()
    return handle._seg


def _unmap(mapping: _Mapping) -> None:
    """Unmap now unless a numpy view still uses the mapping (then it goes with the view)."""
    mm = mapping.mm
    mapping.buf = _NO_BYTES  # our own export of the mapping must not keep it open
    try:
        mm.close()
    except BufferError:
        pass


def normalize_shape(shape: Any) -> tuple[int, ...]:
    """``5`` or ``(2, 3)`` -> a tuple of non-negative ints; TypeError/ValueError otherwise."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"shape must be an int or a sequence of ints, not {shape!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative dimensions: {shape!r}")
    return tuple(int(d) for d in dims)


class TensorHandle:
    """A tensor in shared memory that tasks can read and write.

    >>> y = ctx.alloc((1024,), np.float32)      # inside an orchestration
    >>> y.shape, y.dtype, y.nbytes, y.name
    ((1024,), dtype('float32'), 4096, '/pto_1234x9f3a_7')
    >>> top = y[:512]                           # a view: same segment, bytes 0..2047
    >>> y.numpy()[:4]                           # zero-copy view, after the run
    >>> y.free()
    """

    __slots__ = ("_seg", "_offset", "shape", "dtype", "_is_view", "__weakref__")

    def __init__(self, seg: Segment, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0,
                 is_view: bool = False):
        self._seg = seg
        self._offset = offset
        self.shape = shape
        self.dtype = dtype
        self._is_view = is_view
        with seg.store.lock:
            seg.handles += 1
        weakref.finalize(self, seg.store.handle_gone, seg)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    @property
    def size(self) -> int:
        """Bytes of the tensor, as the original runtime's ``TensorHandle.size``: ``nbytes``."""
        return self.nbytes

    @property
    def name(self) -> str:
        """The shared-memory name of the segment (``/dev/shm/<name without slash>``)."""
        return self._seg.name

    @property
    def offset(self) -> int:
        """Byte offset of this view in its segment (0 for a whole tensor)."""
        return self._offset

    @property
    def freed(self) -> bool:
        return self._seg.freed or self._seg.store.closed

    def numpy(self) -> np.ndarray:
        """A zero-copy numpy view of the tensor's bytes (valid while you hold it)."""
        self._check()
        raw = self._seg.buf[self._offset : self._offset + self.nbytes]
        return raw.view(self.dtype).reshape(self.shape)

    def free(self) -> None:
        """Release the tensor; its segment goes once no submitted task uses it.

        Freeing twice is harmless; using a freed handle raises ``pto.TensorFreed``.
        A view cannot be freed on its own: free the tensor it views.
        """
        if self._is_view:
            raise ValueError(f"{self!r} is a view: free the tensor it views")
        if not self._seg.store.closed:
            self._seg.store.release(self._seg)

    def __getitem__(self, key: Any) -> TensorHandle:
        """A view of a contiguous block along the first axis: ``h[2]``, ``h[a:b]``."""
        self._check()
        if isinstance(key, tuple) and len(key) == 1:
            key = key[0]
        if not self.shape:
            raise IndexError("a 0-d tensor cannot be indexed")
        rows = self.shape[0]
        row_bytes = prod(self.shape[1:]) * self.dtype.itemsize
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index = int(key) + (rows if key < 0 else 0)
            if not 0 <= index < rows:
                raise IndexError(f"index {key} is out of range for {rows} rows")
            return self._view(self.shape[1:], self._offset + index * row_bytes)
        if isinstance(key, slice):
            start, stop, step = key.indices(rows)
            if step != 1:
                raise ValueError("views must be contiguous: slices with a step are not supported")
            stop = max(start, stop)
            return self._view((stop - start, *self.shape[1:]), self._offset + start * row_bytes)
        raise TypeError(f"tensor views take an int or a slice on the first axis, not {key!r}")

    def reshape(self, *shape: Any) -> TensorHandle:
        """The same bytes with another shape (same number of elements)."""
        self._check()
        dims = normalize_shape(shape[0] if len(shape) == 1 else shape)
        if prod(dims) != prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} into {dims}")
        return self._view(dims, self._offset)

    def _view(self, shape: tuple[int, ...], offset: int) -> TensorHandle:
        return TensorHandle(self._seg, shape, self.dtype, offset, is_view=True)

    def _check(self) -> None:
        if self._seg.store.closed:
            raise TensorFreed(f"tensor {self.name} belongs to a closed runtime")
        if self._seg.freed:
            raise TensorFreed(f"tensor {self.name} was freed")

    @property
    def dtype_code(self) -> int:
        return dtype_code(self.dtype)

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        view = f" view@{self._offset}" if self._is_view else ""
        return f"TensorHandle({self.name}{view}, shape={self.shape}, dtype={self.dtype}{state})"
