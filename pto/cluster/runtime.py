"""``pto.Runtime(level="cluster")``: L4 orchestrations over hosts; Ray places, pto carries.

The life of an L4 run: ``submit`` calls the L4 orchestration in the calling thread; each
``ctx.submit(host, entry, args)`` comes to ``place``, which checks the call and books an
``L3Run`` record in the run book (pto/cluster/runbook.py: it sends the run straight to its
host's control endpoint over the driver's CURVE connection, pto/cluster/links.py, as soon
as its inputs allow, and fails it with the first failure among them). A host pulls
another host's tensors itself (pto/cluster/host.py). When the orchestration has returned
and its last L3 run has reported, the L4 run is finished (pto/cluster/results.py): by the
caller of ``run`` (woken by an event), or by a finisher thread for ``submit``'s Future.

Freeing: the tensors an L3 run returned stay on its host while its ``RunOutput`` lives
(Refs hold it, and so does every run still waiting to read it). Its finalizer queues a
``Release`` to that host and to the hosts that may have copied them (release.Releaser).

Failures: a dead host actor or node (Ray's report), or a silent one (the wire's), is
recovered or declared lost by pto/cluster/recovery.py.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cloudpickle
import zmq

from ..base import RuntimeBase, check_timeout
from ..wire.errors import PtoError
from . import placement
from . import protocol as P
from .context import ClusterContext, check_host
from .errors import HostLostError, from_ray
from .host import drop_registrations, store_registration
from .links import Links
from .protocol import STREAM_TIMEOUT_S
from .recovery import HostRecovery
from .refs import Ref, RunOutput, split_refs
from .release import Releaser
from .results import Results
from .runbook import L3Run, L4Run, RunBook
from .shipping import pack_registration
from .stream import StreamAuth
from .stream_fetch import Fetcher
from .trace import ClusterTrace

log = logging.getLogger("pto.cluster")


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
        self._book = RunBook(lambda host, msg: self._links.send(host, msg),
                             lambda run: self._finisher.submit(self._results.finish_future, run))
        self._ends: dict[int, dict[str, str]] = {}  # host -> its endpoints (endpoints())
        client_public, client_secret = zmq.curve_keypair()
        self._client = {"client_public": client_public, "client_secret": client_secret}
        self._stream_auth = StreamAuth.new(encrypt=bool(encrypt_tensors))
        self._links: Links | None = None
        self._fetcher: Fetcher | None = None
        self._recovery: HostRecovery | None = None
        placement.CONNECTION.join(cluster, local_chips)
        self._actors: list[Any] = []
        try:
            nodes = placement.pto_nodes()
            self._actors = placement.start_hosts(nodes, self._session, self._timeout,
                                                 trace is not None, retries)
            infos = placement.wait_up(self._actors, self._timeout)
            self._nodes = nodes
            self._chips = [list(info["chips"]) for info in infos]
            self._host_of_actor = {info["actor"]: h for h, info in enumerate(infos)}
            self.hosts: list[int] = list(range(len(self._actors)))
            self._recovery = HostRecovery(
                self._actors, nodes, [info["pid"] for info in infos], self._host_of_actor,
                self._book, self._open_host, self._timeout, retries, lambda: self._closed)
            self._links = Links(self._session, self._client, self._on_message,
                                self._recovery.on_silent)
            self._fetcher = Fetcher(self._stream_auth, timeout=STREAM_TIMEOUT_S)
            for host in self.hosts:
                self._recovery.open(host)
        except BaseException:
            self._stop_wire()
            self._stop_hosts()
            placement.CONNECTION.leave()
            raise
        self._trace = ClusterTrace(trace) if trace is not None else None
        self._results = Results(self._book, self._fetcher, self._trace, lambda: self._closed)
        self._l3: set[str] = set()  # L3 entry names
        self._l4: dict[str, Callable[..., Any]] = {}
        self._run_ids = itertools.count(1)
        self._finisher = ThreadPoolExecutor(4, thread_name_prefix="pto-l4-finish")
        self._releaser = Releaser(lambda host, ids: self._links.send(host, P.Release(ids)))
        self._opened()
        self._recovery.start()  # after _opened: its watcher runs while the runtime is open

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
        return dict(self._ends[int(host)])

    def _open_host(self, host: int) -> None:
        """Give ``host``'s actor fresh server keys, learn its endpoints, connect to it
        (the recovery's ``connect``: at start and after a restart)."""
        import ray

        server_public, server_secret = zmq.curve_keypair()
        keys = {**self._client, "server_public": server_public, "server_secret": server_secret}
        actor = self._actors[host]
        ends = ray.get(actor.open.remote(keys, self._stream_auth), timeout=self._timeout)
        self._ends[host] = {"control": ends["control"], "control_key": server_public.decode(),
                            "tensors": ends["tensors"]}
        self._links.connect(host, ends["control"], server_public)

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
        live = [h for h in self.hosts if self._book.lost(h) is None]
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
            self._book.abandon(run)
            raise TimeoutError(f"L4 run of {name!r} did not finish within {timeout:g}s; its "
                               "L3 runs not yet sent were dropped")
        return self._results.finish(run, deadline)

    def _start(self, name: str, args: Any, future: Future | None) -> L4Run:
        self._check_open()
        orch = self._l4.get(name)
        if orch is None:
            if name in self._l3:
                raise ValueError(f"{name!r} is an L3 entry: submit it to a host from an L4 "
                                 "orchestration, ctx.submit(host, name, args)")
            raise KeyError(f"no L4 orchestration registered as {name!r}; L4 orchestrations: "
                           f"{sorted(self._l4)}")
        run = L4Run(name, future, time.time())
        ctx = ClusterContext(self, run)
        try:
            run.value = orch(ctx, args)
        except BaseException as exc:  # its submitted runs still finish; then this raises
            run.value, run.error = None, exc
        ctx.end()
        self._book.end(run)
        return run

    def place(self, run: L4Run, host: Any, entry: Any, args: Any) -> Ref:
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
        self._book.add(L3Run(run_id, host, entry, blob, inputs, output, run))
        if self._trace is not None:
            self._trace.submitted(run_id, host, entry, time.time())
        return Ref(output)

    def _on_message(self, host: int, msg: P.Message) -> None:
        """What a host sent (the I/O thread): a run's outcome, for the run book."""
        if not isinstance(msg, (P.Done, P.Failed)):
            log.warning("host %d sent a %s: not a host's message", host, type(msg).__name__)
            return
        self._book.on_message(host, msg)

    # ---- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per host: L3 runs, cross-host transfers into it and the bytes they copied (each
        the tensor's size once: the network's copy), same-host handoffs (zero copies); the
        totals; and the driver's L3 runs in flight. A lost host shows as
        ``{"lost": reason}`` and counts for nothing."""
        import ray

        lost = {h: self._book.lost(h) for h in self.hosts}
        live = [h for h in self.hosts if lost[h] is None]
        got = dict(zip(live, ray.get([self._actors[h].stats.remote() for h in live],
                                     timeout=self._timeout), strict=True))
        per_host = [got.get(h, {"lost": lost[h]}) for h in self.hosts]
        keys = next(iter(got.values()), {})
        total = {k: sum(s.get(k, 0) for s in per_host) for k in keys}
        driver = {"in_flight": self._book.in_flight()}
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
        self._book.fail_all("the runtime was closed while this run was in flight")
        self._finisher.shutdown(wait=True, cancel_futures=False)
        self._releaser.stop()
        if self._trace is not None:
            try:
                self.write_trace()
            except (OSError, PtoError) as exc:
                log.error("cannot write trace %s: %s", self._trace.path, exc)
        closing = {h: self._actors[h].close.remote() for h in self.hosts
                   if self._book.lost(h) is None}
        for host, ref in closing.items():
            try:
                ray.get(ref, timeout=self._timeout)
            except ray.exceptions.RayError as exc:
                log.warning("host %d did not close cleanly: %s", host, type(exc).__name__)
        self._stop_wire()
        self._stop_hosts()
        if self._recovery is not None:
            self._recovery.join(10)
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

