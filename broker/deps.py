"""Which earlier tasks a new task must wait for: byte ranges read and written per tensor.

Dependencies come from the byte ranges a task reads and writes in each tensor
(read-after-write, write-after-read, write-after-write; INOUT is both), so disjoint views
of one tensor never wait on each other. Only unfinished accesses are kept per tensor, so
memory is O(live tasks). A failed write poisons the bytes it covers: later readers fail
with the same root cause until a new write covers them.

``Accesses`` only answers "what does this task wait for"; the task states it reads are
the scheduler's (``broker.scheduler``), which alone changes them.
"""

from __future__ import annotations

from collections.abc import Iterable

from pto.wire.args import ParamType
from pto.wire.protocol import ArgSpec, Failure, unpack_args

from .task import DONE, FAILED, Task

_READS = frozenset({ParamType.INPUT, ParamType.INOUT})
_WRITES = frozenset({ParamType.OUTPUT, ParamType.INOUT, ParamType.OUTPUT_EXISTING})
_OVERWRITES = frozenset({ParamType.INOUT, ParamType.OUTPUT_EXISTING, ParamType.NO_DEP})


class _Access:
    """A task's read or write of bytes [start, end) of a tensor.

    A write that covers earlier accesses takes them into its ``shadow``: later tasks are
    ordered after them through the write, so they need not be scanned again. Only if the
    write fails (and so orders nothing) do later writers look into its shadow.
    """

    __slots__ = ("start", "end", "task", "shadow")

    def __init__(self, start: int, end: int, task: Task, shadow: list[_Access] | None = None):
        self.start, self.end, self.task, self.shadow = start, end, task, shadow

    def live_behind(self) -> list[Task]:
        """Unfinished tasks this failed write had been ordered after."""
        out: list[Task] = []
        for acc in self.shadow or ():
            if acc.task.state < DONE:
                out.append(acc.task)
            elif acc.task.state == FAILED:
                out.extend(acc.live_behind())
        return out


class _TensorUses:
    """Unfinished (and failed) reads and writes of one tensor."""

    __slots__ = ("reads", "writes", "compact_at")

    def __init__(self) -> None:
        self.reads: list[_Access] = []
        self.writes: list[_Access] = []
        self.compact_at = 16

    def compact(self) -> None:
        # Done accesses constrain nothing; dropping them lazily keeps this O(1) amortized.
        self.reads = [a for a in self.reads if a.task.state < DONE]
        self.writes = [a for a in self.writes if a.task.state != DONE]
        self.compact_at = max(16, 2 * (len(self.reads) + len(self.writes)))


class Accesses:
    """The unfinished accesses of every (client, tensor id)."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[int, int], _TensorUses] = {}

    def link(self, task: Task, args: list[ArgSpec]) -> tuple[set[Task], Failure | None]:
        """Record ``task``'s accesses; return the unfinished tasks it must follow and the
        root failure of a failed write whose bytes it reads (it must fail too), if any."""
        deps: set[Task] = set()
        poison: Failure | None = None
        for arg in args:
            if arg.tensor < 0 or arg.kind not in _READS and arg.kind not in _WRITES:
                continue
            key = (task.client, arg.tensor)
            uses = self._tensors.get(key)
            if uses is None:
                uses = self._tensors[key] = _TensorUses()
            start, end = arg.offset, arg.offset + arg.nbytes
            reads, writes = arg.kind in _READS, arg.kind in _WRITES
            for acc in uses.writes:
                if acc.start < end and start < acc.end:
                    if acc.task.state == FAILED:
                        if reads and poison is None:
                            poison = acc.task.root
                        if writes:
                            deps.update(acc.live_behind())
                    elif acc.task.state < DONE:
                        deps.add(acc.task)
            if writes:
                for acc in uses.reads:
                    if acc.start < end and start < acc.end and acc.task.state < DONE:
                        deps.add(acc.task)
                # Accesses this write covers go into its shadow (a covered failed write's
                # poisoned bytes are replaced by this write).
                shadow: list[_Access] = []
                for kind in ("reads", "writes"):
                    kept = []
                    for acc in getattr(uses, kind):
                        if start <= acc.start and acc.end <= end:
                            if acc.task.state < DONE:
                                shadow.append(acc)
                        else:
                            kept.append(acc)
                    setattr(uses, kind, kept)
                uses.writes.append(_Access(start, end, task, shadow or None))
            else:
                uses.reads.append(_Access(start, end, task))
            if len(uses.reads) + len(uses.writes) >= uses.compact_at:
                uses.compact()
        deps.discard(task)
        return deps, poison

    def forget(self, client: int, tensor_ids: Iterable[int]) -> None:
        """A client freed these tensors (or reuses their ids): their accesses go."""
        for tensor_id in tensor_ids:
            self._tensors.pop((client, tensor_id), None)

    def drop_client(self, client: int) -> None:
        for key in [k for k in self._tensors if k[0] == client]:
            del self._tensors[key]

    def count(self, client: int, tensor_id: int) -> int:
        """Accesses kept for one tensor (bounded by its live tasks; tests check it)."""
        uses = self._tensors.get((client, tensor_id))
        return 0 if uses is None else len(uses.reads) + len(uses.writes)


def overwrites(task: Task) -> bool:
    """Rerunning it after a partial run could give wrong data (INOUT, OUTPUT_EXISTING,
    NO_DEP)."""
    return any(a.kind in _OVERWRITES for a in unpack_args(task.args))


def inputs_overwritten(task: Task, later: Iterable[Task]) -> bool:
    """Whether a task that ran after ``task`` on its worker wrote bytes ``task`` reads,
    so rerunning ``task`` would read the wrong data (possible only for tasks queued
    behind it: independent tasks never write what it reads)."""
    reads = [a for a in unpack_args(task.args) if a.kind in _READS]
    return any(w.tensor == r.tensor and w.offset < r.offset + r.nbytes
               and r.offset < w.offset + w.nbytes
               for t in later if t.client == task.client
               for w in unpack_args(t.args) if w.kind in _WRITES or w.kind == ParamType.NO_DEP
               for r in reads)
