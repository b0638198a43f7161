"""Observability: trace files, `pto status`, `pto trace summarize`, `pto keygen`, logs, progress.

Everything runs real processes: embedded runtimes, brokers from start_broker.sh or
``python -m broker``, and the ``pto`` command as a subprocess (``python -m pto``).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from importlib import metadata

import numpy as np
import psutil
import pytest
import zmq.auth

import pto

from ._util import REPO, ExternalBroker, read_line, stop_process, wait_until

pytestmark = pytest.mark.timeout(120)

PTO = [sys.executable, "-m", "pto"]
EPS_US = 0.01  # trace times are rounded to the nanosecond


def step(x, y, seconds):
    import time

    time.sleep(seconds)
    y[...] = x + 1


def join(a, b, y):
    y[...] = a + b


def boom(x, y):
    raise RuntimeError("boom on purpose")


def noop(*args):
    pass


def crash(x):
    import os

    os._exit(7)


def pto_cmd(*args: str, timeout: float = 30, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([*PTO, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PTO_BROKER", "PTO_TRACE", "PTO_CURVE_DIR", "PTO_LOG_LEVEL")}
    env.update(extra)
    return env


@pytest.fixture
def embedded(monkeypatch):
    """Make an embedded runtime with the given keyword arguments (closed after the test)."""
    monkeypatch.delenv("PTO_BROKER", raising=False)
    monkeypatch.delenv("PTO_TRACE", raising=False)
    made = []

    def make(**kwargs):
        rt = pto.Runtime(level="host", platform="sim", **kwargs)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


# ---- trace files ---------------------------------------------------------------------------

REQUIRED = {
    "X": {"name", "cat", "ph", "pid", "tid", "ts", "dur", "args"},
    "M": {"name", "ph", "pid", "args"},
    "s": {"name", "cat", "ph", "pid", "tid", "ts", "id"},
    "f": {"name", "cat", "ph", "pid", "tid", "ts", "id", "bp"},
    "i": {"name", "ph", "pid", "ts", "s", "args"},
}
X_ARGS = {"task", "rank", "world", "bytes", "submit_us", "ready_us", "dispatch_us", "deps"}


def load_trace(path) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    assert isinstance(data, dict) and isinstance(data["traceEvents"], list)
    events = data["traceEvents"]
    for e in events:
        assert e["ph"] in REQUIRED, e
        missing = REQUIRED[e["ph"]] - set(e)
        assert not missing, f"{e} lacks {missing}"
        if "ts" in e:
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] > 0, e
            assert X_ARGS <= set(e["args"]), e
            a = e["args"]
            # one clock for every process: submit <= ready <= dispatch <= start
            assert a["submit_us"] <= a["ready_us"] + EPS_US, e
            assert a["ready_us"] <= a["dispatch_us"] + EPS_US, e
            assert a["dispatch_us"] <= e["ts"] + EPS_US, e
            assert 0 <= a["rank"] < a["world"], e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and e["args"]["name"], e
        if e["ph"] == "f":
            assert e["bp"] == "e", e
    return events


def slices(events) -> list[dict]:
    return [e for e in events if e["ph"] == "X"]


def track_names(events) -> dict[int, str]:
    names = {}
    for e in events:
        if e["ph"] == "M" and e["name"] == "thread_name":
            assert e["tid"] not in names, f"two thread_name events for tid {e['tid']}"
            names[e["tid"]] = e["args"]["name"]
    return names


def enclosing(events, tid: int, ts: float) -> dict:
    """The one slice on track ``tid`` that contains ``ts`` (how viewers bind flow events)."""
    found = [e for e in slices(events)
             if e["tid"] == tid and e["ts"] - EPS_US <= ts <= e["ts"] + e["dur"] + EPS_US]
    assert len(found) == 1, f"flow at tid {tid} ts {ts} binds to {len(found)} slices"
    return found[0]


def flow_edges(events) -> set[tuple[str, str]]:
    """(kernel of the task depended on, kernel of the dependent) for every flow arrow."""
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(ends), "every flow needs one start and one end"
    assert len(starts) == len([e for e in events if e["ph"] == "s"]), "flow ids repeat"
    edges = set()
    for fid, s in starts.items():
        f = ends[fid]
        src, dst = enclosing(events, s["tid"], s["ts"]), enclosing(events, f["tid"], f["ts"])
        assert src["ts"] + src["dur"] <= dst["ts"] + EPS_US, "a dependent started before its dep"
        edges.add((src["name"], dst["name"]))
    return edges


def dag(ctx, args):
    """A chain a -> b -> c across chips 0, 1, 2; a fan-in (d, e) -> f; a group g on 0 and 1."""
    x = ctx.tensor(np.arange(256, dtype=np.float32))
    b_in, c_in, out = ctx.alloc(256), ctx.alloc(256), ctx.alloc(256)
    ctx.submit(0, "a", [pto.Arg.input(x), pto.Arg.output(b_in), pto.Arg.scalar(0.05)])
    ctx.submit(1, "b", [pto.Arg.input(b_in), pto.Arg.output(c_in), pto.Arg.scalar(0.02)])
    ctx.submit(2, "c", [pto.Arg.input(c_in), pto.Arg.output(out), pto.Arg.scalar(0.0)])
    d_out, e_out, total = ctx.alloc(256), ctx.alloc(256), ctx.alloc(256)
    ctx.submit(1, "d", [pto.Arg.input(x), pto.Arg.output(d_out), pto.Arg.scalar(0.03)])
    ctx.submit(2, "e", [pto.Arg.input(x), pto.Arg.output(e_out), pto.Arg.scalar(0.01)])
    ctx.submit(0, "f", [pto.Arg.input(d_out), pto.Arg.input(e_out), pto.Arg.output(total)])
    ctx.submit_group([0, 1], "g", [pto.Arg.inout(total)])  # after f (RAW), once per member
    return out, total


DAG_KERNELS = {"a": step, "b": step, "c": step, "d": step, "e": step, "f": join, "g": noop}
DAG_EDGES = {("a", "b"), ("b", "c"), ("d", "f"), ("e", "f"), ("f", "g")}


def test_trace_file_validates_and_its_flows_match_the_dag(embedded, tmp_path):
    path = tmp_path / "run.json"
    rt = embedded(devices=[0, 1, 2, 3], trace=str(path))
    rt.register("dag", orch=dag, kernels=DAG_KERNELS)
    out, total = rt.run("dag")
    assert (out.numpy() == np.arange(256) + 3).all()
    rt.close()  # writes the trace

    events = load_trace(path)
    names = track_names(events)
    xs = slices(events)
    # one named track per chip that ran something (chip 3 ran nothing), and nothing else
    used = {e["tid"] for e in xs}
    assert used == set(names)
    assert sorted(names.values()) == ["chip 0", "chip 1", "chip 2"]
    chip_of = {tid: int(name.split()[1]) for tid, name in names.items()}

    # one X per task member, on its chip's track
    by_kernel: dict[str, list[dict]] = {}
    for e in xs:
        by_kernel.setdefault(e["name"], []).append(e)
    assert sorted(by_kernel) == sorted(DAG_KERNELS)
    where = {"a": 0, "b": 1, "c": 2, "d": 1, "e": 2, "f": 0}
    for kernel, chip in where.items():
        (e,) = by_kernel[kernel]
        assert chip_of[e["tid"]] == chip and e["args"]["world"] == 1
    group = by_kernel["g"]
    assert sorted((chip_of[e["tid"]], e["args"]["rank"]) for e in group) == [(0, 0), (1, 1)]
    assert {e["args"]["task"] for e in group} == {group[0]["args"]["task"]}
    assert all(e["args"]["group"] == [0, 1] and e["args"]["world"] == 2 for e in group)
    assert len({e["args"]["task"] for e in xs}) == len(DAG_KERNELS)

    # bytes touched: the tensor arguments' sizes
    assert by_kernel["a"][0]["args"]["bytes"] == 2 * 256 * 4
    assert by_kernel["f"][0]["args"]["bytes"] == 3 * 256 * 4
    # the deps recorded on each slice are the DAG's
    task_kernel = {e["args"]["task"]: e["name"] for e in xs}
    deps = {(task_kernel[d], e["name"]) for e in xs for d in e["args"]["deps"]}
    assert deps == DAG_EDGES

    # flow arrows: exactly the DAG's edges (one per dependent member), bound to the slices
    assert flow_edges(events) == DAG_EDGES
    assert len([e for e in events if e["ph"] == "s"]) == 4 + len(group)

    # slices on one chip never overlap: a worker runs one task at a time
    for tid in used:
        on = sorted((e["ts"], e["ts"] + e["dur"]) for e in xs if e["tid"] == tid)
        gaps = zip(on, on[1:], strict=False)
        assert all(a_end <= b_start + EPS_US for (_, a_end), (b_start, _) in gaps)
    assert not any(e["ph"] == "i" or "failure" in e.get("args", {}) for e in events)


def chain_with_failure(ctx, args):
    x = ctx.tensor(np.ones(8, np.float32))
    y, z, ok = ctx.alloc(8), ctx.alloc(8), ctx.alloc(8)
    ctx.submit(0, "boom", [pto.Arg.input(x), pto.Arg.output(y)])
    ctx.submit(1, "join", [pto.Arg.input(y), pto.Arg.input(x), pto.Arg.output(z)])  # not run
    ctx.submit(1, "step", [pto.Arg.input(x), pto.Arg.output(ok), pto.Arg.scalar(0.0)])
    return ok


def test_failures_appear_in_the_trace_written_by_PTO_TRACE(embedded, tmp_path, monkeypatch):
    path = tmp_path / "env.json"
    monkeypatch.setenv("PTO_TRACE", str(path))
    rt = embedded(devices=[0, 1])
    rt.register("bad", orch=chain_with_failure, kernels={"boom": boom, "join": join,
                                                        "step": step})
    with pytest.raises(pto.TaskError, match="boom on purpose"):
        rt.run("bad")
    early = tmp_path / "early.json"
    assert rt.write_trace(str(early)) == str(early)  # any time, to any path
    rt.close()

    for written in (early, path):
        events = load_trace(written)
        xs = {e["name"]: e for e in slices(events)}
        assert set(xs) == {"boom", "step"}  # join never ran
        assert "boom on purpose" in xs["boom"]["args"]["failure"]
        assert "failure" not in xs["step"]["args"]
        (mark,) = [e for e in events if e["ph"] == "i"]
        assert mark["name"] == "join (not run)"
        assert "not run" in mark["args"]["failure"] and "boom" in mark["args"]["failure"]
        assert not [e for e in events if e["ph"] in "sf"]  # the dependent never started

    summary = pto_cmd("trace", "summarize", str(path))
    assert summary.returncode == 0, summary.stderr
    assert re.search(r"failures: 2 task\(s\) \(1 failed running, 1 not run\)", summary.stdout)
    assert "RuntimeError: boom on purpose" in summary.stdout


# ---- pto trace summarize -------------------------------------------------------------------


def critical(ctx, args):
    """chip 0: long (0.3 s) -> short on chip 1 (0.1 s); chip 1 also runs a quick side task."""
    x = ctx.tensor(np.ones(64, np.float32))
    mid, end, side = ctx.alloc(64), ctx.alloc(64), ctx.alloc(64)
    ctx.submit(1, "side", [pto.Arg.input(x), pto.Arg.output(side), pto.Arg.scalar(0.02)])
    ctx.submit(0, "long", [pto.Arg.input(x), pto.Arg.output(mid), pto.Arg.scalar(0.3)])
    ctx.submit(1, "short", [pto.Arg.input(mid), pto.Arg.output(end), pto.Arg.scalar(0.1)])
    return end


@pytest.mark.slow
def test_trace_summarize_reports_busy_critical_path_and_top_kernels(embedded, tmp_path):
    path = tmp_path / "crit.json"
    rt = embedded(devices=[0, 1], trace=str(path))
    rt.register("crit", orch=critical, kernels={"long": step, "short": step, "side": step})
    rt.run("crit")
    rt.close()

    proc = pto_cmd("trace", "summarize", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["tasks"] == 3 and s["slices"] == 3
    busy = {t["track"]: t for t in s["tracks"]}
    assert set(busy) == {"chip 0", "chip 1"}
    assert busy["chip 0"]["busy_us"] >= 0.3e6 and busy["chip 1"]["busy_us"] >= 0.12e6
    assert 0 < busy["chip 1"]["busy_pct"] < busy["chip 0"]["busy_pct"] <= 100
    path_ = s["critical_path"]
    assert [t["kernel"] for t in path_["tasks"]] == ["long", "short"]
    assert [t["track"] for t in path_["tasks"]] == ["chip 0", "chip 1"]
    assert path_["tasks"][1]["after"] == path_["tasks"][0]["task"]
    assert 0.4e6 <= path_["running_us"] < 0.4e6 + 0.2e6
    assert path_["length_us"] == pytest.approx(path_["running_us"] + path_["waiting_us"], abs=1)
    assert [k["kernel"] for k in s["top_kernels"]] == ["long", "short", "side"]
    assert s["failures"] == []

    text = pto_cmd("trace", "summarize", str(path))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert re.search(r"^chip 0\s+1\s+\d+\.\d ms\s+\d+\.\d%$", out, re.M), out
    assert "critical path: 2 task(s)" in out
    assert re.search(r"^long\s+1\s+", out, re.M) and "failures: none" in out

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for target in (bad, tmp_path / "missing.json"):
        proc = pto_cmd("trace", "summarize", str(target))
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith("pto trace: ") and len(proc.stderr.splitlines()) == 1


# ---- pto status ----------------------------------------------------------------------------


def busy_graph(ctx, args):
    """A long task on each chip, then more quick tasks for chip 0 than its worker's credit
    (512), so some wait in the broker's ready queue while the long task runs."""
    x = ctx.tensor(np.ones(1024, np.float32))
    for chip in ctx.peers():
        ctx.submit(chip, "long", [pto.Arg.input(x), pto.Arg.output(ctx.alloc(1024)),
                                  pto.Arg.scalar(args)])
    for _ in range(700):
        ctx.submit(0, "noop", [pto.Arg.input(x)])


