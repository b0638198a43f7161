"""The host actor: one per host (Ray node), owning that host's L3 runtime.

``ClusterRuntime`` starts one ``HostActor`` per node advertising ``pto_chips``, pinned there
(``NodeAffinitySchedulingStrategy(soft=False)``), named ``pto-host<i>-<session>`` in the
``pto`` namespace (``pto status --cluster`` finds them). It is a threaded actor, so runs
overlap; each ``run`` is one ``pto.Runtime(level="host").run`` of an L3 entry.

A run's arguments arrive as an argument template plus the resolved results of the runs it
depends on (top-level Ray arguments: Ray waited for them). Each ``TensorDesc`` in them
becomes a ``TensorHandle`` in this host's shared memory: one this actor keeps (same host:
the very handle, no copy) or a copy of another host's tensor (``fetch`` there, through
Ray's object store, then one copy into a segment here). The run's return value goes back
with its handles replaced by descriptors; the handles stay here, in ``_kept``, until the
driver says no Ref to that run remains (``release``).

When Ray restarts this actor (its process died), ``__init__`` runs again: a new L3
runtime, no kept tensors (runs needing them fail with ``pto.HostLost``), and entries
registered again on first use from the copy ``register`` left in Ray's key-value store
(``ray.experimental.internal_kv``, the GCS: it outlives any actor; the driver deletes it
at close). Keeping it there, not in every run's arguments, keeps a run's Ray call small.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import threading
import time
import warnings
from typing import Any

import cloudpickle
import ray

from ..host.tensor import TensorHandle
from ..wire.errors import BrokerLost, TaskError
from .errors import HostLostError, HostTaskError
from .refs import TensorDesc, fill, instances_in, map_instances
from .shipping import unpack_registration

NAMESPACE = "pto"
# Calls that must never queue behind runs (a run may be waiting for a peer's ``fetch``:
# with both hosts' run threads all waiting on each other, fetches in the same pool would
# deadlock) get threads of their own.
CONTROL = "control"
CONTROL_THREADS = 4
# Bound on waiting for another host's tensor; Ray fails the wait sooner when that host dies.
FETCH_TIMEOUT_S = 600.0


def actor_name(session: str, host: int) -> str:
    return f"pto-host{host}-{session}"


def _kv_key(session: str, entry: str) -> bytes:
    return f"pto-entry-{session}-{entry}".encode()


def store_registration(session: str, entry: str, blob: bytes) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_kv_key(session, entry), blob, overwrite=True,
                                 namespace=NAMESPACE)


def registration(session: str, entry: str) -> bytes:
    from ray.experimental import internal_kv

    blob = internal_kv._internal_kv_get(_kv_key(session, entry), namespace=NAMESPACE)
    if blob is None:
        raise KeyError(f"L3 entry {entry!r} is not registered with this cluster runtime")
    return blob


def drop_registrations(session: str, entries: list[str]) -> None:
    from ray.experimental import internal_kv

    for entry in entries:
        internal_kv._internal_kv_del(_kv_key(session, entry), namespace=NAMESPACE)


class HostActor:
    """Owns host ``host``'s L3 runtime (``chips`` chips) and the tensors its runs returned."""

    def __init__(self, host: int, chips: int, session: str, timeout: float, trace: bool):
        from ..host.runtime import HostRuntime

        self.host = host
        self.session = session
        self._lock = threading.Lock()
        self._trace_dir = tempfile.mkdtemp(prefix=f"pto-trace-h{host}-") if trace else None
        l3_trace = os.path.join(self._trace_dir, "l3.json") if self._trace_dir else None
        self._new_l3 = lambda: HostRuntime(devices=list(range(chips)),
                                       timeout=timeout, trace=l3_trace)
        self.rt = self._new_l3()
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own use of a deprecated property inside
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restarted = bool(ctx.was_current_actor_reconstructed)
        # Why tensors of earlier runs are gone, if they are (a run needing one: HostLost).
        self._lost_why = "the host actor restarted since it was made" if self._restarted else None
        self._node = ctx.get_node_id()
        self._actor = ctx.get_actor_id()
        self._registered: set[str] = set()
        self._kept: dict[int, list[TensorHandle]] = {}  # run id -> handles it returned
        self._running: dict[int, tuple[str, float]] = {}  # run id -> (entry, wall start)
        self._peers: dict[int, Any] = {}  # host -> actor handle
        self._runs: list[dict[str, Any]] = []  # trace records (monotonic seconds)
        self._transfers: list[dict[str, Any]] = []
        self._stats = {"runs": 0, "transfers": 0, "bytes_in": 0, "local_handoffs": 0}
        gc.freeze()  # what start-up made (Ray, pto, the L3 runtime) is never garbage

    # ---- set-up ------------------------------------------------------------------------

    @ray.method(concurrency_group=CONTROL)
    def info(self) -> dict[str, Any]:
        return {"host": self.host, "node": self._node, "actor": self._actor, "pid": os.getpid(),
                "chips": list(self.rt.devices), "restarted": self._restarted}

    def register(self, name: str, blob: bytes) -> None:
        """Register L3 entry ``name`` (``blob``: its pickled orchestration and kernels)."""
        orch, kernels = unpack_registration(cloudpickle.loads(blob))

        def entry(ctx: Any, payload: tuple[Any, dict[tuple[int, int], Any]]) -> Any:
            args, fetched = payload
            handles: dict[tuple[int, int], TensorHandle] = {}

            def to_handle(desc: TensorDesc) -> TensorHandle:
                known = handles.get(desc.key)
                if known is None and desc.host == self.host:
                    known = handles[desc.key] = self._kept_handle(desc.key, desc.name)
                    with self._lock:
                        self._stats["local_handoffs"] += 1
                elif known is None:
                    known = handles[desc.key] = self._copy_in(ctx, desc, fetched[desc.key])
                return known

            return orch(ctx, map_instances(args, TensorDesc, to_handle))

        with self._lock:
            self.rt.register(name, orch=entry, kernels=kernels)
            self._registered.add(name)

    # ---- runs --------------------------------------------------------------------------

    def run(self, header: tuple[int, str, Any], *values: Any) -> Any:
        """Run an L3 entry: ``header`` is (run id, entry, argument template), ``values`` the
        results of the runs it depends on (one Ray argument each: Ray waited for them)."""
        run_id, entry, template = header
        if entry not in self._registered:  # a restarted actor: register from Ray's KV
            self.register(entry, registration(self.session, entry))
        start = time.monotonic()
        with self._lock:
            self._running[run_id] = (entry, time.time())
        error = None
        rt = self.rt  # the L3 runtime this run uses (replaced if its broker is lost)
        try:
            args = fill(template, values)
            fetched = self._fetch_all(instances_in(args, TensorDesc), run_id)
            value = rt.run(entry, (args, fetched))
            return self._keep(run_id, value)
        except TaskError as exc:
            error = exc.reason
            raise HostTaskError(self.host, exc.kernel, exc.chip, exc.reason, exc.failed,
                                run_id) from None
        except BrokerLost as exc:
            error = str(exc)
            self._replace_l3(rt)
            raise HostLostError(self.host, f"its L3 broker was lost: {exc}", run_id) from None
        except HostLostError as exc:
            error = str(exc)
            exc.run = exc.run or run_id
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            exc.add_note(f"(in L3 entry {entry!r} on host {self.host})")
            exc._pto_run = run_id  # type: ignore[attr-defined]  # tells the driver: root
            raise
        finally:
            end = time.monotonic()
            with self._lock:
                self._running.pop(run_id, None)
                self._stats["runs"] += 1
                if self._trace_dir:
                    self._runs.append({"run": run_id, "entry": entry, "start": start,
                                       "end": end, "error": error})

    def _replace_l3(self, lost: Any) -> None:
        """The L3 runtime ``lost`` lost its broker: start a new one, so this host serves
        again (the tensors kept in the old one are gone: runs needing them get HostLost)."""
        with self._lock:
            if self.rt is not lost:
                return  # another run's thread replaced it already
            entries, self._registered = sorted(self._registered), set()
            self._kept.clear()
            self._lost_why = "the host's L3 runtime lost its broker and was restarted"
            self.rt = self._new_l3()
        lost.close()
        for entry in entries:
            if entry not in self._registered:
                self.register(entry, registration(self.session, entry))

    def _keep(self, run_id: int, value: Any) -> Any:
        handles: list[TensorHandle] = []

        def describe(handle: TensorHandle) -> TensorDesc:
            handles.append(handle)
            return TensorDesc(self.host, (run_id, len(handles) - 1), handle.name,
                              tuple(handle.shape), handle.dtype.str, handle.offset,
                              handle.nbytes)

        out = map_instances(value, TensorHandle, describe)
        if handles:
            with self._lock:
                self._kept[run_id] = handles
        return out

    def _kept_handle(self, key: tuple[int, int], name: str) -> TensorHandle:
        with self._lock:
            handles = self._kept.get(key[0])
            why = self._lost_why
        if handles is None:
            raise HostLostError(self.host, f"tensor {name} is gone: "
                                f"{why or 'no Ref names it any more'}")
        return handles[key[1]]

    def _fetch_all(self, descs: list[TensorDesc], run_id: int) -> dict[tuple[int, int], Any]:
        """Other hosts' tensors among ``descs``, through Ray (started at once, then awaited)."""
        import ray.exceptions as rex

        wanted: dict[tuple[int, int], TensorDesc] = {}
        for d in descs:
            if d.host != self.host:
                wanted.setdefault(d.key, d)
        pending = {key: (d, time.monotonic(), self._peer(d.host).fetch.remote(key, d.name))
                   for key, d in wanted.items()}
        out = {}
        for key, (desc, start, ref) in pending.items():
            try:
                out[key] = ray.get(ref, timeout=FETCH_TIMEOUT_S)
            except (rex.RayActorError, rex.ObjectLostError, rex.GetTimeoutError) as exc:
                raise HostLostError(desc.host, f"its tensor {desc.name} could not be fetched "
                                    f"by host {self.host} ({type(exc).__name__})",
                                    run_id) from None
            except rex.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, HostLostError) else exc) from None
            if self._trace_dir:
                self._transfers.append({"run": run_id, "from": desc.host, "to": self.host,
                                        "bytes": desc.nbytes, "name": desc.name,
                                        "start": start, "fetched": time.monotonic()})
        return out

    def _copy_in(self, ctx: Any, desc: TensorDesc, array: Any) -> TensorHandle:
        start = time.monotonic()
        handle = ctx.tensor(array)  # the one copy on this host: object store -> shm
        with self._lock:
            self._stats["transfers"] += 1
            self._stats["bytes_in"] += desc.nbytes
            for rec in reversed(self._transfers):
                if rec["name"] == desc.name and "copied" not in rec:
                    rec["copy_start"], rec["copied"] = start, time.monotonic()
                    break
        return handle

    def _peer(self, host: int) -> Any:
        peer = self._peers.get(host)
        if peer is None:
            peer = self._peers[host] = ray.get_actor(actor_name(self.session, host),
                                                     namespace=NAMESPACE)
        return peer

    @ray.method(concurrency_group=CONTROL)
    def fetch(self, key: tuple[int, int], name: str) -> Any:
        """The bytes of kept tensor ``name``, as a numpy view Ray copies into its object
        store."""
        return self._kept_handle(tuple(key), name).numpy()

    @ray.method(concurrency_group=CONTROL)
    def release(self, run_ids: list[int]) -> None:
        """No Ref to these runs remains: drop their handles (their segments go when no
        run of this host still uses them)."""
        with self._lock:
            dropped = [self._kept.pop(run_id, None) for run_id in run_ids]
        del dropped

    # ---- observability and life ----------------------------------------------------------

    @ray.method(concurrency_group=CONTROL)
    def status(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            running = [{"run": r, "entry": e, "seconds": round(now - t, 3)}
                       for r, (e, t) in sorted(self._running.items())]
            kept = sum(len(h) for h in self._kept.values())
            stats = dict(self._stats)
        return {**self.info(), "running": running, "kept_tensors": kept, "stats": stats}

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    @ray.method(concurrency_group=CONTROL)
    def trace(self) -> dict[str, Any]:
        """This host's trace records: its L3 runs, transfers into it, its chips' events.
        Times are ``time.monotonic()`` here; ``offset`` turns them into wall-clock time."""
        chips: list[dict[str, Any]] = []
        if self._trace_dir:
            path = self.rt.write_trace()
            with open(path) as f:
                chips = json.load(f)["traceEvents"]
        with self._lock:
            return {"host": self.host, "offset": time.time() - time.monotonic(),
                    "runs": list(self._runs), "transfers": list(self._transfers),
                    "chips": chips}

    def close(self) -> None:
        with self._lock:
            self._kept.clear()
        self.rt.close()
        if self._trace_dir:
            import shutil

            shutil.rmtree(self._trace_dir, ignore_errors=True)
