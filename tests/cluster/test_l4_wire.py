"""L4 on pto's own wire, end to end on a 2-host LocalCluster (issue 19).

- a 256 MiB tensor crosses hosts intact, and the consumer host needs little memory beyond
  the tensor's own new segment (the stream lands in it in chunks);
- 4 runs on one host reading one remote tensor at once pull it across once;
- a consumer never maps a producer's segment (hosts share nothing but the network, even
  though a LocalCluster's hosts share this machine's /dev/shm);
- 10,000 small L4 runs leave no Ref, no host-side entry and no segment behind;
- the hosts' endpoints refuse peers without the session's keys, and serve on;
- a host killed while a tensor streams out of it: ``pto.HostLost``, the other host serves,
  and nothing of the failed run stays on it (last: it leaves the cluster one host).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import psutil
import pytest
import zmq

import pto
from pto.cluster.status import cluster_status

from .conftest import host_pids, segment_owner, segments_of, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BREAKS_THE_CLUSTER = True  # kills a host: the next module gets a fresh cluster (conftest.py)
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar
CHUNK = 1 << 20


# -- kernels -------------------------------------------------------------------------------

def iota(y):
    """y[i] = i, a chunk at a time (no tensor-sized temporary)."""
    for s in range(0, y.size, CHUNK):
        y[s:s + CHUNK] = np.arange(s, min(s + CHUNK, y.size), dtype=y.dtype)


def verify(x, out):
    """out[0] = 1 if x[i] == i everywhere, checked a chunk at a time."""
    ok = all(np.array_equal(x[s:s + CHUNK], np.arange(s, min(s + CHUNK, x.size), dtype=x.dtype))
             for s in range(0, x.size, CHUNK))
    out[0] = int(ok)


def scale(x, y, factor):
    y[...] = x * factor


def total(x, out):
    out[...] = x.sum()


def explode(x, y):
    raise ValueError("kernel-exploded-19")


KERNELS = {"iota": iota, "verify": verify, "scale": scale, "total": total, "explode": explode}


# -- L3 entries ----------------------------------------------------------------------------

def ints(ctx, n):
    y = ctx.alloc((n,), np.int32)
    ctx.submit(ctx.peers()[0], "iota", [Out(y)])
    return y


def ints_named(ctx, n):
    y = ints(ctx, n)
    return y, y.name


def verified(ctx, x):
    x = ctx.tensor(x)
    out = ctx.alloc((1,), np.int64)
    ctx.submit(ctx.peers()[-1], "verify", [In(x), Out(out)])
    return out


def scaled(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "scale", [In(x), Out(y), S(args["factor"])])
    return y


def summed(ctx, x):
    x = ctx.tensor(x)
    out = ctx.alloc((1,), x.dtype)
    ctx.submit(ctx.peers()[-1], "total", [In(x), Out(out)])
    return out


def whoami(ctx, args):
    return os.getpid()


def exploding(ctx, x):
    x = ctx.tensor(x)
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "explode", [In(x), Out(y)])
    return y


def touching(ctx, args):
    """Leaves a file behind (the host is this machine): proof that it ran."""
    open(args["path"], "w").close()
    return scaled(ctx, args)


def mapped_segments(ctx, args):
    """The pto segments this host's processes (the host actor, its broker and workers)
    map now."""
    names = set()
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                names.update(line.split("/dev/shm/")[1].strip() for line in f
                             if "/dev/shm/pto_" in line)
        except OSError:
            continue
    return sorted(names)


ENTRIES = {"ints": ints, "ints_named": ints_named, "verified": verified, "scaled": scaled,
           "summed": summed, "whoami": whoami, "mapped_segments": mapped_segments,
           "exploding": exploding, "touching": touching}


@pytest.fixture(scope="module")
def l4(rt):
    for name, fn in ENTRIES.items():
        rt.register(name, orch=fn, kernels=KERNELS)

    def on_host(ctx, args):
        return ctx.submit(args["host"], args["entry"], args=args.get("args"))

    rt.register("on_host", orch=on_host)
    return rt


def _anon_bytes(pids: list[int]) -> int:
    """Private (anonymous) resident memory of ``pids``: what a host uses beyond its shared
    memory segments."""
    used = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                used += next(int(line.split()[1]) * 1024 for line in f
                             if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            continue
    return used


def _host_tree(pid: int) -> list[int]:
    root = psutil.Process(pid)
    return [pid, *(c.pid for c in root.children(recursive=True))]


def test_a_256_mib_tensor_crosses_hosts_intact_in_little_memory(l4):
    n = (256 << 20) // 4
    tree = _host_tree(l4.run("on_host", args={"host": 1, "entry": "whoami"}))
    baseline = max(_anon_bytes(tree) for _ in range(20))
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_bytes(tree))
            time.sleep(0.002)

    def crossing(ctx, count):
        y = ctx.submit(0, "ints", args=count)
        return ctx.submit(1, "verified", args=y)

    l4.register("crossing", orch=crossing)
    before = l4.stats()["total"]
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        ok = l4.run("crossing", args=n)
    finally:
        stop.set()
        sampler.join()
    after = l4.stats()["total"]
    assert ok.tolist() == [1], "the tensor arrived different from what host 0 made"
    assert after["transfers"] - before["transfers"] == 1
    assert after["bytes_in"] - before["bytes_in"] == n * 4  # S bytes copied, once
    extra = peak[0] - baseline
    assert extra < 64 << 20, f"host 1 used {extra >> 20} MiB beyond its segments"


def test_a_tensor_read_by_4_runs_at_once_crosses_once(l4):
    data = np.arange(1 << 18, dtype=np.float32)  # 1 MiB

    def fan_in(ctx, args):
        y = ctx.submit(0, "scaled", args={"x": args, "factor": 1.0})
        return [ctx.submit(1, "summed", args=y) for _ in range(4)]

    l4.register("fan_in", orch=fan_in)
    before = l4.stats()["total"]
    sums = l4.run("fan_in", args=data)
    after = l4.stats()["total"]
    for s in sums:
        np.testing.assert_allclose(s, [data.sum()], rtol=1e-5)
    assert after["transfers"] - before["transfers"] == 1
    assert after["bytes_in"] - before["bytes_in"] == data.nbytes


def test_a_consumer_never_maps_the_producers_segment(l4, cluster):
    def look(ctx, args):
        made = ctx.submit(0, "ints_named", args=1 << 16)
        used = ctx.submit(1, "verified", args=made[0])  # host 1's chips read its copy
        # runs once ``used`` is done, while ``made`` (its input) is surely alive
        return {"made": made, "used": used,
                "mapped": ctx.submit(1, "mapped_segments", args=[made[0], used])}

    l4.register("look", orch=look)
    out = l4.run("look")
    producer_segment = out["made"][1]
    assert out["used"].tolist() == [1]
    assert out["mapped"], "host 1 maps no segment at all?"
    assert producer_segment not in out["mapped"]
    host0 = host_pids(cluster) - set(cluster.host_pids(1))
    theirs = [s for s in out["mapped"] if segment_owner(s) in host0]
    assert not theirs, f"host 1 mapped host 0's segments {theirs}"


def test_the_endpoints_refuse_peers_without_the_session_keys(l4):
    from pto.cluster import protocol as P
    from pto.cluster.stream import MAGIC, REQUEST

    ends = l4.endpoints(0)
    ctx = zmq.Context()
    socks = []
    try:
        plain = ctx.socket(zmq.DEALER)
        wrong = ctx.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()
        wrong.curve_publickey, wrong.curve_secretkey = public, secret
        wrong.curve_serverkey = ends["control_key"].encode()
        for sock in (plain, wrong):
            sock.connect(ends["control"])
            sock.send_multipart(P.encode(P.Hello("intruder")))
            sock.send_multipart(P.encode(P.Run(10**9, "whoami", b"\x80\x04N.")))
        tensors = ctx.socket(zmq.DEALER)
        tensors.connect(ends["tensors"])
        tensors.send_multipart([b"", MAGIC, b"1.0", REQUEST.pack(1, 0, 4)])
        socks = [plain, wrong, tensors]
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            assert not sock.poll(1500), "a peer without the session's keys got an answer"
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
    assert l4.stats()["driver"]["in_flight"] == 0
    assert isinstance(l4.run("on_host", args={"host": 0, "entry": "whoami"}), int)


def test_a_same_host_chain_runs_on_the_host_and_stops_at_a_failure(l4, tmp_path):
    """Runs reading runs of their own host are sent at once and wait on the host."""
    marker = tmp_path / "ran"

    def chain(ctx, n):
        x = ctx.submit(0, "scaled", args={"x": np.ones(4), "factor": 1.0})
        for _ in range(n):
            x = ctx.submit(0, "scaled", args={"x": x, "factor": 2.0})
        return x

    l4.register("host_chain", orch=chain)
    np.testing.assert_array_equal(l4.run("host_chain", args=20), np.full(4, 2.0 ** 20))

    def broken(ctx, _):
        x = ctx.submit(0, "scaled", args={"x": np.ones(4), "factor": 2.0})
        bad = ctx.submit(0, "exploding", args=x)
        after = ctx.submit(0, "touching", args={"x": bad, "path": str(marker), "factor": 1.0})
        return ctx.submit(0, "scaled", args={"x": after, "factor": 1.0})

    l4.register("broken_chain", orch=broken)
    with pytest.raises(pto.TaskError, match="host 0") as info:
        l4.run("broken_chain")
    assert "kernel-exploded-19" in str(info.value)
    assert "2 dependent" in "".join(getattr(info.value, "__notes__", []))
    assert not marker.exists(), "a run after the failed one ran"
    np.testing.assert_array_equal(l4.run("host_chain", args=2), np.full(4, 4.0))


def test_encrypted_tensor_streams_carry_the_same_bytes(cluster):
    n = 1 << 20
    with pto.Runtime(level="cluster", cluster=cluster.address, encrypt_tensors=True) as enc:
        for name in ("ints", "verified"):
            enc.register(name, orch=ENTRIES[name], kernels=KERNELS)

        def crossing(ctx, count):
            y = ctx.submit(0, "ints", args=count)
            return {"y": y, "ok": ctx.submit(1, "verified", args=y)}

        enc.register("crossing", orch=crossing)
        out = enc.run("crossing", args=n)
        assert out["ok"].tolist() == [1]
        np.testing.assert_array_equal(out["y"], np.arange(n, dtype=np.int32))
        assert enc.stats()["total"]["bytes_in"] == n * 4


@pytest.mark.slow
def test_10000_small_runs_leave_nothing_behind(l4, cluster):
    baseline = set(segments_of(host_pids(cluster)))

    def tiny(ctx, i):
        x = ctx.submit(i % 2, "scaled", args={"x": np.full(4, float(i)), "factor": 2.0})
        return ctx.submit((i + 1) % 2, "scaled", args={"x": x, "factor": 0.5})

    l4.register("tiny", orch=tiny)
    window = 256
    for start in range(0, 10_000, window):
        futures = [l4.submit("tiny", args=i) for i in range(start, start + window)]
        for i, future in enumerate(futures, start):
            np.testing.assert_array_equal(future.result(timeout=120), np.full(4, float(i)))
        del futures, future

    def left() -> list:
        gc.collect()
        refs = [o for o in gc.get_objects() if isinstance(o, pto.Ref)]
        st = cluster_status(cluster.address)
        held = [(h["host"], h["kept_tensors"], h["copied_tensors"])
                for r in st["runtimes"] for h in r["hosts"]
                if h.get("kept_tensors") or h.get("copied_tensors")]
        segs = sorted(set(segments_of(host_pids(cluster))) - baseline)
        flight = l4.stats()["driver"]["in_flight"]
        return refs + held + segs + ([flight] if flight else [])

    remaining = wait_until(left, 30)
    assert not remaining, f"left behind: {remaining[:10]}"


def test_a_host_killed_while_its_tensor_streams_out_is_lost_and_the_other_serves(
        l4, cluster):
    """Runs last: host 1 stays down."""
    n = (1 << 30) // 4  # 1 GiB: the stream takes long enough to be cut in the middle
    survivors = set(cluster.host_pids(0))
    baseline = set(segments_of(survivors))

    def doomed(ctx, count):
        y = ctx.submit(1, "ints", args=count)
        return ctx.submit(0, "verified", args=y)

    l4.register("doomed", orch=doomed)
    future = l4.submit("doomed", args=n)
    deadline = time.monotonic() + 120
    while True:  # host 0 made the segment the stream lands in: cut the stream now
        big = [s for s in set(segments_of(survivors)) - baseline
               if os.path.getsize(f"/dev/shm/{s}") >= n * 4]
        if big or future.done():
            break
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.002)
    assert not future.done(), f"finished before the cut: {future.result()}"
    t0 = time.monotonic()
    cluster.kill_host(1)
    with pytest.raises(pto.HostLost) as info:
        future.result(timeout=60)
    lost_after = time.monotonic() - t0
    assert info.value.host == 1, info.value
    assert lost_after < 10, f"HostLost came {lost_after:.1f}s after the kill"
    np.testing.assert_array_equal(
        l4.run("on_host", args={"host": 0, "entry": "scaled",
                                "args": {"x": np.ones(3), "factor": 2.0}}), [2.0] * 3)

    def left() -> list:
        gc.collect()
        return sorted(set(segments_of(survivors)) - baseline)

    assert not wait_until(left, 15), f"host 0 still holds {left()}"
