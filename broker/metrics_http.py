"""The broker's HTTP endpoint (``--metrics-port``): ``/metrics`` for Prometheus, ``/`` a
live dashboard page and ``/api/status`` the JSON it polls.

Runs on its own threads (``ThreadingHTTPServer``) inside the broker process and reads
only the snapshot the broker loop publishes (``broker.metrics.BrokerMetrics.snapshot``)
plus /dev/shm itself: it never touches the scheduler. Imported only when metrics are on,
so ``prometheus_client`` is loaded only then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pto.wire import shm

from .metrics import BrokerMetrics

log = logging.getLogger("pto.broker")

_SHM_EVERY_S = 1.0  # /dev/shm is scanned at most this often, however often we are asked
_STATIC = {"/": ("dashboard.html", "text/html; charset=utf-8"),
           "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8")}


class ShmScan:
    """Live tensors and bytes of the connected clients in /dev/shm, rescanned at most once
    a second (by whichever HTTP thread asks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at = -math.inf
        self._value = {"tensors": 0, "bytes": 0, "cached_bytes": 0}

    def get(self, owners: list[str]) -> dict[str, int]:
        with self._lock:
            if time.monotonic() - self._at >= _SHM_EVERY_S:
                self._value = _scan(set(owners))
                self._at = time.monotonic()
            return self._value


def _scan(owners: set[str]) -> dict[str, int]:
    tensors = nbytes = cached = 0
    for name in shm.list_names():
        if shm.owner_of(name) not in owners:
            continue
        try:
            size = os.stat(shm.SHM_DIR + name).st_size
        except OSError:
            continue
        if name.startswith("/" + shm.CACHE_PREFIX):
            cached += size
        else:
            tensors += 1
            nbytes += size
    return {"tensors": tensors, "bytes": nbytes, "cached_bytes": cached}


class Collector:
    """prometheus_client collector over the published snapshot."""

    def __init__(self, metrics: BrokerMetrics, scan: ShmScan):
        self.metrics = metrics
        self.scan = scan

    def collect(self) -> Iterator[Metric]:
        snap = self.metrics.snapshot
        clients = snap.get("clients", [])
        for key, what in (("submitted", "submitted"), ("done", "finished"),
                          ("failed", "failed")):
            fam = CounterMetricFamily(f"pto_client_tasks_{what}",
                                      f"Tasks {what} per connected client",
                                      labels=["client", "pid"])
            for c in clients:
                fam.add_metric([str(c["client"]), str(c["pid"])], c[key])
            yield fam
        fam = GaugeMetricFamily("pto_client_tasks_unfinished",
                                "Tasks a client submitted that have not ended",
                                labels=["client", "pid"])
        for c in clients:
            fam.add_metric([str(c["client"]), str(c["pid"])], c["unfinished"])
        yield fam
        totals = snap.get("totals", {})
        for key, what in (("submitted", "submitted"), ("done", "finished"),
                          ("failed", "failed")):
            yield CounterMetricFamily(f"pto_tasks_{what}",
                                      f"Tasks {what}, all clients since the broker started",
                                      value=totals.get(key, 0))
        chip_counts = snap.get("chip_counts", {})
        for key, what, doc in (("submitted", "submitted", "submitted to this chip"),
                               ("done", "finished", "this chip's worker finished"),
                               ("failed", "failed", "this chip's worker reported failed")):
            fam = CounterMetricFamily(f"pto_chip_tasks_{what}", f"Tasks {doc}", labels=["chip"])
            for chip, counts in chip_counts.items():
                fam.add_metric([chip], counts[key])
            yield fam
        fam = GaugeMetricFamily("pto_queue_depth", "Ready tasks waiting for a worker's credit",
                                labels=["chip"])
        for chip, n in snap.get("queues", {}).items():
            fam.add_metric([chip], n)
        yield fam
        chips = snap.get("chips", [])
        inflight = GaugeMetricFamily("pto_worker_inflight",
                                     "Tasks sent to the worker, running or queued there",
                                     labels=["chip"])
        busy = GaugeMetricFamily("pto_worker_busy", "1 while the worker holds tasks",
                                 labels=["chip"])
        for w in chips:
            inflight.add_metric([w["chip"]], w["inflight"])
            busy.add_metric([w["chip"]], int(w["busy"]))
        yield inflight
        yield busy
        restarts = CounterMetricFamily("pto_worker_restarts",
                                       "Workers of this chip that died (the broker restarts "
                                       "those it started)", labels=["chip"])
        counts = {w["chip"]: 0 for w in chips} | snap.get("restarts", {})
        for chip, n in counts.items():
            restarts.add_metric([chip], n)
        yield restarts
        for key, name, doc in (
                ("latency", "pto_task_latency_seconds",
                 "Sampled task latency: the last task of each Submit message, from reaching "
                 "the broker to its result leaving it"),
                ("loop", "pto_broker_loop_seconds",
                 "Work of one broker loop round, the poll's wait excluded")):
            h = snap.get(key)
            if h:
                yield HistogramMetricFamily(
                    name, doc, buckets=[(_le(b), n) for b, n in h["buckets"]],
                    sum_value=h["sum"])
        mem = self.scan.get(snap.get("owners", []))
        yield GaugeMetricFamily("pto_shm_tensors", "Connected clients' tensors in /dev/shm",
                                value=mem["tensors"])
        yield GaugeMetricFamily("pto_shm_bytes", "Bytes of connected clients' tensors in /dev/shm",
                                value=mem["bytes"])
        yield GaugeMetricFamily("pto_shm_cached_bytes",
                                "Bytes of retired segments clients keep for reuse",
                                value=mem["cached_bytes"])
        yield GaugeMetricFamily("pto_clients", "Connected clients", value=len(clients))
        yield GaugeMetricFamily("pto_broker_uptime_seconds", "Seconds since the broker started",
                                value=snap.get("uptime_s", 0.0))


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def status_json(snap: dict[str, Any], mem: dict[str, int]) -> dict[str, Any]:
    """What the dashboard polls: the snapshot, with histograms as a few numbers and the
    shared memory in use."""
    out = {k: v for k, v in snap.items() if k not in ("latency", "loop", "owners")}
    out["shm"] = mem
    for key in ("latency", "loop"):
        h = snap.get(key)
        out[f"{key}_ms"] = None if not h or not h["count"] else {
            "count": h["count"], "mean": 1000 * h["sum"] / h["count"],
            "p50": _quantile(h, 0.5), "p99": _quantile(h, 0.99)}
    return out


def _quantile(h: dict[str, Any], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile ``q`` (None: above every bound)."""
    want = q * h["count"]
    for bound, n in h["buckets"]:
        if n >= want:
            return None if math.isinf(bound) else 1000 * bound
    return None


class MetricsServer:
    """``/metrics``, ``/`` and ``/api/status`` on ``host:port`` (port 0: any free one), on
    daemon threads until ``stop()``."""

    def __init__(self, metrics: BrokerMetrics, host: str = "127.0.0.1", port: int = 0):
        scan = ShmScan()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(metrics, scan))
        pages = {path: (resources.files("broker").joinpath("static", name).read_bytes(), kind)
                 for path, (name, kind) in _STATIC.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/api/status":
                    snap = metrics.snapshot
                    body = status_json(snap, scan.get(snap.get("owners", [])))
                    self._reply(200, json.dumps(body).encode(), "application/json")
                elif path in pages:
                    self._reply(200, *pages[path])
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a dashboard polls several times a second: no log line per request

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="pto-metrics",
                                        daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics, dashboard at http://%s:%d/",
                 host, self.port, host, self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
