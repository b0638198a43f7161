"""``pto.task()``: what a running kernel knows about its task."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskInfo:
    """The running task's place: ``rank`` of ``world`` members of its group, on ``chip``.

    ``chip`` is negative for a host sub-task.
    """

    rank: int = 0
    world: int = 1
    chip: int = 0
    _barrier: Any = field(default=None, repr=False, compare=False)

    def barrier(self, timeout: float = 600.0) -> None:
        """Wait until every member of the group reaches this call (no-op outside a group).

        Raises ``pto.wire.barrier.BarrierAborted`` if another member failed, ``TimeoutError``
        after ``timeout`` seconds.
        """
        if self._barrier is not None:
            self._barrier.wait(timeout)


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
