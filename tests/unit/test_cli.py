"""The ``pto`` command's pure parts: trace summaries and status tables (no processes)."""

from __future__ import annotations

import json

from pto.tools import cli, render, trace_summary


def x(task, kernel, tid, ts, dur, deps=(), submit=0.0, failure=None, rank=0, world=1):
    args = {"task": task, "rank": rank, "world": world, "bytes": 0, "submit_us": submit,
            "ready_us": submit, "dispatch_us": submit, "deps": list(deps)}
    if failure:
        args["failure"] = failure
    return {"ph": "X", "name": kernel, "cat": "task", "pid": 1, "tid": tid, "ts": ts, "dur": dur,
            "args": args}


def names(*chips):
    return [{"ph": "M", "name": "thread_name", "pid": 1, "tid": c, "args": {"name": f"chip {c}"}}
            for c in chips]


def test_fan_in_critical_path_follows_the_dependency_that_ended_last():
    # a (0..100) and b (0..300) both feed c (310..350); d is independent and ends early
    events = names(0, 1) + [
        x(1, "a", 0, 0, 100), x(2, "b", 1, 0, 300), x(3, "c", 0, 310, 40, deps=[1, 2]),
        x(4, "d", 1, 300, 5),
    ]
    s = trace_summary.summarize_trace(events)
    path = s["critical_path"]
    assert [t["kernel"] for t in path["tasks"]] == ["b", "c"]
    assert path["tasks"][1]["wait_us"] == 10 and path["tasks"][1]["after"] == 2
    assert path["running_us"] == 340 and path["length_us"] == 350
    busy = {t["track"]: t for t in s["tracks"]}
    assert busy["chip 0"]["busy_us"] == 140 and busy["chip 1"]["busy_us"] == 305
    assert busy["chip 1"]["busy_pct"] == round(100 * 305 / 350, 1)
    assert [k["kernel"] for k in s["top_kernels"]] == ["b", "a", "c", "d"]


def test_groups_count_once_per_task_and_overlaps_once_per_track():
    events = names(0, 1) + [
        x(1, "g", 0, 0, 50, rank=0, world=2), x(1, "g", 1, 10, 50, rank=1, world=2),
        x(2, "h", 1, 65, 10, deps=[1]),
    ]
    s = trace_summary.summarize_trace(events)
    assert s["tasks"] == 2 and s["slices"] == 3
    assert [t["kernel"] for t in s["critical_path"]["tasks"]] == ["g", "h"]
    assert s["critical_path"]["tasks"][0]["track"] == "chip 0, chip 1"
    assert s["top_kernels"][0] == {"kernel": "g", "calls": 2, "total_us": 100.0,
                                   "max_us": 50.0, "mean_us": 50.0}
    assert trace_summary._union([(0, 10), (5, 20), (30, 40)]) == 30


def test_failures_and_tasks_that_never_ran_are_listed():
    events = names(0) + [
        x(1, "boom", 0, 0, 10, failure="RuntimeError: boom\nkernel traceback ..."),
        {"ph": "i", "s": "g", "name": "after (not run)", "pid": 1, "tid": 0, "ts": 1,
         "args": {"task": 2, "failure": "not run: task 1 (kernel 'boom' on chip 0) failed"}},
    ]
    s = trace_summary.summarize_trace(events)
    assert [(f["task"], f["kernel"], f["ran"]) for f in s["failures"]] == [
        (1, "boom", True), (2, "after", False)]
    text = trace_summary.format_summary(s, "t.json")
    assert "failures: 2 task(s) (1 failed running, 1 not run)" in text
    assert "RuntimeError: boom" in text and "kernel traceback" not in text


def test_an_empty_trace_says_so():
    empty = trace_summary.summarize_trace([])
    assert trace_summary.format_summary(empty, "e.json") == "e.json: no tasks"


def test_trace_summarize_reads_a_bare_event_list(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(names(0) + [x(1, "k", 0, 0, 10)]))
    assert cli.main(["trace", "summarize", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 1
    path.write_text(json.dumps({"nothing": 1}))
    assert cli.main(["trace", "summarize", str(path)]) == 1
    assert "no traceEvents" in capsys.readouterr().err


def test_status_table_renders_every_section():
    st = {"address": "ipc:///tmp/b.sock", "pid": 42, "uptime_s": 3725.0, "devices": [0, 1],
          "workers": [{"chip": 0, "pid": 7, "state": "busy", "running": "mm", "inflight": 3,
                       "done": 10, "failed": 1},
                      {"chip": "host", "pid": 9, "state": "idle", "running": None,
                       "inflight": 0, "done": 0, "failed": 0}],
          "clients": [{"client": 1, "pid": 99, "owner": "99xab", "tasks": 4}],
          "queues": {"0": 5, "1": 0, "host": 0}, "shm_bytes": 3 * 1024 * 1024}
    lines = cli.format_status(st).splitlines()
    assert lines[0] == "broker   ipc:///tmp/b.sock  pid 42  up 1h02m"
    assert lines[1] == "devices  0, 1"
    assert lines[2] == "shm      3.0 MiB live in clients' tensors"
    assert "CHIP  PID  STATE  RUNNING  INFLIGHT  DONE  FAILED" in lines
    assert "0     7    busy   mm       3         10    1" in lines
    assert "host  9    idle   -        0         0     0" in lines
    assert "0      5" in lines and "CLIENT  PID  OWNER  UNFINISHED TASKS" in lines
    empty = cli.format_status({"workers": [], "clients": [], "queues": {}})
    assert "no workers connected" in empty and "no clients connected" in empty


def test_units():
    assert [render.duration(s) for s in (5, 65, 3600 * 5 + 60, 86400 * 2 + 3600)] == [
        "5.0s", "1m05s", "5h01m", "2d01h"]
    assert [render.nbytes(n) for n in (0, 1023, 2048, 5 * 2**30)] == [
        "0 B", "1023 B", "2.0 KiB", "5.0 GiB"]
    assert [render.us(u) for u in (12.34, 4500, 2.5e6)] == ["12.3 us", "4.5 ms", "2.50 s"]
