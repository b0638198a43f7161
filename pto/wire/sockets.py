"""Plumbing every pto process shares: its sockets, draining them, its children's
environment.

The client (``pto.host.connection``, ``pto.tools.status``), the broker (``broker.server``) and the
workers (``worker.loop``) all open their ZeroMQ sockets here, so the options that keep a
peer safe (no linger on close, frames capped at ``protocol.MAX_FRAME_BYTES``, CURVE when
asked, ipc endpoints only the user can reach) are set in one place, and drain them with
``incoming`` (and send with ``send_frames``), both without pyzmq's per-call enum work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import zmq

from .protocol import MAX_FRAME_BYTES
from .security import secure_client, secure_server
from .shm import pid_alive

if TYPE_CHECKING:  # only a broker with CURVE starts one; its import pulls in asyncio
    from zmq.auth.thread import ThreadAuthenticator

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # checkout


def _common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)  # closing never waits for a dead peer
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a huge frame drops its sender


def connect(ctx: zmq.Context, address: str, curve: str | None = None) -> zmq.Socket:
    """A DEALER connected to ``address``, with CURVE keys from directory ``curve`` if given
    (resolve ``PTO_CURVE_DIR`` with ``pto.wire.security.curve_dir`` first)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        _common(sock)
        if curve:
            secure_client(sock, curve)
        sock.connect(address)
    except BaseException:
        sock.close(0)  # else the context's term() would wait for it
        raise
    return sock


def bind_routers(ctx: zmq.Context, addresses: list[str],
                 curve: str | None = None) -> tuple[list[zmq.Socket], ThreadAuthenticator | None]:
    """ROUTERs bound to ``addresses`` (one each), and the CURVE authenticator guarding
    them when ``curve`` names a key directory (stop it after closing the sockets).

    An ipc endpoint left by a dead broker is replaced; a new one is created 0600.
    """
    socks = []
    for _ in addresses:
        sock = ctx.socket(zmq.ROUTER)
        _common(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a message to a gone peer is dropped
        socks.append(sock)
    auth = secure_server(ctx, socks, curve) if curve else None
    try:
        for sock, address in zip(socks, addresses, strict=True):
            _bind(sock, address)
    except BaseException:
        for sock in socks:
            sock.close(0)
        if auth is not None:
            auth.stop()
        raise
    return socks, auth


def _bind(sock: zmq.Socket, address: str) -> None:
    if not address.startswith("ipc://"):
        sock.bind(address)
        return
    path = address[len("ipc://"):]
    if os.path.exists(path):
        os.unlink(path)  # a stale endpoint of a dead broker
    old = os.umask(0o077)
    try:
        sock.bind(address)
    finally:
        os.umask(old)


# Plain ints: pyzmq's sugar (``getsockopt(zmq.EVENTS) & zmq.POLLIN``, ``send_multipart``,
# ``recv_multipart``) does enum arithmetic per call and per frame, which costs more than
# the socket call itself on the hot path (issue 14's profile: ~1.5-4x per call).
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)


def incoming(sock: zmq.Socket, limit: int = 0) -> Iterator[list[bytes]]:
    """The multipart messages ``sock`` holds now, without blocking; at most ``limit`` of
    them when ``limit`` > 0 (bounds a round's work so timers stay on time)."""
    count = 0
    get, recv = sock.get, sock.recv
    # Asking first is cheaper than the zmq.Again exception of an empty socket.
    while get(_EVENTS) & _POLLIN:
        try:
            frames = [recv(_NOBLOCK)]
        except zmq.Again:
            return
        while get(_RCVMORE):  # the rest of a multipart message is there with its first
            frames.append(recv(_NOBLOCK))
        yield frames
        count += 1
        if count == limit:
            return


def send_frames(sock: zmq.Socket, frames: list[bytes], block: bool = True) -> None:
    """``sock.send_multipart(frames)`` (``zmq.NOBLOCK`` unless ``block``), without the
    per-frame enum arithmetic; raises ``zmq.Again`` as it does."""
    flags = 0 if block else _NOBLOCK
    more = flags | _SNDMORE
    send = sock.send
    for frame in frames[:-1]:
        send(frame, more)
    send(frames[-1], flags)


def child_env() -> dict[str, str]:
    """The environment for a broker or worker we start: ours, with this checkout
    importable even when pto is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return env


def remove_endpoint(address: str) -> None:
    """Remove an ipc endpoint's file (a broker's, when it stops)."""
    if address.startswith("ipc://") and os.path.exists(address[len("ipc://"):]):
        os.unlink(address[len("ipc://"):])


def stale_endpoints(directory: str) -> list[str]:
    """The ipc endpoint files in ``directory`` that brokers killed before they could clean
    up left behind (named broker-<pid>.sock or <pid>x<hex>.sock, with a .w twin for
    workers), judged by whether <pid> still runs; only this user's."""
    if not directory or not os.path.isdir(directory):
        return []
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".sock", ".sock.w")):
            continue
        head = name.removeprefix("broker-").split(".", 1)[0].split("x", 1)[0]
        path = os.path.join(directory, name)
        try:
            mine = os.lstat(path).st_uid == os.getuid()
        except OSError:
            continue
        if mine and head.isdigit() and not pid_alive(int(head)):
            found.append(path)
    return found


def remove_stale_endpoints(address: str) -> list[str]:
    """Remove ``stale_endpoints`` next to ``address`` (an ipc address); returns them."""
    if not address.startswith("ipc://"):
        return []
    removed = []
    for path in stale_endpoints(os.path.dirname(address[len("ipc://"):])):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed
