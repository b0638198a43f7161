"""A worker's callables for compiled code: one kernel of a package, or its orchestration.

``worker/kernels.py`` loads a registration of kind ``"sim"`` or ``"sim-orch"`` (see
``pto.chip.package``) into one of these; the worker then calls it per task as
``call(values, kinds)`` with the task's arguments (shared-memory views and scalars). Each
call runs on this process's simulated chip for the package, as the task's rank in its
group (``pto.task()``); a failure raises RuntimeError whose message becomes the
``pto.TaskError`` reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..wire.taskinfo import TaskInfo, task
from .simlib import (
    ERROR_NAMES,
    LaunchSpan,
    Library,
    SimChip,
    error_name,
    open_package,
    pack_args,
)

TaskCallable = Callable[[list[Any], list[int]], None]


def package_kernel(name: str, path: str, sha256: str, symbol: str,
                   block_dim: int) -> TaskCallable:
    """Kernel ``symbol`` of a package, registered as ``name``: each call is one launch of
    ``block_dim`` blocks."""
    lib = open_package(path, sha256)
    if symbol not in lib.kernels:
        raise LookupError(f"kernel {name!r}: package {sha256[:12]} has no kernel {symbol!r} "
                          f"(it has: {', '.join(lib.kernels)})")
    sym = symbol.encode()
    where = f"kernel {name!r}"

    def call(values: list[Any], kinds: list[int]) -> None:
        chip, device = _chip_for_task(lib)
        argv = pack_args(values, kinds, where)
        rc = chip.run(sym, argv, block_dim)
        if rc != 0:
            if chip.barrier_error is not None:  # e.g. BarrierAborted: another member failed
                raise chip.barrier_error
            raise RuntimeError(f"C kernel {symbol!r} failed on chip {device} with "
                               f"{error_name(rc)}: {chip.error_message() or 'no message'}")

    return call


def package_orchestration(name: str, path: str, sha256: str, orch: str) -> Orchestration:
    """The C orchestration ``orch`` of a package, registered as kernel ``name``."""
    lib = open_package(path, sha256)
    if lib.orch != orch:
        raise LookupError(f"kernel {name!r}: package {sha256[:12]} has no orchestration "
                          f"{orch!r} (it has: {lib.orch or 'none'})")
    return Orchestration(lib, name, orch)


class Orchestration:
    """A package's orchestration as a task: each call runs it once with the task's
    arguments; it launches the package's kernels itself. ``last_launches`` holds the
    launches of the last call (and ``launches_dropped`` how many more ran than were kept),
    for traces."""

    def __init__(self, lib: Library, name: str, orch: str):
        self.lib, self.name, self.orch = lib, name, orch
        self.where = f"orchestration {orch!r} (registered as {name!r})"
        self.last_launches: list[LaunchSpan] = []
        self.launches_dropped = 0

    def __call__(self, values: list[Any], kinds: list[int]) -> None:
        chip, device = _chip_for_task(self.lib)
        argv = pack_args(values, kinds, self.where)
        chip.record_launches(True)  # only this call's launches: a kernel task's are not kept
        try:
            rc = chip.run(None, argv)
        finally:
            self.last_launches, self.launches_dropped = chip.take_launches()
            chip.record_launches(False)
        # Returning 0 after ignoring a failed launch still fails the task, as at L2.
        code = chip.error_code() if rc == 0 else rc
        if code == 0:
            return
        if chip.barrier_error is not None:
            raise chip.barrier_error
        message = chip.error_message()
        detail = f": {message}" if message else ""
        if rc == 0:
            raise RuntimeError(f"C orchestration {self.orch!r} on chip {device} returned 0 but "
                               f"a launch failed with {error_name(code)}{detail}")
        text = f"{rc} ({ERROR_NAMES[rc]})" if rc in ERROR_NAMES else str(rc)
        raise RuntimeError(f"C orchestration {self.orch!r} on chip {device} returned "
                           f"{text}{detail}")


def _chip_for_task(lib: Library) -> tuple[SimChip, int]:
    """This process's chip for the library, told the current task's group."""
    info: TaskInfo | None
    try:
        info = task()
    except RuntimeError:  # called outside a worker's task (tests, tools)
        info = None
    rank, world, device = (info.rank, info.world, info.chip) if info else (0, 1, 0)
    chip = lib.process_chip(device)
    chip.set_task(rank, world, info.barrier if info is not None and world > 1 else None)
    return chip, device
