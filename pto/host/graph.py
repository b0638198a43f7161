"""Captured graphs on the client: ``rt.capture`` and ``pto.Graph``.

    g = rt.capture("step", args=example)   # runs the orchestration once, records its
                                           # tasks (pto/host/capture.py), installs them
                                           # on the broker and workers: GraphInstall
    g.run(args)                            # binds the inputs, one GraphReplay, waits for
                                           # one GraphResult; returns copies of the outputs
    g.submit(args)                         # the same, as a concurrent.futures.Future
    g.close()                              # GraphDrop; the graph's tensors are freed

Replays of one graph run one after another: a replay's inputs are copied into the
graph's segments, and its read-before-written tensors zeroed, only when the previous
replay has ended (a second ``submit`` queues here, its arrays copied at once). Results
arrive on whichever thread drives the result socket (``pto/host/connection.py``): it
copies the outputs and starts the next queued replay there (no user code), and the
replay's future is resolved by the thread waiting for it, or else by this book's own
completion thread, never under a lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..wire import protocol as P
from ..wire.errors import BrokerLost, PtoError
from .capture import (
    Analysis,
    CaptureContext,
    Input,
    analyse,
    check_frozen,
    frozen_copy,
    top_level_tensors,
)
from .connection import Connection
from .run import Registration, task_error
from .tensor import TensorHandle, TensorStore, segment_of

log = logging.getLogger("pto.host.graph")

REPLIES = (P.GraphInstalled, P.GraphResult)


@dataclass(eq=False)
class _Replay:
    number: int
    args: Any
    copy: bool
    future: Future | None
    outcome: tuple[Any, BaseException | None] | None = None
    claimed: bool = False
    waiters: int = 0


class _ReplayFuture(Future):
    """A replay's future: ``result()`` drives the result socket itself while it waits."""

    def __init__(self, graph: Graph, replay: _Replay):
        super().__init__()
        self._graph = graph
        self._replay = replay

    def result(self, timeout: float | None = None) -> Any:
        return super().result(self._wait(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._wait(timeout))

    def _wait(self, timeout: float | None) -> float | None:
        """Wait for the replay's outcome; the time left (the completion thread may still
        be setting it)."""
        if self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._graph.wait_for(self._replay, timeout)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class Graph:
    """A captured orchestration (``rt.capture``): replay it with ``run`` or ``submit``.

    Non-tensor values of the arguments, Python control flow and scalars are frozen at
    capture; top-level arrays and handles are the graph's inputs (same shape and dtype
    at every replay). Tensors the orchestration allocated belong to the graph.
    """

    def __init__(self, book: GraphBook, gid: int, name: str, inputs: list[Input],
                 frozen: Any, value: Any, analysis: Analysis, keep: list[TensorHandle]):
        self.name = name
        self._book = book
        self.gid = gid
        self._inputs = inputs
        self._input_paths = {inp.path for inp in inputs}
        self._frozen = frozen
        self._value = value
        self._analysis = analysis
        self._keep = keep  # the graph's tensors, alive while it is
        self._kernel_names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._running: _Replay | None = None
        self._queue: list[_Replay] = []
        self._closed: BaseException | None = None
        self.replays = 0  # ended, well or not
        self.tasks = len(analysis.tasks)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.replays} replays"
        return f"<pto.Graph {self.name!r}: {self.tasks} tasks, {state}>"

    # ---- replaying -------------------------------------------------------------------

    def run(self, args: Any = None, copy: bool = True, timeout: float | None = None) -> Any:
        """Replay once and wait; returns the orchestration's value with its handles
        replaced by numpy copies (``copy=False``: the graph's own handles, valid until
        the next replay). Raises ``pto.TaskError`` as a live run would."""
        replay = self._enqueue(args, copy, future=False)
        if not self.wait_for(replay, timeout):
            raise TimeoutError(f"replay of graph {self.name!r} did not end within {timeout:g}s")
        assert replay.outcome is not None
        value, error = replay.outcome
        if error is not None:
            raise error
        return value

    def submit(self, args: Any = None, copy: bool = True) -> Future:
        """Replay without waiting: a ``concurrent.futures.Future`` of ``run``'s value.
        Replays of this graph run one after another: a second submit queues."""
        replay = self._enqueue(args, copy, future=True)
        assert replay.future is not None
        return replay.future

    def close(self) -> None:
        """Drop the graph from the broker and workers and free its tensors (queued
        replays fail with ``PtoError``)."""
        self._book.drop(self)

    # ---- inside ----------------------------------------------------------------------

    def _enqueue(self, args: Any, copy: bool, future: bool) -> _Replay:
        self._check_args(args)
        replay = _Replay(next(self._numbers), args, copy, None)
        if future:
            replay.future = _ReplayFuture(self, replay)
        with self._lock:
            if self._closed is not None:
                raise self._closed
            start = self._running is None
            if start:
                self._running = replay
            else:  # snapshot the arrays: a live submit would have copied them by now
                replay.args = _snapshot(args, self._inputs)
                self._queue.append(replay)
        if start:
            self._start(replay)
        return replay

    def _check_args(self, args: Any) -> None:
        check_frozen(self._frozen, args, "args", self._input_paths)
        for inp in self._inputs:
            value = args if inp.key is None else args[inp.key]
            if not isinstance(value, (np.ndarray, TensorHandle)):
                raise ValueError(f"input {inp.path} must be a numpy array or TensorHandle, "
                                 f"not {type(value).__name__}")
            if tuple(value.shape) != inp.shape or np.dtype(value.dtype) != inp.dtype:
                raise ValueError(f"input {inp.path} has shape {tuple(value.shape)} and dtype "
                                 f"{np.dtype(value.dtype)}; the graph was captured with "
                                 f"{inp.shape} and {inp.dtype}")

    def _start(self, replay: _Replay) -> None:
        """Bind the inputs, reset the graph's state, send the one GraphReplay."""
        try:
            for seg in self._analysis.zero:
                seg.buf[:] = 0
            for seg, data in self._analysis.restore:
                seg.buf[:] = data
            for inp in self._inputs:
                value = replay.args if inp.key is None else replay.args[inp.key]
                data = value.numpy() if isinstance(value, TensorHandle) else value
                for handle in inp.bound:
                    handle.numpy()[...] = data
            self._book.send(P.GraphReplay(self.gid, replay.number, self._book.traced))
        except BaseException as exc:  # noqa: BLE001 - the replay fails with it
            self._ended(replay, None, exc)

    def on_result(self, msg: P.GraphResult) -> None:
        with self._lock:
            replay = self._running
        if replay is None or replay.number != msg.replay:
            return
        self._book.trace_replay(self, msg)
        if msg.failed:
            self._ended(replay, None, task_error(msg.failed))
            return
        try:
            for inp in self._inputs:
                if inp.copy_back and inp.bound:
                    target = replay.args if inp.key is None else replay.args[inp.key]
                    out = target.numpy() if isinstance(target, TensorHandle) else target
                    out[...] = inp.bound[-1].numpy()
            value = _copied(self._value) if replay.copy else self._value
        except BaseException as exc:  # noqa: BLE001
            self._ended(replay, None, exc)
            return
        self._ended(replay, value, None)

    def _ended(self, replay: _Replay, value: Any, error: BaseException | None) -> None:
        """Record the outcome, start the next queued replay, hand the future over."""
        with self._lock:
            replay.outcome = (value, error)
            self.replays += 1
            nxt = None
            if self._running is replay:
                self._running = None
                if self._queue and self._closed is None:
                    nxt = self._running = self._queue.pop(0)
            unwaited = replay.future is not None and replay.waiters == 0 and not replay.claimed
            if unwaited:
                replay.claimed = True
        if nxt is not None:
            self._start(nxt)
        if unwaited:
            self._book.resolve_later(replay)

    def wait_for(self, replay: _Replay, timeout: float | None) -> bool:
        with self._lock:
            replay.waiters += 1
        try:
            self._book.wait_until(lambda: replay.outcome is not None, timeout)
        finally:
            with self._lock:
                replay.waiters -= 1
                mine = replay.outcome is not None and not replay.claimed
                if mine:
                    replay.claimed = True
        if mine and replay.future is not None:
            _resolve(replay)
        return replay.outcome is not None

    @property
    def kernel_list(self) -> list[str]:
        """Each task's kernel name, in capture order."""
        return [self._kernel_names.get(t.kernel, f"#{t.kernel}") for t in self._analysis.tasks]

    def set_kernel_names(self, names: dict[int, str]) -> None:
        self._kernel_names = names

    def release(self) -> None:
        """After it was dropped: let go of its tensors (the runtime frees them)."""
        self._keep.clear()
        self._analysis.zero.clear()
        self._analysis.restore.clear()
        self._value = None

    def fail_all(self, exc: BaseException) -> list[_Replay]:
        """End every queued and running replay with ``exc`` (closing, or broker lost)."""
        with self._lock:
            self._closed = self._closed or exc
            pending = ([self._running] if self._running else []) + self._queue
            self._running, self._queue = None, []
        for replay in pending:
            replay.outcome = (None, exc)
        return pending


