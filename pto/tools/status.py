"""Ask a broker what it is doing (``pto status``)."""

from __future__ import annotations

import json
from typing import Any

import zmq

from ..wire import config
from ..wire import protocol as P
from ..wire.errors import BrokerLost
from ..wire.security import curve_dir
from ..wire.sockets import connect


def status(broker: str | None = None, timeout: float = 2.0,
           curve: str | None = None) -> dict[str, Any]:
    """The broker's status: uptime, workers, clients, queue depth per chip, shm bytes.

    >>> pto.status("ipc:///tmp/pto-1000/broker-42.sock")["workers"][0]["state"]
    'idle'
    """
    settings = config.load()
    address = broker or settings.broker
    if not address:
        raise ValueError("no broker address: pass one or set PTO_BROKER")
    ctx = zmq.Context()
    try:
        sock = connect(ctx, address, curve_dir(curve, settings))
    except BaseException:
        ctx.term()
        raise
    try:
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
