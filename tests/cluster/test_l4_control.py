"""A host's control endpoint on its own (real ZeroMQ over tcp, no Ray): only the session's
client key gets through CURVE, garbage from a peer that has it is dropped and logged, and
the endpoint serves on after both."""

from __future__ import annotations

import logging
import threading

import zmq

from pto.cluster import protocol as P
from pto.cluster.keys import SessionKeys, curve_client
from pto.cluster.server import ControlServer

WAIT_MS = 1500


def _keys() -> tuple[SessionKeys, dict]:
    keys = SessionKeys.new()
    return keys, keys.for_host()


def _dealer(ctx: zmq.Context, endpoint: str, keys: dict | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        curve_client(sock, keys)
    sock.connect(endpoint)
    return sock


def _replies(sock: zmq.Socket, wait_ms: int = WAIT_MS) -> list[P.Message]:
    """What arrives within ``wait_ms`` (heartbeats included)."""
    got = []
    while sock.poll(wait_ms):
        got.append(P.decode(sock.recv_multipart()))
        wait_ms = 50
    return got


class _Host:
    """What a host actor gives the server: a run that echoes its args, a release log."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.released: list[list[int]] = []
        self.lock = threading.Lock()

    def run(self, msg: P.Run) -> P.Message:
        with self.lock:
            self.runs.append(msg.run)
        return P.Done(msg.run, msg.args)

    def release(self, runs: list[int]) -> None:
        self.released.append(runs)


def _serve() -> tuple[ControlServer, _Host, SessionKeys, dict]:
    session, host_keys = _keys()
    host = _Host()
    return ControlServer("127.0.0.1", host_keys, host.run, host.release), host, session, host_keys


def test_the_session_client_gets_its_runs_done_and_heartbeats():
    server, host, session, keys = _serve()
    ctx = zmq.Context()
    try:
        sock = _dealer(ctx, server.endpoint, keys)
        sock.send_multipart(P.encode(P.Hello("s")))
        sock.send_multipart(P.encode(P.Run(7, "entry", b"payload")))
        sock.send_multipart(P.encode(P.Release([3, 4])))
        got = _replies(sock)
        done = [m for m in got if isinstance(m, P.Done)]
        assert [(m.run, m.value) for m in done] == [(7, b"payload")]
        assert any(isinstance(m, P.Heartbeat) for m in _replies(sock, 2000))
        assert host.released == [[3, 4]]
        sock.close(0)
    finally:
        server.close()
        ctx.term()


def test_a_peer_without_the_session_key_gets_nothing_and_the_host_serves_on(caplog):
    server, host, session, keys = _serve()
    ctx = zmq.Context()
    try:
        plain = _dealer(ctx, server.endpoint, None)  # no CURVE at all
        other_public, other_secret = zmq.curve_keypair()
        wrong = _dealer(ctx, server.endpoint, {**keys, "client_public": other_public,
                                               "client_secret": other_secret})
        for i, sock in enumerate((plain, wrong)):
            sock.send_multipart(P.encode(P.Hello("intruder")))
            sock.send_multipart(P.encode(P.Run(100 + i, "entry", b"x")))
        assert _replies(plain) == [] and _replies(wrong) == []
        assert host.runs == [], "a run from a peer without the key was run"
        good = _dealer(ctx, server.endpoint, keys)
        good.send_multipart(P.encode(P.Run(1, "entry", b"ok")))
        assert [m.run for m in _replies(good) if isinstance(m, P.Done)] == [1]
        for sock in (plain, wrong, good):
            sock.close(0)
    finally:
        server.close()
        ctx.term()


def test_garbage_frames_are_dropped_and_logged(caplog):
    server, host, session, keys = _serve()
    ctx = zmq.Context()
    try:
        sock = _dealer(ctx, server.endpoint, keys)
        with caplog.at_level(logging.WARNING, logger="pto.cluster.server"):
            sock.send_multipart([b"junk"])
            sock.send_multipart([P.VERSION, b"\xc1\xff\x00garbage"])
            sock.send_multipart([b"PTO\x02", b"\x90"])  # another protocol's version
            sock.send_multipart([P.VERSION, b"a", b"b"])
            sock.send_multipart(P.encode(P.Done(5, b"not for a host")))
            sock.send_multipart(P.encode(P.Run(2, "entry", b"after garbage")))
            done = [m for m in _replies(sock) if isinstance(m, P.Done)]
        assert [(m.run, m.value) for m in done] == [(2, b"after garbage")]
        assert server.dropped == 5
        assert sum("dropped" in r.getMessage() for r in caplog.records) == 5
        sock.close(0)
    finally:
        server.close()
        ctx.term()


def test_close_frees_the_port():
    server, *_ = _serve()
    endpoint = server.endpoint
    server.close()
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)  # the port is free again
        sock.close(0)
    finally:
        ctx.term()
