"""One run's record, and the interface through which its orchestration reaches the runtime.

``Runtime.submit`` makes a ``Run``; the orchestration's ``OrchContext`` fills it through a
``RunHost`` (the runtime's side, pto/host/runbook.py). A run's life is a ``RunState``, moved
only by ``Run.move`` and checked against ``ALLOWED``: ORCHESTRATING (its orchestration runs)
-> WAITING (it returned; tasks still in flight) -> FINISHED (nothing more will change: its
last task ended, or the broker was lost) -> RESOLVING (exactly one thread -- the one that
``claim``s it -- resolves its future, holding no lock) -> RESOLVED.
A run of ``rt.run`` has no future (nobody else can see it): its own thread claims it and
takes its ``outcome``; a ``Future`` and its locks would cost that round trip about a quarter
of the client's Python.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..wire import protocol as P
from ..wire.errors import PtoError, TaskError, WorkerLost
from .tensor import Segment, TensorHandle, TensorStore, segment_of


class RunFuture(Future):
    """The future of a run: ``result()`` and ``exception()`` drive the wait themselves.

    A thread blocked on it then receives the run's results itself (as ``rt.run`` does),
    instead of waiting for the completion thread; so ``f.result()`` also works inside
    another run's done-callback, which runs on that completion thread. ``cancel()`` first
    asks the broker to drop the run's tasks not yet started (``drop``): an override rather
    than a done-callback, which every run would pay for and hardly any run needs.
    """

    def __init__(self, wait: Callable[[float | None], object], drop: Callable[[], object]):
        super().__init__()
        self._wait_for_run = wait
        self._drop_tasks = drop

    def cancel(self) -> bool:
        # Dropping first is harmless if cancelling then fails: a future leaves PENDING only
        # once its run has finished, when no task of it is left to drop.
        if not self.done():
            self._drop_tasks()
        return super().cancel()

    def result(self, timeout: float | None = None) -> Any:
        return super().result(self._wait(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._wait(timeout))

    def _wait(self, timeout: float | None) -> float | None:
        """Wait for the run; the time left of ``timeout`` (another thread may be resolving)."""
        if self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wait_for_run(timeout)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(frozen=True)
class Registration:
    """An orchestration registered under ``name`` and the ids of the kernels it may submit."""

    name: str
    orch: Callable[..., Any]
    kernel_ids: dict[str, int]


@dataclass(slots=True)
class PendingTask:
    """A task an orchestration submitted that has not gone to the broker yet."""

    spec: P.TaskSpec
    kernel: str
    segments: list[Segment]
    nbytes: int  # bytes its tensor arguments touch (for the trace)
    submitted_at: float  # time.monotonic() of ctx.submit


class RunState(enum.Enum):
    ORCHESTRATING = "orchestrating"  # its orchestration runs; tasks it sent may be in flight
    WAITING = "waiting"  # the orchestration returned; tasks are still in flight
    FINISHED = "finished"  # nothing more will change; nobody resolves it yet
    RESOLVING = "resolving"  # one thread claimed it and completes its future (or outcome)
    RESOLVED = "resolved"


S = RunState
ALLOWED: dict[RunState, frozenset[RunState]] = {
    S.ORCHESTRATING: frozenset({S.WAITING, S.FINISHED}),  # FINISHED: no task left, or lost
    S.WAITING: frozenset({S.FINISHED}),
    S.FINISHED: frozenset({S.RESOLVING}),
    S.RESOLVING: frozenset({S.RESOLVED}),
    S.RESOLVED: frozenset(),
}
_ENDED = frozenset({S.FINISHED, S.RESOLVING, S.RESOLVED})


class IllegalRunTransition(PtoError):
    """A run was moved along an edge ``ALLOWED`` does not have (a bug in pto)."""


@dataclass(eq=False)
class Run:
    """One call of an orchestration and the tasks it submitted.

    Fields up to ``scoped`` belong to the orchestration while it runs (one thread); the
    rest change only under the runtime lock (pto/host/runbook.py), ``state`` only through
    ``move``. ``dropped`` and ``abandoned`` are requests, not states: either may come at
    any point before the run is resolved.
    """

    future: RunFuture | None = None  # None: rt.run's, whose thread takes ``outcome``
    value: Any = None
    error: BaseException | None = None  # the orchestration raised it
    copy_back: list[tuple[np.ndarray, TensorHandle]] = field(default_factory=list)
    array_handles: dict[int, tuple[np.ndarray, TensorHandle]] = field(default_factory=dict)
    scoped: list[weakref.ref] = field(default_factory=list)  # segments allocated in a scope
    state: RunState = RunState.ORCHESTRATING
    outstanding: int = 0  # tasks sent and not yet ended
    submitted: int = 0
    failures: list[P.Failure] = field(default_factory=list)
    lost: BaseException | None = None  # why it ended early: broker lost, runtime closed
    waiters: int = 0  # threads blocked on its result: one of them resolves it
    dropped: bool = False  # the broker was asked to drop its tasks (cancel, once)
    abandoned: bool = False  # without a future: its rt.run gave up on it (timeout)
    outcome: tuple[Any, BaseException | None] | None = None  # without a future, once resolved

    @property
    def finished(self) -> bool:
        """Nothing more will change (FINISHED, RESOLVING or RESOLVED)."""
        return self.state in _ENDED

    def move(self, to: RunState) -> None:
        """The one way its state changes; raises ``IllegalRunTransition`` off the table."""
        if to not in ALLOWED[self.state]:
            raise IllegalRunTransition(f"run: {self.state.value} -> {to.value} is not allowed")
        self.state = to

    def claim(self) -> bool:
        """Under the runtime lock: True for the one caller that is to resolve the future."""
        if self.state is RunState.FINISHED:
            self.move(RunState.RESOLVING)
            return True
        return False

    def resolve(self) -> None:
        """Complete the future, or set ``outcome`` of a run without one (after ``claim``,
        holding no lock: the future's callbacks run here)."""
        future = self.future
        if future is None:
            if not self.abandoned:
                self.outcome = self._outcome()
                self.move(RunState.RESOLVED)
                return
        elif future.set_running_or_notify_cancel():
            value, error = self._outcome()
            # RESOLVED before the future completes: its callbacks may look at the run
            self.move(RunState.RESOLVED)
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
            return
        # Cancelled or abandoned: nobody gets the value, so its tensors must not outlive it.
        self.value = None
        self.copy_back.clear()
        self.array_handles.clear()
        self.move(RunState.RESOLVED)

    def validate(self) -> None:
        """Check the invariants between its state and its other fields (tests call it
        after each step); AssertionError names the one broken."""
        state = self.state
        assert 0 <= self.outstanding <= self.submitted, (self.outstanding, self.submitted)
        assert self.waiters >= 0, self.waiters
        assert not (self.abandoned and self.future is not None), "abandoned with a future"
        if state is RunState.WAITING:
            assert self.outstanding > 0, "waiting with no task in flight"
        if self.lost is not None:
            assert self.finished, f"lost but {state.value}"
        if state is not RunState.RESOLVED:
            assert self.outcome is None, f"an outcome while {state.value}"
        elif self.future is not None:
            assert self.future.done(), "resolved with its future pending"
        elif not self.abandoned:
            assert self.outcome is not None, "resolved without an outcome"

    def _outcome(self) -> tuple[Any, BaseException | None]:
        """(value, None) or (None, the error the run raises); copies arrays back."""
        if self.lost is not None:
            return None, self.lost
        if self.error is not None:
            return None, self.error
        if self.failures:
            return None, task_error(self.failures)
        try:
            for array, handle in self.copy_back:
                array[...] = handle.numpy()
        except BaseException as exc:
            return None, exc
        return self.value, None


class RunHost(Protocol):
    """What an orchestration context may ask of the runtime it runs in (package-internal)."""

    @property
    def devices(self) -> list[int]: ...

    @property
    def store(self) -> TensorStore: ...

    def wait_for_room(self) -> None:
        """Block while released tensors still used by tasks exceed their bound."""

    def new_task_id(self) -> int: ...

    def host_kernel(self, fn: Callable[..., Any]) -> int:
        """The kernel id of a host function, registered with the broker on first use."""

    def send_tasks(self, run: Run, batch: list[PendingTask]) -> None:
        """Hand ``batch`` to the broker (blocks while too many tasks are unfinished)."""


def handles_in(value: Any, depth: int = 0) -> Iterator[TensorHandle]:
    """Tensor handles in a return value (through lists, tuples, sets and dict values)."""
    if isinstance(value, TensorHandle):
        yield value
    elif depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from handles_in(item, depth + 1)
    elif depth < 8 and isinstance(value, dict):
        for item in value.values():
            yield from handles_in(item, depth + 1)


def returned_segments(value: Any) -> set[int]:
    """``id()`` of the segments a return value holds (kept past the run's scopes)."""
    return {id(segment_of(h)) for h in handles_in(value)}


def task_error(failures: list[P.Failure]) -> TaskError:
    """The error a failed run raises: its first root failure (a task that failed by itself)."""
    roots = [f for f in failures if f.root == f.task] or failures
    first = min(roots, key=lambda f: f.task)
    cls = WorkerLost if first.lost else TaskError
    return cls(first.kernel, first.chip, first.reason, failed=len(failures))
