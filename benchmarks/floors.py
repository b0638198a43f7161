"""Physical floors: what no runtime on this machine can beat.

- a bare pyzmq DEALER/ROUTER ping-pong over ``ipc://`` to an echo process (round trip),
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


class Floors:
    key = "floor"
    label = "floor"
    labels = {
        "noop": "bare zmq DEALER/ROUTER ipc, pipelined (1 msg per task, echoed)",
        "roundtrip": "bare zmq DEALER/ROUTER ipc ping-pong",
        "handoff": "in one process, no runtime: np.ones(S) + sum",
    }

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self) -> Floors:
        self._dir = tempfile.TemporaryDirectory(prefix="pto-bench-")
        address = f"ipc://{self._dir.name}/echo.sock"
        self._server = multiprocessing.get_context("spawn").Process(target=_echo, args=(address,))
        self._server.start()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.connect(address)
        self.roundtrip()  # waits for the server to bind
        return self

    def __exit__(self, *exc) -> None:
        self._sock.send(b"stop")
        self._server.join(10)
        if self._server.is_alive():
            self._server.kill()
            self._server.join()
        self._sock.close(0)
        self._ctx.term()
        self._dir.cleanup()

    def roundtrip(self) -> None:
        self._sock.send(b"x")
        self._sock.recv()

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
