"""A broker must survive any bytes a peer sends, answer with an error, and keep serving;
and what it does send and receive in a real run is our msgpack, never pickle."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import msgspec
import numpy as np
import pytest
import zmq

import pto
from pto.wire import protocol as P
from pto.wire.procs import worker_address

from ._util import REPO, ExternalBroker, read_line, stop_process, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def broker(tmp_path_factory, long_lived_roots):
    """One broker (start_broker.sh --workers 2) for the module: each test checks that it
    still serves after what the test threw at it, so the next one also meets a broker that
    has survived everything before it."""
    b = ExternalBroker(tmp_path_factory.mktemp("broker"), workers=2)
    long_lived_roots.add(b.proc.pid)
    try:
        yield b
    finally:
        long_lived_roots.discard(b.proc.pid)
        b.stop()


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
    "pickled Hello": [P.VERSION, pickle.dumps(P.Hello(f"{os.getpid()}xaa", os.getpid()))],
    "pickled Hello alone": [pickle.dumps(P.Hello(f"{os.getpid()}xaa", os.getpid()))],
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
    # Workers up first: this raw client sends no heartbeats, so it must not wait long.
    still_serves(broker.address)
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


def test_bad_worker_frames_pickled_are_refused(broker, raw):
    sock = raw(worker_address(broker.address))
    sock.send_multipart([P.VERSION, pickle.dumps(P.WorkerHello(0, os.getpid()))])
    reply = P.decode(sock.recv_multipart())
    assert isinstance(reply, P.Error) and "malformed" in reply.message


# ---- every frame of a real run, as the broker saw it ---------------------------------------

# Runs ``python -m broker`` with pto.wire.protocol's encode and decode wrapped to record every
# frame the broker sends and receives (clients' and workers'), written out at exit.
RECORDING_BROKER = textwrap.dedent(
    """
    import atexit, sys
    import msgspec
    from pto.wire import protocol as P

    seen = []
    encode, decode = P.encode, P.decode

    def recording_encode(msg):
        frames = encode(msg)
        seen.append(["sent", frames])
        return frames

    def recording_decode(frames, broker=False):
        seen.append(["received", [bytes(f) for f in frames]])
        return decode(frames, broker)

    P.encode, P.decode = recording_encode, recording_decode

    def dump():
        with open(sys.argv[1], "wb") as f:
            f.write(msgspec.msgpack.encode(seen))

    atexit.register(dump)
    from broker.__main__ import main
    sys.exit(main(sys.argv[2:]))
    """
)


def fails(x):
    raise ValueError("on purpose")


def traffic(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "add_one", [pto.Arg.input(x), pto.Arg.output(y)])
    ctx.submit_group(ctx.peers(), "add_one", [pto.Arg.input(x), pto.Arg.output(y)])
    ctx.submit(ctx.peers()[1], "fails", [pto.Arg.input(x)])
    return y


def test_every_frame_of_a_real_run_is_strict_msgpack_and_no_pickle(tmp_path):
    record = tmp_path / "frames.msgpack"
    address = f"ipc://{tmp_path}/recorded.sock"
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORDING_BROKER, str(record), "--listen", address,
         "--workers", "2"], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert read_line(proc, timeout=30) == address
        with pto.Runtime(level="host", broker=address, trace=str(tmp_path / "t.json")) as rt:
            rt.register("o", orch=traffic, kernels={"add_one": add_one, "fails": fails})
            with pytest.raises(pto.TaskError, match="on purpose"):
                rt.run("o", args={"x": np.arange(4)})
            assert pto.status(address)["workers"]
        # its Bye is handled before the SIGTERM (a stop drops what is still queued)
        assert wait_until(lambda: not pto.status(address)["clients"], timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()

    seen = msgspec.msgpack.decode(record.read_bytes())
    strict = {"received": msgspec.msgpack.Decoder(P.BrokerMessage),
              "sent": msgspec.msgpack.Decoder(P.Message)}
    kinds = set()
    for direction, frames in seen:
        assert len(frames) == 2 and frames[0] == P.VERSION, (direction, frames)
        body = frames[1]
        msg = strict[direction].decode(body)  # raises on anything but our messages
        assert msgspec.msgpack.encode(msg) == body  # ...in their one canonical encoding
        with pytest.raises(Exception):  # noqa: B017 - whatever pickle says, it must not load
            pickle.loads(body)
        kinds.add((direction, type(msg).__name__))
    # The run exercised both sockets in both directions, group and failure included.
    assert {("received", k) for k in ("Hello", "Attach", "RegisterKernel", "PackedSubmit",
                                      "StatusRequest", "Bye", "WorkerHello", "Report")} <= kinds
    assert {("sent", k) for k in ("Welcome", "Results", "StatusReply", "Dispatch",
                                  "Shutdown")} <= kinds
