"""The client tensors a worker maps: each segment opened once, on first use, and kept
until its client frees it (or leaves); a task's arguments as numpy views of them.

``worker.loop`` asks for a task's arguments (``arg``) and passes on the broker's frees;
the broker tells it each client's owner id once (``Dispatch.clients``), from which a
tensor's segment name follows (``pto.wire.shm.segment_name``).
"""

from __future__ import annotations

import mmap

import numpy as np
import posix_ipc

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.args import ParamType
from pto.wire.dtypes import CODE_DTYPES


class Tensors:
    """Mapped segments by (client, tensor id), and each client's owner id."""

    def __init__(self) -> None:
        self.owners: dict[int, str] = {}
        self._maps: dict[tuple[int, int], tuple[mmap.mmap, np.ndarray]] = {}

    def learn(self, client: int, owner: str) -> None:
        """``client``'s segments are named for ``owner``."""
        self.owners[client] = owner

    def arg(self, client: int, a: P.ArgSpec) -> object:
        """A scalar as it is; a tensor range as a view (read-only for an input)."""
        if a.kind == ParamType.SCALAR:
            return a.scalar
        return view_of(a, self._segment(client, a.tensor))

    def _segment(self, client: int, tensor: int) -> np.ndarray:
        entry = self._maps.get((client, tensor))
        if entry is None:
            owner = self.owners.get(client)
            if owner is None:
                raise LookupError(f"unknown client {client}")
            name = shm.segment_name(owner, tensor)
            try:
                mm = shm.open_existing(name)
            except posix_ipc.ExistentialError:
                raise FileNotFoundError(f"tensor segment {name} does not exist (freed?)") from None
            entry = (mm, np.frombuffer(mm, dtype=np.uint8))
            self._maps[(client, tensor)] = entry
        return entry[1]

    def unmap(self, client: int, tensor: int) -> None:
        entry = self._maps.pop((client, tensor), None)
        if entry is not None:
            mm, arr = entry
            del arr, entry
            try:
                mm.close()
            except BufferError:
                pass  # a kernel kept a view: the mapping goes when that view does

    def forget(self, client: int) -> None:
        """The client is gone: unmap its tensors, forget its owner id."""
        for key in [k for k in self._maps if k[0] == client]:
            self.unmap(*key)
        self.owners.pop(client, None)

    def close(self) -> None:
        for key in list(self._maps):
            self.unmap(*key)


def view_of(a: P.ArgSpec, buf: np.ndarray) -> np.ndarray:
    """Tensor argument ``a`` as a view of its segment's bytes ``buf`` (read-only for an
    input); ValueError if its range is outside the segment. Live tasks and installed graph
    parts (``worker.graph``) build their views here."""
    if a.offset < 0 or a.nbytes < 0 or a.offset + a.nbytes > buf.nbytes:
        raise ValueError(f"argument range [{a.offset}, {a.offset + a.nbytes}) is outside "
                         f"tensor {a.tensor} of {buf.nbytes} bytes")
    view = buf[a.offset : a.offset + a.nbytes].view(CODE_DTYPES[a.dtype]).reshape(a.shape)
    if a.kind == ParamType.INPUT:
        view.flags.writeable = False
    return view
