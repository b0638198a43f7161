"""How a task learns, without a broker round trip, that a predecessor on another worker
ended: each worker's completion ring, and wake-up pipes between workers.

    worker W (runs predecessor P, its task number k)   worker V (holds S, wait=[(W, k)])
    ------------------------------------------------   -------------------------------------
    runs P                                             S heads its queue: reads W's ring
    ring[k % RING_SLOTS] = outcome        ---- shm --> (mapped), P has not ended: V blocks
    pokes V's wake-up pipe (the broker    --- pipe --> in one poll on its broker socket and
      asked it to: Dispatch.watch)                     its wake-up pipe; woken, reads again,
    reports P to the broker as before                  runs S (or skips it: P failed)

The broker's reports stay the source of truth for clients and traces; the ring only lets
S start early. The ring lives in the worker's status segment after its two status words
(running task, last finished task), so the broker reads the same record after a crash: a
task whose outcome is in the ring ended even if its report died with the worker, and a
successor elsewhere may already have used its outputs.

The wake-up is a byte down a pipe the waiting worker polls together with its broker
socket (``worker.wakeup`` says why a pipe, with the measurement).
"""

from __future__ import annotations

import logging
import mmap

from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.ring import SEGMENT_BYTES, outcome_in, ring_of, slot_value, words_of

from .wakeup import WakeUp

log = logging.getLogger("pto.worker")


class StatusBlock:
    """This worker's status segment: status words for the broker, then its ring."""

    def __init__(self, pid: int):
        self.name = shm.segment_name(shm.new_owner(), "status")
        self._mm: mmap.mmap | None = shm.create(self.name, SEGMENT_BYTES)
        self.words = words_of(self._mm)
        self.ring = ring_of(self._mm)
        self.words[2], self.words[3] = pid, P.RING_SLOTS

    def ended(self, seq: int, ok: bool) -> None:
        self.ring[seq % P.RING_SLOTS] = slot_value(seq, ok)

    def outcome(self, seq: int) -> bool | None:
        return outcome_in(self.ring, seq)

    def close(self) -> None:
        del self.words, self.ring
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class Peers:
    """Other workers' rings (mapped once) and wake-up pipes, this worker's own pipe, and
    who waits for which of its tasks. Peers are named by their broker-assigned uid."""

    def __init__(self, own: StatusBlock):
        self.own = own
        self._wakeup = WakeUp()
        self.wake_fd = self._wakeup.fd  # for the worker's poller
        self.address = self._wakeup.address
        self._rings: dict[int, memoryview | None] = {}  # None: its segment was gone
        self._maps: list[mmap.mmap] = []
        self._watchers: dict[int, list[int]] = {}  # our task seq -> uids to poke when it ends

    def learn(self, peers: list[P.PeerInfo]) -> None:
        for peer in peers:
            if peer.status == self.own.name:
                self._rings[peer.uid] = self.own.ring
                continue
            self._wakeup.learn(peer.uid, peer.wake)
            try:
                mm = shm.open_existing(peer.status)
            except Exception:  # noqa: BLE001 - it died (and was swept) before we looked
                log.warning("cannot map peer %d's status segment %s", peer.uid, peer.status)
                self._rings[peer.uid] = None
                continue
            self._maps.append(mm)
            self._rings[peer.uid] = ring_of(mm)

    def outcome(self, uid: int, seq: int) -> bool | None:
        """As ``outcome_in``; LookupError if that worker's ring cannot be read."""
        ring = self._rings.get(uid)
        if ring is None:
            raise LookupError(f"cannot read the completion ring of worker {uid}")
        return outcome_in(ring, seq)

    def watch(self, pairs: list[int]) -> None:
        """Dispatch.watch: (seq, uid) pairs; poke at once for tasks that already ended."""
        for i in range(0, len(pairs), 2):
            seq, uid = pairs[i], pairs[i + 1]
            if self.own.outcome(seq) is None:
                self._watchers.setdefault(seq, []).append(uid)
            else:
                self.poke(uid)

    def ended(self, seq: int, ok: bool) -> None:
        """Our task ``seq`` ended: record it, then wake whoever waits for it."""
        self.own.ended(seq, ok)
        if self._watchers:
            for uid in self._watchers.pop(seq, ()):
                self.poke(uid)

    def poke(self, uid: int) -> None:
        self._wakeup.poke(uid)

    def wake_on_signals(self) -> None:
        """A signal wakes the worker's poll (``WakeUp.wake_on_signals``); main thread only."""
        self._wakeup.wake_on_signals()

    def drain_pokes(self) -> None:
        self._wakeup.drain()

    def close(self) -> None:
        self._wakeup.close()
        self._rings.clear()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()
