"""The broker's record of each connected peer: clients and workers (``broker.server``
keeps them; the scheduler keeps their tasks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.chips import HOST_QUEUE
from pto.wire.ring import outcome_in, ring_of, words_of


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
    """A worker's status segment ([running task, last finished task], then its completion
    ring: ``pto.wire.ring``), mapped when the worker connects: a janitor that unlinks the name
    after the worker died cannot hide what it was doing."""

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
        running, finished = words_of(self._mm)[:2].tolist()
        return running, finished

    def outcome(self, seq: int) -> bool | None:
        """What its completion ring says of its task ``seq`` (None: not ended, or no ring)."""
        ring = None if self._mm is None else ring_of(self._mm)
        return None if ring is None else outcome_in(ring, seq)

    def release(self) -> None:
        """Unmap it, and unlink the name in case the worker could not (SIGKILL)."""
        if self.name:
            shm.unlink(self.name)
        if self._mm is not None:
            self._mm.close()
            self._mm = None


@dataclass
class WorkerPeer:
    """A connected worker: a chip's (device >= 0), or a host worker's
    (``pto.wire.chips.host_chip(k)``). What it holds is the scheduler's (``in_flight``)."""

    identity: bytes
    device: int
    pid: int
    last_seen: float
    last_sent: float = 0.0
    clients: set[int] = field(default_factory=set)  # client infos it has been sent
    kernels: set[tuple[int, int]] = field(default_factory=set)  # kernels it has been sent
    # to send with the next batch
    frees: list[P.TensorRef] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)  # clients whose state to drop
    cancels: list[int] = field(default_factory=list)  # gids of queued tasks to drop
    status: WorkerStatus = field(default_factory=lambda: WorkerStatus(""))
    wake: str = ""  # its wake-up pipe's endpoint (worker.wakeup)
    uid: int = 0  # the scheduler's name for it in tasks' waits
    peers: set[int] = field(default_factory=set)  # uids of the workers it has been told of
    watch: list[int] = field(default_factory=list)  # Dispatch.watch pairs to send
    done: int = 0
    failed: int = 0

    @property
    def queue(self) -> int:
        """The ready queue it takes tasks from: its chip's, or the one of every host worker."""
        return self.device if self.device >= 0 else HOST_QUEUE

    def has_news(self) -> bool:
        """Something to send even without tasks."""
        return bool(self.frees or self.gone or self.cancels or self.watch)

    def dispatch(self, work: list[P.WorkTask], owner_of: Callable[[int], str],
                 kernel_def: Callable[[tuple[int, int]], P.KernelDef],
                 peer_info: Callable[[int], P.PeerInfo | None]) -> P.Dispatch:
        """The message taking ``work`` and the news to it, with what it must know first
        and was not told yet: clients' segment owners, kernels, and the workers its tasks
        wait for or that wait for its tasks (``peer_info`` of a uid; None: gone)."""
        clients, kernels, peers = [], [], []
        for item in work:
            if item.client not in self.clients:
                self.clients.add(item.client)
                clients.append(P.ClientInfo(item.client, owner_of(item.client)))
            key = (item.client, item.kernel)
            if key not in self.kernels:
                self.kernels.add(key)
                kernels.append(kernel_def(key))
            if item.wait:
                self._introduce(item.wait[::2], peers, peer_info)
        if self.watch:
            self._introduce(self.watch[1::2], peers, peer_info)
        msg = P.Dispatch(clients, kernels, self.frees, self.gone, work, self.cancels, peers,
                         self.watch)
        self.frees, self.gone, self.cancels, self.watch = [], [], [], []
        return msg

    def _introduce(self, uids: list[int], peers: list[P.PeerInfo],
                   peer_info: Callable[[int], P.PeerInfo | None]) -> None:
        for uid in uids:
            if uid not in self.peers:
                self.peers.add(uid)
                info = peer_info(uid)
                if info is not None:
                    peers.append(info)
