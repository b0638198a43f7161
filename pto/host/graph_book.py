"""A runtime's captured graphs: ``rt.capture`` (record, then install) and the routing of
the broker's graph replies to their ``pto.Graph`` (pto/host/graph.py).

Replies arrive on whichever thread drives the result socket (pto/host/connection.py); a
replay's future nobody waits on is resolved on this book's own thread ("pto-graph-done"),
never under a lock and never on the thread that drives the socket.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..wire import protocol as P
from ..wire.errors import BrokerLost, PtoError
from .capture import CaptureContext, Input, analyse, frozen_copy, top_level_tensors
from .connection import Connection
from .graph import Graph, Replay, resolve_replay
from .run import Registration
from .tensor import TensorHandle, TensorStore, segment_of

REPLIES = (P.GraphInstalled, P.GraphResult)


class GraphBook:
    """A runtime's graphs: routes the broker's graph replies, resolves unwaited futures."""

    def __init__(self, conn: Connection, traced: bool, trace_replay: Any):
        self._conn = conn
        self.traced = traced
        self._trace_replay = trace_replay  # (graph name, GraphResult) -> None, or None
        self._graphs: dict[int, Graph] = {}
        self._installed: dict[int, str | None] = {}  # graph id -> error, once answered
        self.gids = itertools.count(1)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def new_id(self) -> int:
        return next(self.gids)

    def send(self, msg: P.Message) -> None:
        self._conn.send(msg)

    def wait_until(self, done: Any, timeout: float | None) -> bool:
        return self._conn.wait_until(done, timeout)

    def install(self, graph: Graph, msg: P.GraphInstall, timeout: float) -> None:
        with self._lock:
            self._graphs[graph.gid] = graph
        self._conn.send(msg)
        if not self._conn.wait_until(lambda: graph.gid in self._installed, timeout):
            if self._conn.lost is not None:
                raise self._conn.lost
            raise PtoError(f"the broker did not confirm graph {graph.name!r} within {timeout}s")
        error = self._installed.pop(graph.gid)
        if error:
            with self._lock:
                self._graphs.pop(graph.gid, None)
            raise ValueError(f"graph {graph.name!r} cannot be installed: {error}")

    def on_message(self, msg: P.Message) -> None:
        if isinstance(msg, P.GraphInstalled):
            self._installed[msg.graph] = msg.error or None
        elif isinstance(msg, P.GraphResult):
            graph = self._graphs.get(msg.graph)
            if graph is not None:
                graph.on_result(msg)

    def trace_replay(self, graph: Graph, msg: P.GraphResult) -> None:
        if self._trace_replay is not None:
            self._trace_replay(graph.name, graph.kernel_list, msg)

    def resolve_later(self, replay: Replay) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="pto-graph-done")
            executor = self._executor
        executor.submit(resolve_replay, replay)

    def drop(self, graph: Graph) -> None:
        with self._lock:
            known = self._graphs.pop(graph.gid, None)
        if known is None:
            return
        for replay in graph.fail_all(PtoError(f"graph {graph.name!r} is closed")):
            if replay.future is not None and not replay.claimed:
                replay.claimed = True
                resolve_replay(replay)
        try:
            self._conn.send(P.GraphDrop(graph.gid))
        except BrokerLost:
            pass
        graph.release()

    def fail_all(self, exc: BaseException) -> None:
        """The broker is lost: every replay in flight fails with ``exc``."""
        with self._lock:
            graphs = list(self._graphs.values())
        for graph in graphs:
            for replay in graph.fail_all(exc):
                if replay.future is not None and not replay.claimed:
                    replay.claimed = True
                    self.resolve_later(replay)  # user callbacks: not on this thread

    def close(self) -> None:
        with self._lock:
            graphs = list(self._graphs.values())
        for graph in graphs:
            self.drop(graph)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def status(self) -> list[Graph]:
        with self._lock:
            return list(self._graphs.values())



def capture(book: GraphBook, store: TensorStore, devices: list[int], reg: Registration,
            args: Any, timeout: float) -> Graph:
    """Run ``reg``'s orchestration once with ``args``, record its tasks, install them."""
    found = top_level_tensors(args)
    seen: dict[int, str] = {}
    for path, _, v in found:
        if id(v) in seen:  # which one a ctx.tensor() call meant could not be told apart
            raise ValueError(f"capture: {seen[id(v)]} and {path} are the same object; pass "
                             "distinct arrays or handles as inputs")
        seen[id(v)] = path
    inputs = {id(v): Input(path, key, tuple(v.shape), np.dtype(v.dtype),
                           isinstance(v, TensorHandle), source=v) for path, key, v in found}
    ctx = CaptureContext(devices, store, reg, inputs, [v for _, _, v in found])
    try:
        value = reg.orch(ctx, args)
        ctx.finish()
    finally:
        with store.lock:  # the graph holds its tensors by handle, not as in use by tasks
            for task in ctx.recorder.tasks:
                for seg in task.segments:
                    store.release_use(seg)
    recorded = ctx.recorder.tasks
    if not recorded:
        raise ValueError(f"capture of {reg.name!r}: the orchestration submitted no task")
    for array, _ in ctx.run.copy_back:
        if id(array) in inputs:
            inputs[id(array)].copy_back = True
    value = _onto_graph(value, {id(segment_of(v)): inp for v, inp in
                                ((inp.source, inp) for inp in inputs.values())
                                if isinstance(v, TensorHandle)})
    analysis = analyse(recorded, ctx.created, list(inputs.values()))
    flags_seg = store.create(8 * analysis.words)
    flags = TensorHandle(flags_seg, (analysis.words,), np.dtype(np.int64))
    keep = [h for h, _ in ctx.created] + [flags]
    frozen = frozen_copy(args, set(inputs))
    for inp in inputs.values():
        inp.source = None
    graph = Graph(book, book.new_id(), reg.name, list(inputs.values()), frozen, value,
                  analysis, keep)
    graph.set_kernel_names({kid: kname for kname, kid in reg.kernel_ids.items()})
    try:
        book.install(graph, P.GraphInstall(graph.gid, reg.name, flags_seg.tensor_id,
                                           analysis.tasks), timeout)
    except BaseException:
        graph.release()
        raise
    return graph


def _onto_graph(value: Any, by_segment: dict[int, Input], depth: int = 0) -> Any:
    """The orchestration's value with the example's handles replaced by the graph's."""
    if isinstance(value, TensorHandle):
        inp = by_segment.get(id(segment_of(value)))
        if inp is None or not inp.bound:
            return value
        return TensorHandle(segment_of(inp.bound[0]), value.shape, value.dtype, value.offset,
                            is_view=True)
    if depth < 8 and isinstance(value, list):
        return [_onto_graph(v, by_segment, depth + 1) for v in value]
    if depth < 8 and type(value) is tuple:
        return tuple(_onto_graph(v, by_segment, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return {k: _onto_graph(v, by_segment, depth + 1) for k, v in value.items()}
    return value