def _resolve(replay: _Replay) -> None:
    future = replay.future
    if future is None or not future.set_running_or_notify_cancel():
        return
    value, error = replay.outcome or (None, None)
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _copied(value: Any, depth: int = 0) -> Any:
    if isinstance(value, TensorHandle):
        return value.numpy().copy()
    if depth < 8 and isinstance(value, list):
        return [_copied(v, depth + 1) for v in value]
    if depth < 8 and isinstance(value, tuple) and type(value) is tuple:
        return tuple(_copied(v, depth + 1) for v in value)
    if depth < 8 and isinstance(value, dict):
        return {k: _copied(v, depth + 1) for k, v in value.items()}
    return value


def _snapshot(args: Any, inputs: list[Input]) -> Any:
    """``args`` with its input arrays copied (the caller may change them meanwhile)."""
    arrays = [inp for inp in inputs if not inp.handle_input]
    if not arrays:
        return args
    if any(inp.copy_back for inp in arrays):
        return args  # the replay writes back into the caller's arrays: keep them
    if isinstance(args, np.ndarray):
        return args.copy()
    out = dict(args) if isinstance(args, dict) else list(args)
    for inp in arrays:
        out[inp.key] = np.array(out[inp.key], copy=True)
    return out if isinstance(args, (dict, list)) else tuple(out)


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

    def resolve_later(self, replay: _Replay) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="pto-graph-done")
            executor = self._executor
        executor.submit(_resolve, replay)

    def drop(self, graph: Graph) -> None:
        with self._lock:
            known = self._graphs.pop(graph.gid, None)
        if known is None:
            return
        for replay in graph.fail_all(PtoError(f"graph {graph.name!r} is closed")):
            if replay.future is not None and not replay.claimed:
                replay.claimed = True
                _resolve(replay)
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
