"""The host actor: one per host (Ray node), owning that host's L3 runtime and endpoints.

``ClusterRuntime`` starts one ``HostActor`` per node advertising ``pto_chips``, pinned there
(``NodeAffinitySchedulingStrategy(soft=False)``), named ``pto-host<i>-<session>`` in the
``pto`` namespace (``pto status --cluster`` finds them). Ray places, restarts and reports
it; runs and tensors do not go through Ray:

- ``open(keys)`` (a Ray call from the driver, carrying the session's keys) binds the
  host's control endpoint (pto/cluster/server.py: the driver's runs arrive there, results
  leave) and its tensor server (pto/cluster/stream_server.py: other hosts and the driver
  pull this host's tensors from it).
- A run's arguments hold a ``TensorDesc`` for each tensor of a run it depends on; its
  return value goes back with its handles replaced by descriptors. Which tensors this host
  keeps, and the copies it pulls from other hosts, are pto/cluster/host_tensors.py's.

When Ray restarts this actor (its process died), ``__init__`` runs again: a new L3
runtime, no kept tensors (runs needing them fail with ``pto.HostLost``), and the driver
opens it again with fresh keys. Entries are registered again on first use from the copy
``register`` left in Ray's key-value store (``ray.experimental.internal_kv``, the GCS: it
outlives any actor; the driver deletes it at close).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from typing import Any

import cloudpickle
import ray

from ..host.tensor import TensorHandle
from ..wire.errors import BrokerLost, TaskError
from . import protocol as P
from .errors import HostLostError, HostTaskError
from .host_tensors import HostTensors
from .refs import TensorDesc, fill, map_instances
from .shipping import unpack_registration
from .stream import StreamAuth

NAMESPACE = "pto"
# Ray calls that must never queue behind each other's long waits get threads of their own.
CONTROL = "control"
CONTROL_THREADS = 4
WATCH = "watch"  # the driver's death watch: one call per driver, parked until close
RUN_THREADS = 8  # L3 runs at once on a host (more wait in the control server's pool)


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


class _Failed(Exception):
    """A run of this host failed: ``args[0]`` is its pickled error, as sent to the driver."""


def dumps_error(exc: BaseException) -> bytes:
    """``exc`` pickled for the driver, or a plain RuntimeError with its text if it will not."""
    try:
        return cloudpickle.dumps(exc)
    except Exception:
        plain = RuntimeError(f"{type(exc).__name__}: {exc}")
        for note in getattr(exc, "__notes__", []):
            plain.add_note(note)
        plain._pto_run = getattr(exc, "_pto_run", 0)  # type: ignore[attr-defined]
        return pickle.dumps(plain)


class HostActor:
    """Owns host ``host``'s L3 runtime (``chips`` chips), its endpoints, and (through
    ``HostTensors``) the tensors its runs returned or copied in."""

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
        self._node = ctx.get_node_id()
        self._actor = ctx.get_actor_id()
        self._ip = ray.util.get_node_ip_address()
        self._registered: set[str] = set()
        # Tensors of earlier runs are gone after a restart (a run needing one: HostLost).
        self._tensors = HostTensors(host, bool(trace), "the host actor restarted since it "
                                    "was made" if self._restarted else None)
        # run id -> Future of its pickled value (or _Failed): what later runs of this host
        # sent before it ended read; dropped on Release
        self._results: dict[int, Future] = {}
        self._running: dict[int, tuple[str, float]] = {}  # run id -> (entry, wall start)
        self._runs: list[dict[str, Any]] = []  # trace records (monotonic seconds)
        self._run_count = 0
        self._control: Any = None  # ControlServer, once open()
        self._server: Any = None  # TensorServer, once open()
        self._closed = threading.Event()
        gc.freeze()  # what start-up made (Ray, pto, the L3 runtime) is never garbage

    # ---- set-up ------------------------------------------------------------------------

    @ray.method(concurrency_group=CONTROL)
    def info(self) -> dict[str, Any]:
        return {"host": self.host, "node": self._node, "actor": self._actor, "pid": os.getpid(),
                "chips": list(self.rt.devices), "restarted": self._restarted}

    @ray.method(concurrency_group=CONTROL)
    def open(self, keys: dict[str, Any], stream_auth: StreamAuth) -> dict[str, str]:
        """Bind this host's control endpoint and tensor server with the session's keys;
        their addresses. Called once per actor life (a restarted actor is opened again)."""
        from .server import ControlServer
        from .stream_server import TensorServer

        with self._lock:
            if self._control is not None:
                raise RuntimeError(f"host {self.host} is already open")
            self._server = TensorServer(self._ip, stream_auth, self._tensors.serve)
            self._tensors.open(stream_auth, self._server.address)
            self._control = ControlServer(self._ip, keys, self.run, self.release,
                                          threads=RUN_THREADS, after=self.after)
            return {"control": self._control.endpoint, "tensors": self._server.address}

    @ray.method(concurrency_group=WATCH)
    def watch(self) -> bool:
        """Returns when this actor closes; Ray fails it at once if the actor dies (the
        driver's death report, without polling)."""
        self._closed.wait()
        return True

    def register(self, name: str, blob: bytes) -> None:
        """Register L3 entry ``name`` (``blob``: its pickled orchestration and kernels)."""
        orch, kernels = unpack_registration(cloudpickle.loads(blob))
        tensors = self._tensors

        def entry(ctx: Any, payload: tuple[Any, int, list[tuple[int, int]]]) -> Any:
            args, run_id, fetched = payload
            handles: dict[tuple[int, int, int], TensorHandle] = {}

            def to_handle(desc: TensorDesc) -> TensorHandle:
                slot = (desc.host, *desc.key)
                known = handles.get(slot)
                if known is None:
                    known = handles[slot] = tensors.handle_for(ctx, desc, run_id, fetched)
                return known

            return orch(ctx, map_instances(args, TensorDesc, to_handle))

        with self._lock:
            self.rt.register(name, orch=entry, kernels=kernels)
            self._registered.add(name)

    # ---- runs (the control server's run threads) ----------------------------------------

    def after(self, msg: P.Run) -> list[Future]:
        """The results of this host's runs that ``msg`` reads (the control server starts it
        once they are done)."""
        with self._lock:
            self._results.setdefault(msg.run, Future())
            return [self._results.setdefault(r, Future()) for r in msg.local if r]

    def run(self, msg: P.Run) -> P.Message:
        """Run an L3 entry for the driver: ``Done`` with its value, or ``Failed``; the same
        outcome for later runs of this host reading it."""
        with self._lock:
            own = self._results.setdefault(msg.run, Future())
            inputs = [self._results.get(r) if r else None for r in msg.local]
        values = list(msg.values)
        for i, future in enumerate(inputs):
            if future is None and msg.local and msg.local[i]:
                reply: P.Message = P.Failed(msg.run, dumps_error(HostLostError(
                    self.host, f"run {msg.local[i]} this run reads is gone", msg.run)))
                break
            if future is not None:
                failed = future.exception()
                if failed is not None:  # the driver failed this run already: say the same
                    reply = P.Failed(msg.run, failed.args[0])
                    break
                values[i] = future.result()
        else:
            reply = self._run(msg, values)
        if own.done():  # a second Run of one id (never sent today): its first outcome stands
            return reply
        if isinstance(reply, P.Done):
            own.set_result(reply.value)
        else:
            own.set_exception(_Failed(reply.error))
        return reply

    def _run(self, msg: P.Run, values: list[bytes]) -> P.Message:
        run_id, entry = msg.run, msg.entry
        start = time.monotonic()
        with self._lock:
            self._running[run_id] = (entry, time.time())
        error = None
        fetched: list[tuple[int, int]] = []
        rt = self.rt  # the L3 runtime this run uses (replaced if its broker is lost)
        try:
            if entry not in self._registered:  # a restarted actor: register from Ray's KV
                self.register(entry, registration(self.session, entry))
            # Pickles from this session's driver (CURVE-authenticated), values first made here
            # or on the session's other hosts.
            template = cloudpickle.loads(msg.args)
            args = fill(template, tuple(cloudpickle.loads(v) for v in values))
            value = rt.run(entry, (args, run_id, fetched))
            return P.Done(run_id, cloudpickle.dumps(self._tensors.keep(run_id, value)),
                          sorted(set(fetched)))
        except TaskError as exc:
            error = exc.reason
            err: BaseException = HostTaskError(self.host, exc.kernel, exc.chip, exc.reason,
                                               exc.failed, run_id)
        except BrokerLost as exc:
            error = str(exc)
            self._replace_l3(rt)
            err = HostLostError(self.host, f"its L3 broker was lost: {exc}", run_id)
        except HostLostError as exc:
            error = str(exc)
            exc.run = exc.run or run_id
            err = exc
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            exc.add_note(f"(in L3 entry {entry!r} on host {self.host})")
            exc._pto_run = run_id  # type: ignore[attr-defined]  # tells the driver: root
            err = exc
        finally:
            end = time.monotonic()
            with self._lock:
                self._running.pop(run_id, None)
                self._run_count += 1
                if self._trace_dir:
                    self._runs.append({"run": run_id, "entry": entry, "start": start,
                                       "end": end, "error": error})
        return P.Failed(run_id, dumps_error(err), sorted(set(fetched)))

    def _replace_l3(self, lost: Any) -> None:
        """The L3 runtime ``lost`` lost its broker: start a new one, so this host serves
        again (the tensors kept in the old one are gone: runs needing them get HostLost)."""
        with self._lock:
            if self.rt is not lost:
                return  # another run's thread replaced it already
            entries, self._registered = sorted(self._registered), set()
            self._tensors.clear("the host's L3 runtime lost its broker and was restarted")
            self.rt = self._new_l3()
        lost.close()
        for entry in entries:
            if entry not in self._registered:
                self.register(entry, registration(self.session, entry))

    def release(self, run_ids: list[int]) -> None:
        """No Ref to these runs remains: drop their results, their tensors and this host's
        copies of them (their segments go when no run of this host still uses them)."""
        with self._lock:
            for run_id in run_ids:
                self._results.pop(run_id, None)
        self._tensors.release(run_ids)

    # ---- observability and life ----------------------------------------------------------

    @ray.method(concurrency_group=CONTROL)
    def status(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            running = [{"run": r, "entry": e, "seconds": round(now - t, 3)}
                       for r, (e, t) in sorted(self._running.items())]
        counts = self._tensors.counts()
        kept, copies = counts.pop("kept_tensors"), counts.pop("copied_tensors")
        return {**self.info(), "running": running, "kept_tensors": kept,
                "copied_tensors": copies, "stats": {**self.stats(), **counts}}

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict[str, int]:
        counts = self._tensors.counts()
        with self._lock:
            runs = self._run_count
        return {"runs": runs, "transfers": counts["transfers"],
                "bytes_in": counts["bytes_in"], "local_handoffs": counts["local_handoffs"]}

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
                    "runs": list(self._runs), "transfers": self._tensors.transfers(),
                    "chips": chips}

    @ray.method(concurrency_group=CONTROL)
    def close(self) -> None:
        if self._control is not None:
            self._control.close()
        if self._server is not None:
            self._server.close()
        self._tensors.close()
        with self._lock:
            self._results.clear()
        self.rt.close()
        self._closed.set()
        if self._trace_dir:
            import shutil

            shutil.rmtree(self._trace_dir, ignore_errors=True)
