"""A chip worker: receive batches of tasks, map their tensors, run the kernels, report.

The execute path is ``Worker._execute``: tensors become zero-copy numpy views of shared
memory segments mapped once per tensor and cached until the client frees it; kernels are
loaded once per (client, kernel). Results go back in batches: everything finished since
the last report, sent when the local queue runs dry, every ``_REPORT_EVERY`` tasks, or
after ``_REPORT_AFTER`` seconds, so dependent tasks elsewhere are never held back long.

A task may arrive before the predecessors it depends on have ended on other workers
(``WorkTask.wait``): it runs when their outcomes appear in those workers' completion
rings, and the worker sleeps in its poll meanwhile (``worker.completions``). Tasks run in
the order received within each client, the clients taking turns (``worker.queue``).

A worker's status segment (what it is running and its completion ring, for its peers
and for the broker to read if it dies) is unlinked by the worker itself however it exits:
a normal stop, SIGTERM (which a spawned worker also gets when its broker dies), a broker
gone silent, or an exception; the watchdog thread does it for a kernel that never
returns. Only a SIGKILLed worker leaves it, for its broker (or the next one's janitor)
to sweep.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback

import zmq

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.barrier import BarrierAborted, GroupBarrier
from pto.wire.chips import chip_label
from pto.wire.procs import SpinPoll, parent_gone, worker_address
from pto.wire.sockets import connect, incoming, send_frames
from pto.wire.taskinfo import TaskInfo, set_current

from .completions import Peers, StatusBlock
from .graph import Graphs
from .kernels import Kernel, load_kernel
from .queue import LocalQueue
from .tensors import Tensors

log = logging.getLogger("pto.worker")

_REPORT_EVERY = 256
_REPORT_AFTER = 0.001


class Worker:
    def __init__(self, broker: str, device: int, heartbeat: float = P.HEARTBEAT_S,
                 liveness: int = P.LIVENESS,
                 parent_pid: int | None = None, curve: str | None = None,
                 spin_seconds: float = 0.0):
        """Serve ``device`` (a chip, or ``pto.wire.chips.host_chip(k)``) for the broker whose
        client address is ``broker``; ``spin_seconds``: see ``pto.wire.procs.SpinPoll``."""
        self.device = device
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.parent_pid = parent_pid
        self.ctx = zmq.Context()
        self.sock = connect(self.ctx, worker_address(broker), curve)
        self.poller = zmq.Poller()  # Socket.poll() would build one per call
        self.poller.register(self.sock, zmq.POLLIN)
        self._poll = SpinPoll(self.poller.poll, spin_seconds)
        self.kernels: dict[tuple[int, int], Kernel | Exception] = {}
        self.kernel_names: dict[tuple[int, int], str] = {}
        self.tensors = Tensors()
        self.queue = LocalQueue()
        self.done: list[int] = []
        self.failed: list[P.Failure] = []
        self.times: list[tuple[int, int, float, float]] = []
        self.launches: list[tuple[int, int, list[P.LaunchTime]]] = []  # of traced tasks
        self.last_report = time.monotonic()
        self.last_recv = time.monotonic()
        self.last_sent = 0.0
        self.stopping = False
        self._closed = threading.Event()
        # What this worker is doing, readable by the broker after a crash (no message
        # needed): [task running now or 0, last task finished]. Tasks run in FIFO order.
        # From here on a SIGTERM only stops the loop, which then removes the segment.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.block = StatusBlock(os.getpid())
        self.status_name = self.block.name
        self.status = self.block.words
        self.peers = Peers(self.block)
        self.poller.register(self.peers.wake_fd, zmq.POLLIN)
        self.peers.wake_on_signals()  # a SIGTERM stops us now, not at the poll's timeout
        self.graphs = Graphs(device, self.peers, self._send)  # captured graphs (worker.graph)

    def _hello(self) -> P.WorkerHello:
        return P.WorkerHello(self.device, os.getpid(), self.status_name, self.peers.address)

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._send(self._hello())
            if self.parent_pid is not None:
                threading.Thread(target=self._watch_parent, name="pto-watchdog",
                                 daemon=True).start()
            log.info("worker for %s started", chip_label(self.device))
            while not self.stopping:
                ran = self.graphs.busy and self.graphs.step()
                task = self._next_task()
                if task is None and ran:
                    self._drain()
                    continue
                if task is None:  # nothing queued, or every client's next task waits
                    if self._idle_poll():
                        self._drain()
                    self._check_timers()  # after the drain: heartbeats that came count
                    continue
                self._execute(task)
                if (len(self.done) + len(self.failed) >= _REPORT_EVERY
                        or time.monotonic() - self.last_report > _REPORT_AFTER):
                    self._report()
                self._drain()  # frees, cancels and tasks that came meanwhile
        finally:
            self._close()

    def _idle_poll(self) -> bool:
        """Report, then sleep until a message or a poke comes; False if the broker socket
        surely has nothing to read. While tasks here wait for peers, what finished is
        reported at most ``_REPORT_AFTER`` late: the tasks that wait for it are already
        on their workers, and on a chain across chips a report per task would keep the
        broker and the client busy on the cores the chain needs."""
        timeout_ms = int(self.heartbeat * 1000)
        if self.queue and (self.done or self.failed) and (
                time.monotonic() - self.last_report < _REPORT_AFTER):
            sent, timeout_ms = False, 1
        else:
            sent = self._report()
        # (No spin on the peers' rings while the head waits: measured on 2 cores, the
        # spin took more from the peer it waited for than it saved: a chain across chips
        # ran at 167-201 us/task with a 100 us spin, 119-149 without.)
        ready = self._poll(timeout_ms, sent)
        from_broker = False
        for what, _ in ready:
            if what is self.sock:
                from_broker = True
            else:
                self.peers.drain_pokes()
        return from_broker

    def _next_task(self) -> P.WorkTask | None:
        """Take the next task that may run now (``worker.queue``); None if there is none
        or every client's next task waits for a predecessor elsewhere."""
        if not self.queue:
            return None
        hold = self.graphs.hold if self.graphs.busy else None
        return self.queue.next(self._check_waits, self._skip, hold)

    def _check_waits(self, task: P.WorkTask) -> bool | None:
        try:
            return self._waits_met(task.wait)
        except LookupError:
            return False  # _skip tells which

    def _skip(self, task: P.WorkTask) -> None:
        """Not run: a predecessor failed (the broker fails it itself, naming the root
        cause, once it hears of that), or its worker's ring could not be read."""
        self.peers.ended(task.seq, False)
        try:
            self._waits_met(task.wait)
        except LookupError as exc:
            self._failed(task, self._kernel_name(task), f"not run: {exc}", lost=True)
            return
        self._failed(task, self._kernel_name(task), "not run: a task it depends on failed",
                     skipped=True)

    def _waits_met(self, wait: list[int]) -> bool | None:
        """True: every predecessor ended well; False: one failed; None: one is running."""
        outcome = self.peers.outcome
        for i in range(0, len(wait), 2):
            ok = outcome(wait[i], wait[i + 1])
            if not ok:
                return ok
        return True

    def _kernel_name(self, task: P.WorkTask) -> str:
        return self.kernel_names.get((task.client, task.kernel), f"#{task.kernel}")

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        self.stopping = True

    def _watch_parent(self) -> None:
        """Exit when our broker is dead or stopped, even in the middle of a kernel that
        never returns (the main loop only looks between tasks)."""
        while not self._closed.wait(self.heartbeat):  # (not self.stopping: SIGTERM sets it
            # while a kernel may keep the main loop from ever stopping)
            if parent_gone(self.parent_pid) or shm.pid_state(self.parent_pid) in ("T", "Z"):
                log.warning("broker (pid %s) is gone or stopped: exiting", self.parent_pid)
                self._remove_leftovers()
                os._exit(1)

    def _remove_leftovers(self) -> None:
        """Remove our status segment's name and, if our broker died, what it left in
        /dev/shm (its group barriers: segments of owners whose process is gone)."""
        shm.unlink(self.status_name)
        reaped = shm.reap_dead_owners() if parent_gone(self.parent_pid) else 0
        log.info("removed status segment %s (and %d of a dead broker's)", self.status_name,
                 reaped)

    def _check_timers(self) -> None:
        now = time.monotonic()
        if parent_gone(self.parent_pid):
            log.info("parent broker is gone: exiting")
            self.stopping = True
        elif now - self.last_recv > self.heartbeat * self.liveness:
            log.warning("broker silent for %.1fs: exiting", now - self.last_recv)
            self.stopping = True
        elif now - self.last_sent > self.heartbeat:
            self._send(P.Heartbeat())

    def _drain(self) -> None:
        for frames in incoming(self.sock):
            try:
                msg = P.decode(frames)
            except P.ProtocolError as exc:
                log.error("bad frame from broker: %s", exc)
                continue
            self.last_recv = time.monotonic()
            if isinstance(msg, P.Dispatch):
                self._apply(msg)
            elif self.graphs.handle(msg):
                pass
            elif isinstance(msg, P.Shutdown):
                log.info("broker asked us to stop: %s", msg.reason)
                self.stopping = True
                return
            elif isinstance(msg, P.Error):
                log.error("broker: %s", msg.message)
                if msg.message.startswith("unknown worker"):
                    # The broker dropped us (e.g. it restarted): introduce ourselves again.
                    self._send(self._hello())

    def _apply(self, msg: P.Dispatch) -> None:
        if msg.peers:
            self.peers.learn(msg.peers)
        for info in msg.clients:
            self.tensors.learn(info.client, info.owner)
        for k in msg.kernels:
            key = (k.client, k.kernel)
            self.kernel_names[key] = k.name
            try:
                self.kernels[key] = load_kernel(k.kind, k.name, k.blob)
            except Exception as exc:  # noqa: BLE001 - reported with each task that uses it
                self.kernels[key] = exc
        for ref in msg.frees:
            self.tensors.unmap(ref.client, ref.tensor)
        for client in msg.gone:
            self._forget_client(client)
            self.graphs.forget_client(client)
        self.queue.extend(msg.tasks)
        if msg.cancel:
            self._drop_queued(set(msg.cancel), "cancelled")
        if msg.watch:
            self.peers.watch(msg.watch)

    def _report(self) -> bool:
        """Send what finished since the last report; True if there was anything."""
        sent = bool(self.done or self.failed)
        if sent:
            self._send(P.Report(self.done, self.failed, self.times, self.launches))
            self.done, self.failed, self.times, self.launches = [], [], [], []
        self.last_report = time.monotonic()
        return sent

    def _send(self, msg: P.Message) -> None:
        send_frames(self.sock, P.encode(msg))
        self.last_sent = time.monotonic()

    # ---- the execute path ------------------------------------------------------------

    def _execute(self, task: P.WorkTask) -> None:
        self.status[0] = task.task
        start = time.monotonic() if task.trace else 0.0
        ok = False
        try:
            ok = self._run_kernel(task)
        finally:
            self.status[1] = task.task
            self.status[0] = 0
            if task.trace:
                self.times.append((task.task, task.rank, start, time.monotonic()))
            # last: a task waiting for this one may start the moment it is written
            self.peers.ended(task.seq, ok)

    def _run_kernel(self, task: P.WorkTask) -> bool:
        """Run it; False if it failed (the failure is recorded)."""
        key = (task.client, task.kernel)
        name = self.kernel_names.get(key, f"#{task.kernel}")
        try:
            fn = self.kernels.get(key)
            if fn is None:
                raise LookupError(f"kernel {name!r} was never sent to this worker")
            if isinstance(fn, Exception):
                raise RuntimeError(f"cannot load kernel {name!r}: {fn!r}")
            args = [self.tensors.arg(task.client, a) for a in task.args]
            barrier = GroupBarrier.open(task.barrier, task.world) if task.world > 1 else None
            set_current(TaskInfo(task.rank, task.world, self.device, barrier))
            try:
                fn(args, [a.kind for a in task.args])
            except BaseException:
                if barrier is not None:
                    barrier.abort()  # the other members must not wait for us forever
                raise
            finally:
                if task.trace:
                    self._note_launches(task, fn)
                set_current(None)
                del args
                if barrier is not None:
                    barrier.close()
        except BaseException as exc:  # noqa: BLE001 - even sys.exit() in a kernel is its result
            reason = "".join(traceback.format_exception_only(exc)).strip()
            if task.world > 1:
                reason = f"rank {task.rank} of {task.world}: {reason}"
            frames = traceback.format_tb(exc.__traceback__)[1:]  # drop this frame
            if frames:
                reason += "\nkernel traceback (most recent call last):\n" + "".join(frames[-5:])
            self._failed(task, name, reason, followed=isinstance(exc, BarrierAborted))
            return False
        self.done.append(task.task)
        return True

    def _note_launches(self, task: P.WorkTask, fn: Kernel) -> None:
        """A compiled orchestration's launches, for the trace (pto.chip.simtasks.Orchestration)."""
        spans = getattr(fn, "last_launches", None)
        if spans:
            self.launches.append((task.task, task.rank, [
                P.LaunchTime(s.kernel, s.block_dim, s.rc, s.start, s.end) for s in spans]))

    def _failed(self, task: P.WorkTask, name: str, reason: str, followed: bool = False,
                skipped: bool = False, lost: bool = False) -> None:
        # root 0: this failure only followed another member's; SKIPPED: not run because a
        # predecessor failed (the broker names the root cause)
        root = 0 if followed else P.SKIPPED if skipped else task.task
        self.failed.append(P.Failure(task.task, name, self.device, reason, root, lost))

    def _forget_client(self, client: int) -> None:
        self.tensors.forget(client)
        for key in [k for k in self.kernels if k[0] == client]:
            del self.kernels[key]
            self.kernel_names.pop(key, None)
        self._drop_queued({t.task for t in self.queue if t.client == client}, "client gone")

    def _drop_queued(self, gids: set[int], reason: str) -> None:
        """Report queued (not started) tasks as failed without running them."""
        for task in self.queue.take(lambda t: t.task not in gids):
            self.peers.ended(task.seq, False)
            self._failed(task, self._kernel_name(task), reason)

    def _close(self) -> None:
        try:
            self._report()
            self.graphs.close()
            self.tensors.close()
            self.sock.close(0)
            signal.set_wakeup_fd(-1)  # before the pipe it writes to closes
            self.peers.close()
            self.ctx.term()
        finally:
            # Even if saying goodbye failed: the name must not outlive us.
            self._closed.set()  # the watchdog's job is done
            self._remove_leftovers()
            del self.status
            self.block.close()
        log.info("worker for %s stopped", chip_label(self.device))

