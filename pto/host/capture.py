"""Capturing a graph: run an orchestration once, record its tasks instead of sending them.

``rt.capture`` (pto/host/graph.py) calls the orchestration with a ``CaptureContext``: the
same checks as a live ``ctx`` (``OrchContext``), but task records stay here, the
top-level tensors of the example arguments become the graph's *inputs* (each bound to a
segment of the graph, refilled at every replay), and every tensor the orchestration
makes belongs to the graph. Then ``analyse`` works out what a replay needs: each task's
predecessors (read-after-write, write-after-read and write-after-write on overlapping
bytes, as the broker does live: ``broker.deps``), which tensors must be zeroed again
before each replay (read before any task writes them, as a fresh ``ctx.alloc`` is), and
which copied-in constants must be restored (a task writes them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..wire import protocol as P
from ..wire.args import Arg, ParamType
from .orchestration import OrchContext
from .run import PendingTask, Registration, Run
from .tensor import Segment, TensorHandle, TensorStore, segment_of

_READS = {ParamType.INPUT, ParamType.INOUT, ParamType.OUTPUT_EXISTING}
_WRITES = {ParamType.OUTPUT, ParamType.INOUT, ParamType.OUTPUT_EXISTING}


@dataclass
class Input:
    """One top-level tensor of the arguments: where it sits, what it must look like, and
    the graph segments it is copied into at each replay."""

    path: str  # as the user wrote it: args['x'], args[0], args
    key: Any  # dict key or index; None: args itself
    shape: tuple[int, ...]
    dtype: np.dtype
    handle_input: bool  # a TensorHandle (used in place live: written bytes copied back)
    source: Any = None  # the example's array or handle (during the capture only)
    bound: list[TensorHandle] = field(default_factory=list)
    copy_back: bool = False  # live, the user's array or handle sees what tasks wrote


def top_level_tensors(args: Any) -> list[tuple[str, Any, Any]]:
    """(path, key, value) of each top-level numpy array or TensorHandle in ``args``."""
    def is_tensor(v: Any) -> bool:
        return isinstance(v, (np.ndarray, TensorHandle))

    if is_tensor(args):
        return [("args", None, args)]
    if isinstance(args, dict):
        return [(f"args[{k!r}]", k, v) for k, v in args.items() if is_tensor(v)]
    if isinstance(args, (list, tuple)):
        return [(f"args[{i}]", i, v) for i, v in enumerate(args) if is_tensor(v)]
    return []


class _Recorder:
    """The ``RunHost`` of a capture: tasks are kept, not sent."""

    def __init__(self, devices: list[int], store: TensorStore):
        self._devices = devices
        self._store = store
        self._ids = itertools.count(1)
        self.tasks: list[PendingTask] = []

    @property
    def devices(self) -> list[int]:
        return self._devices

    @property
    def store(self) -> TensorStore:
        return self._store

    def wait_for_room(self) -> None:
        pass  # nothing runs during a capture: nothing would make room

    def new_task_id(self) -> int:
        return next(self._ids)

    def host_kernel(self, fn: Callable[..., Any]) -> int:
        raise ValueError(
            f"ctx.submit_host({getattr(fn, '__qualname__', fn)!r}) cannot be captured: a graph "
            "replays kernels on chips only. Run this orchestration live (rt.run), or make the "
            "host function a registered kernel")

    def send_tasks(self, run: Run, batch: list[PendingTask]) -> None:
        self.tasks.extend(batch)


class CaptureContext(OrchContext):
    """``ctx`` during a capture (see the module doc)."""

    def __init__(self, devices: list[int], store: TensorStore, reg: Registration,
                 inputs: dict[int, Input], arrays: list[Any]):
        self.recorder = _Recorder(devices, store)
        self.run = Run()
        super().__init__(self.recorder, self.run, reg)
        self._inputs = inputs  # id(user array or handle) -> Input
        self._input_segments = {id(segment_of(a)): inputs[id(a)]
                                for a in arrays if isinstance(a, TensorHandle)}
        self._arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.created: list[tuple[TensorHandle, bool]] = []  # (handle, zero-filled)

    def _alloc(self, shape: Any, dtype: Any, zero: bool = True) -> TensorHandle:
        handle = super()._alloc(shape, dtype, zero)
        self.created.append((handle, zero))
        return handle

    def tensor(self, array: Any) -> TensorHandle:
        bound = self._bind(array)
        if bound is not None:
            return bound
        if isinstance(array, np.ndarray):
            for user in self._arrays:
                if np.shares_memory(array, user):
                    raise ValueError(
                        f"capture: ctx.tensor() of a part of input {self._inputs[id(user)].path}"
                        " would freeze that data; pass the whole input to ctx.tensor() and "
                        "take a view of the handle (h[2:5]) instead")
        return super().tensor(array)

    def submit(self, chip: int, kernel: str, args: list[Arg], retries: int = 1) -> None:
        super().submit(chip, kernel, self._remap(args), retries)

    def submit_group(self, chips: list[int], kernel: str, args: list[Arg]) -> None:
        super().submit_group(chips, kernel, self._remap(args))

    def submit_host(self, fn: Callable[..., Any], args: list[Arg], retries: int = 1) -> None:
        self.recorder.host_kernel(fn)  # raises: not capturable

    def _bind(self, value: Any) -> TensorHandle | None:
        """The graph's segment for an input (a new one per call for an array, as live)."""
        inp = self._inputs.get(id(value))
        if inp is None:
            return None
        if isinstance(value, TensorHandle):
            if inp.bound:
                return inp.bound[0]
            handle = super()._alloc(value.shape, value.dtype, zero=False)
            handle.numpy()[...] = value.numpy()
        else:
            handle = super()._alloc(value.shape, value.dtype, zero=False)
            handle.numpy()[...] = value
        inp.bound.append(handle)
        return handle

    def _remap(self, args: Any) -> Any:
        """Task arguments with input handles (and views of them) moved onto the graph's
        segments; arrays that are inputs are bound by ``tensor`` (via ``_as_handle``)."""
        if not isinstance(args, (list, tuple)):
            return args
        out = []
        for arg in args:
            value = getattr(arg, "value", None)
            if isinstance(value, TensorHandle):
                inp = self._input_segments.get(id(segment_of(value)))
                if inp is not None:
                    full = inp.bound[0] if inp.bound else self._bind(inp.source)
                    value = TensorHandle(segment_of(full), value.shape, value.dtype,
                                         value.offset, is_view=True)
                    if arg.kind in _WRITES or arg.kind == ParamType.NO_DEP:
                        inp.copy_back = True
                    arg = Arg(arg.kind, value)
            elif isinstance(value, np.ndarray) and id(value) in self._inputs:
                if arg.kind != ParamType.INPUT:
                    self._inputs[id(value)].copy_back = True  # live copies it back
            out.append(arg)
        return out


