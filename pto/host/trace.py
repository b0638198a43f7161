"""Task traces as Chrome trace-event JSON (opens in Perfetto UI or chrome://tracing).

One track per chip (and one for host sub-tasks), one slice per task member from its
start to its end (holding one slice per launch when it ran a package's orchestration),
flow arrows from each task to the tasks that waited for it, and the submit/ready/dispatch
times, kernel, group, bytes touched and any failure in each slice's arguments. Times come
from ``time.monotonic()``, one clock for every process of a host.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..wire import protocol as P
from ..wire.chips import chip_label, host_index, is_host_chip


@dataclass
class _Submitted:
    kernel: str
    chips: list[int]
    nbytes: int
    submit: float
    failure: str | None = None
    members: list[P.TaskTime] = field(default_factory=list)


class TraceRecorder:
    """Collects what a runtime's tasks did; ``write`` turns it into a trace file."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._tasks: dict[int, _Submitted] = {}
        self._replays: list[tuple[str, list[str], P.GraphResult, float]] = []

    def submitted(self, task: int, kernel: str, chips: list[int], nbytes: int, t: float) -> None:
        with self._lock:
            self._tasks[task] = _Submitted(kernel, chips, nbytes, t)

    def results(self, msg: P.Results) -> None:
        with self._lock:
            for t in msg.times:
                rec = self._tasks.get(t.task)
                if rec is not None:
                    rec.members.append(t)
            for f in msg.failed:
                rec = self._tasks.get(f.task)
                if rec is not None:
                    rec.failure = f.reason

    def graph_replay(self, name: str, kernels: list[str], msg: P.GraphResult) -> None:
        """A replay of captured graph ``name`` ended (``kernels``: each task's kernel)."""
        ended = time.monotonic()
        with self._lock:
            self._replays.append((name, kernels, msg, ended))

    def _replay_events(self, tracks: set[int]) -> list[dict[str, Any]]:
        """One slice per replay on the "graphs" track; its tasks on their chips' tracks."""
        events: list[dict[str, Any]] = []
        with self._lock:
            replays = list(self._replays)
        for name, kernels, msg, ended in replays:
            events.append({"ph": "X", "name": f"graph {name}", "cat": "graph", "pid": 1,
                           "tid": _GRAPHS_TRACK, "ts": _us(msg.started),
                           "dur": max(_us(ended) - _us(msg.started), 0.001),
                           "args": {"replay": msg.replay, "tasks": len(kernels),
                                    "failed": len(msg.failed)}})
            for index, rank, chip, start, end in msg.times:
                tracks.add(chip)
                events.append({"ph": "X", "name": kernels[index], "cat": "graph-task",
                               "pid": 1, "tid": _track(chip), "ts": _us(start),
                               "dur": max(_us(end) - _us(start), 0.001),
                               "args": {"graph": name, "replay": msg.replay, "task": index,
                                        "rank": rank}})
        if replays:
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": _GRAPHS_TRACK,
                           "args": {"name": "graphs"}})
        return events

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            tasks = dict(self._tasks)
        events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "pto"}}]
        tracks: set[int] = set()
        ends: dict[int, tuple[int, float]] = {}  # task -> (track, end) of its last member
        for task, rec in tasks.items():
            for m in rec.members:
                tracks.add(m.chip)
                args = {"task": task, "rank": m.rank, "world": len(rec.chips),
                        "bytes": rec.nbytes, "submit_us": _us(rec.submit),
                        "ready_us": _us(m.ready), "dispatch_us": _us(m.dispatch),
                        "deps": m.deps}
                if len(rec.chips) > 1:
                    args["group"] = rec.chips
                if rec.failure:
                    args["failure"] = rec.failure
                events.append({"ph": "X", "name": rec.kernel, "cat": "task", "pid": 1,
                               "tid": _track(m.chip), "ts": _us(m.start),
                               "dur": max(_us(m.end) - _us(m.start), 0.001), "args": args})
                events += _launch_events(task, m)
                if task not in ends or ends[task][1] < m.end:
                    ends[task] = (m.chip, m.end)
            if rec.failure and not rec.members:  # never ran: a mark where it was submitted
                events.append({"ph": "i", "s": "g", "name": f"{rec.kernel} (not run)",
                               "pid": 1, "tid": _track(rec.chips[0]), "ts": _us(rec.submit),
                               "args": {"task": task, "failure": rec.failure}})
        events += self._replay_events(tracks)
        flow = 0
        for rec in tasks.values():
            for m in rec.members:
                for dep in m.deps:
                    if dep not in ends:
                        continue
                    flow += 1
                    chip, end = ends[dep]
                    events.append({"ph": "s", "id": flow, "name": "dep", "cat": "dep", "pid": 1,
                                   "tid": _track(chip), "ts": _us(end)})
                    events.append({"ph": "f", "bp": "e", "id": flow, "name": "dep", "cat": "dep",
                                   "pid": 1, "tid": _track(m.chip), "ts": _us(m.start)})
        for chip in sorted(tracks):
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": _track(chip),
                           "args": {"name": chip_label(chip)}})
        return events

    def write(self, path: str | None = None) -> str:
        path = path or self.path
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events(), "displayTimeUnit": "ms"}, f)
        return path


def _launch_events(task: int, member: P.TaskTime) -> list[dict[str, Any]]:
    """A compiled orchestration's launches, as slices nested in its task's slice."""
    return [{"ph": "X", "name": launch.kernel, "cat": "launch", "pid": 1,
             "tid": _track(member.chip), "ts": _us(launch.start),
             "dur": max(_us(launch.end) - _us(launch.start), 0.001),
             "args": {"task": task, "rank": member.rank, "block_dim": launch.block_dim,
                      "rc": launch.rc}}
            for launch in member.launches]


_GRAPHS_TRACK = 2001  # replays of captured graphs


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 3)


def _track(chip: int) -> int:
    # Track ids from 1 (some Perfetto versions merge track 0 into 1); host workers last.
    return 1001 + host_index(chip) if is_host_chip(chip) else chip + 1
