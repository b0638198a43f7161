"""Only the owning user, or holders of the CURVE keys for a tcp broker, can reach pto."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import zmq

import pto
from pto.wire import protocol as P
from pto.wire.procs import runtime_dir, worker_address
from pto.wire.security import keygen

from ._util import read_line, stop_process

pytestmark = pytest.mark.timeout(60)


def triple(x, y):
    y[:] = x * 3


def orch(ctx, args):
    y = ctx.alloc(3, np.int64)
    ctx.submit(ctx.peers()[0], "triple", [pto.Arg.input(np.arange(3)), pto.Arg.output(y)])
    return y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def curve_broker(tmp_path):
    keys = str(tmp_path / "keys")
    keygen(keys)
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "broker", "--listen", address, "--workers", "1",
                             "--curve", keys], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert read_line(proc, timeout=20) == address
        yield address, keys
    finally:
        stop_process(proc)


def test_runtime_dir_and_ipc_endpoints_are_private(rt1_module):
    base = runtime_dir()
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    assert os.stat(base).st_uid == os.getuid()
    path = rt1_module.address[len("ipc://"):]
    assert os.path.dirname(path) == base
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_keygen_makes_private_keys_and_refuses_to_overwrite(tmp_path):
    keys = tmp_path / "k"
    keygen(str(keys))
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    for name in ("broker.key_secret", "client.key_secret"):
        assert stat.S_IMODE(os.stat(keys / name).st_mode) == 0o600
    assert (keys / "authorized" / "client.key").exists()
    with pytest.raises(FileExistsError):
        keygen(str(keys))


def test_tcp_broker_without_curve_is_refused_unless_insecure():
    proc = subprocess.run([sys.executable, "-m", "broker", "--listen",
                           f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "--curve" in proc.stderr


@pytest.mark.slow
def test_key_holder_runs_and_others_are_refused(curve_broker, tmp_path):
    address, keys = curve_broker
    with pto.Runtime(level="host", broker=address, curve=keys) as rt:
        rt.register("o", orch=orch, kernels={"triple": triple})
        assert rt.run("o").numpy().tolist() == [0, 3, 6]
    stranger = str(tmp_path / "stranger")
    keygen(stranger)
    for curve in (None, stranger):
        with pytest.raises(pto.BrokerLost, match="CURVE"):
            pto.Runtime(level="host", broker=address, curve=curve, timeout=1.5)


def test_unauthenticated_peer_cannot_register_as_a_worker(curve_broker):
    address, keys = curve_broker
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(worker_address(address))
        sock.send_multipart(P.encode(P.WorkerHello(7, os.getpid())))
        assert not sock.poll(1500)  # no answer: the handshake never completed
        assert 7 not in pto.status(address, curve=keys)["devices"]
    finally:
        sock.close(0)
        ctx.term()


def test_a_runtime_cannot_use_another_runtimes_tensor(rt1_module):
    def steal(ctx, args):
        ctx.submit(0, "triple", [pto.Arg.input(args), pto.Arg.output(ctx.alloc(3, np.int64))])

    with pto.Runtime(level="host", platform="sim", devices=[0]) as other:
        other.register("o", orch=orch, kernels={"triple": triple})
        theirs = other.run("o")
        rt1_module.register("steal", orch=steal, kernels={"triple": triple})
        with pytest.raises(ValueError, match="another runtime"):
            rt1_module.run("steal", theirs)
        assert theirs.numpy().tolist() == [0, 3, 6]