def status_json(address: str) -> dict:
    proc = pto_cmd("status", "--broker", address, "--json", timeout=20)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_status_of_a_live_broker_with_running_tasks(tmp_path, monkeypatch):
    broker = ExternalBroker(tmp_path, workers=2)
    try:
        idle: dict = {}
        # the workers connect in their own time after start-up
        assert wait_until(lambda: len(idle.update(status_json(broker.address))
                                      or idle["workers"]) == 3, timeout=15), idle
        assert idle["address"] == broker.address and idle["pid"] == broker.proc.pid
        assert idle["clients"] == [] and idle["devices"] == [0, 1]
        assert {w["chip"]: w["state"] for w in idle["workers"]} == {0: "idle", 1: "idle",
                                                                    "host": "idle"}
        monkeypatch.delenv("PTO_BROKER", raising=False)
        monkeypatch.delenv("PTO_TRACE", raising=False)
        with pto.Runtime(level="host", platform="sim", broker=broker.address) as rt:
            with pytest.raises(pto.PtoError, match="tracing is off"):
                rt.write_trace(str(tmp_path / "off.json"))
            rt.register("busy", orch=busy_graph, kernels={"long": step, "noop": noop})
            future = rt.submit("busy", 5.0)
            seen: dict = {}

            def busy() -> bool:
                seen.update(status_json(broker.address))
                return (seen["queues"].get("0", 0) > 0
                        and all(w["running"] == "long" for w in seen["workers"]
                                if w["chip"] != "host"))

            assert wait_until(busy, timeout=10, interval=0.1), seen
            st = seen
            workers = {w["chip"]: w for w in st["workers"]}
            assert set(workers) == {0, 1, "host"}
            pids = {p.pid for p in broker.descendants()}
            assert {w["pid"] for w in st["workers"]} <= pids
            for chip in (0, 1):
                assert workers[chip]["state"] == "busy" and workers[chip]["inflight"] >= 1
            # the worker's credit less the eighth kept for other clients; the rest wait
            assert workers[0]["inflight"] == 512 - 512 // 8
            assert st["queues"]["0"] == 700 + 1 - (512 - 512 // 8)
            (client,) = st["clients"]
            assert client["pid"] == os.getpid() and client["owner"] == rt._owner
            assert client["tasks"] == 702
            assert st["shm_bytes"] >= 3 * 1024 * 4
            assert st["uptime_s"] > idle["uptime_s"]
            # the scheduler's last moves, oldest first: [gid, from, to]
            moves = st["transitions"]
            assert moves and all(len(m) == 3 for m in moves)
            assert ["PENDING", "READY"] in [m[1:] for m in moves]
            assert ["READY", "DISPATCHED"] in [m[1:] for m in moves]

            # the table, with the address from PTO_BROKER
            table = pto_cmd("status", env=clean_env(PTO_BROKER=broker.address))
            assert table.returncode == 0, table.stderr
            out = table.stdout
            assert out.startswith(f"broker   {broker.address}  pid {broker.proc.pid}  up ")
            assert re.search(r"^CHIP\s+PID\s+STATE\s+RUNNING\s+INFLIGHT\s+DONE\s+FAILED$", out,
                             re.M), out
            assert re.search(rf"^0\s+{workers[0]['pid']}\s+busy\s+long\s+\d+", out, re.M), out
            assert re.search(r"^QUEUE\s+READY TASKS$", out, re.M), out
            assert re.search(rf"^{client['client']}\s+{os.getpid()}\s+{rt._owner}\s+\d+$", out,
                             re.M), out
            assert re.search(r"^shm\s+\d+(\.\d)? (B|KiB|MiB)", out, re.M), out
            future.result(timeout=30)
        done = status_json(broker.address)
        assert done["clients"] == [] and done["shm_bytes"] == 0
        assert all(w["state"] == "idle" and w["running"] is None for w in done["workers"])
    finally:
        broker.stop()


def one_long_task(ctx, seconds):
    ctx.submit(0, "long", [pto.Arg.input(np.zeros(4)), pto.Arg.output(ctx.alloc(4)),
                           pto.Arg.scalar(seconds)])


@pytest.mark.slow
def test_a_worker_survives_a_task_longer_than_the_heartbeat_timeout(embedded):
    rt = embedded(devices=[0])
    before = {w["chip"]: w["pid"] for w in pto.status(rt.address)["workers"]}
    rt.register("long", orch=one_long_task, kernels={"long": step})
    rt.run("long", 2.0)
    time.sleep(1.0)  # the broker notices a lost worker within a heartbeat or two
    after = {w["chip"]: (w["pid"], w["done"]) for w in pto.status(rt.address)["workers"]}
    assert after.get(0) == (before[0], 1), (before, after)


def test_status_without_a_broker_fails_fast_with_one_clear_line(tmp_path):
    nowhere = f"ipc://{tmp_path}/no-broker.sock"
    started = time.monotonic()
    proc = pto_cmd("status", "--broker", nowhere, "--timeout", "0.5", env=clean_env())
    assert time.monotonic() - started < 10
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"pto status: no broker answered at {nowhere} within 0.5s\n"

    proc = pto_cmd("status", "--json", env=clean_env())  # no --broker, no PTO_BROKER
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "pto status: no broker address: pass --broker ADDR or set PTO_BROKER\n"

    proc = pto_cmd("status", "--broker", "nonsense", env=clean_env())
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "nonsense" in proc.stderr

    proc = pto_cmd("status", "--timeout", "0", env=clean_env())
    assert proc.returncode == 2 and "must be > 0" in proc.stderr


# ---- pto keygen ----------------------------------------------------------------------------


def free_port_pair() -> int:
    """A port P with P and P+1 free (a tcp broker takes both)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@pytest.mark.slow
def test_keygen_creates_private_keys_refuses_overwrite_and_they_work(tmp_path):
    keys = tmp_path / "keys"
    proc = pto_cmd("keygen", str(keys))
    assert proc.returncode == 0, proc.stderr
    assert "--curve" in proc.stdout
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    for name in ("broker", "client"):
        assert stat.S_IMODE(os.stat(keys / f"{name}.key_secret").st_mode) == 0o600
        public, secret = zmq.auth.load_certificate(str(keys / f"{name}.key_secret"))
        assert secret and zmq.auth.load_certificate(str(keys / f"{name}.key"))[0] == public
        assert zmq.auth.load_certificate(str(keys / f"{name}.key"))[1] is None
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    before = {p: p.read_bytes() for p in keys.rglob("*") if p.is_file()}

    again = pto_cmd("keygen", str(keys))
    assert again.returncode == 1 and "--force" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert {p: p.read_bytes() for p in keys.rglob("*") if p.is_file()} == before

    forced = pto_cmd("keygen", str(keys), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (keys / "client.key_secret").read_bytes() != before[keys / "client.key_secret"]
    assert (keys / "authorized" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    assert stat.S_IMODE(os.stat(keys / "client.key_secret").st_mode) == 0o600

    # the keys secure a tcp broker; `pto status --curve` presents them
    address = f"tcp://127.0.0.1:{free_port_pair()}"
    broker = subprocess.Popen([sys.executable, "-m", "broker", "--listen", address,
                               "--curve", str(keys)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, cwd=REPO, env=clean_env())
    try:
        assert read_line(broker, timeout=20) == address
        ok = pto_cmd("status", "--broker", address, "--curve", str(keys), "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["address"] == address
        refused = pto_cmd("status", "--broker", address, "--timeout", "0.5", env=clean_env())
        assert refused.returncode == 1
        assert "no broker answered" in refused.stderr and "--curve" in refused.stderr
    finally:
        stop_process(broker)


# ---- console scripts -----------------------------------------------------------------------


def script(name: str) -> str | None:
    """The installed console script ``name``: next to this Python, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def test_console_scripts_are_declared_and_pto_broker_serves(tmp_path):
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts.get("pto") == "pto.tools.cli:main"
    assert scripts.get("pto-broker") == "broker.__main__:main"
    helped = pto_cmd("--help")
    assert helped.returncode == 0
    for command in ("status", "trace", "keygen"):
        assert command in helped.stdout

    exe, pto_exe = script("pto-broker"), script("pto")
    if exe is None or pto_exe is None:
        pytest.skip("the console scripts are not installed (pip install -e . installs them)")
    address = f"ipc://{tmp_path}/b.sock"
    broker = subprocess.Popen([exe, "--listen", address, "--workers", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              env=clean_env(), cwd=tmp_path)
    try:
        assert read_line(broker, timeout=20) == address
        assert wait_until(lambda: any(w["chip"] == 0 for w in status_json(address)["workers"]),
                          timeout=15)
        proc = subprocess.run([pto_exe, "status", "--broker", address], capture_output=True,
                              text=True, timeout=20)
        assert proc.returncode == 0 and proc.stdout.startswith(f"broker   {address}")
    finally:
        stop_process(broker)


# ---- logs ----------------------------------------------------------------------------------

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<role>[a-z]+\d*)\[(?P<pid>\d+)\] "
                  r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<logger>[\w.]+): (?P<msg>.*)$")


