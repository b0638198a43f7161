"""An L4 run's outcome for its caller: its first failure, or its value with numpy arrays.

Where it sits: once the run book (pto/cluster/runbook.py) says an L4 run has finished,
``ClusterRuntime`` (pto/cluster/runtime.py) hands it here, in the caller of ``rt.run`` or a
finisher thread for ``rt.submit``'s Future. ``finish`` raises what the orchestration raised,
else the first failure of its L3 runs, else returns its value with each ``Ref`` replaced by
that run's value: the tensors in it are pulled from their hosts' tensor servers
(pto/cluster/stream_fetch.py) straight into the numpy arrays returned, the one copy of
each being the network's.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import HostLostError, first_failure
from .host_tensors import tensor_key
from .refs import Ref, TensorDesc, follow, instances_in, map_instances, output_of
from .runbook import L4Run, RunBook
from .stream import StreamError
from .stream_fetch import Fetcher
from .trace import ClusterTrace


class Results:
    """Turns finished L4 runs into what ``rt.run`` returns or raises."""

    def __init__(self, book: RunBook, fetcher: Fetcher, trace: ClusterTrace | None,
                 closed: Callable[[], bool]):
        self._book = book
        self._fetcher = fetcher
        self._trace = trace
        self._closed = closed

    def finish(self, run: L4Run, deadline: float | None) -> Any:
        """``run``'s value (Refs resolved), or its error raised."""
        try:
            if run.error is not None:
                raise run.error
            if run.errors:
                raise first_failure(sorted(run.errors, key=lambda item: item[0]))
            return self.resolve(run.value, deadline)
        finally:
            if self._trace is not None:
                self._trace.l4_run(run.name, run.start, time.time(), None)
            run.records, run.value, run.errors = [], None, []

    def finish_future(self, run: L4Run) -> None:
        """Finish ``run`` into its Future (a finisher thread)."""
        assert run.future is not None
        try:
            value = self.finish(run, None)
        except BaseException as exc:
            if run.future.set_running_or_notify_cancel():
                run.future.set_exception(exc)
        else:
            if run.future.set_running_or_notify_cancel():
                run.future.set_result(value)

    def resolve(self, value: Any, deadline: float | None) -> Any:
        """``value`` with each Ref replaced by its value, tensors pulled from their hosts'
        tensor servers straight into new numpy arrays."""
        refs = instances_in(value, Ref)
        if not refs:
            return value
        outputs = {id(o): o for o in (output_of(r) for r in refs)}
        self._book.wait_done(outputs.values(), deadline, self._closed)
        for out in outputs.values():
            if out.error is not None:
                raise out.error
        values = {k: pickle.loads(o.blob) for k, o in outputs.items()}
        picked = {id(r): follow(values[id(output_of(r))], r.path, repr(r)) for r in refs}
        descs = {(d.host, d.key): d for v in picked.values() for d in instances_in(v, TensorDesc)}
        arrays = {key: self._pull(d) for key, d in descs.items()}
        return map_instances(value, Ref, lambda r: map_instances(
            picked[id(r)], TensorDesc, lambda d: arrays[(d.host, d.key)]))

    def _pull(self, desc: TensorDesc) -> np.ndarray:
        array = np.empty(desc.shape, np.dtype(desc.dtype))
        if not desc.nbytes:
            return array
        try:
            self._fetcher.fetch(desc.endpoint, tensor_key(desc.key), desc.nbytes,
                                array.reshape(-1).view(np.uint8))
        except StreamError as exc:
            lost = self._book.lost(desc.host)
            raise HostLostError(desc.host, lost or f"its tensor {desc.name} could not be "
                                f"fetched ({type(exc).__name__}: {exc})") from None
        return array
