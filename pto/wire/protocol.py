"""The wire format: every control message between clients, the broker and workers.

A message is two ZeroMQ frames, ``[VERSION, body]`` (ROUTER sockets prepend the peer
identity). ``body`` is one msgpack-encoded msgspec Struct, positional (``array_like``)
and tagged with a small integer, so decoding is one C call and never unpickles.
Tensor bytes never appear here: tasks name tensors by integer id, and each process maps
the segment ``/pto_<owner>_<id>`` itself. Strings (kernel names, owners) travel once,
at registration. Every hop is batched: one message carries a list of tasks or results.

Python kernels travel as opaque cloudpickle bytes inside ``RegisterKernel``: the broker
forwards them to workers and never loads them.
"""

from __future__ import annotations

from typing import Union, get_args

import msgspec

from .errors import ProtocolError
from .records import (  # noqa: F401 - the records messages carry, also named from here
    SKIPPED,
    ArgSpec,
    ClientInfo,
    Failure,
    GraphTask,
    KernelDef,
    LaunchTime,
    PartTask,
    PeerInfo,
    Struct,
    TaskSpec,
    TaskTime,
    TensorRef,
    WorkTask,
)

VERSION = b"PTO\x02"
MAX_FRAME_BYTES = 64 * 1024 * 1024  # larger frames are refused (socket option MAXMSGSIZE)
# Tasks in flight per worker at most.
MAX_CREDIT = 65536
# Slots in a worker's completion ring (see worker.completions): the outcome of its task
# number ``seq`` stays readable until it has been sent RING_SLOTS more tasks; the broker
# never sends it more while a task elsewhere may still wait for ``seq``.
RING_SLOTS = 2 * MAX_CREDIT
# A peer with nothing to say sends a Heartbeat this often (seconds); one silent for
# LIVENESS heartbeats is dead. These are the broker's defaults; clients take the broker's
# values from Welcome, and a broker passes its own to the workers it starts.
HEARTBEAT_S = 0.5
LIVENESS = 3


# ---- client <-> broker --------------------------------------------------------------


class Hello(Struct, tag=1):
    owner: str
    pid: int
    trace: bool = False  # send TaskTimes with results


class RegisterKernel(Struct, tag=2):
    kernel: int
    name: str
    kind: str
    blob: bytes


class Submit(Struct, tag=3):
    tasks: list[TaskSpec]


class PackedTaskSpec(Struct):
    """A ``TaskSpec`` as the broker decodes it: ``args`` left as their msgpack bytes (a
    few dozen bytes per task instead of a few hundred in objects; see ``unpack_args``)."""

    task: int
    chip: int
    kernel: int
    args: msgspec.Raw
    group: list[int] = []
    retries: int = 1


class PackedSubmit(Struct, tag=3):
    """``Submit`` as the broker decodes it."""

    tasks: list[PackedTaskSpec]


class FreeTensors(Struct, tag=4):
    tensors: list[int]  # gone: the broker forgets them, workers unmap them
    # Kept for reuse by a later tensor of the same id: the broker forgets their accesses
    # (a failed write must not poison the next tensor), workers keep them mapped.
    kept: list[int] = []


class Heartbeat(Struct, tag=5):
    pass


class Cancel(Struct, tag=7):
    tasks: list[int]


class Attach(Struct, tag=9):
    """First message on a client's second (sending) socket: "I am this client too"."""

    client: int
    owner: str


class StatusRequest(Struct, tag=8):
    """Any peer may ask, without a Hello: the answer is a StatusReply."""


class StatusReply(Struct, tag=14):
    status: str  # JSON: see broker.status.broker_status


class Bye(Struct, tag=6):
    pass


class Welcome(Struct, tag=10):
    client: int
    devices: list[int]  # every device this broker serves
    ready: list[int]  # those with a live worker now
    heartbeat: float  # seconds between heartbeats; silence for `liveness` of them = dead
    liveness: int
    pid: int = 0  # the broker's pid: over ipc, clients watch it instead of its silence


class Results(Struct, tag=11):
    done: list[int]
    failed: list[Failure]
    times: list[TaskTime] = []


class Error(Struct, tag=12):
    message: str


class DeviceStatus(Struct, tag=13):
    """Sent to every client when a worker comes or goes."""

    devices: list[int]
    ready: list[int]


# ---- worker <-> broker --------------------------------------------------------------


class WorkerHello(Struct, tag=20):
    device: int
    pid: int
    status: str = ""  # shm segment: its status words and completion ring (worker.completions)
    wake: str = ""  # its wake-up pipe (worker.wakeup): poked when a task it waits for ends


class Dispatch(Struct, tag=21):
    """Everything a worker must know before running ``tasks``, in the order to apply it."""

    clients: list[ClientInfo]
    kernels: list[KernelDef]
    frees: list[TensorRef]
    gone: list[int]  # client indexes whose tensors and kernels to drop
    tasks: list[WorkTask]
    cancel: list[int] = []  # queued tasks to drop (reported failed: "cancelled")
    peers: list[PeerInfo] = []  # workers named in ``tasks`` waits or in ``watch``
    # Flat (seq, waiter uid) pairs: when our task ``seq`` ends (or now, if it has), poke
    # that worker, which holds a task waiting for it.
    watch: list[int] = []


