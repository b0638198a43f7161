"""``pto.Runtime(level="cluster")``: L4 orchestrations over hosts, on Ray.

The life of an L4 run: ``submit`` calls the L4 orchestration in the calling thread; each
``ctx.submit(host, entry, args)`` is one ``host_actor.run.remote(...)`` whose top-level
arguments are the ObjectRefs of the runs its Refs name, so Ray itself holds the run until
they are done (and, if one failed, fails it with that error without running it). When
the orchestration has returned, ``_finish`` waits for every L3 run it submitted
(``ray.wait``: Ray reports a dead actor or node as an error, so no wait hangs), raises the
first failure, else fetches the tensors of the returned Refs as numpy arrays.

Freeing: the tensors an L3 run returned stay on its host while its ``_Output`` lives.
That object is the one owner of the run's ObjectRef on the driver: Refs hold it, and so
does the L4 run until that L3 run and every run reading it have finished (the span for
which Ray itself keeps an argument's ObjectRef alive). So the host's handles live exactly
as long as Ray's object (the small descriptor value) does. Ray has no hook on an object's
deletion to tell the host directly, hence the mirror: a ``weakref.finalize`` on the
``_Output`` queues a release, and ``release.Releaser`` sends those in batches (finalizers
may run on any thread, so they never call Ray themselves).
"""

from __future__ import annotations

import itertools
import logging
import pickle
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..base import RuntimeBase, check_timeout
from ..wire.errors import PtoError
from . import placement
from .context import ClusterContext, check_host
from .errors import HostLostError, first_failure, from_ray
from .host import drop_registrations, store_registration
from .refs import Ref, TensorDesc, _Output, follow, instances_in, map_instances
from .release import Releaser
from .shipping import pack_registration
from .trace import ClusterTrace

log = logging.getLogger("pto.cluster")
_TICK_S = 0.5  # how often a waiting run looks at close() / its deadline


@dataclass(eq=False)
class _Submitted:
    run_id: int
    host: int
    entry: str
    object_ref: Any
    output: _Output | None  # held until this run has finished (then only Refs hold it)
    inputs: list[_Output]  # held until this run has finished: it reads their tensors


@dataclass(eq=False)
class _L4Run:
    name: str
    future: Future
    start: float
    submitted: list[_Submitted] = field(default_factory=list)
    value: Any = None  # what the orchestration returned
    results: dict[int, Any] = field(default_factory=dict)  # run id -> its L3 run's value
    error: BaseException | None = None  # what it raised


