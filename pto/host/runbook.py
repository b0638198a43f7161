"""The runs and tasks a runtime has in flight, and who resolves each run's future.

``Runtime`` (pto/host/runtime.py) makes runs here; their ``OrchContext`` sends tasks through
this ``RunBook`` (it is the ``RunHost`` of pto/host/run.py); the connection's driver hands it
the broker's results (``on_message``) and its loss (``fail_all``). All of that is
bookkeeping under the runtime lock, which it shares with the ``TensorStore``. A run's state
(pto/host/run.py ``RunState``) is moved here, under that lock, and by the thread resolving
it. Whether the broker is lost is the connection's record (``Connection.lost``), read here;
this book only records that the runtime closed.

When a run ends, its future is resolved by a thread that holds no lock and does not drive
the result socket, so user code (done-callbacks, ``set_result`` side effects) can take
its time or call ``rt.run``: a thread waiting for the run (``wait``: ``rt.run``,
``future.result()``) resolves it itself; otherwise the completion thread does. A run of
``rt.run`` has no future: its thread always resolves it, unless it gave up (``abandon``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..wire import protocol as P
from ..wire.errors import BrokerLost
from .connection import Connection
from .run import PendingTask, Run, RunFuture, RunState, returned_segments
from .tensor import Segment, TensorStore
from .trace import TraceRecorder

log = logging.getLogger("pto.host.runtime")


@dataclass(slots=True)
class _TaskRecord:
    run: Run
    kernel: str  # names a failure the broker reports without one
    segments: list[Segment]  # kept alive (and in use) until the task ends


class _Completions:
    """One small daemon thread resolving the futures of finished runs nobody waits on."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock  # the runtime lock, for Run.claim
        self._cv = threading.Condition()
        self._queue: deque[Run] = deque()
        self._thread: threading.Thread | None = None
        self._stop = False

    def put(self, runs: list[Run]) -> None:
        with self._cv:
            self._queue.extend(runs)
            if self._thread is None and not self._stop:  # started on first use
                self._thread = threading.Thread(target=self._loop, name="pto-done", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                run = self._queue.popleft()
            with self._lock:
                mine = run.claim()  # a waiter may have taken it on meanwhile
            if mine:
                try:
                    run.resolve()
                except Exception:  # noqa: BLE001 - Future already logs callbacks' errors
                    log.exception("resolving a run failed")
            # Not held while we wait for the next one: its outputs would outlive the
            # caller's last handle to them until another run ended.
            del run

    def stop(self) -> None:
        """Resolve what is queued, then end the thread (unless called from it)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)


class RunBook:
    """The runs in flight, their tasks, and the broker's results applied to them."""

    def __init__(self, conn: Connection, store: TensorStore, devices: list[int],
                 trace: TraceRecorder | None, host_kernel: Callable[[Callable[..., Any]], int],
                 max_outstanding: int):
        self._conn = conn
        self._store = store
        self._lock = store.lock  # the runtime lock: segments, tasks and runs together
        self._devices = list(devices)
        self._trace = trace
        self._host_kernel = host_kernel
        self._max_outstanding = max_outstanding  # unfinished tasks before send_tasks waits
        self._task_ids = itertools.count(1)
        self._tasks: dict[int, _TaskRecord] = {}  # task id -> record, until it ends
        self._runs: set[Run] = set()  # unfinished
        self._room = threading.Condition(self._lock)  # notified as tasks end, and on loss
        self._room_waiters = 0  # threads in send_tasks waiting on _room: only they need notifying
        self._closed: BrokerLost | None = None  # close_runs(): the runtime is closing
        self._completions = _Completions(self._lock)

    # ---- RunHost: what an OrchContext uses -----------------------------------------------

    @property
    def devices(self) -> list[int]:
        return self._devices

    @property
    def store(self) -> TensorStore:
        return self._store

    def wait_for_room(self) -> None:
        self._store.wait_for_room(self._ended)

    def new_task_id(self) -> int:
        return next(self._task_ids)

    def host_kernel(self, fn: Callable[..., Any]) -> int:
        return self._host_kernel(fn)

    def send_tasks(self, run: Run, batch: list[PendingTask]) -> None:
        with self._lock:
            while len(self._tasks) >= self._max_outstanding and self._ended() is None:
                self._room_waiters += 1
                try:
                    self._room.wait()
                finally:
                    self._room_waiters -= 1
            ended = self._ended()
            if ended is not None:
                raise ended
            for task in batch:
                self._tasks[task.spec.task] = _TaskRecord(run, task.kernel, task.segments)
            run.outstanding += len(batch)
            run.submitted += len(batch)
        if self._trace is not None:
            for task in batch:
                spec = task.spec
                self._trace.submitted(spec.task, task.kernel, spec.group or [spec.chip],
                                      task.nbytes, task.submitted_at)
        self._conn.send(P.Submit([task.spec for task in batch]))

    # ---- a run's life ------------------------------------------------------------------

    def new_run(self, with_future: bool = True) -> Run:
        """A new run; without a future, the calling thread must ``wait`` for it (and
        ``abandon`` it if it stops waiting before the end)."""
        run = Run()
        if with_future:
            # The future reaches its run only weakly: a cycle run -> future -> run would
            # keep the run's returned handles (and their segments) until a cyclic collection.
            run_ref = weakref.ref(run)

            def wait(timeout: float | None) -> None:
                run = run_ref()
                if run is not None:
                    self.wait(run, timeout)

            def drop() -> None:
                run = run_ref()
                if run is not None:
                    self.cancel(run)

            run.future = RunFuture(wait, drop)
        with self._lock:
            ended = self._ended()
            if ended is not None:
                raise ended
            self._runs.add(run)
        return run

    def orch_finished(self, run: Run, value: Any = None,
                      error: BaseException | None = None) -> None:
        """The orchestration returned ``value`` (or raised ``error``); the calling thread
        resolves the run at once if its tasks have all ended already."""
        if run.scoped:
            keep = returned_segments(value) if error is None else set()
            for ref in run.scoped:
                seg = ref()
                if seg is not None and id(seg) not in keep:
                    self._store.release(seg)
            run.scoped = []
        with self._lock:
            run.value, run.error = value, error
            if run.state is RunState.ORCHESTRATING:  # (else the broker was lost meanwhile)
                if run.outstanding:
                    run.move(RunState.WAITING)
                else:
                    self._finish(run, [])
            mine = run.claim()
        if mine:
            run.resolve()

    def wait(self, run: Run, timeout: float | None = None) -> bool:
        """Block until ``run`` has finished (True) or ``timeout`` passed (False); this
        thread resolves its future unless another one already took that on."""
        with self._lock:
            run.waiters += 1
        try:
            self._conn.wait_until(lambda: run.finished, timeout)
        finally:
            lost = self._conn.lost
            if lost is not None and not run.finished:
                self.fail_all(lost)  # woken by the loss before its declarer ended the runs
            with self._lock:
                run.waiters -= 1
                mine = run.claim()
        if mine:
            run.resolve()
        return run.finished

    def abandon(self, run: Run) -> bool:
        """The thread of a run without a future stops waiting for it: True if it has
        finished after all (then this thread resolved it: ``run.outcome``); else its tasks
        not started are dropped, and it ends unseen."""
        with self._lock:
            finished = run.finished
            mine = run.claim()
            if not finished:
                run.abandoned = True
        if mine:
            run.resolve()
        if not finished:
            self.cancel(run)
        return finished

    def cancel(self, run: Run) -> None:
        """Ask the broker (once) to drop ``run``'s tasks that have not started."""
        with self._lock:
            if run.dropped or self._ended() is not None:
                return
            run.dropped = True
            tasks = [task for task, record in self._tasks.items() if record.run is run]
        if tasks:
            try:
                self._conn.send(P.Cancel(tasks))
            except BrokerLost:
                pass  # every run, this one too, fails with it (fail_all)

    def _finish(self, run: Run, unwaited: list[Run]) -> None:
        # Caller holds the lock. Runs nobody waits on go to the completion thread, except
        # one without a future, whose own thread claims it when it next looks (or abandons).
        if run.finished:
            return
        run.move(RunState.FINISHED)
        self._runs.discard(run)
        if run.waiters == 0 and (run.future is not None or run.abandoned):
            unwaited.append(run)

    # ---- from the connection's driver --------------------------------------------------

    def on_message(self, msg: P.Message) -> None:
        if not isinstance(msg, P.Results):
            return
        if self._trace is not None:
            self._trace.results(msg)
        unwaited: list[Run] = []
        with self._lock:
            for task in msg.done:
                run = self._task_ended(task)
                if run is not None and run.outstanding == 0 and run.state is RunState.WAITING:
                    self._finish(run, unwaited)
            for failure in msg.failed:
                record = self._tasks.get(failure.task)
                run = self._task_ended(failure.task)
                if run is not None:
                    run.failures.append(failure)
                    if record is not None and not failure.kernel:
                        failure.kernel = record.kernel
                    if run.outstanding == 0 and run.state is RunState.WAITING:
                        self._finish(run, unwaited)
            if self._room_waiters:
                self._room.notify_all()
        if unwaited:
            self._completions.put(unwaited)

    def _task_ended(self, task: int) -> Run | None:
        record = self._tasks.pop(task, None)
        if record is None:
            return None
        for seg in record.segments:
            self._store.release_use(seg)
        record.run.outstanding -= 1
        return record.run

    def fail_all(self, exc: BaseException) -> None:
        """The broker is gone (the connection's ``on_lost``): every unfinished run ends
        with ``exc``, and every thread waiting for room or a result wakes now."""
        unwaited: list[Run] = []
        with self._lock:
            self._end_all(exc, unwaited)
        self._store.interrupt_waits()
        if unwaited:
            self._completions.put(unwaited)

    def close_runs(self) -> None:
        """The runtime is closing: runs in flight end (``fail_all``), new ones are refused."""
        with self._lock:
            if self._closed is None:
                self._closed = BrokerLost("the runtime was closed while this run was in flight")
            closed = self._closed
        self.fail_all(closed)

    def _end_all(self, exc: BaseException, unwaited: list[Run]) -> None:
        # Caller holds the lock. Idempotent: a run already ended keeps its outcome.
        for run in list(self._runs):
            run.lost = exc
            self._finish(run, unwaited)
        self._tasks.clear()
        self._room.notify_all()

    def _ended(self) -> BaseException | None:
        """Why no run may go on (the broker lost, the runtime closed), or None."""
        return self._conn.lost or self._closed

    def close(self) -> None:
        """After ``close_runs``: resolve the futures still queued, stop the completion thread."""
        self.close_runs()
        self._completions.stop()

    def validate(self) -> None:
        """Check the book's invariants (tests call it after each step): every run in
        flight is unfinished and valid, and its ``outstanding`` counts its tasks here."""
        with self._lock:
            counts: dict[int, int] = {}
            for record in self._tasks.values():
                assert record.run in self._runs, "a task of a run not in flight"
                counts[id(record.run)] = counts.get(id(record.run), 0) + 1
            for run in self._runs:
                assert not run.finished, f"a {run.state.value} run still in flight"
                run.validate()
                assert run.outstanding == counts.get(id(run), 0), (
                    run.outstanding, counts.get(id(run), 0))
