"""Ask a broker what it is doing (``pto status``)."""

from __future__ import annotations

import json
import os
from typing import Any

import zmq

from . import protocol as P
from .errors import BrokerLost
from .security import curve_dir, secure_client


def status(broker: str | None = None, timeout: float = 2.0,
           curve: str | None = None) -> dict[str, Any]:
    """The broker's status: uptime, workers, clients, queue depth per chip, shm bytes.

    >>> pto.status("ipc:///tmp/pto-1000/broker-42.sock")["workers"][0]["state"]
    'idle'
    """
    address = broker or os.environ.get("PTO_BROKER")
    if not address:
        raise ValueError("no broker address: pass one or set PTO_BROKER")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        keys = curve_dir(curve)
        if keys:
            secure_client(sock, keys)
        sock.connect(address)
        sock.send_multipart(P.encode(P.StatusRequest()))
        if not sock.poll(int(timeout * 1000)):
            raise BrokerLost(f"no broker answered at {address} within {timeout:g}s")
        msg = P.decode(sock.recv_multipart())
        if not isinstance(msg, P.StatusReply):
            raise BrokerLost(f"broker at {address} answered {type(msg).__name__}")
        return json.loads(msg.status)
    finally:
        sock.close(0)
        ctx.term()
