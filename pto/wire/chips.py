"""How chips and host workers are numbered: one number line shared by the scheduler
(broker/), the workers, the client's orchestration and its traces.

Chips and host workers share one number line: chip ``c >= 0`` is a simulated chip; host
worker ``k`` (the ``k``-th process that runs ``ctx.submit_host`` sub-tasks) is chip
``host_chip(k) == -1 - k``. Host sub-tasks are submitted to ``HOST_QUEUE`` (-1), the one
queue every host worker takes from.
"""

from __future__ import annotations

HOST_QUEUE = -1  # the chip of a host sub-task: a queue any host worker takes from



def host_chip(k: int) -> int:
    """The chip number of host worker ``k`` (``k >= 0``)."""
    if k < 0:
        raise ValueError(f"host worker index must be >= 0, not {k}")
    return -1 - k


def is_host_chip(chip: int) -> bool:
    """Whether ``chip`` names a host worker (or the host queue) rather than a chip."""
    return chip < 0


def host_index(chip: int) -> int:
    """``k`` of the host worker numbered ``chip`` (the inverse of ``host_chip``)."""
    if chip >= 0:
        raise ValueError(f"chip {chip} is not a host worker")
    return -1 - chip


def chip_label(chip: int) -> str:
    """How logs and errors name a worker: ``chip 3`` or ``host worker 0``."""
    return f"chip {chip}" if chip >= 0 else f"host worker {host_index(chip)}"
