"""Physical floors: what no runtime on this machine can beat.

- a bare pyzmq DEALER/ROUTER ping-pong over ``ipc://`` to an echo process (round trip),
- the same message relayed client -> broker -> worker -> broker -> client through a bare
  pyzmq ROUTER/ROUTER relay process (the four hops of pto's design, with no work done),
- the same pair pipelined, one message per task, each echoed back (messages/s),
- creating and summing the tensor in one process, no runtime (tensor handoff),
- memcpy bandwidth: a numpy copy of 512 MiB between pre-faulted buffers.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time

import numpy as np
import zmq

from .common import MiB, median


def _echo(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            break
        sock.send_multipart(frames)
    sock.close(0)
    ctx.term()


def _relay(front: str, back: str) -> None:
    """A broker doing nothing: ROUTER for the client, ROUTER for the worker, forward."""
    ctx = zmq.Context()
    fe, be = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    fe.bind(front)
    be.bind(back)
    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    worker = client = None
    early: list[bytes] = []  # client messages that came before the worker's hello
    while True:
        ready = dict(poller.poll())
        if fe in ready:
            client, msg = fe.recv_multipart()
            if worker is None:
                early.append(msg)
            else:
                be.send_multipart([worker, msg])
            if msg == b"stop" and worker is not None:
                break
        if be in ready:
            identity, msg = be.recv_multipart()
            if msg == b"hello":
                worker = identity
                for held in early:
                    be.send_multipart([worker, held])
                if b"stop" in early:
                    break
            else:
                fe.send_multipart([client, msg])
    fe.close(0)
    be.close(0)
    ctx.term()


def _relay_worker(back: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"hello")
    while (msg := sock.recv()) != b"stop":
        sock.send(msg)
    sock.close(0)
    ctx.term()


class Floors:
    key = "floor"
    label = "floor"
    labels = {
        "noop": "bare zmq DEALER/ROUTER ipc, pipelined (1 msg per task, echoed)",
        "roundtrip": "bare zmq DEALER/ROUTER ipc ping-pong",
        "roundtrip_relay": "bare zmq relay: client -> broker -> worker -> broker -> client",
        "handoff": "in one process, no runtime: np.ones(S) + sum",
    }

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self) -> Floors:
        self._dir = tempfile.TemporaryDirectory(prefix="pto-bench-")
        address = f"ipc://{self._dir.name}/echo.sock"
        self._server = multiprocessing.get_context("spawn").Process(target=_echo, args=(address,))
        self._server.start()
        spawn = multiprocessing.get_context("spawn")
        front, back = f"ipc://{self._dir.name}/front.sock", f"ipc://{self._dir.name}/back.sock"
        self._relays = [spawn.Process(target=_relay, args=(front, back)),
                        spawn.Process(target=_relay_worker, args=(back,))]
        for p in self._relays:
            p.start()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self.roundtrip()  # waits for the server to bind
        self._relay_sock = self._ctx.socket(zmq.DEALER)
        self._relay_sock.connect(front)
        self.roundtrip_relay()  # the relay holds it until its worker said hello
        return self

    def __exit__(self, *exc) -> None:
        self._sock.send(b"stop")
        self._relay_sock.send(b"stop")
        for p in (self._server, *self._relays):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self._sock.close(0)
        self._relay_sock.close(0)
        self._ctx.term()
        self._dir.cleanup()

    def roundtrip(self) -> None:
        self._sock.send(b"x")
        self._sock.recv()

    def roundtrip_relay(self) -> None:
        self._relay_sock.send(b"x")
        self._relay_sock.recv()

    def noop(self, n: int) -> None:
        send, recv = self._sock.send, self._sock.recv
        for _ in range(n):
            send(b"x")
        for _ in range(n):
            recv()

    def handoff(self, nbytes: int) -> float:
        return float(np.ones(nbytes // 8).sum())

    def handoff_copied(self, nbytes: int) -> tuple[int, str]:
        return 0, "no runtime"

    def memcpy(self, repeats: int, nbytes: int = 512 * MiB) -> dict:
        src = np.ones(nbytes // 8)
        dst = np.zeros_like(src)
        dst[:] = 0.0  # pre-fault
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - t0)
        t = median(times)
        return {"system": "memcpy", "label": f"memcpy: numpy copy of {nbytes // MiB} MiB",
                "kind": "floor", "size_mib": nbytes // MiB, "ms": t * 1e3,
                "gb_per_s": nbytes / t / 1e9}
