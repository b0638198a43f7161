"""The group barriers (``pto.wire.barrier``) of the tasks a broker dispatches as groups.

The scheduler decides when a group's barrier opens (at dispatch), is aborted (a member
failed, or its worker died) and goes (every member is done with it); this module only
turns those decisions into shared memory: ``/pto_<broker owner>_b<gid>``.
"""

from __future__ import annotations

from collections.abc import Iterable

from pto.wire import shm
from pto.wire.barrier import GroupBarrier


class Barriers:
    def __init__(self, owner: str):
        self.owner = owner  # the broker's segment owner id
        self._open: dict[int, GroupBarrier] = {}

    def open(self, gid: int, world: int) -> str:
        """The name of group task ``gid``'s barrier, created by its first member's dispatch."""
        barrier = self._open.get(gid)
        if barrier is None:
            barrier = self._open[gid] = GroupBarrier.create(
                shm.segment_name(self.owner, f"b{gid}"), world)
        return barrier.name

    def apply(self, aborts: Iterable[int], closes: Iterable[int]) -> None:
        """Abort, then remove, the barriers the scheduler named."""
        for gid in aborts:
            barrier = self._open.get(gid)
            if barrier is not None:
                barrier.abort()  # members waiting at it give up
        for gid in closes:
            barrier = self._open.pop(gid, None)
            if barrier is not None:
                barrier.close()
                barrier.unlink()

    def close_all(self) -> None:
        self.apply((), list(self._open))
        shm.unlink_owner(self.owner)  # and anything a crash between create and here left
