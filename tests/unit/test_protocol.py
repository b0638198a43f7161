"""The wire format: round trips, versioning, and refusing malformed bytes."""

from __future__ import annotations

import msgspec
import pytest

from pto import protocol as P
from pto.errors import ProtocolError


@pytest.mark.parametrize("msg", [
    P.Hello("123xab", 123),
    P.Submit([P.TaskSpec(1, 0, 2, [P.ArgSpec(1, 3, 0, 16, 12, [4]), P.ArgSpec(0, scalar=2.5)])]),
    P.Results([1, 2], [P.Failure(3, "k", 0, "boom", 3)]),
    P.Dispatch([P.ClientInfo(1, "1x2")], [P.KernelDef(1, 1, "k", "py", b"\x80")], [], [2], []),
    P.Shutdown("bye"),
])
def test_round_trip(msg):
    assert P.decode(P.encode(msg)) == msg


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


def test_no_pickle_on_the_wire():
    body = P.encode(P.Hello("1x1", 1))[1]
    assert not body.startswith(b"\x80")  # a pickle protocol header
