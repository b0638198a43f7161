"""L3, ``pto.Runtime(level="host")``: register orchestrations and kernels, run them, get results.

The life of a run: ``submit`` calls the orchestration function in the calling thread; each
``ctx.submit`` checks its arguments at once and queues a task record; records go to the
broker in batches (pto/host/orchestration.py, and when the orchestration returns). The broker
resolves dependencies and dispatches; results come back over pto/host/connection.py into the
``RunBook`` (pto/host/runbook.py), which ends the run when its last task has ended; then its
``Future`` gets the orchestration's return value, or ``TaskError`` naming the first
failure, from a thread that holds no lock: the one waiting for it, or a completion thread.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..base import RuntimeBase, check_timeout
from ..wire import config, shm
from ..wire import protocol as P
from ..wire.errors import PtoError
from ..wire.pickling import pickle_by_value
from ..wire.security import curve_dir
from .connection import Connection
from .embedded import EmbeddedBroker
from .graph import Graph
from .graph_book import REPLIES as GRAPH_REPLIES
from .graph_book import GraphBook
from .graph_book import capture as capture_graph
from .orchestration import OrchContext
from .run import Registration, Run
from .runbook import RunBook
from .tensor import TensorStore
from .trace import TraceRecorder

log = logging.getLogger("pto.host.runtime")


class HostRuntime(RuntimeBase):
    """L3, ``pto.Runtime(level="host")``: a connection to the chips of a host, embedded (its
    own broker and workers) or through a running broker.

    >>> with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
    ...     rt.register("double", orch=double, kernels={"scale": scale})
    ...     y = rt.run("double", args={"input": np.ones(4, np.float32)})
    ...     y.numpy()
    array([2., 2., 2., 2.], dtype=float32)

    ``broker=ADDRESS`` (or ``PTO_BROKER``) connects to a broker started with
    ``scripts/start_broker.sh``; then ``devices`` defaults to every chip it serves.
    Without one, a broker and one worker per device start as child processes and stop
    on ``close()``, at interpreter exit, or when this process dies; ``metrics_port=N``
    has that broker serve Prometheus ``/metrics`` and a live dashboard on
    ``http://127.0.0.1:N/`` (a running broker takes ``--metrics-port N`` instead).
    """

    level = "host"

    def __init__(self, platform: str = "sim",
                 devices: list[int] | None = None, broker: str | None = None,
                 device: int | None = None, timeout: float = 10.0, trace: str | None = None,
                 curve: str | None = None, metrics_port: int | None = None):
        if platform != "sim":
            raise ValueError(f"platform {platform!r} needs Ascend hardware and its toolkit; "
                             "this machine supports platform='sim'")
        if device is not None:
            if devices is not None:
                raise ValueError("give device= or devices=, not both")
            devices = [device]
        if devices is not None:
            devices = _check_devices(devices)
        timeout = check_timeout(timeout)
        settings = config.load()
        self._owner = shm.new_owner()
        self._embedded: EmbeddedBroker | None = None
        address = broker or settings.broker
        if metrics_port is not None and (isinstance(metrics_port, bool)
                                         or not isinstance(metrics_port, int)
                                         or not 0 < metrics_port <= 65535):
            raise ValueError(f"metrics_port must be a port number 1..65535, not {metrics_port!r}")
        if address:
            _check_address(address)
            if metrics_port is not None:
                raise ValueError("metrics_port= is for an embedded broker: start a running "
                                 "broker with --metrics-port N instead")
        else:
            self._embedded = EmbeddedBroker(devices or [0], self._owner, settings,
                                            metrics_port=metrics_port)
            address = self._embedded.address
        trace = trace or settings.trace
        self._trace = TraceRecorder(trace) if trace else None
        keys = None if self._embedded else curve_dir(curve, settings)  # ipc needs none
        try:
            self._conn = Connection(address, self._owner, timeout,
                                    watch=self._embedded.exit_reason if self._embedded else None,
                                    trace=self._trace is not None, curve=keys)
            self.devices = self._wait_for_devices(devices, timeout)
        except BaseException:
            if self._embedded:
                self._embedded.stop(keep_logs=True)
            raise
        self.address = address
        self._store = TensorStore(self._owner, threading.RLock(), self._conn.free, settings)
        self._registry: dict[str, Registration] = {}
        self._kernel_ids = itertools.count(1)
        self._host_kernels: dict[int, tuple[Callable[..., Any], int]] = {}  # id(fn) -> (fn, id)
        self._book = RunBook(self._conn, self._store, self.devices, self._trace,
                             self._host_kernel, settings.max_outstanding_tasks)
        self._graphs = GraphBook(self._conn, self._trace is not None,
                                 self._trace.graph_replay if self._trace else None)
        self._timeout = timeout
        self._conn.on_message = self._on_message
        self._conn.on_lost = self._on_lost
        self._conn.start()
        self._opened()

    def _on_message(self, msg: P.Message) -> None:
        if isinstance(msg, GRAPH_REPLIES):
            self._graphs.on_message(msg)
        else:
            self._book.on_message(msg)

    def _on_lost(self, exc: BaseException) -> None:
        self._book.fail_all(exc)
        self._graphs.fail_all(exc)

    def _wait_for_devices(self, wanted: list[int] | None, timeout: float) -> list[int]:
        welcome = self._conn.welcome
        served = set(welcome.devices)
        if wanted is None:
            wanted = sorted(served)
        missing = sorted(set(wanted) - served)
        if missing:
            self._conn.close()
            raise ValueError(f"broker at {self._conn.address} does not serve chip(s) {missing}; "
                             f"it serves {sorted(served)}")
        ready = set(welcome.ready)

        def on_status(msg: P.Message) -> None:
            if isinstance(msg, P.DeviceStatus):
                ready.clear()
                ready.update(msg.ready)

        self._conn.on_message = on_status
        if not self._conn.recv_until(lambda: ready >= set(wanted), timeout):
            self._conn.close()
            where = f" (logs in {self._embedded.log_dir})" if self._embedded else ""
            raise PtoError(f"workers for chip(s) {sorted(set(wanted) - ready)} did not start "
                           f"within {timeout:g}s{where}")
        return list(wanted)

    # ---- registration ------------------------------------------------------------------

    def register(self, name: str, orch: Callable[..., Any],
                 kernels: Mapping[str, Callable[..., Any]] | None = None) -> None:
        """Register an orchestration function and the kernels it submits by name.

        >>> rt.register("pipeline", orch=pipeline, kernels={"compute": compute_fn})

        Python kernels travel to the workers by value (cloudpickle), so functions from
        ``__main__`` or a test module work as they are.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise TypeError("register() needs a non-empty name")
        if not callable(orch):
            raise TypeError(f"orch for {name!r} must be callable (ctx, args) -> value")
        kernel_ids: dict[str, int] = {}
        messages = []
        for kname, fn in (kernels or {}).items():
            if not isinstance(kname, str) or not kname:
                raise TypeError(f"kernel names must be non-empty strings, not {kname!r}")
            if not callable(fn):
                from ..chip.compiler import kernel_registration  # a compiled package, or an error

                kind, blob = kernel_registration(kname, fn)
            else:
                kind, blob = "py", _python_kernel(f"kernel {kname!r}", fn)
            kid = next(self._kernel_ids)
            kernel_ids[kname] = kid
            messages.append(P.RegisterKernel(kid, kname, kind, blob))
        for msg in messages:
            self._conn.send(msg)
        self._registry[name] = Registration(name, orch, kernel_ids)

    # ---- running -----------------------------------------------------------------------

    def submit(self, name: str, args: Any = None) -> Future:
        """Run an orchestration without waiting; the Future resolves to its return value.

        The orchestration itself runs now, in this thread; its tasks run on the chips.
        Done-callbacks run on the thread waiting in ``result()``, else on the runtime's
        completion thread, never while a runtime lock is held: they may block or call
        ``rt.run``.
        """
        future = self._start(name, args, with_future=True).future
        assert future is not None
        return future

    def _start(self, name: str, args: Any, with_future: bool) -> Run:
        self._check_open()
        reg = self._registry.get(name)
        if reg is None:
            raise KeyError(f"no orchestration registered as {name!r}; "
                           f"registered: {sorted(self._registry)}")
        run = self._book.new_run(with_future)  # a future's cancel() drops its tasks
        ctx = OrchContext(self._book, run, reg)
        try:
            value = reg.orch(ctx, args)
            ctx.finish()
        except BaseException as exc:
            # Tasks submitted before the error still run (as if each submit were sent at
            # once); the run then raises the orchestration's error once they have ended.
            try:
                ctx.finish()
            except PtoError:
                pass
            self._book.orch_finished(run, error=exc)
        else:
            self._book.orch_finished(run, value=value)
        return run

    def run(self, name: str, args: Any = None, progress: bool = False,
            timeout: float | None = None) -> Any:
        """Run an orchestration and wait for all its tasks; return its return value.

        Raises ``pto.TaskError`` naming the first failed task (kernel, chip, reason).
        With ``progress=True``, a bar of tasks done/total is drawn on stderr. After
        ``timeout`` seconds the run is cancelled and ``TimeoutError`` raised.
        """
        run = self._start(name, args, with_future=False)  # nobody else sees it: no Future
        if progress:
            _show_progress(run, self._book.wait)
        # This thread receives the results itself while it waits: one wake-up less; and it
        # resolves the run (sets run.outcome), the one thread that may.
        if not self._book.wait(run, timeout) and not self._book.abandon(run):
            raise TimeoutError(f"run of {name!r} did not finish within {timeout:g}s; "
                               "its tasks not yet started were cancelled")
        assert run.outcome is not None
        value, error = run.outcome
        del run  # the error's traceback holds this frame: not the run and its tensors too
        if error is not None:
            raise error
        return value

    def capture(self, name: str, args: Any = None) -> Graph:
        """Run orchestration ``name`` once with ``args`` and record its tasks as a
        ``pto.Graph`` installed on the broker and workers; ``g.run(new_args)`` replays it.

        Top-level arrays and handles of ``args`` are the graph's inputs; every other
        value, and the orchestration's control flow, is frozen (see docs/api.md,
        "Captured graphs"). ``ctx.submit_host`` cannot be captured (ValueError).
        """
        self._check_open()
        reg = self._registry.get(name)
        if reg is None:
            raise KeyError(f"no orchestration registered as {name!r}; "
                           f"registered: {sorted(self._registry)}")
        return capture_graph(self._graphs, self._store, self.devices, reg, args, self._timeout)

    def _host_kernel(self, fn: Callable[..., Any]) -> int:
        """The kernel id of a host sub-task function, registering it on first use."""
        known = self._host_kernels.get(id(fn))
        if known is not None:
            return known[1]
        if not callable(fn):
            raise TypeError(f"submit_host needs a callable, not {type(fn).__name__}")
        blob = _python_kernel(f"host function {fn!r}", fn)
        kid = next(self._kernel_ids)
        self._conn.send(P.RegisterKernel(kid, getattr(fn, "__qualname__", repr(fn)), "py", blob))
        self._host_kernels[id(fn)] = (fn, kid)  # keeps fn alive, so id(fn) stays unique
        return kid

    # ---- life --------------------------------------------------------------------------

    def _check_open(self) -> None:
        super()._check_open()
        if self._conn.lost is not None:
            raise self._conn.lost

    def close(self) -> None:
        """Stop: fail runs still in flight, free every tensor, stop an embedded broker."""
        if self._closed:
            return
        self._closed = True
        self._graphs.close()  # dropped on the broker and workers; their tensors freed
        # Runs still in flight end first, so their waiters see why instead of a closed socket.
        self._book.close_runs()
        self._conn.close()
        if self._trace is not None:
            try:
                self._trace.write()
            except OSError as exc:
                log.error("cannot write trace %s: %s", self._trace.path, exc)
        self._book.close()  # resolves the futures still queued while their tensors exist
        self._store.close()
        if self._embedded is not None:
            self._embedded.stop()

    def write_trace(self, path: str | None = None) -> str:
        """Write the Chrome trace-event JSON of the tasks so far (also done at close())."""
        if self._trace is None:
            raise PtoError("tracing is off: create the runtime with trace='run.json'")
        return self._trace.write(path)

    def _describe(self) -> str:
        return f"{self.address} devices={self.devices}"