class ClusterRuntime(RuntimeBase):
    """L4: runs L3 entries on the hosts of a Ray cluster (one host actor per node).

    >>> with pto.Runtime(level="cluster", cluster=lc.address) as rt:
    ...     rt.register("partial_sum", orch=partial_sum, kernels={"sum": sum_kernel})
    ...     rt.register("scatter", orch=scatter)        # no kernels: an L4 orchestration
    ...     total = rt.run("scatter", args=np.arange(1000.0))
    """

    level = "cluster"

    def __init__(self, cluster: str | None = None, devices: list[int] | None = None,
                 timeout: float = 60.0, trace: str | None = None, retries: int = 1,
                 platform: str = "sim"):
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
        placement.CONNECTION.join(cluster, local_chips)
        self._actors: list[Any] = []
        try:
            nodes = placement.pto_nodes()
            self._actors = placement.start_hosts(nodes, self._session, self._timeout,
                                                 trace is not None, retries)
            infos = placement.wait_up(self._actors, self._timeout)
        except BaseException:
            self._stop_hosts()
            placement.CONNECTION.leave()
            raise
        self._nodes = nodes
        self._chips = [list(info["chips"]) for info in infos]
        self._pids = [info["pid"] for info in infos]
        self._host_of_actor = {info["actor"]: h for h, info in enumerate(infos)}
        self.hosts: list[int] = list(range(len(self._actors)))
        self._trace = ClusterTrace(trace) if trace is not None else None
        self._l3: set[str] = set()  # L3 entry names
        self._l4: dict[str, Callable[..., Any]] = {}
        self._run_ids = itertools.count(1)
        self._finisher = ThreadPoolExecutor(8, thread_name_prefix="pto-l4-finish")
        self._releaser = Releaser(self._actors)
        self._opened()

    # ---- hosts -------------------------------------------------------------------------

    def chips(self, host: int) -> list[int]:
        """The chips (device ids) of ``host``."""
        self._check_host(host)
        return list(self._chips[int(host)])

    def _check_host(self, host: Any) -> None:
        check_host(host, self.hosts)

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
        refs = [a.register.remote(name, blob) for a in self._actors]
        for host, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=self._timeout)
            except ray.exceptions.GetTimeoutError:
                raise HostLostError(host, f"it did not answer register({name!r}) within "
                                    f"{self._timeout:g}s") from None
            except ray.exceptions.RayError as exc:
                raise from_ray(exc, self._host_of_actor, host) from None
        self._l3.add(name)

    def _check_l3_entry(self, entry: Any) -> None:
        if entry in self._l4:
            raise ValueError(f"{entry!r} is an L4 orchestration: ctx.submit runs L3 entries "
                             "(registered with kernels=); run it with rt.run")
        if entry not in self._l3:
            raise KeyError(f"no L3 entry registered as {entry!r}; L3 entries: "
                           f"{sorted(self._l3)}")

    # ---- running -----------------------------------------------------------------------

    def submit(self, name: str, args: Any = None) -> Future:
        """Run L4 orchestration ``name`` without waiting; the Future resolves to its return
        value with every Ref replaced by numpy arrays. The orchestration runs now, here."""
        run = self._start(name, args)
        self._finisher.submit(self._finish, run, None)
        return run.future

    def run(self, name: str, args: Any = None, timeout: float | None = None) -> Any:
        """Run L4 orchestration ``name`` and wait; its return value with numpy arrays for
        Refs. Raises ``pto.TaskError`` (naming the host) or ``pto.HostLost``; after
        ``timeout`` seconds the run's L3 runs not yet finished are cancelled and
        ``TimeoutError`` raised."""
        if timeout is not None:
            check_timeout(timeout)
        run = self._start(name, args)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._finish(run, deadline)  # in this thread: one hand-off less
        return run.future.result(0)

    def _start(self, name: str, args: Any) -> _L4Run:
        self._check_open()
        orch = self._l4.get(name)
        if orch is None:
            if name in self._l3:
                raise ValueError(f"{name!r} is an L3 entry: submit it to a host from an L4 "
                                 "orchestration, ctx.submit(host, name, args)")
            raise KeyError(f"no L4 orchestration registered as {name!r}; L4 orchestrations: "
                           f"{sorted(self._l4)}")
        run = _L4Run(name, Future(), time.time())
        ctx = ClusterContext(self, run)
        try:
            run.value = orch(ctx, args)
            run.error = None
        except BaseException as exc:  # its submitted runs still finish; then this raises
            run.value, run.error = None, exc
        ctx._ended = True
        return run

    def _submit_l3(self, run: _L4Run, host: int, entry: str, template: Any,
                   inputs: list[_Output]) -> Ref:
        self._check_open()
        run_id = next(self._run_ids)
        actor = self._actors[host]
        try:
            object_ref = actor.run.remote((run_id, entry, template),
                                          *[o.object_ref for o in inputs])
        except (TypeError, pickle.PicklingError) as exc:  # Ray could not serialize them
            raise TypeError(f"the args of {entry!r} cannot be sent to host {host}: {exc}"
                            ) from None
        output = _Output(self._token, run_id, host, entry, object_ref, self._releaser.release)
        run.submitted.append(_Submitted(run_id, host, entry, object_ref, output, inputs))
        if self._trace is not None:
            self._trace.submitted(run_id, host, entry, time.time())
        return Ref(output)

    # ---- finishing (a finisher thread, or the caller of run) --------------------------

    def _finish(self, run: _L4Run, deadline: float | None) -> None:
        import ray

        try:
            errors = self._wait_all(run, deadline)
            if run.error is not None:
                raise run.error
            if errors:
                raise first_failure([(rec.run_id, rec.host, err) for rec, err in errors])
            value = self._resolve(run, deadline)
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                for record in run.submitted:
                    if record.object_ref is not None:
                        ray.cancel(record.object_ref)
            self._end(run, error=exc)
        else:
            self._end(run, value=value)

    def _wait_all(self, run: _L4Run, deadline: float | None) -> list[tuple[_Submitted, Any]]:
        """Wait for every L3 run of ``run``; the (record, pto error) of those that failed."""
        import ray

        pending = {rec.object_ref: rec for rec in run.submitted}
        errors: list[tuple[_Submitted, Any]] = []
        while pending:
            self._check_waiting(run, deadline)
            tick = _TICK_S if deadline is None else max(min(_TICK_S, deadline - time.monotonic()),
                                                        0.0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=tick, fetch_local=False)
            if ready:
                more, _ = ray.wait([r for r in pending if r not in ready],
                                   num_returns=len(pending) - len(ready), timeout=0,
                                   fetch_local=False) if len(pending) > len(ready) else ([], [])
                ready = ready + more
            for ref in ready:
                rec = pending.pop(ref)
                try:
                    run.results[rec.run_id] = ray.get(ref, timeout=self._timeout)
                except ray.exceptions.RayError as exc:
                    errors.append((rec, from_ray(exc, self._host_of_actor, rec.host)))
                self._done_with(rec)
        errors.sort(key=lambda item: item[0].run_id)
        return errors

    def _done_with(self, rec: _Submitted) -> None:
        """``rec`` finished: it no longer needs its inputs, and only Refs keep its output."""
        rec.inputs = []
        rec.output = None
        rec.object_ref = None

    def _check_waiting(self, run: _L4Run, deadline: float | None) -> None:
        if self._closed:
            raise PtoError("the runtime was closed while this run was in flight")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"L4 run of {run.name!r} did not finish in time; its L3 runs not "
                               "yet finished were cancelled")

    def _resolve(self, run: _L4Run, deadline: float | None) -> Any:
        """The run's value with each Ref replaced by its value, tensors fetched as numpy
        arrays (a Ref made by an earlier L4 run is read from Ray)."""
        import ray

        value = run.value
        refs = instances_in(value, Ref)
        if not refs:
            return value
        earlier = {r._output.run_id: r._output.object_ref for r in refs
                   if r._output.run_id not in run.results}
        results = dict(run.results)
        results.update(zip(earlier, ray.get(list(earlier.values()), timeout=self._timeout),
                           strict=True))
        picked = {id(r): follow(results[r._output.run_id], r._path, repr(r)) for r in refs}
        descs = {d.key: d for v in picked.values() for d in instances_in(v, TensorDesc)}
        fetches = {key: self._actors[d.host].fetch.remote(key, d.name)
                   for key, d in descs.items()}
        arrays = {}
        for key, ref in fetches.items():
            try:
                arrays[key] = ray.get(ref, timeout=self._remaining(deadline))
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError("the results did not arrive in time") from None
            except ray.exceptions.RayError as exc:
                raise from_ray(exc, self._host_of_actor, descs[key].host) from None
        return map_instances(value, Ref, lambda r: map_instances(
            picked[id(r)], TensorDesc, lambda d: arrays[d.key]))

    def _remaining(self, deadline: float | None) -> float:
        if deadline is None:
            return 10 * self._timeout
        return max(deadline - time.monotonic(), 0.001)

    def _end(self, run: _L4Run, value: Any = None, error: BaseException | None = None) -> None:
        if self._trace is not None:
            self._trace.l4_run(run.name, run.start, time.time(), error)
        run.submitted, run.value, run.results = [], None, {}
        if run.future.set_running_or_notify_cancel():
            if error is not None:
                run.future.set_exception(error)
            else:
                run.future.set_result(value)

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per host: L3 runs, cross-host transfers into it and their bytes, same-host
        handoffs (zero copies); and the totals."""
        import ray

        per_host = ray.get([a.stats.remote() for a in self._actors], timeout=self._timeout)
        total = {k: sum(s[k] for s in per_host) for k in per_host[0]}
        return {"hosts": per_host, "total": total}

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
        self._finisher.shutdown(wait=True, cancel_futures=False)
        self._releaser.stop()
        if self._trace is not None:
            try:
                self.write_trace()
            except (OSError, PtoError) as exc:
                log.error("cannot write trace %s: %s", self._trace.path, exc)
        closing = [a.close.remote() for a in self._actors]
        for host, ref in enumerate(closing):
            try:
                ray.get(ref, timeout=self._timeout)
            except ray.exceptions.RayError as exc:
                log.warning("host %d did not close cleanly: %s", host, type(exc).__name__)
        self._stop_hosts()
        drop_registrations(self._session, sorted(self._l3))
        placement.CONNECTION.leave()

    def _stop_hosts(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)

    def _describe(self) -> str:
        return f"hosts={self.hosts}"

