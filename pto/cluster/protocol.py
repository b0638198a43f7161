"""The L4 control wire: messages between the driver and a host actor's endpoint.

A message is two ZeroMQ frames, ``[VERSION, body]``, ``body`` one msgpack-encoded msgspec
Struct (positional, tagged), like pto/wire/protocol.py. User values (a run's arguments, an
L3 entry's return value, an error) travel inside as cloudpickle bytes: both ends of this
socket are authenticated by the session's CURVE keys (a peer without them never gets a
frame through), so a pickle here comes from this session's driver or its own hosts.
Anything that does not decode is dropped and logged by the receiver.
"""

from __future__ import annotations

from typing import Union

import msgspec

from ..wire.errors import ProtocolError

VERSION = b"PTOL4\x01"
HEARTBEAT_S = 0.5  # a host with nothing to say sends a Heartbeat this often
SILENT_LOST_S = 4.0  # a host silent this long is lost (unless Ray says it is restarting)
STREAM_TIMEOUT_S = 4.0  # a tensor server silent this long is lost (HostLost within 5 s)


class _Struct(msgspec.Struct, array_like=True, omit_defaults=False):
    pass


class Hello(_Struct, tag=1):
    """Driver -> host, first on a connection: who to send results and heartbeats to."""

    session: str


class Run(_Struct, tag=2):
    """Driver -> host: run L3 entry ``entry``; ``args`` pickles its argument template (a
    ``_Slot`` for each Ref), ``values`` the pickled values of the runs the slots name, as
    their hosts sent them (tensors as ``TensorDesc``). ``local[i]`` non-zero: input ``i``
    is run ``local[i]`` of this very host, not yet done when sent; the host waits for it
    and takes its value itself (``values[i]`` is empty): a same-host chain never waits for
    the driver."""

    run: int
    entry: str
    args: bytes
    values: list[bytes] = []
    local: list[int] = []


class Release(_Struct, tag=3):
    """Driver -> host: no Ref names these runs' results any more: drop their tensors (the
    producer's, or this host's copies of them)."""

    runs: list[int]


class Done(_Struct, tag=4):
    """Host -> driver: run ``run`` returned ``value`` (pickled, tensors as ``TensorDesc``);
    ``fetched``: (producer host, run) of the copies this host made for it."""

    run: int
    value: bytes
    fetched: list[tuple[int, int]] = []


class Failed(_Struct, tag=5):
    """Host -> driver: run ``run`` raised ``error`` (pickled)."""

    run: int
    error: bytes
    fetched: list[tuple[int, int]] = []


class Heartbeat(_Struct, tag=6):
    pass


Message = Union[Hello, Run, Release, Done, Failed, Heartbeat]  # noqa: UP007 - tagged union

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> list[bytes]:
    """Frames for one message (without a ROUTER identity)."""
    return [VERSION, _encoder.encode(msg)]


def decode(frames: list[bytes]) -> Message:
    """Decode ``[VERSION, body]``; ProtocolError on anything else."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    if bytes(frames[0]) != VERSION:
        raise ProtocolError(f"unsupported L4 protocol version {bytes(frames[0])[:16]!r}")
    try:
        return _decoder.decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed L4 message: {exc}") from None
