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
replay's future is resolved by the thread waiting for it, or else by the runtime's graph
book's completion thread (pto/host/graph_book.py, which also holds ``capture``), never
under a lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..wire import protocol as P
from .capture import Analysis, Input, check_frozen
from .run import task_error
from .tensor import TensorHandle


@dataclass(eq=False)
class Replay:
    number: int
    args: Any
    copy: bool
    future: Future | None
    outcome: tuple[Any, BaseException | None] | None = None
    claimed: bool = False
    waiters: int = 0


class _ReplayFuture(Future):
    """A replay's future: ``result()`` drives the result socket itself while it waits."""

    def __init__(self, graph: Graph, replay: Replay):
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

    def __init__(self, book: Any, gid: int, name: str, inputs: list[Input],
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
        self._running: Replay | None = None
        self._queue: list[Replay] = []
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

    def _enqueue(self, args: Any, copy: bool, future: bool) -> Replay:
        self._check_args(args)
        replay = Replay(next(self._numbers), args, copy, None)
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

    def _start(self, replay: Replay) -> None:
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

    def _ended(self, replay: Replay, value: Any, error: BaseException | None) -> None:
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

    def wait_for(self, replay: Replay, timeout: float | None) -> bool:
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
            resolve_replay(replay)
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

    def fail_all(self, exc: BaseException) -> list[Replay]:
        """End every queued and running replay with ``exc`` (closing, or broker lost)."""
        with self._lock:
            self._closed = self._closed or exc
            pending = ([self._running] if self._running else []) + self._queue
            self._running, self._queue = None, []
        for replay in pending:
            replay.outcome = (None, exc)
        return pending


def resolve_replay(replay: Replay) -> None:
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
