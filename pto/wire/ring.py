"""The layout of a worker's status segment, shared by the worker that writes it, its peers
that read its completion ring, and the broker that reads both after the worker dies
(``worker.completions`` has the flow).

int64 words: [running task gid or 0, last finished task gid, pid, ring slots], then the
ring: slot ``seq % RING_SLOTS`` holds the outcome of the worker's task number ``seq``.
"""

from __future__ import annotations

import mmap

import numpy as np

from .protocol import RING_SLOTS

WORDS = 4
SEGMENT_BYTES = 8 * (WORDS + RING_SLOTS)


def slot_value(seq: int, ok: bool) -> int:
    """What slot ``seq % RING_SLOTS`` holds once task ``seq`` ended (0 is an empty slot)."""
    return (seq + 1) * 2 + (0 if ok else 1)


def outcome_in(ring: np.ndarray, seq: int) -> bool | None:
    """Whether task ``seq`` of the ring's worker ended well (True), badly (False), or has
    not ended (None). Only valid while ``seq`` is within RING_SLOTS of the newest task
    sent to that worker, which the broker guarantees for every task still waited for."""
    value = int(ring[seq % RING_SLOTS])
    if value >> 1 != seq + 1:
        return None
    return not value & 1


def ring_of(mm: mmap.mmap) -> np.ndarray | None:
    """The ring in a mapped status segment (None if it is too short to hold one)."""
    if len(mm) < SEGMENT_BYTES:
        return None
    return np.frombuffer(mm, dtype=np.int64, offset=8 * WORDS, count=RING_SLOTS)
