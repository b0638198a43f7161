"""The broker: one poll loop over a ROUTER for clients and a ROUTER for workers.

Shaped like the ZeroMQ guide's Majordomo broker: a small class per peer kind, heartbeats
as plain timestamps, and one loop that drains both sockets, lets the scheduler decide,
then sends at most one message per peer per round. No sleeps on the dispatch path: the
loop blocks in ``zmq.Poller.poll`` until a message, a signal or the next timer tick.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import zmq

from pto import protocol as P
from pto import shm
from pto.barrier import GroupBarrier
from pto.errors import ProtocolError
from pto.procs import parent_gone, poll_with_spin, worker_address
from pto.security import secure_server

from .scheduler import HOST, Scheduler, State, Task

log = logging.getLogger("pto.broker")

_OWNER = re.compile(r"^[0-9]+x[0-9a-f]{1,32}$")
# Messages per socket per round: bounds a round's work (timers stay on time) and keeps one
# busy socket from starving the other.
_MAX_DRAIN = 32
_NOTHING_BEFORE: list[int] = []  # WorkTask.after of most tasks (never mutated)


@dataclass
class ClientPeer:
    identity: bytes
    index: int
    owner: str
    pid: int
    last_seen: float
    last_sent: float = 0.0
    identities: list[bytes] = field(default_factory=list)  # its sockets: results go to the first

    def __post_init__(self) -> None:
        self.identities.append(self.identity)


class WorkerStatus:
    """A worker's status block ([running task, last finished task], see worker.loop),
    mapped when the worker connects: a janitor that unlinks the name after the worker died
    cannot hide what it was doing."""

    def __init__(self, name: str):
        self.name = name
        self._mm = None
        if name:
            try:
                self._mm = shm.open_existing(name)
            except Exception:  # noqa: BLE001 - not there: we know nothing
                self._mm = None

    def read(self) -> tuple[int, int] | None:
        if self._mm is None:
            return None
        running, finished = np.frombuffer(self._mm, dtype=np.int64, count=2).tolist()
        return running, finished

    def release(self) -> None:
        if self.name:
            shm.unlink(self.name)
        if self._mm is not None:
            self._mm.close()
            self._mm = None


@dataclass
class WorkerPeer:
    """A connected worker: a chip's (device >= 0), or a host worker's (device -1 - index)."""

    identity: bytes
    device: int
    pid: int
    last_seen: float
    last_sent: float = 0.0
    inflight: dict[int, Task] = field(default_factory=dict)
    clients: set[int] = field(default_factory=set)  # client infos it has been sent
    kernels: set[tuple[int, int]] = field(default_factory=set)  # kernels it has been sent
    frees: list[P.TensorRef] = field(default_factory=list)  # to send with the next batch
    gone: list[int] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    status: WorkerStatus = field(default_factory=lambda: WorkerStatus(""))
    done: int = 0
    failed: int = 0

    @property
    def queue(self) -> int:
        return self.device if self.device >= 0 else HOST


@dataclass
class WorkerProcess:
    """A worker this broker started and restarts when it dies."""

    device: int
    popen: subprocess.Popen | None = None
    restarts: int = 0  # deaths in a row before connecting, for back-off
    start_at: float = 0.0
    connected: bool = False  # it said WorkerHello


class Broker:
    def __init__(
        self,
        address: str,
        devices: list[int],
        spawn_workers: bool,
        heartbeat: float = 0.5,
        liveness: int = 3,
        credit: int = 512,
        parent_pid: int | None = None,
        log_dir: str | None = None,
        host_workers: int = 1,
        curve: str | None = None,
    ):
        if not 1 <= credit <= P.MAX_CREDIT:
            raise ValueError(f"credit must be in 1..{P.MAX_CREDIT}, not {credit}")
        self.address = address
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.credit = credit
        self.parent_pid = parent_pid
        self.log_dir = log_dir
        self.started = time.monotonic()
        self.sched = Scheduler([*devices, HOST] if spawn_workers and host_workers else devices)
        self.clients: dict[bytes, ClientPeer] = {}
        self.clients_by_index: dict[int, ClientPeer] = {}
        self.kernels: dict[tuple[int, int], P.KernelDef] = {}
        self.workers: dict[bytes, WorkerPeer] = {}
        self.worker_by_device: dict[int, WorkerPeer] = {}
        self.spawned: dict[int, WorkerProcess] = (
            {d: WorkerProcess(d) for d in (*devices, *range(-1, -1 - host_workers, -1))}
            if spawn_workers else {}
        )
        self.owner = shm.new_owner()  # names the group barriers this broker creates
        self.barriers: dict[int, GroupBarrier] = {}
        self.times: dict[int, list[P.TaskTime]] = {}  # per traced client, to send
        self._next_client = 1
        self._stop = False

        self.ctx = zmq.Context()
        self.curve = curve
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        sockets = [self.frontend, self.backend]
        self._auth = secure_server(self.ctx, sockets, curve) if curve else None
        self._bind(self.frontend, address)
        self._bind(self.backend, worker_address(address))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)

    def _bind(self, sock: zmq.Socket, address: str) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if address.startswith("ipc://"):
            path = address[len("ipc://") :]
            if os.path.exists(path):
                os.unlink(path)  # a stale endpoint of a dead broker
            old = os.umask(0o077)
            try:
                sock.bind(address)
            finally:
                os.umask(old)
        else:
            sock.bind(address)

    # ---- the loop --------------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT, a Shutdown, or the parent's death."""
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        removed = shm.reap_dead_owners()
        if removed:
            log.info("startup janitor removed %d segment(s)", removed)
        _remove_stale_endpoints(os.path.dirname(self.address[6:]) if self.address.startswith(
            "ipc://") else None)
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
                ready = dict(poll_with_spin(self.poller.poll, timeout_ms, busy))
                busy = bool(ready)
                if self._wake_r.fileno() in ready or self._wake_r in ready:
                    self._drain_wakeups()
                if self.frontend in ready:
                    self._drain(self.frontend, self._on_client_frames)
                if self.backend in ready:
                    self._drain(self.backend, self._on_worker_frames)
                self._dispatch()
                self._send_results()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        self._stop = True

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _drain(self, sock: zmq.Socket, handle) -> None:
        for _ in range(_MAX_DRAIN):
            # Asking first is cheaper than the zmq.Again exception of an empty socket.
            if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if len(frames) < 2:
                continue
            handle(frames[0], frames[1:])

    def _send(self, sock: zmq.Socket, identity: bytes, msg: P.Message) -> None:
        try:
            sock.send_multipart([identity, *P.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a message to a peer whose queue is full")

    # ---- clients ---------------------------------------------------------------------

    def _decode(self, sock: zmq.Socket, identity: bytes, frames: list[bytes]) -> P.Message | None:
        """The message in ``frames``, or None after answering the sender with an Error."""
        try:
            return P.decode(frames, broker=True)
        except ProtocolError as exc:
            role = "client" if sock is self.frontend else "worker"
            log.warning("bad frame from %s %r: %s", role, identity, exc)
            self._send(sock, identity, P.Error(str(exc)))
            return None

    def _on_client_frames(self, identity: bytes, frames: list[bytes]) -> None:
        msg = self._decode(self.frontend, identity, frames)
        if msg is None:
            return
        if isinstance(msg, P.StatusRequest):
            self._send(self.frontend, identity, P.StatusReply(json.dumps(self.status())))
            return
        client = self.clients.get(identity)
        now = time.monotonic()
        if client is None:
            if isinstance(msg, P.Hello):
                self._on_hello(identity, msg, now)
            elif isinstance(msg, P.Attach):
                self._on_attach(identity, msg)
            elif not isinstance(msg, (P.Bye, P.Heartbeat)):
                self._send(self.frontend, identity, P.Error("unknown client: send Hello first"))
            return
        client.last_seen = now
        if isinstance(msg, P.PackedSubmit):
            self.sched.submit(client.index, msg.tasks)
        elif isinstance(msg, P.Cancel):
            for task in self.sched.cancel(client.index, msg.tasks):
                for worker in self.workers.values():
                    if task.gid in worker.inflight:
                        worker.cancels.append(task.gid)
        elif isinstance(msg, P.RegisterKernel):
            key = (client.index, msg.kernel)
            self.kernels[key] = P.KernelDef(client.index, msg.kernel, msg.name, msg.kind, msg.blob)
            self.sched.kernel_names[key] = msg.name
        elif isinstance(msg, P.FreeTensors):
            self.sched.forget_tensors(client.index, msg.tensors)
            self.sched.forget_tensors(client.index, msg.kept)
            for worker in self.workers.values():
                if client.index in worker.clients:
                    worker.frees.extend(P.TensorRef(client.index, t) for t in msg.tensors)
        elif isinstance(msg, P.Bye):
            log.info("client %d (pid %d) said bye", client.index, client.pid)
            self._drop_client(client, reap=False)
        elif isinstance(msg, P.Heartbeat):
            pass
        else:
            self._send(self.frontend, identity, P.Error(f"unexpected {type(msg).__name__}"))

    def _on_hello(self, identity: bytes, msg: P.Hello, now: float) -> None:
        if not _OWNER.match(msg.owner):
            self._send(self.frontend, identity, P.Error(f"invalid owner id {msg.owner!r}"))
            return
        client = ClientPeer(identity, self._next_client, msg.owner, msg.pid, now)
        self._next_client += 1
        self.clients[identity] = client
        self.clients_by_index[client.index] = client
        if msg.trace:
            self.sched.traced.add(client.index)
        log.info("client %d connected (pid %d, owner %s)", client.index, msg.pid, msg.owner)
        self._send(self.frontend, identity, P.Welcome(
            client.index, self.devices(), self.ready_devices(), self.heartbeat,
            self.liveness, os.getpid()))
        client.last_sent = now

    def _on_attach(self, identity: bytes, msg: P.Attach) -> None:
        client = self.clients_by_index.get(msg.client)
        if client is None or client.owner != msg.owner:
            self._send(self.frontend, identity, P.Error("Attach names no connected client"))
            return
        client.identities.append(identity)
        self.clients[identity] = client

    def devices(self) -> list[int]:
        return sorted(d for d in set(self.sched.ready) | set(self.spawned) if d >= 0)

    def ready_devices(self) -> list[int]:
        return sorted(d for d in self.worker_by_device if d >= 0)

    def _announce_devices(self) -> None:
        msg = P.DeviceStatus(self.devices(), self.ready_devices())
        for client in self.clients_by_index.values():
            self._send(self.frontend, client.identity, msg)

    def status(self) -> dict:
        """What ``pto status`` shows: uptime, workers, clients, queues, shared memory."""
        unfinished: dict[int, int] = {}
        for task in self.sched.tasks.values():
            unfinished[task.client] = unfinished.get(task.client, 0) + 1
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.device):
            running = (w.status.read() or (0, 0))[0]
            task = w.inflight.get(running)
            workers.append({
                "chip": w.device if w.device >= 0 else "host", "pid": w.pid,
                "state": "busy" if w.inflight else "idle",
                "running": self.sched.kernel_name(task) if task else None,
                "inflight": len(w.inflight), "done": w.done, "failed": w.failed,
            })
        owners = {c.owner for c in self.clients_by_index.values()}
        shm_bytes = sum(_size(n) for n in shm.list_names() if shm.owner_of(n) in owners)
        return {
            "address": self.address, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "devices": self.devices(), "workers": workers,
            "clients": [{"client": c.index, "pid": c.pid, "owner": c.owner,
                         "tasks": unfinished.get(c.index, 0)}
                        for c in sorted(self.clients_by_index.values(), key=lambda c: c.index)],
            "queues": {("host" if q == HOST else str(q)): len(d)
                       for q, d in sorted(self.sched.ready.items())},
            "shm_bytes": shm_bytes,
        }

    def _drop_client(self, client: ClientPeer, reap: bool) -> None:
        for identity in client.identities:
            self.clients.pop(identity, None)
        self.clients_by_index.pop(client.index, None)
        self.sched.drop_client(client.index)
        for key in [k for k in self.kernels if k[0] == client.index]:
            del self.kernels[key]
        for worker in self.workers.values():
            if client.index in worker.clients:
                worker.gone.append(client.index)
                worker.clients.discard(client.index)
                worker.kernels = {k for k in worker.kernels if k[0] != client.index}
        if reap:
            removed = shm.unlink_owner(client.owner)
            log.info("client %d is gone: removed %d segment(s)", client.index, removed)

    def _send_results(self) -> None:
        now = time.monotonic()
        for index, (done, failed) in self.sched.take_results().items():
            client = self.clients_by_index.get(index)
            if client is not None:
                times = self.times.pop(index, [])
                self._send(self.frontend, client.identity, P.Results(done, failed, times))
                client.last_sent = now

    # ---- workers ---------------------------------------------------------------------

    def _on_worker_frames(self, identity: bytes, frames: list[bytes]) -> None:
        msg = self._decode(self.backend, identity, frames)
        if msg is None:
            return
        worker = self.workers.get(identity)
        if worker is None:
            if isinstance(msg, P.WorkerHello):
                self._on_worker_hello(identity, msg)
            else:
                self._send(self.backend, identity, P.Error("unknown worker: send WorkerHello"))
            return
        worker.last_seen = time.monotonic()
        if isinstance(msg, P.Report):
            worker.done += len(msg.done)
            worker.failed += len(msg.failed)
            for gid, rank, start, end in msg.times:
                task = worker.inflight.get(gid)
                if task is not None and task.trace is not None:
                    ready, dispatch, deps = task.trace
                    self.times.setdefault(task.client, []).append(P.TaskTime(
                        task.tid, worker.device, rank, ready, dispatch, start, end, deps))
            for gid in msg.done:
                if worker.inflight.pop(gid, None) is not None:
                    self._ended(self.sched.done(gid))
            for failure in msg.failed:
                if worker.inflight.pop(failure.task, None) is not None:
                    # root 0: it failed only because another member of its group did
                    self._member_failed(failure.task, failure.reason,
                                        followed=failure.root == 0)
        elif not isinstance(msg, P.Heartbeat):
            self._send(self.backend, identity, P.Error(f"unexpected {type(msg).__name__}"))

    def _on_worker_hello(self, identity: bytes, msg: P.WorkerHello) -> None:
        current = self.worker_by_device.get(msg.device)
        if current is not None:
            log.warning("refused a second worker for device %d (pid %d)", msg.device, msg.pid)
            self._send(self.backend, identity, P.Error(f"device {msg.device} is already served"))
            self._send(self.backend, identity, P.Shutdown("device already served"))
            return
        worker = WorkerPeer(identity, msg.device, msg.pid, time.monotonic(),
                            status=WorkerStatus(msg.status))
        self.workers[identity] = worker
        self.worker_by_device[msg.device] = worker
        proc = self.spawned.get(msg.device)
        if proc is not None and proc.popen is not None and proc.popen.pid == msg.pid:
            proc.connected = True
        self.sched.add_chip(worker.queue)
        log.info("worker for device %d connected (pid %d)", msg.device, msg.pid)
        self._announce_devices()

    def _dispatch(self) -> None:
        if not any(self.sched.ready.values()) and not any(
                w.frees or w.gone or w.cancels for w in self.workers.values()):
            return  # most rounds that only took reports in
        credit: dict[int, int] = {}
        idle = set()
        for worker in self.workers.values():
            credit[worker.queue] = credit.get(worker.queue, 0) + self._credit(worker)
            if not worker.inflight:
                idle.add(worker.queue)
        batches: dict[int, list[P.WorkTask]] = {}
        host_workers = [w for w in self.workers.values() if w.queue == HOST]
        for queue, task, rank in self.sched.schedule(credit, idle):
            if queue == HOST:  # any host worker with room, the least loaded first
                worker = min(host_workers, key=lambda w: len(w.inflight))
            else:
                worker = self.worker_by_device[queue]
            batches.setdefault(worker.device, []).append(self._work(worker, task, rank))
        for worker in self.workers.values():
            work = batches.get(worker.device, [])
            if not work and not worker.frees and not worker.gone and not worker.cancels:
                continue
            clients, kernels = [], []
            for item in work:
                if item.client not in worker.clients:
                    worker.clients.add(item.client)
                    owner = self.clients_by_index[item.client].owner
                    clients.append(P.ClientInfo(item.client, owner))
                key = (item.client, item.kernel)
                if key not in worker.kernels:
                    worker.kernels.add(key)
                    kernels.append(self.kernels[key])
            msg = P.Dispatch(clients, kernels, worker.frees, worker.gone, work, worker.cancels)
            worker.frees, worker.gone, worker.cancels = [], [], []
            self._send(self.backend, worker.identity, msg)
            worker.last_sent = time.monotonic()

    def _credit(self, worker: WorkerPeer) -> int:
        # Host tasks are long and few: one at a time per host worker spreads them out.
        limit = self.credit if worker.queue != HOST else 1
        return max(0, limit - len(worker.inflight))

    def _work(self, worker: WorkerPeer, task: Task, rank: int) -> P.WorkTask:
        worker.inflight[task.gid] = task
        world = len(task.chips)
        barrier = ""
        if world > 1:
            if task.gid not in self.barriers:
                name = shm.segment_name(self.owner, f"b{task.gid}")
                self.barriers[task.gid] = GroupBarrier.create(name, world)
            barrier = self.barriers[task.gid].name
        return P.WorkTask(task.gid, task.client, task.kernel, msgspec.Raw(task.args), rank, world,
                          barrier, task.trace is not None, task.after or _NOTHING_BEFORE)

    def _member_failed(self, gid: int, reason: str, lost: bool = False,
                       followed: bool = False) -> None:
        task = self.sched.failed(gid, reason, lost, followed)
        if task is not None and task.gid in self.barriers:
            self.barriers[task.gid].abort()  # members waiting at the barrier give up
        self._ended(task)

    def _ended(self, task: Task | None) -> None:
        if task is not None and task.state in (State.DONE, State.FAILED):
            barrier = self.barriers.pop(task.gid, None)
            if barrier is not None:
                barrier.close()
                barrier.unlink()

    def _worker_lost(self, worker: WorkerPeer, how: str) -> None:
        """Fail or rerun what a dead worker held: tasks it had not started go back to the
        head of the queue; started ones rerun while they have retries, unless a partial run
        may have overwritten their inputs (then pto.WorkerLost); group members fail."""
        log.warning("worker for device %d (pid %d) lost: %s", worker.device, worker.pid, how)
        self.workers.pop(worker.identity, None)
        if self.worker_by_device.get(worker.device) is worker:
            del self.worker_by_device[worker.device]
        status = worker.status.read()
        worker.status.release()
        running, finished = status or (0, 0)
        gids = list(worker.inflight)
        tasks = list(worker.inflight.values())
        # A worker runs its tasks in the order sent: the first ``started`` of them started
        # (up to the running one, or the last finished); without a status block, assume all.
        started = len(gids) if status is None else max(
            (gids.index(g) + 1 for g in (running, finished) if g in gids), default=0)
        what = f"chip {worker.device}" if worker.device >= 0 else "host"
        requeue = []
        for i, task in enumerate(tasks):
            gid = task.gid
            name = self.sched.kernel_name(task)
            reason = (f"worker of {what} (pid {worker.pid}) died ({how}) while running kernel "
                      f"{name!r}{self._log_hint(worker.device)}")
            if task.client not in self.clients_by_index or len(task.chips) > 1:
                self._member_failed(gid, reason, lost=True)
            elif i >= started:
                requeue.append(task)
            elif (task.retries > 0 and not self.sched.overwrites(task)
                  and not self.sched.inputs_overwritten(  # by a task queued behind it
                      task, tasks[i + 1:started])):
                task.retries -= 1
                log.info("rerunning task %d (kernel %r) after its worker died", gid, name)
                requeue.append(task)
            else:
                self._member_failed(gid, reason, lost=True)
        self.sched.requeue(requeue)
        worker.inflight.clear()
        self._announce_devices()

    # ---- timers ----------------------------------------------------------------------

    def _on_tick(self, now: float) -> None:
        if parent_gone(self.parent_pid):
            log.info("parent %s is gone: shutting down", self.parent_pid)
            self._stop = True
            for client in list(self.clients_by_index.values()):
                self._drop_client(client, reap=True)
            return
        deadline = self.heartbeat * self.liveness
        for client in list(self.clients_by_index.values()):
            if not shm.pid_alive(client.pid) or now - client.last_seen > deadline:
                self._drop_client(client, reap=True)
            elif now - client.last_sent > self.heartbeat:
                self._send(self.frontend, client.identity, P.Heartbeat())
                client.last_sent = now
        for worker in list(self.workers.values()):
            proc = self.spawned.get(worker.device)
            if (proc is not None and proc.popen is not None and proc.popen.pid == worker.pid
                    and proc.popen.poll() is not None):
                self._worker_lost(worker, _exit_text(proc.popen.returncode))
            elif not shm.pid_alive(worker.pid):
                self._worker_lost(worker, "process gone")
            elif not worker.inflight and now - worker.last_seen > deadline:
                self._worker_lost(worker, f"silent for {now - worker.last_seen:.1f}s")
            elif now - worker.last_sent > self.heartbeat:
                self._send(self.backend, worker.identity, P.Heartbeat())
                worker.last_sent = now
        for proc in self.spawned.values():
            self._supervise(proc, now)

    def _supervise(self, proc: WorkerProcess, now: float) -> None:
        if proc.popen is not None:
            if proc.popen.poll() is None:
                return  # (the worker loop of _on_tick already failed what a dead one held)
            # A worker that keeps dying before it even connects (a broken environment) is
            # restarted ever more slowly; one that served is replaced at once.
            proc.popen = None
            proc.restarts = 0 if proc.connected else proc.restarts + 1
            proc.start_at = now + (min(5.0, 0.1 * 2 ** proc.restarts) if proc.restarts else 0)
        if now >= proc.start_at and not self._stop:
            proc.popen = self._spawn_worker(proc.device)
            proc.connected = False

    def _log_file(self, device: int) -> str | None:
        if not self.log_dir:
            return None
        name = f"worker-{device}.log" if device >= 0 else f"host-{-1 - device}.log"
        return os.path.join(self.log_dir, name)

    def _log_hint(self, device: int) -> str:
        path = self._log_file(device)
        return f"; worker log: {path}" if path else ""

    def _spawn_worker(self, device: int) -> subprocess.Popen:
        role = ["--device", str(device)] if device >= 0 else ["--host", str(-1 - device)]
        cmd = [sys.executable, "-m", "worker", "--broker", self.address, *role,
               "--parent-pid", str(os.getpid()), "--heartbeat", str(self.heartbeat),
               "--liveness", str(self.liveness)]
        log_file = self._log_file(device)
        if log_file:
            cmd += ["--log-file", log_file]
        if self.curve:
            cmd += ["--curve", self.curve]
        log.info("starting %s worker", f"chip {device}" if device >= 0 else "host")
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=_child_env())

    def _shutdown(self) -> None:
        signal.set_wakeup_fd(-1)
        for worker in self.workers.values():
            self._send(self.backend, worker.identity, P.Shutdown("broker stopping"))
        for client in self.clients_by_index.values():
            self._send(self.frontend, client.identity, P.Shutdown("broker stopping"))
        deadline = time.monotonic() + 2.0
        for proc in self.spawned.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for barrier in self.barriers.values():
            barrier.close()
            barrier.unlink()
        shm.unlink_owner(self.owner)
        for worker in self.workers.values():  # workers killed on the way out leave theirs
            worker.status.release()
        self.frontend.close(0)
        self.backend.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        for addr in (self.address, worker_address(self.address)):
            if addr.startswith("ipc://") and os.path.exists(addr[6:]):
                os.unlink(addr[6:])
        self._wake_r.close()
        self._wake_w.close()
        log.info("broker stopped")


def _size(name: str) -> int:
    try:
        return os.stat(shm.SHM_DIR + name).st_size
    except OSError:
        return 0


def _remove_stale_endpoints(directory: str | None) -> None:
    """Remove ipc endpoints that brokers killed before they could clean up left behind
    (named broker-<pid>.sock or <pid>x<hex>.sock, with a .w twin for workers)."""
    if not directory or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if not name.endswith((".sock", ".sock.w")):
            continue
        head = name.removeprefix("broker-").split(".", 1)[0].split("x", 1)[0]
        if head.isdigit() and not shm.pid_alive(int(head)):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _child_env() -> dict[str, str]:
    """Our environment, with this checkout importable even when pto is not installed."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
