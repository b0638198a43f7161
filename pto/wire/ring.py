"""The layout of a worker's status segment, shared by the worker that writes it, its peers
that read its completion ring, and the broker that reads both after the worker dies
(``worker.completions`` has the flow).

int64 words: [running task gid or 0, last finished task gid, pid, ring slots], then the
ring: slot ``seq % RING_SLOTS`` holds the outcome of the worker's task number ``seq``.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

from .protocol import RING_SLOTS

WORDS = 4
SEGMENT_BYTES = 8 * (WORDS + RING_SLOTS)


def slot_value(seq: int, ok: bool) -> int:
    """What slot ``seq % RING_SLOTS`` holds once task ``seq`` ended (0 is an empty slot)."""
    return (seq + 1) * 2 + (0 if ok else 1)


def outcome_in(ring: Sequence[int], seq: int) -> bool | None:
    """Whether task ``seq`` of the ring's worker ended well (True), badly (False), or has
    not ended (None). Only valid while ``seq`` is within RING_SLOTS of the newest task
    sent to that worker, which the broker guarantees for every task still waited for."""
    value = int(ring[seq % RING_SLOTS])
    if value >> 1 != seq + 1:
        return None
    return not value & 1


def words_of(mm: mmap.mmap) -> memoryview:
    """The status words of a mapped status segment, as int64s (a memoryview, not numpy:
    the broker reads these and never needs numpy)."""
    return memoryview(mm)[:8 * WORDS].cast("q")


def ring_of(mm: mmap.mmap) -> memoryview | None:
    """The ring in a mapped status segment, as int64s (None if it is too short to hold one).
    Release the view (drop it) before closing ``mm``."""
    if len(mm) < SEGMENT_BYTES:
        return None
    return memoryview(mm)[8 * WORDS:SEGMENT_BYTES].cast("q")
