"""Errors of L4 runs: what a host actor raises, and how the driver names the host.

A host actor raises ``HostTaskError`` (a ``pto.TaskError`` naming the host) when its L3
run fails, or ``HostLostError`` (a ``pto.HostLost``) when it cannot reach another host's
tensor. Both pickle by their fields (Ray ships them to the driver), and both carry the id
of the run that failed first, so the driver tells a root failure from the same error that
Ray propagated into the runs depending on it. ``from_ray`` turns what ``ray.get`` raised
into the pto error a user sees.
"""

from __future__ import annotations

from typing import Any

from ..wire.errors import HostLost, TaskError


class HostTaskError(TaskError):
    """An L3 run on host ``host`` failed: ``kernel`` on ``chip`` for ``reason``."""

    def __init__(self, host: int, kernel: str, chip: int, reason: str, failed: int = 1,
                 run: int = 0):
        super().__init__(kernel, chip, reason, failed)
        self.host = host
        self.run = run
        self.args = (f"on host {host}: {self.args[0]}",)

    def __reduce__(self) -> Any:
        return (type(self), (self.host, self.kernel, self.chip, self.reason, self.failed,
                             self.run))

    def __str__(self) -> str:
        return str(self.args[0])


class HostLostError(HostLost):
    """Host ``host`` (its Ray node or its host actor) is gone: ``reason`` says how we know."""

    def __init__(self, host: int, reason: str, run: int = 0):
        super().__init__(host, reason)
        self.run = run

    def __reduce__(self) -> Any:
        return (type(self), (self.host, self.reason, self.run))


def from_ray(exc: BaseException, host_of_actor: dict[str, int], host: int) -> BaseException:
    """The pto error for ``exc`` raised by ``ray.get`` of a run submitted to ``host``.

    ``host_of_actor`` maps actor ids (hex) to hosts, so an actor death Ray propagated from
    an upstream run names the upstream's host.
    """
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if isinstance(cause, (HostTaskError, HostLostError)):
            return cause
        if isinstance(cause, rex.RayError):
            return from_ray(cause, host_of_actor, host)
        if cause is not None:
            return cause  # the L3 orchestration's own exception (it names the host in a note)
        return HostLostError(host, f"the host actor failed: {exc}")
    if isinstance(exc, rex.RayActorError):
        actor = getattr(exc, "actor_id", None)
        lost = host_of_actor.get(actor, host) if isinstance(actor, str) else host
        return HostLostError(lost, _actor_reason(exc))
    if isinstance(exc, rex.ActorUnschedulableError | rex.NodeDiedError):
        return HostLostError(host, f"its Ray node is gone ({type(exc).__name__})")
    if isinstance(exc, rex.ObjectLostError | rex.WorkerCrashedError):
        return HostLostError(host, f"a result on it was lost ({type(exc).__name__})")
    return exc


def _actor_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    head = next((line for line in text if line.strip()), type(exc).__name__)
    return f"its host actor died ({type(exc).__name__}: {head[:200]})"


def is_root(error: BaseException, run_id: int, host: int) -> bool:
    """Whether ``error`` (as ``from_ray`` made it) started at run ``run_id`` itself."""
    if isinstance(error, (HostTaskError, HostLostError)) and getattr(error, "run", 0):
        return error.run == run_id
    if isinstance(error, HostLost):
        return error.host == host
    return getattr(error, "_pto_run", run_id) == run_id


def first_failure(errors: list[tuple[int, int, BaseException]]) -> BaseException:
    """The error an L4 run raises: the first (by run id) of its failed L3 runs that failed
    itself, noting how many depending runs were not run. ``errors``: (run id, host, error)."""
    roots = [item for item in errors if is_root(item[2], item[0], item[1])]
    err = (roots or errors)[0][2]
    skipped = len(errors) - len(roots or errors[:1])
    if skipped and not getattr(err, "_pto_noted", False):
        err.add_note(f"({skipped} dependent L3 run(s) not run)")
        err._pto_noted = True  # type: ignore[attr-defined]
    return err
