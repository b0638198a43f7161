"""The broker: one poll loop over a ROUTER for clients and a ROUTER for workers.

Shaped like the ZeroMQ guide's Majordomo broker: a small record per peer kind
(``broker.peers``), heartbeats as plain timestamps, and one loop that drains both
sockets, lets the scheduler (``broker.scheduler``, the one owner of task state) decide,
then sends at most one message per peer per round. No sleeps on the dispatch path: the
loop blocks in ``zmq.Poller.poll`` until a message, a signal or the next timer tick.
This module only routes; its sockets are ``broker.routers``'s, who is connected
``broker.roster``'s, worker processes ``broker.supervisor``'s, group barriers
``broker.barriers``'s, captured graphs ``broker.graphs``'s, metrics ``broker.metrics``'s, and
``pto status``'s answer ``broker.status``'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time

import msgspec

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.chips import HOST_QUEUE
from pto.wire.procs import parent_gone
from pto.wire.sockets import (
    remove_stale_endpoints,
)

from .barriers import Barriers
from .graphs import GRAPH_REQUESTS, Graphs
from .metrics import BrokerMetrics
from .peers import ClientPeer, WorkerPeer, WorkerStatus
from .roster import Roster
from .routers import Routers
from .scheduler import Scheduler
from .status import broker_status
from .supervisor import Supervisor

log = logging.getLogger("pto.broker")

_OWNER = re.compile(r"^[0-9]+x[0-9a-f]{1,32}$")
_NO_WAIT: list[int] = []  # WorkTask.wait of most tasks (never mutated)


class Broker:
    def __init__(
        self,
        address: str,
        devices: list[int],
        spawn_workers: bool,
        heartbeat: float = P.HEARTBEAT_S,
        liveness: int = P.LIVENESS,
        credit: int = 512,
        parent_pid: int | None = None,
        log_dir: str | None = None,
        host_workers: int = 1,
        curve: str | None = None,
        spin_seconds: float = 0.0,
        metrics: BrokerMetrics | None = None,
        transition_log: int = 1000,
        supervisor: Supervisor | None = None,
    ):
        """Serve clients at ``address`` (workers at ``pto.wire.procs.worker_address``); with
        ``spawn_workers``, run a worker per chip in ``devices`` and ``host_workers`` host
        workers. ``credit``: tasks in flight per chip worker; ``spin_seconds``: see
        ``pto.wire.procs.SpinPoll``; ``metrics``: counters to update and publish (only the
        loop touches them: see ``broker.metrics``); ``transition_log``: task moves kept (0:
        none); ``supervisor``: one already made for these workers (``python -m broker`` makes it
        first, so that the fork server starts early)."""
        if not 1 <= credit <= P.MAX_CREDIT:
            raise ValueError(f"credit must be in 1..{P.MAX_CREDIT}, not {credit}")
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.credit = credit
        self.parent_pid = parent_pid
        self.metrics = metrics
        self.started = time.monotonic()
        self.supervisor = supervisor or Supervisor(
            address, devices if spawn_workers else [], host_workers, heartbeat, liveness,
            log_dir, curve)
        self.sched = Scheduler(
            [*devices, HOST_QUEUE] if spawn_workers and host_workers else devices,
            log_size=transition_log)
        self.barriers = Barriers(shm.new_owner())
        self._next_client = 1
        self._stop = False

        self.routers = Routers(address, curve, spin_seconds)
        self.frontend, self.backend = self.routers.frontend, self.routers.backend
        self._send, self._decode = self.routers.send, self.routers.decode
        self.roster = Roster(self.routers)
        self.graphs = Graphs(self.roster, self._live_group_on)

    # ---- the loop --------------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, a Shutdown, or the parent's death."""
        self.routers.wake_on_signals()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        removed = shm.reap_dead_owners()
        if removed:
            log.info("startup janitor removed %d segment(s)", removed)
        remove_stale_endpoints(self.address)
        tick = min(self.heartbeat, 0.25)
        next_tick = 0.0
        busy = False
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_tick:
                    self._on_tick(now)
                    next_tick = now + tick
                timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
                ready = self.routers.wait(timeout_ms, busy)
                round_start = time.perf_counter()
                busy = self.routers.take_in(ready, self._on_client_frames,
                                            self._on_worker_frames)
                self._dispatch()
                self._send_results()
                aborts, closes = self.sched.take_barrier_orders()
                if aborts or closes:
                    self.barriers.apply(aborts, closes)
                if self.metrics is not None and busy:
                    self.metrics.on_round(round_start)
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        self._stop = True

    # ---- clients ---------------------------------------------------------------------

    def _on_client_frames(self, identity: bytes, frames: list[bytes]) -> int:
        """Handle one client message; returns how many tasks it submitted."""
        msg = self._decode(self.frontend, identity, frames)
        if msg is None:
            return 0
        if isinstance(msg, P.StatusRequest):
            roster = self.roster
            status = broker_status(self.address, self.started, self.devices(),
                                   roster.workers.values(), roster.clients_by_index.values(),
                                   self.sched)
            status["graphs"] = self.graphs.status()
            status["graph_messages"] = self.graphs.messages
            self._send(self.frontend, identity, P.StatusReply(json.dumps(status)))
            return 0
        client = self.roster.clients.get(identity)
        now = time.monotonic()
        if client is None:
            if isinstance(msg, P.Hello):
                self._on_hello(identity, msg, now)
            elif isinstance(msg, P.Attach):
                self._on_attach(identity, msg)
            elif not isinstance(msg, (P.Bye, P.Heartbeat)):
                self._send(self.frontend, identity, P.Error("unknown client: send Hello first"))
            return 0
        client.last_seen = now
        if isinstance(msg, GRAPH_REQUESTS):
            self.graphs.on_request(client.index, msg, self.devices())
        elif isinstance(msg, P.PackedSubmit):
            if self.metrics is not None:
                self.metrics.on_submit(client.index, msg.tasks)
            self.sched.submit(client.index, msg.tasks)
            return len(msg.tasks)
        elif isinstance(msg, P.Cancel):
            self.sched.cancel(client.index, msg.tasks)
        elif isinstance(msg, P.RegisterKernel):
            key = (client.index, msg.kernel)
            self.roster.kernels[key] = P.KernelDef(client.index, msg.kernel, msg.name, msg.kind,
                                                   msg.blob)
            self.sched.register_kernel(client.index, msg.kernel, msg.name)
        elif isinstance(msg, P.FreeTensors):
            self.sched.forget_tensors(client.index, msg.tensors)
            self.sched.forget_tensors(client.index, msg.kept)
            for worker in self.roster.workers.values():
                if client.index in worker.clients:
                    worker.frees.extend(P.TensorRef(client.index, t) for t in msg.tensors)
        elif isinstance(msg, P.Bye):
            log.info("client %d (pid %d) said bye", client.index, client.pid)
            self._drop_client(client, reap=False)
        elif not isinstance(msg, P.Heartbeat):
            self._send(self.frontend, identity, P.Error(f"unexpected {type(msg).__name__}"))
        return 0

    def _live_group_on(self, device: int) -> bool:
        return any(len(task.chips) > 1 for task in self.sched.in_flight(device))

    def _on_hello(self, identity: bytes, msg: P.Hello, now: float) -> None:
        if not _OWNER.match(msg.owner):
            self._send(self.frontend, identity, P.Error(f"invalid owner id {msg.owner!r}"))
            return
        client = ClientPeer(identity, self._next_client, msg.owner, msg.pid, now)
        self._next_client += 1
        self.roster.add_client(client)
        self.sched.add_client(client.index, traced=msg.trace)
        log.info("client %d connected (pid %d, owner %s)", client.index, msg.pid, msg.owner)
        self._send(self.frontend, identity, P.Welcome(
            client.index, self.devices(), self.roster.ready_devices(), self.heartbeat,
            self.liveness, os.getpid()))
        client.last_sent = now

    def _on_attach(self, identity: bytes, msg: P.Attach) -> None:
        client = self.roster.clients_by_index.get(msg.client)
        if client is None or client.owner != msg.owner:
            self._send(self.frontend, identity, P.Error("Attach names no connected client"))
            return
        client.identities.append(identity)
        self.roster.clients[identity] = client

    def devices(self) -> list[int]:
        return sorted(d for d in {*self.sched.queue_lengths(), *self.supervisor.devices()}
                      if d >= 0)

    def _announce_devices(self) -> None:
        msg = P.DeviceStatus(self.devices(), self.roster.ready_devices())
        for client in self.roster.clients_by_index.values():
            self._send(self.frontend, client.identity, msg)

    def _drop_client(self, client: ClientPeer, reap: bool) -> None:
        self.roster.remove_client(client)
        self.sched.drop_client(client.index)
        self.graphs.drop_client(client.index)
        if self.metrics is not None:
            self.metrics.on_client_gone(client.index)
        for worker in self.roster.workers.values():
            if client.index in worker.clients:
                worker.gone.append(client.index)
                worker.clients.discard(client.index)
                worker.kernels = {k for k in worker.kernels if k[0] != client.index}
        if reap:
            removed = shm.unlink_owner(client.owner)
            log.info("client %d is gone: removed %d segment(s)", client.index, removed)

    def _send_results(self) -> None:
        now = time.monotonic()
        for index, (done, failed, times) in self.sched.take_results().items():
            client = self.roster.clients_by_index.get(index)
            if client is not None:
                if self.metrics is not None:
                    self.metrics.on_results(index, done, failed)
                self._send(self.frontend, client.identity, P.Results(done, failed, times))
                client.last_sent = now

    # ---- workers ---------------------------------------------------------------------

    def _on_worker_frames(self, identity: bytes, frames: list[bytes]) -> int:
        """Handle one worker message; returns how many tasks it reported."""
        msg = self._decode(self.backend, identity, frames)
        if msg is None:
            return 0
        worker = self.roster.workers.get(identity)
        if worker is None:
            if isinstance(msg, P.WorkerHello):
                self._on_worker_hello(identity, msg)
            else:
                self._send(self.backend, identity, P.Error("unknown worker: send WorkerHello"))
            return 0
        worker.last_seen = time.monotonic()
        if isinstance(msg, P.GraphDone):
            self.graphs.done(worker.device, msg)
            return 0
        if isinstance(msg, P.Report):
            worker.done += len(msg.done)
            worker.failed += len(msg.failed)
            if self.metrics is not None:
                self.metrics.on_report(worker.device, len(msg.done), len(msg.failed))
            self.sched.report(worker.device, msg.done, msg.failed, msg.times, msg.launches)
            return len(msg.done) + len(msg.failed)
        if not isinstance(msg, P.Heartbeat):
            self._send(self.backend, identity, P.Error(f"unexpected {type(msg).__name__}"))
        return 0

    def _on_worker_hello(self, identity: bytes, msg: P.WorkerHello) -> None:
        if msg.device in self.roster.worker_by_device:
            log.warning("refused a second worker for device %d (pid %d)", msg.device, msg.pid)
            self._send(self.backend, identity, P.Error(f"device {msg.device} is already served"))
            self._send(self.backend, identity, P.Shutdown("device already served"))
            return
        worker = WorkerPeer(identity, msg.device, msg.pid, time.monotonic(),
                            status=WorkerStatus(msg.status), wake=msg.wake)
        self.supervisor.connected(msg.device, msg.pid)
        # Host tasks are long and few: one at a time per host worker spreads them out.
        limit = self.credit if worker.queue != HOST_QUEUE else 1
        worker.uid = self.sched.add_worker(worker.device, worker.queue, limit)
        self.roster.add_worker(worker)
        log.info("worker for device %d connected (pid %d)", msg.device, msg.pid)
        self._announce_devices()
        self.graphs.worker_joined(msg.device)

    def _dispatch(self) -> None:
        batches: dict[int, list[P.WorkTask]] = {}
        if self.sched.has_ready():
            for device, task, rank, barrier_id, seq in self.sched.schedule():
                world = len(task.chips)
                barrier = self.barriers.open(barrier_id, world) if barrier_id else ""
                batches.setdefault(device, []).append(P.WorkTask(
                    task.gid, task.client, task.kernel, msgspec.Raw(task.args), rank, world,
                    barrier, task.trace is not None, seq, task.wait or _NO_WAIT))
        cancels, watches = self.sched.take_worker_orders()
        for device, gids in cancels.items():
            worker = self.roster.worker_by_device.get(device)
            if worker is not None:
                worker.cancels += gids
        for device, pairs in watches.items():
            worker = self.roster.worker_by_device.get(device)
            if worker is not None:
                worker.watch += pairs
        if not batches and not any(w.has_news() for w in self.roster.workers.values()):
            return  # most rounds that only took reports in
        for worker in self.roster.workers.values():
            work = batches.get(worker.device, [])
            if work or worker.has_news():
                msg = worker.dispatch(work, self.roster.owner_of, self.roster.kernels.__getitem__,
                                      self.roster.peer_info)
                self._send(self.backend, worker.identity, msg)
                worker.last_sent = time.monotonic()

    def _worker_lost(self, worker: WorkerPeer, how: str) -> None:
        log.warning("worker for device %d (pid %d) lost: %s", worker.device, worker.pid, how)
        if self.metrics is not None:
            self.metrics.on_worker_lost(worker.device, worker.pid, how)
        self.roster.remove_worker(worker)
        status = worker.status.read()
        what = f"chip {worker.device}" if worker.device >= 0 else "host"
        self.sched.worker_lost(worker.device, status,
                               f"worker of {what} (pid {worker.pid}) died ({how})",
                               self.supervisor.log_hint(worker.device), worker.status.outcome)
        worker.status.release()
        self.graphs.worker_lost(worker.device, f"worker of {what} (pid {worker.pid}) died ({how})")
        self._announce_devices()

    # ---- timers ----------------------------------------------------------------------

    def _on_tick(self, now: float) -> None:
        if parent_gone(self.parent_pid):
            log.info("parent %s is gone: shutting down", self.parent_pid)
            self._stop = True
            for client in list(self.roster.clients_by_index.values()):
                self._drop_client(client, reap=True)
            return
        deadline = self.heartbeat * self.liveness
        for client in list(self.roster.clients_by_index.values()):
            if not shm.pid_alive(client.pid) or now - client.last_seen > deadline:
                self._drop_client(client, reap=True)
            elif now - client.last_sent > self.heartbeat:
                self._send(self.frontend, client.identity, P.Heartbeat())
                client.last_sent = now
        for worker in list(self.roster.workers.values()):
            # alive first: one that dies between the two lines is then seen dead by exit_of,
            # which tells how it ended (for the workers we started)
            alive = shm.pid_alive(worker.pid)
            exited = self.supervisor.exit_of(worker.device, worker.pid, gone=not alive)
            if exited is not None:
                self._worker_lost(worker, exited)
            elif not alive:
                self._worker_lost(worker, "process gone")
            elif (not self.sched.in_flight(worker.device)
                  and not self.graphs.busy_on(worker.device)
                  and now - worker.last_seen > deadline):
                self._worker_lost(worker, f"silent for {now - worker.last_seen:.1f}s")
            elif now - worker.last_sent > self.heartbeat:
                self._send(self.backend, worker.identity, P.Heartbeat())
                worker.last_sent = now
        self.supervisor.tick(now, self._stop)
        self.supervisor.reap_orphans()
        if self.metrics is not None:
            self.metrics.publish(self.address, self.started, self.roster.workers.values(),
                                 self.roster.clients_by_index.values(), self.sched)

    def _shutdown(self) -> None:
        for worker in self.roster.workers.values():
            self._send(self.backend, worker.identity, P.Shutdown("broker stopping"))
        for client in self.roster.clients_by_index.values():
            self._send(self.frontend, client.identity, P.Shutdown("broker stopping"))
        self.supervisor.stop(timeout=2.0)
        self.barriers.close_all()
        self.graphs.close()
        for worker in self.roster.workers.values():  # workers killed on the way out leave theirs
            worker.status.release()
        self.routers.close()
        log.info("broker stopped")
