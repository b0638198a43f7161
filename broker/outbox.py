"""What the scheduler has to tell the outside between two poll rounds, kept until the
server takes it: per client, the task ids done, the failures and the task times; the
group barriers to abort and to remove (``broker.barriers`` does it); and per worker, the
queued tasks to drop and the tasks other workers wait for (``Dispatch.cancel``,
``Dispatch.watch``)."""

from __future__ import annotations

from pto.wire.protocol import Failure, TaskTime

# per client: (task ids done, failures, task times)
Results = dict[int, tuple[list[int], list[Failure], list[TaskTime]]]
_NO_ORDERS: tuple[list[int], list[int]] = ([], [])  # (never mutated)


class Outbox:
    def __init__(self) -> None:
        self._results: dict[int, tuple[list[int], list[Failure]]] = {}
        self._times: dict[int, list[TaskTime]] = {}  # sent with the client's next results
        self._aborts: list[int] = []  # barriers to abort (a member failed)
        self._closes: list[int] = []  # barriers to remove (every member is done with it)
        self._cancels: dict[int, list[int]] = {}  # worker -> gids of queued tasks to drop
        self._watches: dict[int, list[int]] = {}  # worker -> flat (seq, waiter uid) pairs

    def done(self, client: int, task_id: int) -> None:
        self._for(client)[0].append(task_id)

    def failed(self, client: int, failure: Failure) -> None:
        self._for(client)[1].append(failure)

    def timed(self, client: int, times: TaskTime) -> None:
        self._times.setdefault(client, []).append(times)

    def forget(self, client: int) -> None:
        self._results.pop(client, None)
        self._times.pop(client, None)

    def take_results(self) -> Results:
        if not self._results:
            return {}  # most poll rounds
        results, self._results = self._results, {}
        return {client: (done, failed, self._times.pop(client, []))
                for client, (done, failed) in results.items()}

    def abort_barrier(self, gid: int) -> None:
        self._aborts.append(gid)

    def close_barrier(self, gid: int) -> None:
        self._closes.append(gid)

    def take_barrier_orders(self) -> tuple[list[int], list[int]]:
        """(barriers to abort, barriers to remove), in that order."""
        if not self._aborts and not self._closes:
            return _NO_ORDERS
        orders = self._aborts, self._closes
        self._aborts, self._closes = [], []
        return orders

    def cancel_on(self, worker: int, gid: int) -> None:
        self._cancels.setdefault(worker, []).append(gid)

    def watch(self, worker: int, seq: int, waiter_uid: int) -> None:
        """Ask ``worker`` to poke the worker ``waiter_uid`` when its task ``seq`` ends."""
        pairs = self._watches.get(worker)
        if pairs is None:
            pairs = self._watches[worker] = []
        pairs += (seq, waiter_uid)

    def take_worker_orders(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(cancels, watches) per worker; see ``cancel_on`` and ``watch``."""
        orders = self._cancels, self._watches
        if self._cancels:
            self._cancels = {}
        if self._watches:
            self._watches = {}
        return orders

    def _for(self, client: int) -> tuple[list[int], list[Failure]]:
        res = self._results.get(client)
        if res is None:
            res = self._results[client] = ([], [])
        return res
