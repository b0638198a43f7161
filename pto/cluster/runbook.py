"""The driver's book of L3 runs in flight: when each is sent, and what its end releases.

Where it sits: ``ClusterRuntime.place`` (pto/cluster/runtime.py) checks a ``ctx.submit``
call and hands the ``L3Run`` record here (``add``). A run whose Refs are all done, or
whose unfinished ones all run on its own host, is sent at once (the host waits for its
own runs itself, so a same-host chain never waits for the driver); one waiting for
another host's run is sent by the I/O thread (pto/cluster/links.py calls ``on_message``)
the moment the last of them reports ``Done``, with their values as the hosts sent them. A
failure fails every run waiting on it with the same error, without running it. When the
orchestration has returned (``end``) and its last L3 run has settled, the L4 run is
finished: its event is set and ``on_finished`` called (the runtime hands a ``submit``
Future to a finisher thread).

Host failures reach the book from pto/cluster/recovery.py: ``host_lost`` fails a lost
host's runs and the runs reading its tensors; ``resend`` sends a restarted host's runs in
flight again. Every state change here happens under the book's one lock.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..wire.errors import PtoError
from . import protocol as P
from .errors import HostLostError
from .refs import RunOutput


@dataclass(eq=False)
class L4Run:
    """One ``rt.run``/``rt.submit`` of an L4 orchestration."""

    name: str
    future: Future | None  # None: rt.run's own run (its caller finishes it)
    start: float
    pending: int = 0  # L3 runs placed and not yet settled
    ended: bool = False  # the orchestration has returned
    finished: threading.Event = field(default_factory=threading.Event)
    records: list[L3Run] = field(default_factory=list)
    errors: list[tuple[int, int, BaseException]] = field(default_factory=list)
    value: Any = None  # what the orchestration returned
    error: BaseException | None = None  # what it raised
    abandoned: bool = False


@dataclass(eq=False)
class L3Run:
    """One ``ctx.submit``: an L3 entry run on one host."""

    run_id: int
    host: int
    entry: str
    args: bytes  # the pickled argument template
    inputs: list[RunOutput]  # held until this run has settled: it reads their values
    output: RunOutput | None  # held until settled (then only Refs hold it)
    l4: L4Run
    waiting: int = 0  # inputs not yet done
    sends: int = 0


class RunBook:
    """The L3 runs in flight of one cluster runtime and the hosts it has given up on."""

    def __init__(self, send: Callable[[int, P.Message], None],
                 on_finished: Callable[[L4Run], None]):
        self._send_msg = send
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an output settled
        self._inflight: dict[int, L3Run] = {}
        self._lost: dict[int, str] = {}  # host -> why it is lost for this runtime

    # ---- placing and ending (the orchestration's thread) --------------------------------

    def add(self, rec: L3Run) -> None:
        """Book ``rec``: send it if it can go now, fail it if an input failed or its host is
        lost, else leave it waiting for its inputs."""
        run = rec.l4
        with self._lock:
            run.pending += 1
            run.records.append(rec)
            self._inflight[rec.run_id] = rec
            failed = None
            for out in rec.inputs:
                if not out.done:
                    rec.waiting += 1
                    out.waiters.append(rec)
                elif out.error is not None and failed is None:
                    failed = out.error
            if failed is None and rec.host in self._lost:
                failed = HostLostError(rec.host, self._lost[rec.host])
            if failed is not None:
                self._settle(rec, error=failed)
            elif all(out.done or out.host == rec.host for out in rec.inputs):
                self._send(rec)  # what it waits for (if anything) runs on its own host

    def end(self, run: L4Run) -> None:
        """``run``'s orchestration has returned: it finishes when its last L3 run settles."""
        with self._lock:
            run.ended = True
            self._check_finished(run)

    def abandon(self, run: L4Run) -> None:
        """``rt.run`` timed out: drop its L3 runs not yet sent (sent ones end on their own)."""
        with self._lock:
            run.abandoned = True
            for rec in run.records:
                if rec.output is not None and not rec.sends:
                    self._settle(rec, error=TimeoutError("its L4 run timed out"))
            run.records, run.value = [], None

    # ---- the hosts' reports (the I/O thread) ---------------------------------------------

    def on_message(self, host: int, msg: P.Done | P.Failed) -> None:
        with self._lock:
            rec = self._inflight.get(msg.run)
            if rec is None or rec.host != host:
                return  # failed already (its host was declared lost), or not ours
            if isinstance(msg, P.Done):
                self._settle(rec, blob=msg.value)
            else:
                self._settle(rec, error=load_error(msg.error, host))

    # ---- host failures (pto/cluster/recovery.py) -----------------------------------------

    def lost(self, host: int) -> str | None:
        """Why ``host`` is lost for this runtime, or None while it serves."""
        with self._lock:
            return self._lost.get(host)

    def host_lost(self, host: int, reason: str) -> bool:
        """``host`` is gone for good: fail its runs and the runs reading its tensors. False
        if it was lost already."""
        with self._lock:
            if host in self._lost:
                return False
            self._lost[host] = reason
            for rec in list(self._inflight.values()):
                if rec.output is not None and (
                        rec.host == host or any(o.host == host for o in rec.inputs)):
                    self._settle(rec, error=HostLostError(host, reason))
        return True

    def resend(self, host: int, retries: int) -> None:
        """``host``'s actor restarted: send its runs in flight again, each at most
        ``retries`` more times (then it fails with ``HostLost``)."""
        with self._lock:
            for rec in list(self._inflight.values()):
                if rec.host != host or rec.output is None or not rec.sends:
                    continue
                if rec.sends > retries:
                    self._settle(rec, error=HostLostError(
                        host, f"its host actor died under run {rec.run_id} "
                        f"{1 + retries} time(s)"))
                else:
                    self._send(rec)

    def fail_all(self, reason: str) -> None:
        """The runtime closes: fail every run in flight with ``PtoError(reason)``."""
        with self._lock:
            for rec in list(self._inflight.values()):
                if rec.output is not None:
                    self._settle(rec, error=PtoError(reason))

    # ---- results (the finishing thread) ---------------------------------------------------

    def wait_done(self, outputs: Iterable[RunOutput], deadline: float | None,
                  closed: Callable[[], bool]) -> None:
        """Wait until every one of ``outputs`` has settled (a Ref of another L4 run still
        in flight), or raise ``TimeoutError`` at ``deadline`` or when the runtime closes."""
        outputs = list(outputs)
        with self._lock:
            while not all(o.done for o in outputs):
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or closed():
                    raise TimeoutError("the results did not arrive in time")
                self._changed.wait(left if left is not None else 1.0)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # ---- under the lock ---------------------------------------------------------------------

    def _send(self, rec: L3Run) -> None:
        for out in rec.inputs:
            if out.host != rec.host:
                out.copies.add(rec.host)  # its tensors may be copied there: release there too
        rec.sends += 1
        values = [out.blob if out.done else b"" for out in rec.inputs]
        local = [0 if out.done else out.run_id for out in rec.inputs]
        self._send_msg(rec.host, P.Run(rec.run_id, rec.entry, rec.args, values,
                                       local if any(local) else []))

    def _settle(self, rec: L3Run, blob: bytes | None = None,
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

    def _check_finished(self, run: L4Run) -> None:
        if run.ended and run.pending == 0 and not run.finished.is_set():
            run.finished.set()
            if run.future is not None:
                self._on_finished(run)


def load_error(blob: bytes, host: int) -> BaseException:
    """A host's pickled error (CURVE: from this session's host), or one saying why not."""
    try:
        err = pickle.loads(blob)
    except Exception as exc:
        return HostLostError(host, f"its error report did not unpickle: {exc!r}")
    return err if isinstance(err, BaseException) else HostLostError(
        host, f"it reported a non-exception {type(err).__name__}")
