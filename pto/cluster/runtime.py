"""``pto.Runtime(level="cluster")``: L4 orchestrations over hosts; Ray places, pto carries.

The life of an L4 run: ``submit`` calls the L4 orchestration in the calling thread; each
``ctx.submit(host, entry, args)`` becomes an ``_L3Run`` record (``place``). A run whose
Refs are all done, or whose unfinished ones all run on its own host, is sent at once,
straight to its host's control endpoint over the driver's CURVE connection
(pto/cluster/links.py; the host waits for its own runs itself, so a same-host chain never
waits for the driver); one waiting for another host's run is sent by the I/O thread the
moment the last of them reports ``Done`` (its dependents get the values as
the hosts sent them; a host pulls another host's tensors itself, pto/cluster/host.py). A
failure fails every run waiting on it with the same error, without running it. When the
orchestration has returned and its last L3 run has reported, the L4 run is finished: by
the caller of ``run`` (woken by an event), or by a finisher thread for ``submit``'s
Future. Finishing raises the first failure, else fetches the returned Refs' tensors from
their hosts' tensor servers straight into the numpy arrays it returns.

Freeing: the tensors an L3 run returned stay on its host while its ``RunOutput`` lives
(Refs hold it, and so does every run still waiting to read it). Its finalizer queues a
``Release`` to that host and to the hosts that may have copied them (release.Releaser).

Failures: Ray reports a dead host actor (a ``watch`` call parked on every actor fails at
once) and a dead node; the wire reports a host silent for ``protocol.SILENT_LOST_S``. A
restarted actor is opened again (new endpoint, fresh keys) and its runs in flight are sent
again, ``retries`` times at most; a host that is gone for good fails its runs, and the runs
reading its tensors, with ``pto.HostLost``.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np
import zmq

from ..base import RuntimeBase, check_timeout
from ..wire.errors import PtoError
from . import placement
from . import protocol as P
from .context import ClusterContext, check_host
from .errors import HostLostError, first_failure, from_ray
from .host import STREAM_TIMEOUT_S, drop_registrations, store_registration, tensor_key
from .links import Links
from .refs import (
    Ref,
    RunOutput,
    TensorDesc,
    follow,
    instances_in,
    map_instances,
    output_of,
    split_refs,
)
from .release import Releaser
from .shipping import pack_registration
from .stream import StreamAuth, StreamError
from .stream_fetch import Fetcher
from .trace import ClusterTrace

log = logging.getLogger("pto.cluster")


@dataclass(eq=False)
class _L4Run:
    name: str
    future: Future | None  # None: rt.run's own run (its caller finishes it)
    start: float
    pending: int = 0  # L3 runs placed and not yet settled
    ended: bool = False  # the orchestration has returned
    finished: threading.Event = field(default_factory=threading.Event)
    records: list[_L3Run] = field(default_factory=list)
    errors: list[tuple[int, int, BaseException]] = field(default_factory=list)
    value: Any = None  # what the orchestration returned
    error: BaseException | None = None  # what it raised
    abandoned: bool = False


@dataclass(eq=False)
class _L3Run:
    run_id: int
    host: int
    entry: str
    args: bytes  # the pickled argument template
    inputs: list[RunOutput]  # held until this run has settled: it reads their values
    output: RunOutput | None  # held until settled (then only Refs hold it)
    l4: _L4Run
    waiting: int = 0  # inputs not yet done
    sends: int = 0


@dataclass
class _Host:
    control: str = ""
    control_key: bytes = b""
    tensors: str = ""
    lost: str | None = None  # why it is lost for this runtime
    restarting: bool = False
    watch: Any = None  # the parked ObjectRef of its actor's watch()


class ClusterRuntime(RuntimeBase):
    """L4: runs L3 entries on the hosts of a Ray cluster (one host actor per node).

    >>> with pto.Runtime(level="cluster", cluster=lc.address) as rt:
    ...     rt.register("partial_sum", orch=partial_sum, kernels={"sum": sum_kernel})
    ...     rt.register("scatter", orch=scatter)        # no kernels: an L4 orchestration
    ...     total = rt.run("scatter", args=np.arange(1000.0))

    ``encrypt_tensors=True`` encrypts host-to-host tensor streams with CURVE (for untrusted
    networks; it costs several times the time of a large transfer). Control messages are
    always CURVE-encrypted; tensor streams are always authenticated.
    """

    level = "cluster"

    def __init__(self, cluster: str | None = None, devices: list[int] | None = None,
                 timeout: float = 60.0, trace: str | None = None, retries: int = 1,
                 platform: str = "sim", encrypt_tensors: bool = False):
        if platform != "sim":
            raise ValueError(f"platform {platform!r} needs Ascend hardware; use 'sim'")
        timeout = check_timeout(timeout)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        if cluster is not None and (not isinstance(cluster, str) or not cluster):
            raise ValueError(f"cluster must be a Ray address string, not {cluster!r}")
        local_chips = len(list(devices)) if devices is not None else 1
        self._token = object()  # Refs made by this runtime point at it
        self._session = secrets.token_hex(4)
        self._timeout = float(timeout)
        self._retries = retries
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an output settled
        self._inflight: dict[int, _L3Run] = {}
        client_public, client_secret = zmq.curve_keypair()
        self._client = {"client_public": client_public, "client_secret": client_secret}
        self._stream_auth = StreamAuth.new(encrypt=bool(encrypt_tensors))
        self._links: Links | None = None
        self._fetcher: Fetcher | None = None
        self._watcher: threading.Thread | None = None
        placement.CONNECTION.join(cluster, local_chips)
        self._actors: list[Any] = []
        try:
            nodes = placement.pto_nodes()
            self._actors = placement.start_hosts(nodes, self._session, self._timeout,
                                                 trace is not None, retries)
            infos = placement.wait_up(self._actors, self._timeout)
            self._nodes = nodes
            self._chips = [list(info["chips"]) for info in infos]
            self._pids = [info["pid"] for info in infos]
            self._host_of_actor = {info["actor"]: h for h, info in enumerate(infos)}
            self.hosts: list[int] = list(range(len(self._actors)))
            self._hosts = [_Host() for _ in self.hosts]
            self._links = Links(self._session, self._client, self._on_message, self._on_silent)
            self._fetcher = Fetcher(self._stream_auth, timeout=STREAM_TIMEOUT_S)
            for host in self.hosts:
                self._open_host(host)
        except BaseException:
            self._stop_wire()
            self._stop_hosts()
            placement.CONNECTION.leave()
            raise
        self._trace = ClusterTrace(trace) if trace is not None else None
        self._l3: set[str] = set()  # L3 entry names
        self._l4: dict[str, Callable[..., Any]] = {}
        self._run_ids = itertools.count(1)
        self._finisher = ThreadPoolExecutor(4, thread_name_prefix="pto-l4-finish")
        self._releaser = Releaser(lambda host, ids: self._links.send(host, P.Release(ids)))
        self._watcher = threading.Thread(target=self._watch, name="pto-l4-watch", daemon=True)
        self._watcher.start()
        self._opened()

    # ---- hosts -------------------------------------------------------------------------

    def chips(self, host: int) -> list[int]:
        """The chips (device ids) of ``host``."""
        check_host(host, self.hosts)
        return list(self._chips[int(host)])

    def endpoints(self, host: int) -> dict[str, str]:
        """Where ``host`` listens: ``{"control": tcp address, "control_key": its CURVE
        public key (Z85), "tensors": tcp address}``. Only this runtime's client key gets
        through the control endpoint, only the session's secret through the tensor one."""
        check_host(host, self.hosts)
        state = self._hosts[int(host)]
        return {"control": state.control, "control_key": state.control_key.decode(),
                "tensors": state.tensors}

    def _open_host(self, host: int) -> None:
        """Give ``host``'s actor fresh server keys, learn its endpoints, connect to it."""
        import ray

        server_public, server_secret = zmq.curve_keypair()
        keys = {**self._client, "server_public": server_public, "server_secret": server_secret}
        actor = self._actors[host]
        ends = ray.get(actor.open.remote(keys, self._stream_auth), timeout=self._timeout)
        state = self._hosts[host]
        state.control, state.tensors = ends["control"], ends["tensors"]
        state.control_key = server_public
        self._links.connect(host, state.control, server_public)
        state.watch = actor.watch.options(max_task_retries=0).remote()

    # ---- registration ------------------------------------------------------------------

    def register(self, name: str, orch: Callable[..., Any],
                 kernels: Mapping[str, Any] | None = None) -> None:
        """With ``kernels``, an L3 entry shipped to every host now (``ctx.submit`` runs it);
        without, an L4 orchestration ``orch(ctx, args)`` run here by ``rt.run``."""
        import ray

        self._check_open()
        if not isinstance(name, str) or not name:
            raise TypeError("register() needs a non-empty name")
        if not callable(orch):
            raise TypeError(f"orch for {name!r} must be callable (ctx, args) -> value")
        if name in self._l3 or name in self._l4:
            kind = "an L3 entry" if name in self._l3 else "an L4 orchestration"
            raise ValueError(f"{name!r} is already registered as {kind}")
        if kernels is None:
            self._l4[name] = orch
            return
        if not isinstance(kernels, Mapping):
            raise TypeError(f"kernels of {name!r} must be a dict name -> kernel")
        blob = pack_registration(name, orch, kernels)
        store_registration(self._session, name, blob)  # where a restarted host finds it
        live = [h for h in self.hosts if self._hosts[h].lost is None]
        refs = {h: self._actors[h].register.remote(name, blob) for h in live}
        for host, ref in refs.items():
            try:
                ray.get(ref, timeout=self._timeout)
            except ray.exceptions.GetTimeoutError:
                raise HostLostError(host, f"it did not answer register({name!r}) within "
                                    f"{self._timeout:g}s") from None
            except ray.exceptions.RayError as exc:
                raise from_ray(exc, self._host_of_actor, host) from None
        self._l3.add(name)

    # ---- running -----------------------------------------------------------------------

    def submit(self, name: str, args: Any = None) -> Future:
        """Run L4 orchestration ``name`` without waiting; the Future resolves to its return
        value with every Ref replaced by numpy arrays. The orchestration runs now, here."""
        run = self._start(name, args, Future())
        assert run.future is not None
        return run.future

    def run(self, name: str, args: Any = None, timeout: float | None = None) -> Any:
        """Run L4 orchestration ``name`` and wait; its return value with numpy arrays for
        Refs. Raises ``pto.TaskError`` (naming the host) or ``pto.HostLost``; after
        ``timeout`` seconds the run's L3 runs not yet sent are dropped and ``TimeoutError``
        raised."""
        if timeout is not None:
            check_timeout(timeout)
        run = self._start(name, args, None)
        deadline = None if timeout is None else time.monotonic() + timeout
        if not run.finished.wait(timeout):
            self._abandon(run)
            raise TimeoutError(f"L4 run of {name!r} did not finish within {timeout:g}s; its "
                               "L3 runs not yet sent were dropped")
        return self._finish(run, deadline)

    def _start(self, name: str, args: Any, future: Future | None) -> _L4Run:
        self._check_open()
        orch = self._l4.get(name)
        if orch is None:
            if name in self._l3:
                raise ValueError(f"{name!r} is an L3 entry: submit it to a host from an L4 "
                                 "orchestration, ctx.submit(host, name, args)")
            raise KeyError(f"no L4 orchestration registered as {name!r}; L4 orchestrations: "
                           f"{sorted(self._l4)}")
        run = _L4Run(name, future, time.time())
        ctx = ClusterContext(self, run)
        try:
            run.value = orch(ctx, args)
        except BaseException as exc:  # its submitted runs still finish; then this raises
            run.value, run.error = None, exc
        ctx.end()
        with self._lock:
            run.ended = True
            self._check_finished(run)
        return run

    def place(self, run: _L4Run, host: Any, entry: Any, args: Any) -> Ref:
        """``ctx.submit``: check the call, record the L3 run, send it if it can go now."""
        self._check_open()
        check_host(host, self.hosts)
        host = int(host)
        if entry in self._l4:
            raise ValueError(f"{entry!r} is an L4 orchestration: ctx.submit runs L3 entries "
                             "(registered with kernels=); run it with rt.run")
        if entry not in self._l3:
            raise KeyError(f"no L3 entry registered as {entry!r}; L3 entries: "
                           f"{sorted(self._l3)}")
        template, inputs = split_refs(args, self._token)
        try:
            blob = cloudpickle.dumps(template)
        except Exception as exc:
            raise TypeError(f"the args of {entry!r} cannot be sent to host {host}: {exc}"
                            ) from None
        run_id = next(self._run_ids)
        output = RunOutput(self._token, run_id, host, entry, self._releaser.release)
        rec = _L3Run(run_id, host, entry, blob, inputs, output, run)
        with self._lock:
            run.pending += 1
            run.records.append(rec)
            self._inflight[run_id] = rec
            failed = None
            for out in inputs:
                if not out.done:
                    rec.waiting += 1
                    out.waiters.append(rec)
                elif out.error is not None and failed is None:
                    failed = out.error
            if failed is None and self._hosts[host].lost is not None:
                failed = HostLostError(host, self._hosts[host].lost)
            if failed is not None:
                self._settle(rec, error=failed)
            elif all(out.done or out.host == host for out in inputs):
                self._send(rec)  # what it waits for (if anything) runs on its own host
        if self._trace is not None:
            self._trace.submitted(run_id, host, entry, time.time())
        return Ref(output)

    # ---- the wire's side (the I/O thread; every method below runs under self._lock) ---

    def _send(self, rec: _L3Run) -> None:
        for out in rec.inputs:
            if out.host != rec.host:
                out.copies.add(rec.host)  # its tensors may be copied there: release there too
        rec.sends += 1
        values = [out.blob if out.done else b"" for out in rec.inputs]
        local = [0 if out.done else out.run_id for out in rec.inputs]
        self._links.send(rec.host, P.Run(rec.run_id, rec.entry, rec.args, values,
                                          local if any(local) else []))

    def _settle(self, rec: _L3Run, blob: bytes | None = None,
                error: BaseException | None = None) -> None:
        """``rec`` ended (``blob``: its value, or ``error``): wake or fail its waiters."""
        self._inflight.pop(rec.run_id, None)
        out = rec.output
        rec.inputs, rec.output = [], None
        if out is None:
            return  # settled already (failed by a lost host, then its report came)
        out.blob, out.error, out.done = blob, error, True
        run = rec.l4
        run.pending -= 1
        if error is not None:
            run.errors.append((rec.run_id, rec.host, error))
        waiters, out.waiters = out.waiters, []
        for waiter in waiters:
            if waiter.output is None:
                continue
            if error is not None:
                self._settle(waiter, error=error)
            else:
                waiter.waiting -= 1
                if waiter.waiting == 0 and not waiter.sends:
                    self._send(waiter)
        self._changed.notify_all()
        self._check_finished(run)

    def _check_finished(self, run: _L4Run) -> None:
        if run.ended and run.pending == 0 and not run.finished.is_set():
            run.finished.set()
            if run.future is not None:
                self._finisher.submit(self._finish_future, run)

    def _on_message(self, host: int, msg: P.Message) -> None:
        if not isinstance(msg, (P.Done, P.Failed)):
            log.warning("host %d sent a %s: not a host's message", host, type(msg).__name__)
            return
        with self._lock:
            rec = self._inflight.get(msg.run)
            if rec is None or rec.host != host:
                return  # failed already (its host was declared lost), or not ours
            if isinstance(msg, P.Done):
                self._settle(rec, blob=msg.value)
            else:
                self._settle(rec, error=_load_error(msg.error, host))

    def _on_silent(self, host: int) -> None:
        self._suspect(host, f"it sent nothing for {P.SILENT_LOST_S:g}s (no heartbeat)")

    def _host_lost(self, host: int, reason: str) -> None:
        """``host`` is gone for good: fail its runs and the runs reading its tensors."""
        with self._lock:
            state = self._hosts[host]
            if state.lost is not None:
                return
            state.lost = reason
            for rec in list(self._inflight.values()):
                if rec.output is not None and (
                        rec.host == host or any(o.host == host for o in rec.inputs)):
                    self._settle(rec, error=HostLostError(host, reason))
        log.warning("host %d is lost: %s", host, reason)

    # ---- Ray's death reports (the watcher thread) ----------------------------------------

    def _watch(self) -> None:
        """Wait on every host actor's parked ``watch()``: Ray fails it the moment the actor
        dies (no polling while all is well)."""
        import ray

        while not self._closed:
            refs = {s.watch: h for h, s in enumerate(self._hosts)
                    if s.watch is not None and s.lost is None}
            if not refs:
                return
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                host = refs[ref]
                if self._hosts[host].watch is ref:
                    self._hosts[host].watch = None
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self._suspect(host, from_ray(exc, self._host_of_actor, host))

    def _suspect(self, host: int, why: str | BaseException) -> None:
        """Ray or the wire says ``host`` may be gone: find out (a thread of its own)."""
        with self._lock:
            state = self._hosts[host]
            if state.restarting or state.lost is not None or self._closed:
                return
            state.restarting = True
        threading.Thread(target=self._recover, args=(host, why), daemon=True,
                         name=f"pto-l4-recover-{host}").start()

    def _recover(self, host: int, why: str | BaseException) -> None:
        """Wait for Ray to restart ``host``'s actor, then open it again and resend its runs
        (each at most ``retries`` more times); or declare it lost: its node died, the actor
        is out of restarts, or it is the same process, alive but silent."""
        import ray

        reason = why.reason if isinstance(why, HostLostError) else str(why)
        try:
            # Ray holds this call until a restarting actor is up; one out of restarts fails it.
            ref = self._actors[host].info.remote()
            deadline = time.monotonic() + self._timeout
            while not ray.wait([ref], timeout=0.25)[0]:
                if not self._node_alive(host):
                    raise HostLostError(host, "its Ray node is gone")
                if time.monotonic() > deadline or self._closed:
                    raise HostLostError(host, f"{reason}; it did not come back within "
                                        f"{self._timeout:g}s")
            info = ray.get(ref)
            if info["pid"] == self._pids[host]:
                raise HostLostError(host, reason)
            self._pids[host] = info["pid"]
            if not self._closed:
                self._open_host(host)
        except (ray.exceptions.RayError, HostLostError, PtoError) as exc:
            if isinstance(exc, ray.exceptions.RayError):
                exc = from_ray(exc, self._host_of_actor, host)
            with self._lock:
                self._hosts[host].restarting = False
            self._host_lost(host, exc.reason if isinstance(exc, HostLostError) else reason)
            return
        log.warning("host %d restarted (%s): resending its runs in flight", host, reason)
        with self._lock:
            self._hosts[host].restarting = False
            for rec in list(self._inflight.values()):
                if rec.host != host or rec.output is None or not rec.sends:
                    continue
                if rec.sends > self._retries:
                    self._settle(rec, error=HostLostError(
                        host, f"its host actor died under run {rec.run_id} "
                        f"{1 + self._retries} time(s)"))
                else:
                    self._send(rec)

    def _node_alive(self, host: int) -> bool:
        import ray

        node = self._nodes[host].node_id
        return any(n["NodeID"] == node and n.get("Alive") for n in ray.nodes())

    # ---- finishing (a finisher thread, or the caller of run) --------------------------

    def _finish_future(self, run: _L4Run) -> None:
        assert run.future is not None
        try:
            value = self._finish(run, None)
        except BaseException as exc:
            if run.future.set_running_or_notify_cancel():
                run.future.set_exception(exc)
        else:
            if run.future.set_running_or_notify_cancel():
                run.future.set_result(value)

    def _finish(self, run: _L4Run, deadline: float | None) -> Any:
        try:
            if run.error is not None:
                raise run.error
            if run.errors:
                raise first_failure(sorted(run.errors, key=lambda item: item[0]))
            return self._resolve(run.value, deadline)
        finally:
            if self._trace is not None:
                self._trace.l4_run(run.name, run.start, time.time(), None)
            run.records, run.value, run.errors = [], None, []

    def _abandon(self, run: _L4Run) -> None:
        """``rt.run`` timed out: drop its L3 runs not yet sent (sent ones end on their own)."""
        with self._lock:
            run.abandoned = True
            for rec in run.records:
                if rec.output is not None and not rec.sends:
                    self._settle(rec, error=TimeoutError("its L4 run timed out"))
            run.records, run.value = [], None

    def _resolve(self, value: Any, deadline: float | None) -> Any:
        """``value`` with each Ref replaced by its value, tensors pulled from their hosts'
        tensor servers straight into new numpy arrays."""
        refs = instances_in(value, Ref)
        if not refs:
            return value
        outputs = {id(o): o for o in (output_of(r) for r in refs)}
        with self._lock:  # a Ref of another L4 run still in flight: wait for it
            while not all(o.done for o in outputs.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or self._closed:
                    raise TimeoutError("the results did not arrive in time")
                self._changed.wait(left if left is not None else 1.0)
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
            lost = self._hosts[desc.host].lost
            raise HostLostError(desc.host, lost or f"its tensor {desc.name} could not be "
                                f"fetched ({type(exc).__name__}: {exc})") from None
        return array

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per host: L3 runs, cross-host transfers into it and the bytes they copied (each
        the tensor's size once: the network's copy), same-host handoffs (zero copies); the
        totals; and the driver's L3 runs in flight. A lost host shows as
        ``{"lost": reason}`` and counts for nothing."""
        import ray

        live = [h for h in self.hosts if self._hosts[h].lost is None]
        got = dict(zip(live, ray.get([self._actors[h].stats.remote() for h in live],
                                     timeout=self._timeout), strict=True))
        per_host = [got.get(h, {"lost": self._hosts[h].lost}) for h in self.hosts]
        keys = next(iter(got.values()), {})
        total = {k: sum(s.get(k, 0) for s in per_host) for k in keys}
        with self._lock:
            driver = {"in_flight": len(self._inflight)}
        return {"hosts": per_host, "total": total, "driver": driver}

    def write_trace(self, path: str | None = None) -> str:
        """Write the cluster trace so far (also done at close())."""
        if self._trace is None:
            raise PtoError("tracing is off: create the runtime with trace='run.json'")
        return self._trace.write(self._actors, self._nodes, self._timeout, path)

    # ---- life --------------------------------------------------------------------------

    def close(self) -> None:
        """Fail runs in flight, write the trace, stop every host actor (its L3 runtime)."""
        import ray

        if self._closed:
            return
        self._closed = True
        with self._lock:
            for rec in list(self._inflight.values()):
                if rec.output is not None:
                    self._settle(rec, error=PtoError(
                        "the runtime was closed while this run was in flight"))
        self._finisher.shutdown(wait=True, cancel_futures=False)
        self._releaser.stop()
        if self._trace is not None:
            try:
                self.write_trace()
            except (OSError, PtoError) as exc:
                log.error("cannot write trace %s: %s", self._trace.path, exc)
        closing = {h: self._actors[h].close.remote() for h in self.hosts
                   if self._hosts[h].lost is None}
        for host, ref in closing.items():
            try:
                ray.get(ref, timeout=self._timeout)
            except ray.exceptions.RayError as exc:
                log.warning("host %d did not close cleanly: %s", host, type(exc).__name__)
        self._stop_wire()
        self._stop_hosts()
        if self._watcher is not None:
            self._watcher.join(10)
        drop_registrations(self._session, sorted(self._l3))
        placement.CONNECTION.leave()

    def _stop_wire(self) -> None:
        if self._links is not None:
            self._links.close()
        if self._fetcher is not None:
            self._fetcher.close()

    def _stop_hosts(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)

    def _describe(self) -> str:
        return f"hosts={self.hosts}"


def _load_error(blob: bytes, host: int) -> BaseException:
    """A host's pickled error (CURVE: from this session's host), or one saying why not."""
    try:
        err = pickle.loads(blob)
    except Exception as exc:
        return HostLostError(host, f"its error report did not unpickle: {exc!r}")
    return err if isinstance(err, BaseException) else HostLostError(
        host, f"it reported a non-exception {type(err).__name__}")
