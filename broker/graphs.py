"""Captured graphs in the broker: installed once, then replayed with O(chips) work per run.

    client                       broker (this module)                  workers
    ------                       --------------------                  -------
    GraphInstall (once)  -->     splits the tasks by chip, names each
                                 task's predecessors and whom to poke,
                                 opens a barrier per group task    -->  GraphPart, one per chip
    <-- GraphInstalled
    GraphReplay (per run) -->    queued; started when its chips hold
                                 no other replay and no live group  -->  GraphRun, one per chip
                                                                     <-- GraphDone, one per chip
    <-- GraphResult              once every chip has reported (or died)

A replay never goes through the scheduler's task states (``broker.scheduler``): the
scheduler owns live tasks, this module owns replays, each with its own small state table
(``_ALLOWED``). Graphs whose chips overlap take turns replay by replay, picked in turn;
live tasks interleave with graph tasks on the workers (``worker.graph``).

A worker that dies mid-replay fails that replay with ``WorkerLost`` (its INOUT tensors
may be half written, so it is not rerun); the other chips are told to skip what is left
(``GraphAbort``), and the replay ends once they have reported. A restarted worker gets
every graph on its chip installed again, and so do its peers (whom to poke changed).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.barrier import GroupBarrier

if TYPE_CHECKING:
    from .roster import Roster

log = logging.getLogger("pto.broker")

QUEUED, RUNNING, ENDED = "queued", "running", "ended"
_ALLOWED = {QUEUED: {RUNNING, ENDED}, RUNNING: {ENDED}, ENDED: set()}


@dataclass
class _Replay:
    client_replay: int
    trace: bool
    state: str = QUEUED
    number: int = 0  # the workers' replay number (outcome words)
    waiting: set[int] = field(default_factory=set)  # chips yet to report
    failed: list[P.Failure] = field(default_factory=list)
    times: list[tuple[int, int, int, float, float]] = field(default_factory=list)
    started: float = 0.0

    def move(self, new: str) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"replay state {self.state} -> {new} is not allowed")
        self.state = new


@dataclass
class _Graph:
    client: int
    graph: int
    name: str
    flags: int
    tasks: list[P.GraphTask]
    chips: list[int]
    barriers: dict[int, GroupBarrier]  # task index -> its group barrier
    queue: deque[_Replay] = field(default_factory=deque)
    running: _Replay | None = None
    replays: int = 0  # numbers handed out
    done: int = 0
    failed: int = 0
    broken: bool = False  # a failed replay may have aborted its barriers


GRAPH_REQUESTS = (P.GraphReplay, P.GraphInstall, P.GraphDrop)  # what a client may send


class Graphs:
    """The installed graphs of every client, and their replays."""

    def __init__(self, roster: Roster, live_group_on: Callable[[int], bool]):
        self._send_worker = roster.send_to_chip  # False: no worker for that chip now
        self._send_client = roster.send_to_client
        self._uid_of = roster.uid_of_chip
        self._peer_info = roster.peer_info
        self._kernel_def = roster.kernel_def
        self._owner_of = roster.owner_of
        self._live_group_on = live_group_on
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._turns: deque[tuple[int, int]] = deque()  # graphs with queued replays, in turn
        self._busy: dict[int, tuple[int, int]] = {}  # chip -> graph replaying there
        self._owner = shm.new_owner()  # of the group barriers
        self._ids = itertools.count(1)
        self.messages = 0  # graph messages in and out (the benchmark and a test count them)

    # ---- clients ---------------------------------------------------------------------

    def on_request(self, client: int, msg: P.Message, devices: list[int]) -> None:
        """A client's graph request (one of ``GRAPH_REQUESTS``)."""
        if isinstance(msg, P.GraphReplay):
            self.replay(client, msg)
        elif isinstance(msg, P.GraphInstall):
            self.install(client, msg, devices)
        elif isinstance(msg, P.GraphDrop):
            self.drop(client, msg.graph)

    def install(self, client: int, msg: P.GraphInstall, devices: list[int]) -> None:
        self.messages += 1
        key = (client, msg.graph)
        error = _check(msg, devices)
        if error is None and key in self._graphs:
            error = f"graph {msg.graph} is already installed"
        if error is not None:
            self._reply(client, P.GraphInstalled(msg.graph, error))
            return
        chips = sorted({c for t in msg.tasks for c in (t.group or [t.chip])})
        barriers = {}
        for i, t in enumerate(msg.tasks):
            if len(t.group) > 1:
                name = shm.segment_name(self._owner, f"g{next(self._ids)}")
                barriers[i] = GroupBarrier.create(name, len(t.group))
        graph = _Graph(client, msg.graph, msg.name, msg.flags, msg.tasks, chips, barriers)
        self._graphs[key] = graph
        for chip in chips:
            self._install_on(graph, chip)
        log.info("client %d installed graph %d %r: %d task(s) on chip(s) %s", client, msg.graph,
                 msg.name, len(msg.tasks), chips)
        self._reply(client, P.GraphInstalled(msg.graph))

    def replay(self, client: int, msg: P.GraphReplay) -> None:
        self.messages += 1
        graph = self._graphs.get((client, msg.graph))
        if graph is None:
            self._reply(client, P.GraphResult(msg.graph, msg.replay, [P.Failure(
                -1, "", -1, f"graph {msg.graph} is not installed", -1)]))
            return
        graph.queue.append(_Replay(msg.replay, msg.trace))
        if len(graph.queue) == 1 and graph.running is None:
            self._turns.append((client, msg.graph))
        self.pump()

    def drop(self, client: int, graph_id: int) -> None:
        self.messages += 1
        graph = self._graphs.pop((client, graph_id), None)
        if graph is None:
            return
        for chip in graph.chips:
            if self._busy.get(chip) == (client, graph_id):
                del self._busy[chip]
            self._send_worker(chip, P.GraphForget(client, graph_id))
        for barrier in graph.barriers.values():
            barrier.abort()
            barrier.close()
            barrier.unlink()
        self.pump()

    def drop_client(self, client: int) -> None:
        for key in [k for k in self._graphs if k[0] == client]:
            self.drop(*key)

    # ---- workers ---------------------------------------------------------------------

    def done(self, chip: int, msg: P.GraphDone) -> None:
        self.messages += 1
        graph = self._graphs.get((msg.client, msg.graph))
        run = None if graph is None else graph.running
        if run is None or run.number != msg.replay or chip not in run.waiting:
            return  # a replay dropped or already failed
        run.waiting.discard(chip)
        run.failed += msg.failed
        if run.trace:
            run.times += [(i, rank, chip, start, end) for i, rank, start, end in msg.times]
        if not run.waiting:
            self._end(graph, run)

    def worker_lost(self, chip: int, how: str) -> None:
        """A chip's worker died: the replay running there fails (``WorkerLost``)."""
        key = self._busy.get(chip)
        graph = None if key is None else self._graphs.get(key)
        if graph is None or graph.running is None:
            return
        run = graph.running
        if chip not in run.waiting:
            return
        run.waiting.discard(chip)
        run.failed.append(P.Failure(-2, f"graph {graph.name!r}", chip,
                                    f"not run: {how}", -2, lost=True))
        for barrier in graph.barriers.values():
            barrier.abort()
        graph.broken = True
        for other in run.waiting:
            self._send_worker(other, P.GraphAbort(graph.client, graph.graph, run.number))
        if not run.waiting:
            self._end(graph, run)

    def worker_joined(self, chip: int) -> None:
        """A (re)started worker: install every graph with tasks on its chip, on all of
        that graph's chips (their peers' uids changed)."""
        for graph in self._graphs.values():
            if chip in graph.chips:
                for c in graph.chips:
                    self._install_on(graph, c)
        self.pump()

    def busy_on(self, chip: int) -> bool:
        """A replay is running on ``chip`` (its worker may be silent meanwhile)."""
        return chip in self._busy

    # ---- replays ---------------------------------------------------------------------

    def pump(self) -> None:
        """Start the queued replays whose chips are free, graphs taking turns."""
        for _ in range(len(self._turns)):
            key = self._turns.popleft()
            graph = self._graphs.get(key)
            if graph is None or not graph.queue or graph.running is not None:
                continue
            if not self._start(graph):
                self._turns.append(key)

    def _start(self, graph: _Graph) -> bool:
        chips = graph.chips
        if any(c in self._busy or self._uid_of(c) is None for c in chips):
            return False
        if graph.barriers and any(self._live_group_on(c) for c in chips):
            return False
        if graph.broken:
            self._renew_barriers(graph)
        run = graph.queue.popleft()
        run.move(RUNNING)
        graph.replays += 1
        run.number = graph.replays
        run.started = time.monotonic()
        run.waiting = set(chips)
        graph.running = run
        for c in chips:
            self._busy[c] = (graph.client, graph.graph)
            self._send_worker(c, P.GraphRun(graph.client, graph.graph, run.number, run.trace))
        return True

    def _end(self, graph: _Graph, run: _Replay) -> None:
        run.move(ENDED)
        graph.running = None
        for c in graph.chips:
            if self._busy.get(c) == (graph.client, graph.graph):
                del self._busy[c]
        if run.failed:
            graph.failed += 1
            if graph.barriers:
                graph.broken = True
        else:
            graph.done += 1
        self._reply(graph.client, P.GraphResult(graph.graph, run.client_replay, run.failed,
                                                run.times, run.started))
        if graph.queue:
            self._turns.append((graph.client, graph.graph))
        self.pump()

    def _renew_barriers(self, graph: _Graph) -> None:
        """After a failed replay: fresh barriers under the same names (workers open them
        by name at each run)."""
        for i, barrier in graph.barriers.items():
            name, world = barrier.name, barrier.world
            barrier.close()
            barrier.unlink()
            graph.barriers[i] = GroupBarrier.create(name, world)
        graph.broken = False

    def _install_on(self, graph: _Graph, chip: int) -> None:
        """Send ``chip``'s worker its part: its tasks in order, each with the outcome words
        it waits for (one per member of each predecessor) and the workers to poke."""
        where = [t.group or [t.chip] for t in graph.tasks]
        words = list(itertools.accumulate((len(w) for w in where), initial=0))
        pokes: dict[int, set[int]] = {}  # outcome word -> uids of workers waiting for it
        for i, t in enumerate(graph.tasks):
            for c in where[i]:
                uid = self._uid_of(c)
                if uid is None:
                    continue
                for d in t.deps:
                    for rank, other in enumerate(where[d]):
                        if other != c:
                            pokes.setdefault(words[d] + rank, set()).add(uid)
        tasks: list[P.PartTask] = []
        kernels: dict[int, P.KernelDef] = {}
        uids: set[int] = set()
        for i in _order(graph.tasks, bool(graph.barriers)):
            t = graph.tasks[i]
            if chip not in where[i]:
                continue
            rank = where[i].index(chip)
            kdef = self._kernel_def((graph.client, t.kernel))
            if kdef is not None:
                kernels[t.kernel] = kdef
            poke = sorted(pokes.get(words[i] + rank, ()))
            deps = [words[d] + r for d in t.deps for r in range(len(where[d]))]
            barrier = graph.barriers.get(i)
            tasks.append(P.PartTask(i, words[i] + rank, t.kernel, t.args, rank, len(where[i]),
                                    barrier.name if barrier else "", deps, poke))
            uids.update(poke)
        peers = [info for info in map(self._peer_info, sorted(uids)) if info is not None]
        self._send_worker(chip, P.GraphPart(graph.client, graph.graph,
                                            self._owner_of(graph.client), graph.flags,
                                            list(kernels.values()), peers, tasks))

    def _reply(self, client: int, msg: P.Message) -> None:
        self.messages += 1
        self._send_client(client, msg)

    # ---- status ----------------------------------------------------------------------

    def status(self) -> list[dict]:
        return [{"client": g.client, "graph": g.graph, "name": g.name, "tasks": len(g.tasks),
                 "chips": g.chips, "replays": g.done + g.failed, "failed": g.failed,
                 "queued": len(g.queue), "running": g.running is not None}
                for g in self._graphs.values()]

    def close(self) -> None:
        for graph in self._graphs.values():
            for barrier in graph.barriers.values():
                barrier.close()
        shm.unlink_owner(self._owner)


def _order(tasks: list[P.GraphTask], groups: bool) -> list[int]:
    """The order each worker is to run its tasks in: by depth (longest path from a task
    with no predecessor), so the chips move through the graph's levels together and
    seldom wait for each other; capture order if the graph has groups (their members
    must meet in one order on every chip)."""
    if groups:
        return list(range(len(tasks)))
    depth = [0] * len(tasks)
    for i, t in enumerate(tasks):  # predecessors come first: one pass
        depth[i] = 1 + max((depth[d] for d in t.deps), default=-1)
    return sorted(range(len(tasks)), key=depth.__getitem__)


def _check(msg: P.GraphInstall, devices: list[int]) -> str | None:
    """Why the graph cannot be installed, or None."""
    if not msg.tasks:
        return "a graph needs at least one task"
    for i, t in enumerate(msg.tasks):
        for c in t.group or [t.chip]:
            if c not in devices:
                return f"task {i} names chip {c}, which this broker does not serve"
        if any(not 0 <= d < i for d in t.deps):
            return f"task {i} depends on a task that is not before it"
    return None