class Report(Struct, tag=22):
    done: list[int]
    failed: list[Failure]
    times: list[tuple[int, int, float, float]] = []  # (task, rank, start, end) of traced tasks
    launches: list[tuple[int, int, list[LaunchTime]]] = []  # (task, rank, its launches)


class Shutdown(Struct, tag=23):
    reason: str = ""


# ---- captured graphs (pto.host.graph, broker.graphs, worker.graph) ------------------


class GraphInstall(Struct, tag=30):
    """Client -> broker, once per graph: its tasks, and the tensor holding an int64
    outcome word per task member (``flags``: a group task has one per chip), written by
    the workers and read by the waiting ones."""

    graph: int  # client-local graph id
    name: str
    flags: int  # tensor id
    tasks: list[GraphTask]


class GraphInstalled(Struct, tag=31):
    """Broker -> client: the graph is installed (``error`` empty) or refused."""

    graph: int
    error: str = ""


class GraphReplay(Struct, tag=32):
    """Client -> broker: replay the graph once (its inputs are bound already)."""

    graph: int
    replay: int  # client-local number, echoed in GraphResult
    trace: bool = False


class GraphDrop(Struct, tag=33):
    graph: int


class GraphResult(Struct, tag=34):
    """Broker -> client: one replay ended; ``failed`` empty if every task ran well.
    ``times``: (task index, rank, chip, start, end) of each task, for traced replays."""

    graph: int
    replay: int
    failed: list[Failure] = []
    times: list[tuple[int, int, int, float, float]] = []
    started: float = 0.0  # when the broker triggered it (time.monotonic())


class GraphPart(Struct, tag=35):
    """Broker -> worker: install (or replace) this worker's part of a graph."""

    client: int
    graph: int
    owner: str  # the client's segment owner
    flags: int  # tensor id of the outcome words
    kernels: list[KernelDef]
    peers: list[PeerInfo]
    tasks: list[PartTask]


class GraphRun(Struct, tag=36):
    """Broker -> worker: run your part of the graph once, as replay number ``replay``."""

    client: int
    graph: int
    replay: int
    trace: bool = False


class GraphAbort(Struct, tag=37):
    """Broker -> worker: replay ``replay`` failed (a worker died): skip what is left of it."""

    client: int
    graph: int
    replay: int


class GraphForget(Struct, tag=38):
    client: int
    graph: int


class GraphDone(Struct, tag=39):
    """Worker -> broker: its part of a replay ended (failures, and times if traced:
    (task index, rank, start, end))."""

    client: int
    graph: int
    replay: int
    failed: list[Failure] = []
    times: list[tuple[int, int, float, float]] = []


Message = Union[  # noqa: UP007 - msgspec needs a real Union of tagged structs
    Hello, RegisterKernel, Submit, FreeTensors, Heartbeat, Cancel, StatusRequest, Attach, Bye,
    Welcome,
    Results, Error, DeviceStatus, StatusReply,
    WorkerHello, Dispatch, Report, Shutdown,
    GraphInstall, GraphInstalled, GraphReplay, GraphDrop, GraphResult, GraphPart, GraphRun,
    GraphAbort, GraphForget, GraphDone,
]

# What the broker receives: Submit's task arguments stay packed until it needs them.
BrokerMessage = Union[tuple(  # noqa: UP007
    PackedSubmit if kind is Submit else kind for kind in get_args(Message))]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_broker_decoder = msgspec.msgpack.Decoder(BrokerMessage)
_args_decoder = msgspec.msgpack.Decoder(list[ArgSpec])
NO_ARGS = _encoder.encode([])


def pack_args(args: list[ArgSpec] | msgspec.Raw) -> bytes:
    """A task's arguments as msgpack bytes (a copy: not a view of a whole frame)."""
    if isinstance(args, msgspec.Raw):
        return bytes(args)
    return _encoder.encode(args) if args else NO_ARGS


def unpack_args(packed: bytes) -> list[ArgSpec]:
    """The arguments ``pack_args`` packed; ProtocolError if they are malformed."""
    if packed == NO_ARGS:
        return []
    try:
        return _args_decoder.decode(packed)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed task arguments: {exc}") from None


def encode(msg: Message) -> list[bytes]:
    """Frames for one message (without a ROUTER identity)."""
    return [VERSION, _encoder.encode(msg)]


def decode(frames: list[bytes], broker: bool = False) -> Message:
    """Decode ``[VERSION, body]``; raise ProtocolError on anything else. With ``broker``,
    only what peers send a broker, and a Submit as a ``PackedSubmit``."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    version, body = frames
    if version != VERSION:
        got = bytes(version)[:16]
        raise ProtocolError(f"unsupported protocol version {got!r}, want {VERSION!r}")
    try:
        return (_broker_decoder if broker else _decoder).decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
