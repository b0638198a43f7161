"""Who is connected to the broker: clients (by socket identity and by index), workers (by
socket identity, chip and uid), and the kernels clients registered, with the lookups and
sends the loop and captured graphs (``broker.graphs``) need. ``broker.server`` adds and
removes peers; task state stays the scheduler's.
"""

from __future__ import annotations

import time

from pto.wire import protocol as P

from .peers import ClientPeer, WorkerPeer
from .routers import Routers


class Roster:
    def __init__(self, routers: Routers):
        self._routers = routers
        self.clients: dict[bytes, ClientPeer] = {}  # by identity (a client may have several)
        self.clients_by_index: dict[int, ClientPeer] = {}
        self.kernels: dict[tuple[int, int], P.KernelDef] = {}  # to forward to workers
        self.workers: dict[bytes, WorkerPeer] = {}
        self.worker_by_device: dict[int, WorkerPeer] = {}
        self.worker_by_uid: dict[int, WorkerPeer] = {}

    # ---- comings and goings ------------------------------------------------------------

    def add_client(self, client: ClientPeer) -> None:
        self.clients[client.identity] = client
        self.clients_by_index[client.index] = client

    def remove_client(self, client: ClientPeer) -> None:
        for identity in client.identities:
            self.clients.pop(identity, None)
        self.clients_by_index.pop(client.index, None)
        for key in [k for k in self.kernels if k[0] == client.index]:
            del self.kernels[key]

    def add_worker(self, worker: WorkerPeer) -> None:
        self.workers[worker.identity] = worker
        self.worker_by_device[worker.device] = worker
        self.worker_by_uid[worker.uid] = worker

    def remove_worker(self, worker: WorkerPeer) -> None:
        self.workers.pop(worker.identity, None)
        self.worker_by_uid.pop(worker.uid, None)
        if self.worker_by_device.get(worker.device) is worker:
            del self.worker_by_device[worker.device]

    # ---- lookups -----------------------------------------------------------------------

    def owner_of(self, client: int) -> str:
        return self.clients_by_index[client].owner

    def kernel_def(self, key: tuple[int, int]) -> P.KernelDef | None:
        return self.kernels.get(key)

    def uid_of_chip(self, device: int) -> int | None:
        worker = self.worker_by_device.get(device)
        return None if worker is None else worker.uid

    def peer_info(self, uid: int) -> P.PeerInfo | None:
        peer = self.worker_by_uid.get(uid)
        return None if peer is None else P.PeerInfo(uid, peer.status.name, peer.wake)

    def ready_devices(self) -> list[int]:
        return sorted(d for d in self.worker_by_device if d >= 0)

    # ---- sending -----------------------------------------------------------------------

    def send_to_client(self, index: int, msg: P.Message) -> None:
        client = self.clients_by_index.get(index)
        if client is not None:
            self._routers.send(self._routers.frontend, client.identity, msg)
            client.last_sent = time.monotonic()

    def send_to_chip(self, device: int, msg: P.Message) -> bool:
        """Send to the worker of ``device``; False if none is connected now."""
        worker = self.worker_by_device.get(device)
        if worker is None:
            return False
        self._routers.send(self._routers.backend, worker.identity, msg)
        worker.last_sent = time.monotonic()
        return True
