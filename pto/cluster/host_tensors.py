"""A host's tensors: those its runs returned (kept) and those it copied in from other hosts.

Where it sits: the host actor (pto/cluster/host.py) keeps the handles a run returns
(``keep``, which gives the driver descriptors instead) until the driver's ``Release`` says
no Ref to that run remains (``release``); its tensor server (pto/cluster/stream_server.py)
serves them to other hosts and the driver (``serve``). When a later run's arguments name a
tensor (``handle_for``): one this host keeps is handed over as the very handle (no copy);
another host's is pulled from that host's tensor server straight into a new segment here
(one copy, the network's; concurrent runs needing it share one pull) and kept until the
producer's run is released. This host never opens another host's segment.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..host.tensor import TensorHandle
from .errors import HostLostError
from .protocol import STREAM_TIMEOUT_S
from .refs import TensorDesc, map_instances
from .stream import StreamAuth, StreamError
from .stream_fetch import Fetcher


def tensor_key(key: tuple[int, int]) -> str:
    """The name a kept tensor is served under: ``<run>.<position>``."""
    return f"{key[0]}.{key[1]}"


class HostTensors:
    """The kept and copied-in tensors of one host actor, and the counts of its handoffs."""

    def __init__(self, host: int, trace: bool, lost_why: str | None):
        self.host = host
        self._trace = trace
        self._lock = threading.Lock()
        self._kept: dict[int, list[TensorHandle]] = {}  # run id -> handles it returned
        # (producer host, run) -> {position: Future of the copy here}
        self._copies: dict[tuple[int, int], dict[int, Future]] = {}
        self._lost_why = lost_why  # why tensors of earlier runs are gone, if they are
        self._fetcher: Fetcher | None = None
        self._endpoint = ""
        self._stats = {"transfers": 0, "bytes_in": 0, "local_handoffs": 0}
        self._transfers: list[dict[str, Any]] = []  # trace records (monotonic seconds)

    def open(self, stream_auth: StreamAuth, endpoint: str) -> None:
        """Pull from other hosts with the session's ``stream_auth``; serve at ``endpoint``."""
        self._fetcher = Fetcher(stream_auth, timeout=STREAM_TIMEOUT_S)
        self._endpoint = endpoint

    def keep(self, run_id: int, value: Any) -> Any:
        """``value`` (run ``run_id``'s return value) with each handle kept here and replaced
        by its descriptor."""
        handles: list[TensorHandle] = []

        def describe(handle: TensorHandle) -> TensorDesc:
            handles.append(handle)
            return TensorDesc(self.host, (run_id, len(handles) - 1), handle.name,
                              tuple(handle.shape), handle.dtype.str, handle.offset,
                              handle.nbytes, self._endpoint)

        out = map_instances(value, TensorHandle, describe)
        if handles:
            with self._lock:
                self._kept[run_id] = handles
        return out

    def handle_for(self, ctx: Any, desc: TensorDesc, run_id: int,
                   fetched: list[tuple[int, int]]) -> TensorHandle:
        """The tensor ``desc`` names as a handle on this host, for run ``run_id`` (``ctx``:
        its L3 orchestration context, which allocates a copy's segment); a copy's
        (producer host, run) is appended to ``fetched``."""
        if desc.host == self.host:
            handle = self._kept_handle(desc.key, desc.name)
            with self._lock:
                self._stats["local_handoffs"] += 1
            return handle
        handle = self._copy_in(ctx, desc, run_id)
        fetched.append((desc.host, desc.key[0]))
        return handle

    def _kept_handle(self, key: tuple[int, int], name: str) -> TensorHandle:
        with self._lock:
            handles = self._kept.get(key[0])
            why = self._lost_why
        if handles is None:
            raise HostLostError(self.host, f"tensor {name} is gone: "
                                f"{why or 'no Ref names it any more'}")
        return handles[key[1]]

    def _copy_in(self, ctx: Any, desc: TensorDesc, run_id: int) -> TensorHandle:
        """Another host's tensor as a handle here: pulled from its tensor server into a new
        segment once, however many runs here need it at once or later (until released)."""
        with self._lock:
            parts = self._copies.setdefault((desc.host, desc.key[0]), {})
            future = parts.get(desc.key[1])
            leader = future is None
            if leader:
                future = parts[desc.key[1]] = Future()
        if not leader:
            return future.result()
        start = time.monotonic()
        handle = None
        try:
            # every byte is about to be written: no zero-filling first
            handle = ctx.alloc(desc.shape, np.dtype(desc.dtype), zero=False)
            if desc.nbytes:
                assert self._fetcher is not None, "open() comes first"
                self._fetcher.fetch(desc.endpoint, tensor_key(desc.key), desc.nbytes,
                                    handle.numpy().reshape(-1).view(np.uint8))
        except BaseException as exc:
            if handle is not None:
                handle.free()  # now: the error's traceback would keep it alive until a gc
            with self._lock:
                self._copies.get((desc.host, desc.key[0]), {}).pop(desc.key[1], None)
            if isinstance(exc, StreamError):
                exc = HostLostError(desc.host, f"its tensor {desc.name} could not be fetched "
                                    f"by host {self.host} ({type(exc).__name__}: {exc})", run_id)
            future.set_exception(exc)
            raise exc from None
        future.set_result(handle)
        with self._lock:
            self._stats["transfers"] += 1
            self._stats["bytes_in"] += desc.nbytes
            if self._trace:
                self._transfers.append({"run": run_id, "from": desc.host, "to": self.host,
                                        "bytes": desc.nbytes, "name": desc.name,
                                        "start": start, "fetched": time.monotonic()})
        return handle

    def serve(self, key: str) -> memoryview | None:
        """The tensor server's lookup: a view of kept tensor ``<run>.<position>``."""
        try:
            run, pos = (int(k) for k in key.split("."))
        except ValueError:
            return None
        with self._lock:
            handles = self._kept.get(run)
        if handles is None or not 0 <= pos < len(handles):
            return None
        array = handles[pos].numpy()
        return memoryview(array.reshape(-1).view(np.uint8)) if array.nbytes else None

    def release(self, run_ids: list[int]) -> None:
        """No Ref to these runs remains: drop their handles and this host's copies of
        them (their segments go when no run of this host still uses them)."""
        gone = set(run_ids)
        with self._lock:
            dropped: list[Any] = [self._kept.pop(run_id, None) for run_id in run_ids]
            for key in [k for k in self._copies if k[1] in gone]:
                dropped.append(self._copies.pop(key))
        del dropped

    def clear(self, why: str | None) -> None:
        """Drop every tensor (the L3 runtime holding them is gone, or this host closes);
        ``why`` is what a run that needs one of them hears."""
        with self._lock:
            self._kept.clear()
            self._copies.clear()
            if why is not None:
                self._lost_why = why

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
        self.clear(None)

    def counts(self) -> dict[str, int]:
        """Tensors kept and copied in now, and the handoff counters so far."""
        with self._lock:
            return {"kept_tensors": sum(len(h) for h in self._kept.values()),
                    "copied_tensors": sum(len(c) for c in self._copies.values()),
                    **self._stats}

    def transfers(self) -> list[dict[str, Any]]:
        """The trace records of the pulls into this host."""
        with self._lock:
            return list(self._transfers)