def records(path) -> list[re.Match]:
    out = []
    with open(path) as f:
        for line in f:
            if LINE.match(line.rstrip("\n")):
                out.append(LINE.match(line.rstrip("\n")))
    return out


def start_broker(log_dir, level: str | None = None) -> tuple[subprocess.Popen, str]:
    env = clean_env(**({"PTO_LOG_LEVEL": level} if level else {}))
    proc = subprocess.Popen([sys.executable, "-m", "broker", "--workers", "1",
                             "--log-dir", str(log_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    try:
        return proc, read_line(proc, timeout=20)
    except BaseException:
        stop_process(proc)
        raise


def worker_pids(broker: subprocess.Popen) -> dict[str, int]:
    """{"worker0": pid, "host0": pid} of the broker's children."""
    found = {}
    for child in psutil.Process(broker.pid).children():
        cmd = child.cmdline()
        if "--device" in cmd:
            found[f"worker{cmd[cmd.index('--device') + 1]}"] = child.pid
        elif "--host" in cmd:
            found[f"host{cmd[cmd.index('--host') + 1]}"] = child.pid
    return found


def test_log_records_carry_role_chip_and_pid(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    broker, address = start_broker(logs)
    try:
        wanted = {"worker0", "host0"}
        assert wait_until(lambda: set(worker_pids(broker)) == wanted, timeout=15)
        pids = worker_pids(broker)

        def connected() -> int:  # (a worker that never connected is stopped at once)
            return sum("worker for device" in m["msg"] and "connected" in m["msg"]
                       for m in records(logs / "broker.log"))

        assert wait_until(lambda: connected() == 2, timeout=30)
        monkeypatch.delenv("PTO_BROKER", raising=False)
        with pto.Runtime(level="host", platform="sim", broker=address) as rt:
            rt.register("one", orch=lambda ctx, a: ctx.submit(0, "noop", []),
                        kernels={"noop": noop})
            rt.run("one")
        assert wait_until(lambda: any("said bye" in m["msg"] for m in records(logs / "broker.log")))
    finally:
        stop_process(broker)

    files = {"broker.log": ("broker", broker.pid), "worker-0.log": ("worker0", pids["worker0"]),
             "host-0.log": ("host0", pids["host0"])}
    assert set(os.listdir(logs)) >= set(files)
    for name, (role, pid) in files.items():
        text = (logs / name).read_text()
        recs = records(logs / name)
        assert recs and len(recs) == len(text.splitlines()), text
        assert {(m["role"], int(m["pid"])) for m in recs} == {(role, pid)}, text
    worker = [m["msg"] for m in records(logs / "worker-0.log")]
    assert "worker for chip 0 started" in worker and "worker for chip 0 stopped" in worker
    broker_msgs = " | ".join(m["msg"] for m in records(logs / "broker.log"))
    assert f"worker for device 0 connected (pid {pids['worker0']})" in broker_msgs
    assert f"client 1 connected (pid {os.getpid()}" in broker_msgs


def test_PTO_LOG_LEVEL_sets_the_level_of_every_process(tmp_path):
    logs = tmp_path / "quiet"
    logs.mkdir()
    broker, _ = start_broker(logs, level="WARNING")
    try:
        assert wait_until(lambda: set(worker_pids(broker)) == {"worker0", "host0"}, timeout=15)
        time.sleep(0.5)  # let the workers log their start-up, if they were going to
    finally:
        stop_process(broker)
    for name in ("broker.log", "worker-0.log", "host-0.log"):
        path = logs / name
        levels = {m["level"] for m in records(path)} if path.exists() else set()
        assert levels <= {"WARNING", "ERROR", "CRITICAL"}, (name, path.read_text())


def lost_worker(ctx, args):
    t = ctx.alloc(4)
    ctx.submit(0, "crash", [pto.Arg.inout(t)])  # INOUT: never rerun, so pto.WorkerLost


def test_worker_lost_names_the_worker_log(embedded):
    rt = embedded(devices=[0])
    rt.register("lost", orch=lost_worker, kernels={"crash": crash})
    with pytest.raises(pto.WorkerLost) as info:
        rt.run("lost")
    match = re.search(r"worker log: (\S+)", info.value.reason)
    assert match, info.value.reason
    path = match.group(1)
    assert path.endswith("worker-0.log") and os.path.dirname(path) == rt._embedded.log_dir
    assert "exited with code 7" in info.value.reason
    recs = records(path)  # the dead worker's log, readable while the runtime is open
    assert recs and recs[0]["role"] == "worker0"
    assert any(m["msg"] == "worker for chip 0 started" for m in recs)


# ---- progress ------------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import time
import numpy as np
import pto

def tick(x):
    time.sleep(0.01)

def many(ctx, n):
    x = ctx.tensor(np.zeros(4))
    for i in range(n):
        ctx.submit(ctx.peers()[i % 2], "tick", [pto.Arg.input(x)])

with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
    rt.register("many", orch=many, kernels={"tick": tick})
    rt.run("many", 60, progress=True)
    print("finished", flush=True)
"""


def run_in_terminal(script: str, cwd, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``script`` with stderr on a pseudo-terminal; return (rc, stdout, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL, cwd=cwd, env=clean_env())
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        stop_process(proc)
        proc.stdout.close()
    return rc, out, b"".join(chunks).decode(errors="replace")


def test_progress_bar_counts_tasks_on_the_terminal(tmp_path):
    rc, out, term = run_in_terminal(textwrap.dedent(PROGRESS_SCRIPT), tmp_path)
    assert rc == 0, term
    assert out == "finished\n"
    frames = [f for f in re.split(r"[\r\n]+", term) if f]
    bars = [f for f in frames if re.fullmatch(r"\[[#.]{30}\] \d+/60 tasks", f)]
    assert bars and bars == frames, term  # nothing but the bar was drawn
    assert bars[-1] == "[" + "#" * 30 + "] 60/60 tasks"
    counts = [int(re.search(r"(\d+)/60", b).group(1)) for b in bars]
    assert counts == sorted(counts) and counts[0] < 60  # it moved while the run went on
    assert term.endswith("60/60 tasks\r\n")  # the bar's line is ended (a tty shows \n as \r\n)