# ---- analysis --------------------------------------------------------------------------


@dataclass
class Analysis:
    tasks: list[P.GraphTask]
    words: int  # outcome words (one per task member)
    zero: list[Segment]  # zero-filled again before each replay
    restore: list[tuple[Segment, np.ndarray]]  # constants a task writes: bytes to put back


def analyse(tasks: list[PendingTask], created: list[tuple[TensorHandle, bool]],
            inputs: list[Input]) -> Analysis:
    specs = [t.spec for t in tasks]
    graph_tasks = [P.GraphTask(s.chip, s.kernel, s.args, s.group, sorted(d))
                   for s, d in zip(specs, dependencies(specs), strict=True)]
    bound = {segment_of(h).tensor_id for inp in inputs for h in inp.bound}
    allocated = {segment_of(h).tensor_id: segment_of(h) for h, zero in created
                 if zero and segment_of(h).tensor_id not in bound}
    constants = {segment_of(h).tensor_id: segment_of(h) for h, zero in created
                 if not zero and segment_of(h).tensor_id not in bound}
    written: dict[int, list[tuple[int, int]]] = {}
    zero: dict[int, Segment] = {}
    restore: dict[int, Segment] = {}
    for spec in specs:
        for a in spec.args:
            if a.kind == ParamType.SCALAR:
                continue
            kind = ParamType(a.kind)
            span = (a.offset, a.offset + a.nbytes)
            if a.tensor in allocated and a.tensor not in zero and (
                    kind in _READS or kind == ParamType.NO_DEP):
                if not covered(span, written.get(a.tensor, [])):
                    zero[a.tensor] = allocated[a.tensor]
            if kind in _WRITES or kind == ParamType.NO_DEP:
                written.setdefault(a.tensor, []).append(span)
                if a.tensor in constants:
                    restore[a.tensor] = constants[a.tensor]
    words = sum(len(s.group) or 1 for s in specs)
    return Analysis(graph_tasks, words, list(zero.values()),
                    [(seg, seg.buf.copy()) for seg in restore.values()])


