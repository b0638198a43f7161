"""``pto.task()``: what a running kernel knows about its task."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    """The running task's place: ``rank`` of ``world`` members of its group, on ``chip``."""

    rank: int = 0
    world: int = 1
    chip: int = 0

    def barrier(self) -> None:
        """Wait for every member of the group; a task outside a group returns at once."""
        if self.world != 1:
            raise NotImplementedError("group barriers arrive with group tasks")


_current = threading.local()


def task() -> TaskInfo:
    """The task the calling kernel runs as (rank 0 of 1 outside a group).

    >>> def kernel(x, y):
    ...     info = pto.task()
    ...     y[:] = x + info.rank
    """
    info = getattr(_current, "info", None)
    if info is None:
        raise RuntimeError("pto.task() is only available inside a running kernel")
    return info


def set_current(info: TaskInfo | None) -> None:
    _current.info = info
