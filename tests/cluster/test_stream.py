"""Host-to-host tensor streams (pto.cluster.stream*): real ZeroMQ over tcp, real POSIX
shared-memory segments on both ends, no Ray.

A server runs in a thread of the test, or in a child process where the test needs a
separate address space (the consumer's memory) or a host to kill. Every segment is unlinked
by the test that made it (the suite's leak check is strict).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import zmq

from pto.cluster.stream import (
    MAGIC,
    OK,
    REPLY,
    REQUEST,
    StreamAuth,
    StreamClosed,
    StreamCorrupt,
    StreamLost,
    StreamRefused,
    UnknownTensor,
    zap_reply,
)
from pto.cluster.stream_fetch import Fetcher
from pto.cluster.stream_server import TensorServer
from pto.wire import shm

MiB = 1 << 20
OWNER = shm.new_owner()
_ids = iter(range(1, 1 << 30))

# Shared with the child server: byte i of a test tensor is a function of i (as uint32 words,
# word j == j), so a chunk written at the wrong offset cannot look right.
PATTERN = '''
import numpy as np
def fill(buf, nbytes):
    view = np.frombuffer(buf, np.uint8, nbytes)
    block = 1 << 20
    for start in range(0, nbytes // 4, block):
        stop = min(start + block, nbytes // 4)
        view[start * 4:stop * 4] = np.arange(start, stop, dtype=np.uint32).view(np.uint8)
    tail = nbytes % 4
    if tail:
        view[nbytes - tail:] = np.arange(tail, dtype=np.uint8) + 7
def matches(buf, nbytes):
    view = np.frombuffer(buf, np.uint8, nbytes)
    block = 1 << 20
    for start in range(0, nbytes // 4, block):
        stop = min(start + block, nbytes // 4)
        want = np.arange(start, stop, dtype=np.uint32).view(np.uint8)
        if not np.array_equal(view[start * 4:stop * 4], want):
            return False
    tail = nbytes % 4
    return not tail or np.array_equal(view[nbytes - tail:], np.arange(tail, dtype=np.uint8) + 7)
'''
_pattern: dict = {}
exec(PATTERN, _pattern)
fill, matches = _pattern["fill"], _pattern["matches"]

SERVER = PATTERN + '''
import itertools, json, sys, time
from pto.cluster.stream import StreamAuth
from pto.cluster.stream_server import TensorServer
from pto.wire import shm

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

cfg = json.loads(sys.stdin.readline())
curve = tuple(bytes.fromhex(k) for k in cfg["curve"]) if cfg["curve"] else None
auth = StreamAuth(bytes.fromhex(cfg["secret"]), curve)
mapping = shm.create(cfg["name"], cfg["nbytes"])
try:
    fill(mapping, cfg["nbytes"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on
    base = rss()["VmRSS"]
    whole = memoryview(mapping)[:cfg["nbytes"]]
    calls = itertools.count(1)

    def lookup(key):
        if cfg["stall_after"] and next(calls) > cfg["stall_after"]:
            time.sleep(3600)  # a producer that hangs mid-transfer, until it is killed
        return whole if key == "t" else None

    server = TensorServer("127.0.0.1", auth, lookup)
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.readline()
    server.close()
    print(json.dumps({"extra_peak": rss()["VmHWM"] - base, "stats": server.stats()}),
          flush=True)
finally:
    shm.unlink(cfg["name"])
'''


def new_name() -> str:
    return shm.segment_name(OWNER, next(_ids))


@contextlib.contextmanager
def segment(nbytes: int, filled: bool = False) -> Iterator[memoryview]:
    """A real pto segment of ``nbytes``, unlinked at exit; yields a view of exactly nbytes."""
    name = new_name()
    mapping = shm.create(name, nbytes)
    view = memoryview(mapping)[:nbytes]
    try:
        if filled:
            fill(view, nbytes)
        yield view
    finally:
        shm.unlink(name)
        view.release()
        with contextlib.suppress(BufferError):  # a zero-copy frame may still hold it a moment
            mapping.close()


@contextlib.contextmanager
def server_process(auth: StreamAuth, nbytes: int, stall_after: int = 0
                   ) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """A producer in its own process serving tensor "t" of ``nbytes``: (proc, address, name).
    With ``stall_after``, it hangs once it has served that many chunks."""
    name = new_name()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        proc.stdin.write(json.dumps({
            "secret": auth.secret.hex(), "name": name, "nbytes": nbytes,
            "stall_after": stall_after,
            "curve": [k.hex() for k in auth.curve] if auth.curve else None}) + "\n")
        proc.stdin.flush()
        address = json.loads(proc.stdout.readline())["address"]
        yield proc, address, name
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        shm.unlink(name)  # a killed server could not


def stop_server_process(proc: subprocess.Popen) -> dict:
    proc.stdin.write("\n")
    proc.stdin.flush()
    report = json.loads(proc.stdout.readline())
    proc.wait(10)
    return report


@pytest.fixture
def auth() -> StreamAuth:
    return StreamAuth.new()


@pytest.fixture
def tensors() -> dict[str, memoryview]:
    return {}


@pytest.fixture
def server(auth: StreamAuth, tensors: dict[str, memoryview]) -> Iterator[TensorServer]:
    with TensorServer("127.0.0.1", auth, tensors.get) as srv:
        yield srv


@pytest.fixture
def fetcher(auth: StreamAuth) -> Iterator[Fetcher]:
    with Fetcher(auth, chunk_bytes=MiB, window=3, timeout=3.0) as f:
        yield f


def current_rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_256_mib_crosses_equal_with_bounded_memory_on_both_sides(auth):
    nbytes = 256 * MiB
    with server_process(auth, nbytes) as (proc, address, _), segment(nbytes) as dest, \
            Fetcher(auth) as fetcher:
        # The destination's own pages (256 MiB of shared memory touched by recv_into) count
        # in RSS; anything beyond them is what the fetch itself held.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = current_rss()
        assert fetcher.fetch(address, "t", nbytes, dest) == nbytes
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
        extra = peak - before - nbytes
        assert extra < 64 * MiB, f"consumer held {extra / MiB:.0f} MiB beyond the destination"
        assert matches(dest, nbytes)
        report = stop_server_process(proc)
    assert report["extra_peak"] < 64 * MiB, report
    assert report["stats"]["transfers"] == 1
    assert report["stats"]["bytes_sent"] == nbytes


@pytest.mark.parametrize("nbytes", [0, 1, 3, MiB - 1, MiB, MiB + 1, 5 * MiB + 7])
def test_chunk_boundaries(server, fetcher, tensors, nbytes):
    with segment(nbytes, filled=True) as src, segment(nbytes) as dest:
        tensors["k"] = src
        assert fetcher.fetch(server.address, "k", nbytes, dest) == nbytes
        assert matches(dest, nbytes)
    chunks = max(1, -(-nbytes // MiB))
    assert server.stats()["requests"] == chunks
    assert server.stats()["bytes_sent"] == nbytes


def test_many_fetches_reuse_one_connection_and_survive_errors(server, fetcher, tensors):
    with segment(3 * MiB, filled=True) as src, segment(3 * MiB) as dest:
        tensors["k"] = src
        for _ in range(5):
            fetcher.fetch(server.address, "k", 3 * MiB, dest)
        assert server.stats()["accepted"] == 1  # one connection served all five
        for _ in range(3):
            with pytest.raises(UnknownTensor, match="unknown tensor 'nope'"):
                fetcher.fetch(server.address, "nope", 10, dest)
            dest[:] = bytes(dest.nbytes)
            fetcher.fetch(server.address, "k", 3 * MiB, dest)
            assert matches(dest, 3 * MiB)
    stats = server.stats()
    assert (stats["transfers"], stats["unknown"]) == (8, 3)
    assert stats["accepted"] == 4  # a connection that saw an error is never reused


def test_concurrent_fetches_of_different_tensors(server, fetcher, tensors):
    sizes = [MiB + 1, 2 * MiB, 3 * MiB + 5, 7]
    with contextlib.ExitStack() as stack:
        dests = []
        for i, size in enumerate(sizes):
            tensors[f"t{i}"] = stack.enter_context(segment(size, filled=True))
            dests.append(stack.enter_context(segment(size)))
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda i: fetcher.fetch(server.address, f"t{i}", sizes[i],
                                                         dests[i]), range(4)))
        assert done == sizes
        assert all(matches(dest, size) for dest, size in zip(dests, sizes, strict=True))
    assert server.stats()["transfers"] == 4


def test_destination_is_checked_before_anything_is_sent(server, fetcher, tensors):
    with segment(10, filled=True) as src:
        tensors["k"] = src
        with pytest.raises(ValueError, match="holds 5 bytes"):
            fetcher.fetch(server.address, "k", 10, bytearray(5))
        with pytest.raises(ValueError, match="writable"):
            fetcher.fetch(server.address, "k", 10, bytes(10))
    assert server.stats()["requests"] == 0


def test_a_range_past_the_tensor_is_refused_not_served(server, fetcher, tensors):
    with segment(100, filled=True) as src:
        tensors["k"] = src
        dest = bytearray(200)
        with pytest.raises(StreamCorrupt, match="refused the range"):
            fetcher.fetch(server.address, "k", 200, dest)
    assert dest == bytearray(200)
    assert server.stats()["bytes_sent"] == 0


def test_wrong_secret_gets_nothing_and_the_server_keeps_serving(server, tensors, auth, caplog):
    with segment(MiB, filled=True) as src, segment(MiB) as dest:
        tensors["k"] = src
        with Fetcher(StreamAuth(b"not the session secret"), timeout=60.0) as intruder, \
                caplog.at_level(logging.WARNING, logger="pto.cluster.stream_server"):
            start = time.monotonic()
            with pytest.raises(StreamRefused, match="refused our credentials"):
                intruder.fetch(server.address, "k", MiB, dest)
            assert time.monotonic() - start < 30  # told by the handshake, not the timeout
        assert server.stats()["requests"] == 0
        assert server.stats()["denied"] >= 1
        assert "without the session's credentials" in caplog.text
        assert not any(dest)
        with Fetcher(auth, timeout=3.0) as good:
            assert good.fetch(server.address, "k", MiB, dest) == MiB
        assert matches(dest, MiB)


def raw_dealer(ctx: zmq.Context, address: str, auth: StreamAuth | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if auth is not None:
        auth.secure_client(sock)
    sock.connect(address)
    return sock


def test_plain_dealer_gets_nothing_and_garbage_is_dropped(server, fetcher, tensors, auth,
                                                          caplog):
    with segment(MiB, filled=True) as src, segment(MiB) as dest, \
            zmq.Context() as ctx, \
            caplog.at_level(logging.WARNING, logger="pto.cluster.stream_server"):
        tensors["k"] = src
        # No credentials at all: the handshake fails, not one frame reaches the server.
        plain = raw_dealer(ctx, server.address, None)
        plain.send_multipart([MAGIC, b"k", REQUEST.pack(1, 0, 100)])
        assert not plain.poll(500)
        assert server.stats()["requests"] == 0
        # A session member sending garbage: dropped (and logged), never answered.
        member = raw_dealer(ctx, server.address, auth)
        for frames in ([b"hello"], [MAGIC, b"k", b"short"], [b"XXXX", b"k", REQUEST.pack(1, 0, 1)],
                       [MAGIC, b"k", REQUEST.pack(1, 0, 1), b"extra"], [os.urandom(5000)]):
            member.send_multipart(frames)
        deadline = time.monotonic() + 30
        while server.stats()["dropped"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["dropped"] == 4  # the 5th, too big, cut the connection
        assert not member.poll(200)
        plain.close()
        member.close()
        assert "dropped a malformed request" in caplog.text
        assert fetcher.fetch(server.address, "k", MiB, dest) == MiB
        assert matches(dest, MiB)


def test_server_killed_mid_transfer_raises_at_once(auth):
    nbytes = 64 * MiB
    with server_process(auth, nbytes, stall_after=3) as (proc, address, _), \
            segment(nbytes) as dest, \
            Fetcher(auth, chunk_bytes=MiB, window=2, timeout=60.0) as fetcher:
        # The producer hangs after 3 chunks; kill it once the first bytes arrived: the fetch
        # is then surely mid-transfer.
        words = np.frombuffer(dest, np.uint32)

        def kill_when_started() -> None:
            deadline = time.monotonic() + 30
            while not words[1] and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        start = time.monotonic()
        with pytest.raises(StreamLost, match="dropped while fetching tensor 't'"):
            fetcher.fetch(address, "t", nbytes, dest)
        took = time.monotonic() - start
        killer.join()
        words = None  # release its hold on the segment before the segment goes
        assert proc.wait(10) == -signal.SIGKILL
    assert took < 30  # told by the dropped connection, not the 60 s timeout


@contextlib.contextmanager
def silent_server(auth: StreamAuth) -> Iterator[TensorServer]:
    """A session server that lets peers in, then never answers: its lookup hangs."""
    release = threading.Event()
    with TensorServer("127.0.0.1", auth, lambda key: release.wait(60) and None) as server:
        try:
            yield server
        finally:
            release.set()


@contextlib.contextmanager
def rogue_server(auth: StreamAuth, reply: Callable[[int, int, int], list[bytes]]
                 ) -> Iterator[str]:
    """A session member that answers each request (tag, offset, n) with ``reply(...)``'s
    frames: a server gone wrong. Yields its address."""
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    router = ctx.socket(zmq.ROUTER)
    auth.secure_server(router)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if zap.poll(10):
                zap.send_multipart(zap_reply(auth, zap.recv_multipart())[0])
            if router.poll(10):
                identity, _, _, header = router.recv_multipart()
                router.send_multipart([identity, *reply(*REQUEST.unpack(header))])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join()
        ctx.destroy(linger=0)


def ok(tag: int, offset: int, n: int) -> bytes:
    return REPLY.pack(OK, tag, offset, n)


@pytest.mark.parametrize("reply, error", [
    (lambda tag, off, n: [ok(tag, off, n), b"x" * (n - 1)], "held 99 bytes"),
    (lambda tag, off, n: [ok(tag, off, n), b"x" * (n + 1)], "held 101 bytes"),
    (lambda tag, off, n: [ok(tag, off + 1, n), b"x" * n], "was not asked for"),
    (lambda tag, off, n: [ok(tag + 1, off, n), b"x" * n], "was not asked for"),
    (lambda tag, off, n: [ok(tag, off, n), b"x" * n, b"more"], "held 100 bytes"),
    (lambda tag, off, n: [ok(tag, off, n)], "malformed reply"),
    (lambda tag, off, n: [b"short", b"x" * n], "malformed reply"),
], ids=["short", "long", "offset", "tag", "extra-frame", "no-body", "bad-header"])
def test_a_wrong_reply_raises_and_never_writes_outside_its_slice(auth, reply, error):
    dest = mmap.mmap(-1, 150)
    dest[:] = b"-" * 150
    with rogue_server(auth, reply) as address, Fetcher(auth, timeout=5.0) as fetcher:
        with pytest.raises(StreamCorrupt, match=error) as caught:
            fetcher.fetch(address, "k", 100, dest)
    assert dest[100:] == b"-" * 50
    assert caught.tb is not None
    dest.close()  # the error's traceback holds no view of it (BufferError otherwise)


def test_keys_too_long_are_refused_before_sending(fetcher):
    with pytest.raises(ValueError, match="at most 1024 bytes"):
        fetcher.fetch("tcp://127.0.0.1:1", "k" * 1025, 0, bytearray())


def test_a_silent_server_is_lost_after_the_timeout(auth):
    with silent_server(auth) as server, Fetcher(auth, timeout=1.0) as fetcher:
        start = time.monotonic()
        with pytest.raises(StreamLost, match="no reply for tensor 'k' .* in 1 s"):
            fetcher.fetch(server.address, "k", 10, bytearray(10))
        assert 0.9 < time.monotonic() - start < 30
        assert server.stats()["requests"] == 1


def wait_for_all(arrived: threading.Semaphore, count: int) -> None:
    """In the first caller's make_dest: until every caller has come to fetch_shared (then
    a moment more, for the last to reach its lock), so none comes after the fetch ended."""
    for _ in range(count):
        assert arrived.acquire(timeout=30)
    time.sleep(0.3)


def test_four_threads_fetching_one_tensor_make_one_transfer(server, fetcher, tensors):
    nbytes = 8 * MiB + 3
    made: list[memoryview] = []
    results: list = [None] * 4
    arrived = threading.Semaphore(0)
    with segment(nbytes, filled=True) as src, contextlib.ExitStack() as stack:
        tensors["k"] = src

        def make_dest() -> memoryview:
            wait_for_all(arrived, 4)
            made.append(stack.enter_context(segment(nbytes)))
            return made[-1]

        def run(i: int) -> None:
            arrived.release()
            results[i] = fetcher.fetch_shared(server.address, "k", nbytes, make_dest)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(made) == 1
        assert all(dest is made[0] for dest, _ in results)
        assert sorted(copied for _, copied in results) == [0, 0, 0, nbytes]
        assert matches(made[0], nbytes)
    assert server.stats()["transfers"] == 1


def test_a_shared_fetch_failure_reaches_every_waiter_and_discards_once(server, fetcher):
    errors: list[BaseException] = []
    discarded: list[bytearray] = []
    arrived = threading.Semaphore(0)

    def make_dest() -> bytearray:
        wait_for_all(arrived, 4)
        return bytearray(10)

    def run() -> None:
        arrived.release()
        try:
            fetcher.fetch_shared(server.address, "missing", 10, make_dest, discarded.append)
        except UnknownTensor as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 4 and len({id(e) for e in errors}) == 1
    assert len(discarded) == 1
    assert server.stats()["requests"] == 1


def test_encrypted_stream_works_and_refuses_non_curve_clients(tensors):
    auth = StreamAuth.new(encrypt=True)
    assert auth.encrypted and "secret" not in repr(auth)
    with TensorServer("127.0.0.1", auth, tensors.get) as server, \
            segment(5 * MiB + 1, filled=True) as src, segment(5 * MiB + 1) as dest:
        tensors["k"] = src
        with Fetcher(auth, chunk_bytes=MiB) as fetcher:
            assert fetcher.fetch(server.address, "k", src.nbytes, dest) == src.nbytes
        assert matches(dest, src.nbytes)
        dest[:] = bytes(dest.nbytes)
        # PLAIN with the right secret, and CURVE with keys of another session: nothing.
        other = StreamAuth.new(encrypt=True)
        for outsider in (StreamAuth(auth.secret),
                         StreamAuth(auth.secret, (*auth.curve[:2], *other.curve[2:]))):
            with Fetcher(outsider, timeout=60.0) as fetcher, pytest.raises(StreamRefused):
                fetcher.fetch(server.address, "k", src.nbytes, dest)
        assert not any(dest)
        assert server.stats()["transfers"] == 1
        assert server.stats()["denied"] >= 1  # the CURVE outsider (PLAIN fails before ZAP)


def test_close_stops_a_fetch_in_progress_and_leaves_no_thread(auth):
    threads_before = set(threading.enumerate())
    caught: list[BaseException] = []
    with silent_server(auth) as server:
        fetcher = Fetcher(auth, timeout=60.0)

        def run() -> None:
            try:
                fetcher.fetch(server.address, "k", 10, bytearray(10))
            except BaseException as exc:
                caught.append(exc)

        t = threading.Thread(target=run)
        t.start()
        while not server.stats()["requests"]:
            time.sleep(0.01)
        start = time.monotonic()
        fetcher.close()
        t.join(5)
        assert time.monotonic() - start < 5
        assert len(caught) == 1 and isinstance(caught[0], StreamClosed)
        with pytest.raises(StreamClosed):
            fetcher.fetch(server.address, "k", 0, bytearray())
        fetcher.close()
        address = server.address
    server.close()  # again: a no-op
    # The port is free again, and no thread of ours is left.
    probe = zmq.Context()
    sock = probe.socket(zmq.ROUTER)
    sock.bind(address)
    sock.close(linger=0)
    probe.term()
    left = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not left, left


def test_stream_auth_validates_its_keys():
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        StreamAuth(b"")
    with pytest.raises(ValueError, match="four Z85 keys"):
        StreamAuth(b"s", (b"x", b"y", b"z", b"w"))
    import pickle
    auth = StreamAuth.new(encrypt=True)
    assert pickle.loads(pickle.dumps(auth)) == auth
