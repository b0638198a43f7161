"""``ctx``, what an orchestration function receives: it builds one run's task graph.

Every ``submit`` checks its arguments at once (so an error names the call that made it)
and queues a task record; records leave for the broker in batches, the last when the
orchestration returns (``finish``, called by ``Runtime``). The context reaches the runtime
only through its ``RunHost`` (pto/host/run.py).
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..wire import protocol as P
from ..wire.args import Arg, ParamType
from ..wire.chips import HOST_QUEUE
from ..wire.dtypes import dtype_code
from .run import PendingTask, Registration, Run, RunHost
from .tensor import TensorHandle, normalize_shape, segment_of, usable_segment

_FLUSH_EVERY = 256  # task records per Submit message while an orchestration runs
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
_MAX_TENSOR_BYTES = 2**62


class OrchContext:
    """What an orchestration function receives as ``ctx``: it builds the run's task graph.

    >>> def pipeline(ctx, args):
    ...     x = ctx.tensor(args["input"])
    ...     y = ctx.alloc(x.shape, x.dtype)
    ...     ctx.submit(ctx.peers()[0], "scale", [pto.Arg.input(x), pto.Arg.output(y),
    ...                                          pto.Arg.scalar(2.0)])
    ...     return y
    """

    def __init__(self, host: RunHost, run: Run, reg: Registration):
        self._host = host
        self._run = run
        self._reg = reg
        self._pending: list[PendingTask] = []
        self._scopes = 0
        self._ended = False  # set when the orchestration returns: the run takes no more tasks

    def peers(self) -> list[int]:
        """The chips (device ids) this runtime can submit to."""
        return list(self._host.devices)

    def finish(self) -> None:
        """The orchestration has returned (or raised): send what is queued, take no more."""
        self._ended = True
        self._flush()

    # ---- tensors -----------------------------------------------------------------------

    def alloc(self, shape: Any, dtype: Any = np.float32, zero: bool = True) -> TensorHandle:
        """A new zero-filled tensor in shared memory; with ``zero=False`` its bytes are
        whatever a reused segment held (for a tensor about to be overwritten whole: it
        saves a pass over its memory, and a new segment's pages are mapped in at once).

        Waits while too many released tensors still wait for their tasks, so a loop that
        allocates faster than the chips compute keeps a bounded footprint.
        """
        return self._alloc(shape, dtype, zero)

    def _alloc(self, shape: Any, dtype: Any, zero: bool = True) -> TensorHandle:
        dims = normalize_shape(shape)
        dt = np.dtype(dtype)
        dtype_code(dt)
        nbytes = math.prod(dims) * dt.itemsize
        if nbytes > _MAX_TENSOR_BYTES:
            raise ValueError(f"a tensor of shape {dims} and dtype {dt} needs {nbytes} bytes, more "
                             f"than the {_MAX_TENSOR_BYTES} a tensor may have")
        store = self._host.store
        if store.backlog > 0:
            self._flush()  # the tasks that will shrink the backlog must be on their way
            self._host.wait_for_room()
        handle = TensorHandle(store.create(nbytes, zero), dims, dt)
        if self._scopes:
            self._run.scoped.append(weakref.ref(segment_of(handle)))
        return handle

    def tensor(self, array: Any) -> TensorHandle:
        """A new tensor holding a copy of ``array`` (the only copy pto makes); a handle of
        this runtime is returned as it is, so one orchestration takes numpy arrays (L3)
        and the handles an L4 run passes it."""
        if isinstance(array, TensorHandle):
            if segment_of(array).store is not self._host.store:
                raise ValueError(f"ctx.tensor: tensor {array.name} belongs to another runtime")
            usable_segment(array)  # or TensorFreed
            return array
        arr = np.asarray(array)
        handle = self._alloc(arr.shape, arr.dtype, zero=False)  # every byte is copied in
        handle.numpy()[...] = arr
        return handle

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Tensors allocated inside are intermediates: each is freed once its tasks finish
        and no handle to it remains, and at the latest when the run ends, unless the
        orchestration returns it.

        >>> for step in range(10_000):
        ...     with ctx.scope():
        ...         tmp = ctx.alloc(x.shape, x.dtype)
        ...         ctx.submit(0, "f", [pto.Arg.input(x), pto.Arg.output(tmp)])
        ...         ctx.submit(1, "g", [pto.Arg.input(tmp), pto.Arg.inout(acc)])
        """
        self.scope_begin()
        try:
            yield
        finally:
            self.scope_end()

    def scope_begin(self) -> None:
        self._scopes += 1

    def scope_end(self) -> None:
        if self._scopes == 0:
            raise RuntimeError("scope_end() without a matching scope_begin()")
        self._scopes -= 1

    # ---- tasks -------------------------------------------------------------------------

    def submit(self, chip: int, kernel: str, args: list[Arg], retries: int = 1) -> None:
        """Add a task running ``kernel`` on ``chip``; it waits for the tasks it depends on.

        If the chip's worker dies under the task, it reruns up to ``retries`` times, unless
        it has INOUT/OUTPUT_EXISTING/NO_DEP arguments (then ``pto.WorkerLost``).
        """
        self._check_chip(chip)
        self._add(int(chip), [], self._kernel_id(kernel), kernel, args, retries)

    def submit_group(self, chips: list[int], kernel: str, args: list[Arg]) -> None:
        """Run ``kernel`` on every chip of ``chips`` at once, as ranks 0..len(chips)-1.

        The members start together (the broker reserves all the chips first), share
        ``args``, and see ``pto.task().rank/.world``; ``pto.task().barrier()`` waits for
        all of them. The group depends on (and is depended on through) all its arguments.
        """
        try:
            group = list(chips)
        except TypeError:
            raise TypeError(f"chips must be a list of chip ids, not {chips!r}") from None
        if not group:
            raise ValueError("a group needs at least one chip")
        for chip in group:
            self._check_chip(chip)
        if len(set(group)) != len(group):
            raise ValueError(f"a group names each chip once: {group}")
        group = [int(c) for c in group]
        self._add(group[0], group, self._kernel_id(kernel), kernel, args)

    def submit_host(self, fn: Callable[..., Any], args: list[Arg], retries: int = 1) -> None:
        """Run the Python callable ``fn`` on the host as a task of the graph.

        It runs in a host worker process of the broker (not in this process), with the
        same arguments, dependencies and failure rules as a kernel on a chip.
        """
        kid = self._host.host_kernel(fn)
        self._add(HOST_QUEUE, [], kid, getattr(fn, "__qualname__", repr(fn)), args, retries)

    def _check_chip(self, chip: Any) -> None:
        devices = self._host.devices
        if not isinstance(chip, (int, np.integer)) or isinstance(chip, bool) or chip not in devices:
            raise ValueError(f"unknown chip {chip!r}; this runtime has chips {devices}")

    def _kernel_id(self, kernel: str) -> int:
        kid = self._reg.kernel_ids.get(kernel)
        if kid is None:
            raise KeyError(f"unknown kernel {kernel!r} in {self._reg.name!r}; "
                           f"registered kernels: {sorted(self._reg.kernel_ids)}")
        return kid

    def _add(self, chip: int, group: list[int], kid: int, kernel: str, args: list[Arg],
             retries: int = 0) -> None:
        if self._ended:
            raise RuntimeError(f"cannot submit {kernel!r}: this ctx belongs to a run whose "
                               "orchestration has returned")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args of {kernel!r} must be a list of pto.Arg, "
                            f"not {type(args).__name__}")
        specs: list[P.ArgSpec] = []
        handles: list[TensorHandle] = []
        for i, arg in enumerate(args):
            if not isinstance(arg, Arg):
                raise TypeError(f"argument {i} of {kernel!r} is a {type(arg).__name__}, "
                                "not a pto.Arg (use pto.Arg.input/output/inout/scalar)")
            if not isinstance(arg.kind, ParamType):
                try:
                    arg = Arg(ParamType(arg.kind), arg.value)
                except ValueError:
                    raise ValueError(f"argument {i} of {kernel!r} has kind {arg.kind!r}, not a "
                                     f"pto.ParamType ({', '.join(p.name for p in ParamType)})"
                                     ) from None
            if arg.kind == ParamType.SCALAR:
                specs.append(P.ArgSpec(int(ParamType.SCALAR), scalar=_scalar(arg.value, i, kernel)))
                continue
            handle = self._as_handle(arg, i, kernel)
            handles.append(handle)
            specs.append(P.ArgSpec(int(arg.kind), segment_of(handle).tensor_id, handle.offset,
                                   handle.nbytes, handle.dtype_code, list(handle.shape)))
        segments = [segment_of(h) for h in handles]
        if segments:
            self._host.store.use(segments)  # from now on the task keeps the segments alive
        spec = P.TaskSpec(self._host.new_task_id(), chip, kid, specs, group, retries)
        nbytes = sum(arg_spec.nbytes for arg_spec in specs)
        self._pending.append(PendingTask(spec, kernel, segments, nbytes, time.monotonic()))
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush()

    def _as_handle(self, arg: Arg, i: int, kernel: str) -> TensorHandle:
        value = arg.value
        if isinstance(value, TensorHandle):
            if segment_of(value).store is not self._host.store:
                raise ValueError(f"argument {i} of {kernel!r}: tensor {value.name} belongs to "
                                 "another runtime")
            usable_segment(value)  # or TensorFreed
            return value
        if isinstance(value, np.ndarray):
            known = self._run.array_handles.get(id(value))
            if known is not None:
                return known[1]
            if arg.kind != ParamType.INPUT and not value.flags.writeable:
                raise ValueError(f"argument {i} of {kernel!r}: a read-only array cannot be "
                                 f"an {arg.kind.name.lower()}")
            handle = self.tensor(value) if arg.kind != ParamType.OUTPUT else self.alloc(
                value.shape, value.dtype)
            self._run.array_handles[id(value)] = (value, handle)  # also keeps id() unique
            if arg.kind != ParamType.INPUT:
                self._run.copy_back.append((value, handle))
            return handle
        raise TypeError(f"argument {i} of {kernel!r}: a tensor argument takes a TensorHandle "
                        f"or a numpy array, not {type(value).__name__}")

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._host.send_tasks(self._run, batch)


def _scalar(value: Any, i: int, kernel: str) -> int | float | bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        if not _INT_MIN <= int(value) <= _UINT_MAX:
            raise OverflowError(f"scalar argument {i} of {kernel!r} does not fit in 64 bits")
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"scalar argument {i} of {kernel!r} must be a bool, int or float, "
                    f"not {type(value).__name__}")
