"""A barrier for the members of one group task, across worker processes.

It lives in shared memory and POSIX semaphores, so members block in the kernel (no
spinning on a 2-core host, no broker round trip per call). Two turnstiles, used by
alternate generations, keep a fast member from taking a wake-up meant for a slow one
when the barrier is reused. A failed member (or the broker, when a member's worker dies)
aborts the barrier: every waiter, now or later, gets ``BarrierAborted``.

Names: ``/pto_<owner>_b<gid>`` for the state, ``/pto_<owner>_b<gid>m|t0|t1`` for the
semaphores (``/dev/shm/sem.pto_...``), so the shm janitor reclaims them by owner.
"""

from __future__ import annotations

import time

import posix_ipc

from . import shm
from .errors import PtoError

_COUNT, _GENERATION, _ABORTED = 0, 1, 2


class BarrierAborted(PtoError):
    """Another member of the group failed, or its worker died, so the barrier can't complete."""


class GroupBarrier:
    def __init__(self, name: str, world: int, create: bool):
        self.name = name
        self.world = world
        flags = posix_ipc.O_CREX if create else 0
        if create:
            self._mm = shm.create(name, 8 * 3)
        else:
            self._mm = shm.open_existing(name)
        self._state = memoryview(self._mm)[:8 * 3].cast("q")  # count, generation, aborted
        self._mutex = posix_ipc.Semaphore(name + "m", flags, mode=0o600, initial_value=1)
        self._turn = [posix_ipc.Semaphore(name + t, flags, mode=0o600, initial_value=0)
                      for t in ("t0", "t1")]

    @classmethod
    def create(cls, name: str, world: int) -> GroupBarrier:
        return cls(name, world, create=True)

    @classmethod
    def open(cls, name: str, world: int) -> GroupBarrier:
        return cls(name, world, create=False)

    def wait(self, timeout: float = 600.0) -> None:
        """Block until all ``world`` members have called ``wait`` (for this generation)."""
        state = self._state
        if state[_ABORTED]:
            raise BarrierAborted("the group's barrier was aborted: another member failed")
        self._mutex.acquire()
        generation = int(state[_GENERATION])
        state[_COUNT] += 1
        last = state[_COUNT] == self.world
        if last:
            state[_COUNT] = 0
            state[_GENERATION] += 1
        self._mutex.release()
        turn = self._turn[generation % 2]
        if last:
            for _ in range(self.world - 1):
                turn.release()
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                turn.acquire(0.1)  # wake now and then to notice an abort
                return
            except posix_ipc.BusyError:
                if state[_ABORTED]:
                    raise BarrierAborted(
                        "the group's barrier was aborted: another member failed") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group barrier: not every member arrived within "
                                       f"{timeout:g}s") from None

    def abort(self) -> None:
        self._state[_ABORTED] = 1

    def close(self) -> None:
        for sem in (self._mutex, *self._turn):
            sem.close()
        del self._state
        try:
            self._mm.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        shm.unlink(self.name)
        for suffix in ("m", "t0", "t1"):
            try:
                posix_ipc.unlink_semaphore(self.name + suffix)
            except posix_ipc.ExistentialError:
                pass
