"""One Chrome trace-event JSON (Perfetto) for a cluster runtime.

Layout: process 0 is the driver (a track of L4 runs, one of L3 submits); process
``h + 1`` is host ``h``, holding an "L3 runs" track, a "transfers in" track (each
cross-host pull: source host, bytes, its time from request to the last byte) and that
host's per-chip tracks exactly as its L3 runtime traced them (pto/host/trace.py). Runs and
transfers overlap, so they are async slices (``b``/``e``). Each host's times are its
``time.monotonic()`` shifted to wall-clock time with the offset it reports; everything is
then relative to the first event.
"""

from __future__ import annotations

import json
import threading
from typing import Any

_RUNS_TID, _TRANSFERS_TID = 0, 999
_FLOW_IDS_PER_HOST = 10_000_000


class ClusterTrace:
    """The driver's part of the trace (L4 runs) and the gathering of the hosts' parts."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._l4: list[tuple[str, float, float, str | None]] = []
        self._submits: list[tuple[int, int, str, float]] = []

    def submitted(self, run_id: int, host: int, entry: str, t: float) -> None:
        """An L3 run was sent to ``host`` at wall-clock time ``t`` (the host records when
        it ran)."""
        with self._lock:
            self._submits.append((run_id, host, entry, t))

    def l4_run(self, name: str, start: float, end: float, error: BaseException | None) -> None:
        with self._lock:
            self._l4.append((name, start, end, None if error is None else
                             f"{type(error).__name__}: {error}"))

    def write(self, actors: list[Any], nodes: list[Any], timeout: float,
              path: str | None = None) -> str:
        """Gather every reachable host's records and write the file; returns its path."""
        import ray

        hosts = []
        for host, actor in enumerate(actors):
            try:
                hosts.append(ray.get(actor.trace.remote(), timeout=timeout))
            except ray.exceptions.RayError as exc:  # a lost host: its part is gone with it
                hosts.append({"host": host, "lost": f"{type(exc).__name__}"})
        with self._lock:
            l4, submits = list(self._l4), list(self._submits)
        events = build_events(l4, hosts, [f"{n.ip} {n.node_id[:8]}" for n in nodes], submits)
        path = path or self.path
        with open(path, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        return path


def build_events(l4: list[tuple[str, float, float, str | None]], hosts: list[dict[str, Any]],
                 node_names: list[str], submits: list[tuple[int, int, str, float]] = ()
                 ) -> list[dict[str, Any]]:
    """The trace events for the driver's L4 runs and L3 submits and each host's records
    (times in wall-clock seconds)."""
    events: list[dict[str, Any]] = [_meta("process_name", 0, None, "pto driver (L4)"),
                                    _meta("thread_name", 0, 1, "L4 runs"),
                                    _meta("thread_name", 0, 2, "L3 submits")]
    for i, (name, start, end, error) in enumerate(l4):
        args = {"error": error} if error else {}
        events += _async(name, "l4run", i + 1, 0, 1, start * 1e6, end * 1e6, args)
    for run_id, host, entry, t in submits:
        events.append({"ph": "i", "s": "t", "name": f"{entry} -> host {host}", "cat": "submit",
                       "pid": 0, "tid": 2, "ts": t * 1e6, "args": {"run": run_id}})
    for rec in hosts:
        host = rec["host"]
        pid = host + 1
        where = node_names[host] if host < len(node_names) else ""
        label = f"host {host} ({where})" + (f" lost: {rec['lost']}" if "lost" in rec else "")
        events += [_meta("process_name", pid, None, label),
                   _meta("process_sort_index", pid, None, pid),
                   _meta("thread_name", pid, _RUNS_TID, "L3 runs"),
                   _meta("thread_name", pid, _TRANSFERS_TID, "transfers in")]
        if "lost" in rec:
            continue
        shift = rec["offset"] * 1e6
        for run in rec["runs"]:
            args = {"run": run["run"]} | ({"error": run["error"]} if run["error"] else {})
            events += _async(run["entry"], "l3run", run["run"], pid, _RUNS_TID,
                             run["start"] * 1e6 + shift, run["end"] * 1e6 + shift, args)
        for n, t in enumerate(rec["transfers"]):
            end = t["fetched"]
            args = {"from_host": t["from"], "bytes": t["bytes"], "run": t["run"],
                    "pull_us": round((end - t["start"]) * 1e6, 1)}
            events += _async(f"from host {t['from']}: {t['bytes']} B", "transfer",
                             host * _FLOW_IDS_PER_HOST + n + 1, pid, _TRANSFERS_TID,
                             t["start"] * 1e6 + shift, end * 1e6 + shift, args)
        for ev in rec["chips"]:
            if ev.get("ph") == "M" and ev.get("name") == "process_name":
                continue  # the host's process carries the name
            ev = dict(ev, pid=pid)
            if "ts" in ev:
                ev["ts"] = ev["ts"] + shift
            if ev.get("ph") in ("s", "f"):
                ev["id"] = host * _FLOW_IDS_PER_HOST + ev["id"]
            events.append(ev)
    times = [ev["ts"] for ev in events if "ts" in ev]
    base = min(times) if times else 0.0
    for ev in events:
        if "ts" in ev:
            ev["ts"] = round(ev["ts"] - base, 3)
    return events


def _meta(kind: str, pid: int, tid: int | None, value: Any) -> dict[str, Any]:
    key = "sort_index" if kind.endswith("sort_index") else "name"
    ev = {"ph": "M", "name": kind, "pid": pid, "args": {key: value}}
    if tid is not None:
        ev["tid"] = tid
    return ev


def _async(name: str, cat: str, ident: int, pid: int, tid: int, start_us: float,
           end_us: float, args: dict[str, Any]) -> list[dict[str, Any]]:
    common = {"name": name, "cat": cat, "id": ident, "pid": pid, "tid": tid}
    return [dict(common, ph="b", ts=start_us, args=args),
            dict(common, ph="e", ts=max(end_us, start_us + 0.001))]