def covered(span: tuple[int, int], writes: list[tuple[int, int]]) -> bool:
    """Whether earlier writes cover every byte of ``span``."""
    start, end = span
    for s, e in sorted(writes):
        if s > start:
            break
        start = max(start, e)
        if start >= end:
            return True
    return start >= end


def dependencies(specs: list[P.TaskSpec]) -> list[set[int]]:
    """Each task's predecessors by byte overlap, as the broker's live tracking does. Per
    tensor, the accesses since the last write covering them (later conflicts with older
    ones are ordered through that write)."""
    accesses: dict[int, list[tuple[int, int, int, bool]]] = {}  # tensor -> (s, e, task, w)
    deps: list[set[int]] = []
    for i, spec in enumerate(specs):
        mine: set[int] = set()
        for a in spec.args:
            if a.kind in (ParamType.SCALAR, ParamType.NO_DEP):
                continue
            kind = ParamType(a.kind)
            write = kind in _WRITES
            s, e = a.offset, a.offset + max(a.nbytes, 1)
            seen = accesses.setdefault(a.tensor, [])
            for s2, e2, j, w2 in seen:
                if (write or w2) and s < e2 and s2 < e and j != i:
                    mine.add(j)
            if write:
                seen[:] = [x for x in seen if not (s <= x[0] and x[1] <= e)]
            seen.append((s, e, i, write))
        deps.append(mine)
    return deps


def frozen_copy(value: Any, tensors: set[int], depth: int = 0) -> Any:
    """``value`` with its top-level tensors left out (``None``), for comparing later
    arguments with (scalars and structure are frozen at capture)."""
    if id(value) in tensors:
        return None
    if isinstance(value, np.ndarray):
        return value.copy()
    if depth < 16 and isinstance(value, dict):
        return {k: frozen_copy(v, tensors, depth + 1) for k, v in value.items()}
    if depth < 16 and isinstance(value, (list, tuple)):
        return type(value)(frozen_copy(v, tensors, depth + 1) for v in value) \
            if type(value) in (list, tuple) else value
    return value


def check_frozen(old: Any, new: Any, path: str, inputs: set[str]) -> None:
    """ValueError naming the first non-tensor value that differs from the captured one."""
    if path in inputs:
        return
    same = True
    if isinstance(old, np.ndarray) or isinstance(new, np.ndarray):
        same = (isinstance(old, np.ndarray) and isinstance(new, np.ndarray)
                and old.shape == new.shape and old.dtype == new.dtype
                and bool(np.array_equal(old, new)))
    elif isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            raise ValueError(f"{path} has keys {sorted(map(repr, new))}, the captured one had "
                             f"{sorted(map(repr, old))}: capture one graph per variant")
        for k in old:
            check_frozen(old[k], new[k], f"{path}[{k!r}]", inputs)
        return
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) != len(new) or type(old) is not type(new):
            same = False
        else:
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                check_frozen(a, b, f"{path}[{i}]", inputs)
            return
    else:
        try:
            same = bool(old == new) and type(old) is type(new)
        except Exception:  # noqa: BLE001 - incomparable: treated as changed
            same = False
        if isinstance(old, float) and isinstance(new, float) and math.isnan(old):
            same = math.isnan(new)
    if not same:
        raise ValueError(f"{path} is {_short(new)}, but the graph was captured with "
                         f"{_short(old)}: values that are not tensors are frozen at capture "
                         "(capture one graph per variant, or pass the value as a tensor)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
