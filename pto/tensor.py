"""Tensors as the client sees them: handles onto shared-memory segments it owns.

A segment is unlinked exactly once, when the first of these happens *and* no submitted
task still uses it: ``handle.free()``, garbage collection of its last handle, or
``Runtime.close()``. Workers drop their cached mapping when the broker forwards the free.
"""

from __future__ import annotations

import itertools
import mmap
import threading
import weakref
from collections.abc import Callable
from math import prod
from typing import Any

import numpy as np

from . import shm
from .dtypes import dtype_code
from .errors import TensorFreed


class Segment:
    """One shared-memory segment of a runtime, with the count of unfinished tasks using it."""

    __slots__ = ("tid", "name", "nbytes", "mm", "buf", "users", "freed", "store", "__weakref__")

    def __init__(self, store: TensorStore, tid: int, nbytes: int):
        self.store = store
        self.tid = tid
        self.name = shm.segment_name(store.owner, tid)
        self.nbytes = nbytes
        self.mm: mmap.mmap | None = shm.create(self.name, nbytes)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8, count=nbytes)
        self.users = 0
        self.freed = False


class TensorStore:
    """Creates a runtime's segments and unlinks each exactly once."""

    def __init__(self, owner: str, lock: threading.RLock, notify_free: Callable[[int], None]):
        self.owner = owner
        self.lock = lock
        self._ids = itertools.count(1)
        self._live: dict[int, str] = {}  # tid -> name of every segment not yet unlinked
        self._notify_free = notify_free
        self.closed = False

    def create(self, nbytes: int) -> Segment:
        if self.closed:
            raise TensorFreed("the runtime is closed")
        seg = Segment(self, next(self._ids), nbytes)
        with self.lock:
            self._live[seg.tid] = seg.name
        weakref.finalize(seg, self._collect, seg.tid, seg.mm)
        return seg

    def free(self, seg: Segment) -> None:
        """Free now, or as soon as the tasks using it finish."""
        with self.lock:
            seg.freed = True
            if seg.users == 0:
                self._unlink(seg.tid)

    def release_use(self, seg: Segment) -> None:
        """A task using ``seg`` finished (caller holds the lock)."""
        seg.users -= 1
        if seg.users == 0 and seg.freed:
            self._unlink(seg.tid)

    def _collect(self, tid: int, mm: mmap.mmap) -> None:
        # Garbage collection of the last handle: tasks hold their segments, so none uses it.
        with self.lock:
            self._unlink(tid)
        try:
            mm.close()
        except BufferError:
            pass  # a numpy view from .numpy() still uses the mapping; it goes with the view

    def _unlink(self, tid: int) -> None:
        name = self._live.pop(tid, None)
        if name is not None:
            shm.unlink(name)
            if not self.closed:
                self._notify_free(tid)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for name in self._live.values():
                shm.unlink(name)
            self._live.clear()

    def live_names(self) -> list[str]:
        with self.lock:
            return list(self._live.values())


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
    >>> y.numpy()[:4]                           # zero-copy view, after the run
    >>> y.free()
    """

    __slots__ = ("_seg", "_offset", "shape", "dtype", "__weakref__")

    def __init__(self, seg: Segment, shape: tuple[int, ...], dtype: np.dtype, offset: int = 0):
        self._seg = seg
        self._offset = offset
        self.shape = shape
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    @property
    def name(self) -> str:
        """The shared-memory name of the segment (``/dev/shm/<name without slash>``)."""
        return self._seg.name

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
        """
        if not self._seg.store.closed:
            self._seg.store.free(self._seg)

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
        return f"TensorHandle({self.name}, shape={self.shape}, dtype={self.dtype}{state})"
