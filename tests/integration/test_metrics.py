"""``--metrics-port``: Prometheus ``/metrics`` and the dashboard's ``/api/status`` of a real
broker with real workers (the page itself in a browser: test_dashboard.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import pto

from ._util import REPO, ExternalBroker, wait_until

pytestmark = pytest.mark.timeout(120)


def add_one(x, y):
    y[:] = x + 1


def bad_kernel(x, y):
    raise ValueError("boom: this kernel always fails")


def fan(ctx, args):
    x = ctx.tensor(args["x"])
    for i in range(args["n"]):
        y = ctx.alloc(x.shape, x.dtype)
        ctx.submit(ctx.peers()[i % len(ctx.peers())], "k", [pto.Arg.input(x), pto.Arg.output(y)])


def fail_once(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(0, "bad", [pto.Arg.input(x), pto.Arg.output(y)])


def one(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(0, "k", [pto.Arg.input(x), pto.Arg.output(y)])
    return y


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def run_work(address: str) -> None:
    with pto.Runtime(level="host", platform="sim", broker=address) as rt:
        rt.register("fan", orch=fan, kernels={"k": add_one})
        rt.register("fail", orch=fail_once, kernels={"bad": bad_kernel})
        for _ in range(5):
            rt.run("fan", args={"x": np.ones(4), "n": 10})
        with pytest.raises(pto.TaskError):
            rt.run("fail", args={"x": np.ones(4)})


@pytest.mark.slow
def test_metrics_count_tasks_per_client_and_chip_failures_and_restarts(tmp_path):
    port = free_port()
    b = ExternalBroker(tmp_path, workers=2, args=("--metrics-port", str(port)))
    try:
        before = scrape(port)
        assert value(before, "pto_tasks_submitted_total") == 0
        run_work(b.address)
        # the loop publishes every tick (0.25 s): wait for the run's last counts
        assert wait_until(lambda: value(scrape(port), "pto_tasks_failed_total") == 1, 5)
        m = scrape(port)
        assert value(m, "pto_tasks_submitted_total") == 51
        assert value(m, "pto_tasks_finished_total") == 50
        assert value(m, "pto_chip_tasks_submitted_total", chip="0") == 26
        assert value(m, "pto_chip_tasks_submitted_total", chip="1") == 25
        assert value(m, "pto_chip_tasks_finished_total", chip="0") == 25
        assert value(m, "pto_chip_tasks_failed_total", chip="0") == 1
        assert value(m, "pto_chip_tasks_failed_total", chip="1") == 0
        for chip in ("0", "1", "host"):
            assert value(m, "pto_queue_depth", chip=chip) == 0
            assert value(m, "pto_worker_inflight", chip=chip) == 0
            assert value(m, "pto_worker_restarts_total", chip=chip) == 0
        assert value(m, "pto_task_latency_seconds_count") >= 6  # one per Submit at least
        assert value(m, "pto_broker_loop_seconds_count") > 0
        assert value(m, "pto_clients") == 0  # the client has gone
        assert not any(name.startswith("pto_client_") for name, _ in m)

        status = json.loads(get(f"http://127.0.0.1:{port}/api/status"))
        assert status["totals"] == {"submitted": 51, "done": 50, "failed": 1, "restarts": 0}
        [failure] = status["failures"]
        assert failure["kernel"] == "bad" and failure["chip"] == "0"
        assert "boom: this kernel always fails" in failure["reason"]
        assert status["latency_ms"]["count"] >= 6
        with pytest.raises(urllib.error.HTTPError) as err:
            get(f"http://127.0.0.1:{port}/nothing-here")
        assert err.value.code == 404

        # a worker killed: counted as a restart of its chip, listed with how it died
        worker = next(p for p in b.descendants() if "--device" in " ".join(p.cmdline())
                      and p.cmdline()[p.cmdline().index("--device") + 1] == "1")
        os.kill(worker.pid, signal.SIGKILL)
        assert wait_until(lambda: value(scrape(port), "pto_worker_restarts_total",
                                        chip="1") == 1, 10), b.logtext()
        deaths = json.loads(get(f"http://127.0.0.1:{port}/api/status"))["deaths"]
        assert [(d["chip"], d["pid"]) for d in deaths] == [("1", worker.pid)]
        b.remember()
        wait_until(lambda: len(b.descendants()) >= 3, 10)  # the restarted worker
        b.remember()
    finally:
        b.stop()


def test_client_series_while_a_client_is_connected_and_shm_in_use(tmp_path):
    port = free_port()
    b = ExternalBroker(tmp_path, workers=1, args=("--metrics-port", str(port)))
    try:
        with pto.Runtime(level="host", platform="sim", broker=b.address) as rt:
            rt.register("fan", orch=fan, kernels={"k": add_one})
            rt.register("one", orch=one, kernels={"k": add_one})
            rt.run("fan", args={"x": np.ones(4), "n": 2})
            keep = rt.run("one", args={"x": np.ones(1 << 16)})  # 512 KiB alive while we look
            size = keep.numpy().nbytes
            assert wait_until(lambda: value(scrape(port), "pto_tasks_finished_total") == 3, 5)
            assert wait_until(lambda: value(scrape(port), "pto_shm_bytes") >= size, 5)
            m = scrape(port)
            pid = str(os.getpid())
            [client] = {dict(labels)["client"] for name, labels in m
                        if name == "pto_client_tasks_submitted_total"}
            assert value(m, "pto_client_tasks_submitted_total", client=client, pid=pid) == 3
            assert value(m, "pto_client_tasks_finished_total", client=client, pid=pid) == 3
            assert value(m, "pto_client_tasks_unfinished", client=client, pid=pid) == 0
            assert value(m, "pto_shm_tensors") >= 1
            assert value(m, "pto_clients") == 1
            del keep
    finally:
        b.stop()


def test_embedded_runtime_serves_metrics_on_its_port():
    port = free_port()
    with pto.Runtime(level="host", platform="sim", devices=[0], metrics_port=port) as rt:
        rt.register("fan", orch=fan, kernels={"k": add_one})
        rt.run("fan", args={"x": np.ones(4), "n": 4})
        assert wait_until(lambda: value(scrape(port), "pto_tasks_finished_total") == 4, 5)
        assert b"<title>pto broker</title>" in get(f"http://127.0.0.1:{port}/")
    with pytest.raises(urllib.error.URLError):  # gone with the runtime's broker
        get(f"http://127.0.0.1:{port}/metrics")


def test_bad_metrics_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="metrics_port= is for an embedded broker"):
        pto.Runtime(level="host", platform="sim", broker="ipc:///nonexistent.sock",
                    metrics_port=9400)
    with pytest.raises(ValueError, match="metrics_port must be a port number"):
        pto.Runtime(level="host", platform="sim", metrics_port=-1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "broker", "--metrics-port", "70000"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--metrics-port must be in 0..65535" in bad.stderr
    with socket.socket() as taken:  # a port in use: a plain error, no broker left running
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([sys.executable, "-m", "broker", "--metrics-port",
                               str(taken.getsockname()[1])], capture_output=True, text=True,
                              env=env, timeout=60)
    assert busy.returncode == 1 and "cannot serve metrics on 127.0.0.1:" in busy.stderr


def test_metrics_are_off_by_default_and_prometheus_client_not_loaded():
    code = ("import sys, broker.__main__, broker.server; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr
