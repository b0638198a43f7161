"""A broker must survive any bytes a peer sends, answer with an error, and keep serving."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest
import zmq

import pto
from pto import protocol as P
from pto.procs import worker_address

pytestmark = pytest.mark.timeout(60)


def add_one(x, y):
    y[:] = x + 1


def orch(ctx, args):
    y = ctx.alloc(4, np.int64)
    ctx.submit(ctx.peers()[0], "add_one", [pto.Arg.input(np.arange(4)), pto.Arg.output(y)])
    return y


def still_serves(address: str) -> None:
    with pto.Runtime(level="host", broker=address) as rt:
        rt.register("o", orch=orch, kernels={"add_one": add_one})
        assert rt.run("o").numpy().tolist() == [1, 2, 3, 4]


@pytest.fixture
def raw():
    """A factory of raw DEALER sockets, all closed after the test."""
    ctx = zmq.Context()
    socks = []

    def connect(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(address)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close(0)
    ctx.term()


BAD_FRAMES = {
    "garbage": [b"\x00\x01\x02"],
    "wrong version": [b"PTO\x63", P.encode(P.Heartbeat())[1]],
    "no version": [P.encode(P.Hello("1x1", 1))[1]],
    "truncated": [P.VERSION, P.encode(P.Hello("1x1", 1))[1][:-3]],
    "not msgpack": [P.VERSION, b"\xc1\xc1\xc1"],
    "unknown kind": [P.VERSION, msgspec.msgpack.encode([77, "x"])],
    "wrong field types": [P.VERSION, msgspec.msgpack.encode([3, [["a", "b"]]])],
    "three frames": [P.VERSION, b"", b""],
    "pickle": [P.VERSION, b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."],
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_client_frames_get_an_error_and_the_broker_keeps_serving(broker, raw, name):
    sock = raw(broker.address)
    sock.send_multipart(BAD_FRAMES[name])
    reply = P.decode(sock.recv_multipart())
    assert isinstance(reply, P.Error) and reply.message
    still_serves(broker.address)


def test_messages_before_hello_are_refused(broker, raw):
    sock = raw(broker.address)
    sock.send_multipart(P.encode(P.Submit([P.TaskSpec(1, 0, 1, [])])))
    reply = P.decode(sock.recv_multipart())
    assert isinstance(reply, P.Error) and "Hello" in reply.message


def test_invalid_owner_is_refused(broker, raw):
    sock = raw(broker.address)
    sock.send_multipart(P.encode(P.Hello("../../etc", os.getpid())))
    reply = P.decode(sock.recv_multipart())
    assert isinstance(reply, P.Error) and "owner" in reply.message


def test_tasks_naming_unknown_kernels_or_chips_fail_cleanly(broker, raw):
    sock = raw(broker.address)
    sock.send_multipart(P.encode(P.Hello(f"{os.getpid()}xab", os.getpid())))
    assert isinstance(P.decode(sock.recv_multipart()), P.Welcome)
    sock.send_multipart(P.encode(P.Submit([P.TaskSpec(1, 0, 42, []), P.TaskSpec(2, 99, 42, [])])))
    while True:
        msg = P.decode(sock.recv_multipart())
        if isinstance(msg, P.Results):
            break
    reasons = sorted(f.reason for f in msg.failed)
    assert len(reasons) == 2
    assert "unknown chip 99" in reasons[0] and "unknown kernel" in reasons[1]
    sock.send_multipart(P.encode(P.Bye()))
    still_serves(broker.address)


def test_a_task_with_malformed_arguments_fails_alone(broker, raw):
    """The broker unpacks a task's arguments only when it links the task: bad ones fail
    that task, not the Submit it came in."""
    sock = raw(broker.address)
    sock.send_multipart(P.encode(P.Hello(f"{os.getpid()}xac", os.getpid())))
    assert isinstance(P.decode(sock.recv_multipart()), P.Welcome)
    sock.send_multipart(P.encode(P.RegisterKernel(7, "k", "py", b"never loaded")))
    bad = [1, 0, 7, ["not", "arguments"]]
    good = [2, 0, 7, []]
    sock.send_multipart([P.VERSION, msgspec.msgpack.encode([3, [bad, good]])])
    failed, done = [], []
    while len(failed) + len(done) < 2:
        msg = P.decode(sock.recv_multipart())
        if isinstance(msg, P.Results):
            failed += msg.failed
            done += msg.done
    assert [f.task for f in failed][:1] == [1]
    assert "malformed task arguments" in failed[0].reason
    sock.send_multipart(P.encode(P.Bye()))
    still_serves(broker.address)


def test_oversized_frame_is_dropped_without_harm(broker, raw):
    sock = raw(broker.address)
    sock.send_multipart([P.VERSION, b"\0" * (P.MAX_FRAME_BYTES + 1)])
    still_serves(broker.address)


def test_bad_worker_frames_and_a_second_worker_for_a_served_device(broker, raw):
    still_serves(broker.address)  # a client waits until every device has its worker
    sock = raw(worker_address(broker.address))
    sock.send_multipart([b"junk"])
    assert isinstance(P.decode(sock.recv_multipart()), P.Error)
    sock.send_multipart(P.encode(P.Report([123], [])))  # before WorkerHello
    assert isinstance(P.decode(sock.recv_multipart()), P.Error)
    sock.send_multipart(P.encode(P.WorkerHello(0, os.getpid())))
    reply = P.decode(sock.recv_multipart())
    assert isinstance(reply, P.Error) and "already served" in reply.message
    assert isinstance(P.decode(sock.recv_multipart()), P.Shutdown)
    still_serves(broker.address)