def _show_progress(run: Run, wait: Callable[[Run, float], bool], width: int = 30) -> None:
    """Draw ``[#####.....] done/total tasks`` on stderr until the run ends (only the final
    line when stderr is not a terminal)."""
    live = sys.stderr.isatty()
    while True:
        total = run.submitted
        done = total - run.outstanding
        finished = run.finished
        if live or finished:
            filled = width * done // total if total else width
            bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks"
            sys.stderr.write(("\r" if live else "") + bar + ("\n" if finished else ""))
            sys.stderr.flush()
        if finished:
            return
        wait(run, 0.1)


def _python_kernel(what: str, fn: Callable[..., Any]) -> bytes:
    """``fn`` pickled by value for the workers, or a TypeError/ValueError saying why not."""
    try:
        blob = pickle_by_value(fn)
    except Exception as exc:
        raise TypeError(f"{what} cannot be sent to workers: {exc}") from exc
    if len(blob) > P.MAX_FRAME_BYTES // 2:
        raise ValueError(f"{what} pickles to {len(blob)} bytes (limit {P.MAX_FRAME_BYTES // 2}):"
                         " it captures large data; pass data as tensor arguments instead")
    return blob


def _check_address(address: str) -> None:
    try:
        config.broker_address(address)
    except ValueError:
        raise ValueError(f"broker address must be ipc://PATH or tcp://HOST:PORT, "
                         f"not {address!r}") from None


def _check_devices(devices: Any) -> list[int]:
    try:
        out = list(devices)
    except TypeError:
        raise TypeError(f"devices must be a list of ints, not {devices!r}") from None
    if not out or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                          and d >= 0 for d in out):
        raise ValueError(f"devices must be a non-empty list of non-negative ints: {devices!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"devices must not repeat: {devices!r}")
    return [int(d) for d in out]


__all__ = ["HostRuntime"]
