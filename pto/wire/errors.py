"""Exceptions raised by pto. Every error a user can see derives from PtoError."""

from __future__ import annotations


class PtoError(Exception):
    """Base class of every pto error."""


class TaskError(PtoError):
    """A task failed: its kernel raised, returned non-zero, crashed, or a task it depends on failed.

    ``kernel`` and ``chip`` name the first failure (the root cause), ``reason`` says why.
    """

    def __init__(self, kernel: str, chip: int, reason: str, failed: int = 1):
        self.kernel = kernel
        self.chip = chip
        self.reason = reason
        self.failed = failed
        extra = f" ({failed - 1} dependent task(s) not run)" if failed > 1 else ""
        super().__init__(f"kernel {kernel!r} failed on chip {chip}: {reason}{extra}")


class WorkerLost(TaskError):
    """The worker process of a chip died while it ran the task."""


class BrokerLost(PtoError):
    """The broker could not be reached, or stopped answering."""


class HostLost(PtoError):
    """A host of a cluster (its Ray node or its host actor) died while a run needed it."""

    def __init__(self, host: int, reason: str):
        self.host = host
        self.reason = reason
        super().__init__(f"host {host} was lost: {reason}")


class TensorFreed(PtoError, ValueError):
    """A freed (or closed-runtime) tensor handle was used."""


class OutOfMemory(PtoError, MemoryError):
    """Shared memory (/dev/shm) has no room for a new tensor."""


class CompileError(PtoError):
    """Building a package failed. ``stderr`` holds the compiler's or linker's output
    (``file:line: error: ...``), ``command`` the command that failed."""

    def __init__(self, message: str, stderr: str = "", command: list[str] | None = None):
        super().__init__(message)
        self.stderr = stderr
        self.command = command or []


class ProtocolError(PtoError):
    """A control message could not be decoded."""
