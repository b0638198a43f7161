"""A worker's parts of captured graphs, and its replay loop.

    broker                           this worker                        peer worker
    ------                           -----------                        -----------
    GraphPart (once per graph) -->   maps the graph's tensors, builds
                                     every task's numpy views, loads
                                     its kernels
    GraphRun (once per replay) -->   runs its tasks in order; a task
                                     whose predecessor on another chip
                                     has no outcome word for this
                                     replay yet waits (the worker runs
                                     live tasks or sleeps meanwhile)   <-- pipe poke (worker.wakeup)
                                     writes flags[i] = replay*2+failed
                                     and pokes the workers it names  --> pipe poke
    <-- GraphDone (once per replay)  its failures, its times if traced

The outcome words live in one tensor per graph (the client makes it at capture and every
worker maps it): a replay's tasks get no broker sequence numbers, so the broker's work per
replay does not grow with the graph, and graph tasks leave the live completion rings alone.
The wake-ups go through the live path's pipes (``worker.completions.Peers``).

While a replay whose graph has group tasks is running here, live group members wait (see
``hold``): a group member blocked in its barrier must never wait for a task this worker
put off for it. The broker starts such a replay only when no live group is in flight on
its chips (``broker.graphs``).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.args import ParamType
from pto.wire.barrier import BarrierAborted, GroupBarrier
from pto.wire.taskinfo import TaskInfo, set_current

from .completions import Peers
from .kernels import Kernel, load_kernel
from .tensors import view_of

log = logging.getLogger("pto.worker")

_STEP = 64  # graph tasks run before live tasks get a turn
_SPIN = 50  # sched_yield()s (looking again each time) before sleeping in the poll
_WINDOW = 32  # tasks of a part, in order, among which the first that may run goes


@dataclass(slots=True)
class _Task:
    index: int
    word: int
    name: str
    fn: Kernel | Exception
    values: list
    kinds: list[int]
    rank: int
    world: int
    barrier: str
    deps: list[int]
    poke: list[int]
    info: TaskInfo | None  # prebuilt for a single-chip task (a group member's has a barrier)


@dataclass
class _Part:
    client: int
    graph: int
    flags: memoryview
    tasks: list[_Task]
    maps: list[mmap.mmap]
    groups: bool  # has group tasks


@dataclass
class _Replay:
    part: _Part
    replay: int
    trace: bool
    pending: list[int] = field(default_factory=list)  # positions not run yet, in order
    blocker: int = 0  # the word the first waiting task waits for
    aborted: bool = False
    failed: list[P.Failure] = field(default_factory=list)
    times: list[tuple[int, int, float, float]] = field(default_factory=list)


class Graphs:
    """This worker's installed parts and the replays it was asked to run, in order."""

    def __init__(self, device: int, peers: Peers, send: Callable[[P.Message], None]):
        self.device = device
        self._peers = peers
        self._send = send
        self._parts: dict[tuple[int, int], _Part] = {}
        self._runs: deque[_Replay] = deque()
        self._aborted: dict[tuple[int, int], int] = {}  # replays up to this one: skip

    @property
    def busy(self) -> bool:
        return bool(self._runs)

    def hold(self, task: P.WorkTask) -> bool:
        """Whether a live task must wait while replays are running (see the module doc)."""
        return task.world > 1 and any(r.part.groups for r in self._runs)

    def handle(self, msg: P.Message) -> bool:
        """Apply a graph message; False if ``msg`` is not one."""
        if isinstance(msg, P.GraphRun):
            part = self._parts.get((msg.client, msg.graph))
            if part is None:
                log.error("replay of graph %d of client %d, which is not installed here",
                          msg.graph, msg.client)
                self._send(P.GraphDone(msg.client, msg.graph, msg.replay, [P.Failure(
                    -1, "", self.device, "graph not installed on this worker", -1)]))
            else:
                self._runs.append(_Replay(part, msg.replay, msg.trace,
                                          list(range(len(part.tasks)))))
        elif isinstance(msg, P.GraphPart):
            try:
                self._install(msg)
            except Exception:  # noqa: BLE001 - its replays report "not installed"
                log.exception("cannot install graph %d of client %d", msg.graph, msg.client)
        elif isinstance(msg, P.GraphAbort):
            key = (msg.client, msg.graph)
            self._aborted[key] = max(self._aborted.get(key, 0), msg.replay)
        elif isinstance(msg, P.GraphForget):
            self._forget(msg.client, msg.graph)
        else:
            return False
        return True

    def forget_client(self, client: int) -> None:
        for key in [k for k in self._parts if k[0] == client]:
            self._forget(*key)

    # ---- install ---------------------------------------------------------------------

    def _install(self, msg: P.GraphPart) -> None:
        key = (msg.client, msg.graph)
        self._forget(*key)
        self._peers.learn(msg.peers)
        kernels: dict[int, tuple[str, Kernel | Exception]] = {}
        for k in msg.kernels:
            try:
                kernels[k.kernel] = (k.name, load_kernel(k.kind, k.name, k.blob))
            except Exception as exc:  # noqa: BLE001 - reported by each task that uses it
                kernels[k.kernel] = (k.name, RuntimeError(f"cannot load kernel {k.name!r}: "
                                                          f"{exc!r}"))
        segments: dict[int, np.ndarray] = {}
        maps: list[mmap.mmap] = []

        def segment(tensor: int) -> np.ndarray:
            buf = segments.get(tensor)
            if buf is None:
                mm = shm.open_existing(shm.segment_name(msg.owner, tensor))
                maps.append(mm)
                buf = segments[tensor] = np.frombuffer(mm, dtype=np.uint8)
            return buf

        tasks = []
        try:
            words = segment(msg.flags)
            flags = memoryview(words[: len(words) // 8 * 8]).cast("B").cast("q")  # plain ints
            for t in msg.tasks:
                name, fn = kernels.get(t.kernel, (f"#{t.kernel}", LookupError(
                    f"kernel #{t.kernel} was never sent to this worker")))
                values = [_view(segment, a) for a in t.args]
                if max([t.word, *t.deps]) >= len(flags):
                    raise ValueError(f"outcome word {max([t.word, *t.deps])} is outside the "
                                     f"graph's {len(flags)} words")
                tasks.append(_Task(t.index, t.word, name, fn, values,
                                   [a.kind for a in t.args], t.rank, t.world, t.barrier, t.deps,
                                   t.poke, TaskInfo(0, 1, self.device)
                                   if t.world == 1 and not isinstance(fn, Exception) else None))
        except Exception:
            del segments
            _close(maps)
            raise
        self._parts[key] = _Part(msg.client, msg.graph, flags, tasks, maps,
                                 any(t.world > 1 for t in tasks))
        log.info("installed graph %d of client %d: %d task(s) here", msg.graph, msg.client,
                 len(tasks))

    def _forget(self, client: int, graph: int) -> None:
        part = self._parts.pop((client, graph), None)
        self._aborted.pop((client, graph), None)
        if part is None:
            return
        for run in [r for r in self._runs if r.part is part]:
            # Said ended, so a broker waiting for it (a replay failed by a worker's death,
            # whose graph is installed again) is not kept waiting; one dropped with its
            # graph is ignored there.
            self._send(P.GraphDone(client, graph, run.replay))
        self._runs = deque(r for r in self._runs if r.part is not part)
        part.tasks.clear()
        part.flags.release()
        _close(part.maps)

    # ---- the replay loop -------------------------------------------------------------

    def step(self) -> bool:
        """Run up to ``_STEP`` tasks of the replays here, the oldest first; True if any
        ran (or a replay ended), False if every task within reach waits for a peer."""
        ran = 0
        while self._runs and ran < _STEP:
            run = self._runs[0]
            part = run.part
            if not run.aborted and self._aborted.get((part.client, part.graph), 0) >= run.replay:
                run.aborted = True
            done = self._advance(run, _STEP - ran)
            if not run.pending:
                self._runs.popleft()
                self._send(P.GraphDone(part.client, part.graph, run.replay, run.failed,
                                       run.times))
                ran += 1
            elif not done:
                # Spin a little on the word the first waiting task waits for: its peer is
                # usually mid-task on the other core, and sleeping costs two wake-ups.
                flags, word = part.flags, run.blocker
                for _ in range(_SPIN):
                    os.sched_yield()
                    if flags[word] >> 1 == run.replay:
                        done = self._advance(run, _STEP - ran)
                        break
                if not done:
                    return ran > 0
            ran += done

        return ran > 0

    def _advance(self, run: _Replay, budget: int) -> int:
        """Run (or skip) the tasks of ``run`` that may go now, among the first ``_WINDOW``
        not yet run (the first only, if the graph has group tasks: members must meet in
        the order every chip runs them); how many went."""
        part = run.part
        tasks, flags, replay = part.tasks, part.flags, run.replay
        pending = run.pending
        window = 1 if part.groups else _WINDOW
        went = 0
        kept: list[int] = []
        i = 0
        while i < len(pending) and i < window and went < budget:
            task = tasks[pending[i]]
            i += 1
            ok: bool | None = not run.aborted
            if ok:
                for d in task.deps:
                    word = flags[d]
                    if word >> 1 != replay:
                        ok = None
                        break
                    if word & 1:
                        ok = False
                        break
            if ok is None:
                if not kept:
                    run.blocker = d
                kept.append(pending[i - 1])
                continue
            if ok:
                info = task.info
                if info is not None and not run.trace:  # the common case, inline
                    set_current(info)
                    try:
                        task.fn(task.values, task.kinds)
                    except BaseException as exc:  # noqa: BLE001 - recorded as its result
                        self._failed(run, task, exc)
                        ok = False
                else:
                    ok = self._run(run, task)
            elif not run.aborted:
                run.failed.append(P.Failure(task.index, task.name, self.device,
                                            "not run: a task it depends on failed", P.SKIPPED))
            flags[task.word] = replay * 2 + (0 if ok else 1)
            for uid in task.poke:
                self._peers.poke(uid)
            went += 1
        set_current(None)
        if went:
            kept += pending[i:]
            run.pending = kept
        return went

    def _run(self, run: _Replay, task: _Task) -> bool:
        start = time.monotonic() if run.trace else 0.0
        fn = task.fn
        barrier = None
        try:
            if isinstance(fn, Exception):
                raise fn
            barrier = GroupBarrier.open(task.barrier, task.world) if task.world > 1 else None
            set_current(TaskInfo(task.rank, task.world, self.device, barrier))
            try:
                fn(task.values, task.kinds)
            except BaseException:
                if barrier is not None:
                    barrier.abort()
                raise
            finally:
                set_current(None)
                if barrier is not None:
                    barrier.close()
        except BaseException as exc:  # noqa: BLE001 - even sys.exit() in a kernel is its result
            self._failed(run, task, exc)
            ok = False
        else:
            ok = True
        if run.trace:
            run.times.append((task.index, task.rank, start, time.monotonic()))
        return ok

    def _failed(self, run: _Replay, task: _Task, exc: BaseException) -> None:
        reason = "".join(traceback.format_exception_only(exc)).strip()
        if task.world > 1:
            reason = f"rank {task.rank} of {task.world}: {reason}"
        frames = traceback.format_tb(exc.__traceback__)[1:]
        if frames:
            reason += "\nkernel traceback (most recent call last):\n" + "".join(frames[-5:])
        # A member that only followed another's failure names no root: graph task indexes
        # start at 0, so the live runs' "0: followed" would read as task 0's own failure.
        root = P.SKIPPED if isinstance(exc, BarrierAborted) else task.index
        run.failed.append(P.Failure(task.index, task.name, self.device, reason, root))

    def close(self) -> None:
        for key in list(self._parts):
            self._forget(*key)


def _view(segment: Callable[[int], np.ndarray], a: P.ArgSpec) -> object:
    """A task argument as the kernel sees it, built once at install."""
    if a.kind == ParamType.SCALAR:
        return a.scalar
    return view_of(a, segment(a.tensor))


def _close(maps: list[mmap.mmap]) -> None:
    for mm in maps:
        try:
            mm.close()
        except BufferError:
            pass  # a kernel kept a view: the mapping goes with it
    maps.clear()
