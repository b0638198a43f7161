"""The wire format: round trips of every message type, versioning, refusing malformed
bytes, and no pickle anywhere in it."""

from __future__ import annotations

import pickle
import types
import typing
from typing import Any, Union, get_args, get_origin

import msgspec
import pytest

from pto.wire import protocol as P
from pto.wire.errors import ProtocolError

MESSAGE_TYPES = list(get_args(P.Message))


def sample(tp: Any, depth: int = 0) -> Any:
    """A value of type ``tp`` with every field set to something other than its default,
    so a field the encoder dropped or reordered shows in the round trip."""
    origin = get_origin(tp)
    if tp is int:
        return 7 + depth
    if tp is float:
        return 2.5
    if tp is bool:
        return True
    if tp is str:
        return f"s{depth}"
    if tp is bytes:
        return b"\x80\x04blob"  # looks like a pickle header: still opaque bytes
    if tp is msgspec.Raw:
        return msgspec.Raw(msgspec.msgpack.encode([sample(P.ArgSpec, depth + 1)]))
    if origin is list:
        return [sample(get_args(tp)[0], depth + 1)]
    if origin is tuple:
        return tuple(sample(a, depth + 1) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return sample(next(a for a in get_args(tp) if a is not type(None)), depth)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return tp(**{f: sample(hints[f], depth + 1) for f in tp.__struct_fields__})
    raise TypeError(f"no sample for {tp!r}: teach sample() the new field type")


def test_the_union_holds_every_message_struct_of_the_module():
    tagged = {obj for obj in vars(P).values() if isinstance(obj, type)
              and issubclass(obj, msgspec.Struct) and obj.__struct_config__.tag is not None}
    assert tagged - set(MESSAGE_TYPES) == {P.PackedSubmit}  # the broker's view of Submit
    tags = [t.__struct_config__.tag for t in MESSAGE_TYPES]
    assert len(tags) == len(set(tags)) == 28


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_every_message_type_round_trips(kind):
    msg = sample(kind)
    frames = P.encode(msg)
    assert P.decode(frames) == msg
    as_broker = P.decode(frames, broker=True)
    if kind is P.Submit:  # arguments stay packed: the same bytes, unpacked on demand
        assert isinstance(as_broker, P.PackedSubmit)
        assert [P.unpack_args(P.pack_args(t.args)) for t in as_broker.tasks] == [
            t.args for t in msg.tasks]
    else:
        assert as_broker == msg
    # The body is plain msgpack: a tagged array, readable without our classes.
    plain = msgspec.msgpack.decode(frames[1])
    assert isinstance(plain, list) and plain[0] == kind.__struct_config__.tag


def test_scalars_keep_their_python_type():
    spec = P.decode(P.encode(P.Submit([P.TaskSpec(1, 0, 1, [
        P.ArgSpec(0, scalar=2), P.ArgSpec(0, scalar=2.0), P.ArgSpec(0, scalar=True)])])))
    values = [a.scalar for a in spec.tasks[0].args]
    assert [type(v) for v in values] == [int, float, bool]


@pytest.mark.parametrize("frames,needle", [
    ([b"PTO\x09", msgspec.msgpack.encode([5])], "version"),
    ([P.VERSION], "frames"),
    ([P.VERSION, b"\xc1garbage"], "malformed"),
    ([P.VERSION, msgspec.msgpack.encode([99, 1])], "malformed"),  # unknown kind
    ([P.VERSION, msgspec.msgpack.encode([3, "not a list"])], "malformed"),
    ([P.VERSION, P.encode(P.Hello("a", 1))[1][:-2]], "malformed"),  # truncated
])
def test_bad_frames_raise_protocol_error(frames, needle):
    with pytest.raises(ProtocolError, match=needle):
        P.decode(frames)


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_no_pickle_on_the_wire(kind):
    """A pickled message is refused, and an encoded one is no pickle: were ``encode``
    ever to pickle, both halves would fail."""
    msg = sample(kind)
    pickled = pickle.dumps(msg)
    assert pickle.loads(pickled) == msg  # (the sample pickles fine: the refusal is ours)
    for broker in (False, True):
        with pytest.raises(ProtocolError, match="malformed"):
            P.decode([P.VERSION, pickled], broker=broker)
    body = P.encode(msg)[1]
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle says, it must not load
        pickle.loads(body)
