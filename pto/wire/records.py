"""The records control messages are made of (pto/wire/protocol.py holds the messages and
their codec): a task's arguments, a task as submitted and as dispatched, failures, trace
times, peers, and the tasks of a captured graph. Positional msgspec Structs: encoding and
decoding are one C call each, and strings travel once, at registration.
"""

from __future__ import annotations

import msgspec


class Struct(msgspec.Struct, array_like=True, omit_defaults=False):
    pass


class ArgSpec(Struct):
    """One task argument. ``tensor`` is the client's tensor id, or -1 for a scalar."""

    kind: int  # pto.ParamType value
    tensor: int = -1
    offset: int = 0  # byte offset of the view in its segment
    nbytes: int = 0
    dtype: int = 0  # pto.wire.dtypes code
    shape: list[int] = []
    scalar: int | float | bool | None = None


class TaskSpec(Struct):
    """A task as the client submits it."""

    task: int  # client-local task id
    chip: int  # -1: a host sub-task
    kernel: int  # client-local kernel id (see RegisterKernel)
    args: list[ArgSpec]
    group: list[int] = []  # a group task: one member per chip, rank = position here
    retries: int = 1  # times to rerun the task if its worker dies under it


# Failure.root from a worker: not run because a predecessor failed (WorkTask.wait)
SKIPPED = -1


class Failure(Struct):
    """Why a task failed. ``root`` is the task id of the first failure (itself if it is one;
    from a worker also 0: a group member that only followed another's, or SKIPPED)."""

    task: int
    kernel: str
    chip: int
    reason: str
    root: int
    lost: bool = False  # the worker died under it (pto.WorkerLost)


class ClientInfo(Struct):
    client: int  # broker-assigned client index
    owner: str  # segment owner id: tensors are /pto_<owner>_<id>


class KernelDef(Struct):
    client: int
    kernel: int
    name: str
    kind: str  # "py": cloudpickled callable
    blob: bytes


class TensorRef(Struct):
    client: int
    tensor: int


class WorkTask(Struct):
    """A task as the broker dispatches it to a worker."""

    task: int  # broker-global task id
    client: int
    kernel: int
    args: list[ArgSpec]
    rank: int = 0
    world: int = 1
    barrier: str = ""  # a group's barrier (see pto.wire.barrier), when world > 1
    trace: bool = False  # report start/end times
    seq: int = 0  # its number on this worker: where its outcome goes in the completion ring
    # Predecessors still unfinished when it was sent, as flat (worker uid, seq) pairs: it
    # runs once each is done in that worker's completion ring, and is skipped (reported
    # with root SKIPPED) if one failed.
    wait: list[int] = []


class LaunchTime(Struct):
    """One launch a compiled orchestration made inside a traced task: kernel, blocks,
    result code (0: ok), and time.monotonic() start and end."""

    kernel: str
    block_dim: int
    rc: int
    start: float
    end: float


class TaskTime(Struct):
    """When one member of a traced task became ready, was dispatched, started and ended
    (time.monotonic() seconds: one clock for every process of the host), and the launches
    it made if it ran a package's orchestration."""

    task: int
    chip: int
    rank: int
    ready: float
    dispatch: float
    start: float
    end: float
    deps: list[int]  # the task ids it waited for
    launches: list[LaunchTime] = []


class PeerInfo(Struct):
    """Another worker (or this one), as a worker needs to know it: to read its completion
    ring (``status`` segment) or to wake it up (``wake`` endpoint)."""

    uid: int  # unique per worker process for the broker's lifetime
    status: str
    wake: str


# ---- captured graphs (pto.host.graph, broker.graphs, worker.graph) ------------------


class GraphTask(Struct):
    """One task of a captured graph as the client installs it: ``deps`` are the indexes
    (in the graph's task list) of every task it depends on, all earlier than it."""

    chip: int
    kernel: int
    args: list[ArgSpec]
    group: list[int] = []
    deps: list[int] = []


class PartTask(Struct):
    """One task of a worker's part of a graph, in the order it runs them. Each member of
    a graph task has an outcome word (``word``) in the graph's flags tensor; ``deps`` are
    the words it waits for, ``poke`` the uids of the workers waiting for its own."""

    index: int  # in the graph's task list
    word: int
    kernel: int
    args: list[ArgSpec]
    rank: int = 0
    world: int = 1
    barrier: str = ""
    deps: list[int] = []
    poke: list[int] = []
