"""``pto trace summarize``'s analysis of a Chrome trace written by ``Runtime(trace=...)``:
per-track busy time, the critical path, the top kernels and the failures."""

from __future__ import annotations

from typing import Any

from .render import table, us


def summarize_trace(events: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """Per-track busy time, the critical path, the top kernels and the failures of a trace.

    The critical path ends at the task that finished last and walks back, at each step, to
    the dependency that finished last (the one the task waited for): a chain of task
    durations and the waits between them that accounts for the end of the run.
    """
    events = [e for e in events if isinstance(e, dict)]
    names: dict[int, str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[e.get("tid")] = str((e.get("args") or {}).get("name", e.get("tid")))

    def track(tid: Any) -> str:
        return names.get(tid, f"track {tid}")

    slices = [e for e in events if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float))
              and e.get("cat") != "launch"]  # launches nest inside their task's slice
    tasks: dict[Any, dict[str, Any]] = {}
    for n, e in enumerate(slices):
        a = e.get("args") or {}
        key = a.get("task", f"slice{n}")
        start, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        t = tasks.setdefault(key, {"task": key, "kernel": e.get("name", "?"), "tracks": [],
                                   "start": start, "end": end, "submit": a.get("submit_us"),
                                   "deps": [], "failure": None})
        t["tracks"].append(track(e.get("tid")))
        t["start"], t["end"] = min(t["start"], start), max(t["end"], end)
        t["deps"] = sorted(set(t["deps"]) | set(a.get("deps") or []))
        t["failure"] = t["failure"] or a.get("failure")

    # busy time per track: the union of its slices
    per_track: dict[Any, list[tuple[float, float]]] = {}
    for e in slices:
        per_track.setdefault(e.get("tid"), []).append(
            (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))))
    t0 = min((s for iv in per_track.values() for s, _ in iv), default=0.0)
    t1 = max((x for iv in per_track.values() for _, x in iv), default=0.0)
    span = t1 - t0
    busy = []
    order = sorted(per_track, key=lambda x: (0, x, "") if isinstance(x, int) else (1, 0, str(x)))
    for tid in order:
        total = _union(per_track[tid])
        busy.append({"track": track(tid), "tid": tid, "slices": len(per_track[tid]),
                     "busy_us": round(total, 3),
                     "busy_pct": round(100.0 * total / span, 1) if span > 0 else 0.0})

    path = _critical_path(tasks)
    kernels: dict[str, dict[str, Any]] = {}
    for e in slices:
        k = kernels.setdefault(e.get("name", "?"), {"kernel": e.get("name", "?"), "calls": 0,
                                                    "total_us": 0.0, "max_us": 0.0})
        dur = float(e.get("dur", 0.0))
        k["calls"] += 1
        k["total_us"] += dur
        k["max_us"] = max(k["max_us"], dur)
    top_kernels = sorted(kernels.values(), key=lambda k: -k["total_us"])[:top]
    for k in top_kernels:
        k["mean_us"] = round(k["total_us"] / k["calls"], 3)
        k["total_us"], k["max_us"] = round(k["total_us"], 3), round(k["max_us"], 3)

    failures = [{"task": t["task"], "kernel": t["kernel"], "track": ", ".join(t["tracks"]),
                 "ran": True, "reason": t["failure"]} for t in tasks.values() if t["failure"]]
    for e in events:  # tasks that never ran: instant marks
        a = e.get("args") or {}
        if e.get("ph") in ("i", "I") and a.get("failure") and a.get("task") not in tasks:
            failures.append({"task": a.get("task"), "kernel": str(e.get("name", "?")).removesuffix(
                " (not run)"), "track": "-", "ran": False, "reason": a["failure"]})
    return {
        "tasks": len(tasks), "slices": len(slices), "span_us": round(span, 3),
        "tracks": busy, "critical_path": path, "top_kernels": top_kernels,
        "failures": failures,
    }


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _critical_path(tasks: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if not tasks:
        return {"tasks": [], "length_us": 0.0, "running_us": 0.0, "waiting_us": 0.0}
    last = max(tasks.values(), key=lambda t: t["end"])
    chain = [last]
    seen = {last["task"]}
    while True:
        deps = [tasks[d] for d in chain[-1]["deps"] if d in tasks and d not in seen]
        if not deps:
            break
        pred = max(deps, key=lambda t: t["end"])
        chain.append(pred)
        seen.add(pred["task"])
    chain.reverse()
    steps = []
    for i, t in enumerate(chain):
        if i == 0:
            since = t["submit"] if isinstance(t["submit"], (int, float)) else t["start"]
            after = "submit"
        else:
            since, after = chain[i - 1]["end"], chain[i - 1]["task"]
        steps.append({"task": t["task"], "kernel": t["kernel"], "track": ", ".join(t["tracks"]),
                      "wait_us": round(max(t["start"] - since, 0.0), 3), "after": after,
                      "run_us": round(t["end"] - t["start"], 3)})
    running = sum(s["run_us"] for s in steps)
    waiting = sum(s["wait_us"] for s in steps)
    return {"tasks": steps, "length_us": round(running + waiting, 3),
            "running_us": round(running, 3), "waiting_us": round(waiting, 3)}


def format_summary(summary: dict[str, Any], name: str = "trace", top: int = 10) -> str:
    """``summarize_trace``'s result as the text ``pto trace summarize`` prints."""
    if not summary["slices"] and not summary["failures"]:
        return f"{name}: no tasks"
    lines = [f"{name}: {summary['tasks']} task(s), {summary['slices']} slice(s) on "
             f"{len(summary['tracks'])} track(s) over {us(summary['span_us'])}", ""]
    if summary["tracks"]:
        lines += table(["TRACK", "SLICES", "BUSY", "BUSY %"],
                        [[t["track"], t["slices"], us(t["busy_us"]), f"{t['busy_pct']:.1f}%"]
                         for t in summary["tracks"]])
        lines.append("")
    path = summary["critical_path"]
    if path["tasks"]:
        lines.append(f"critical path: {len(path['tasks'])} task(s), {us(path['length_us'])} "
                     f"({us(path['running_us'])} running, {us(path['waiting_us'])} waiting)")
        lines += table(["TASK", "KERNEL", "TRACK", "WAITED", "AFTER", "RAN"],
                        [[s["task"], s["kernel"], s["track"], us(s["wait_us"]),
                          s["after"] if s["after"] == "submit" else f"task {s['after']}",
                          us(s["run_us"])] for s in path["tasks"]])
        lines.append("")
    if summary["top_kernels"]:
        lines.append("top kernels by total time")
        lines += table(["KERNEL", "CALLS", "TOTAL", "MEAN", "MAX"],
                        [[k["kernel"], k["calls"], us(k["total_us"]), us(k["mean_us"]),
                          us(k["max_us"])] for k in summary["top_kernels"]])
        lines.append("")
    failures = summary["failures"]
    ran = sum(f["ran"] for f in failures)
    if failures:
        lines.append(f"failures: {len(failures)} task(s) ({ran} failed running, "
                     f"{len(failures) - ran} not run)")
        shown = failures[:top]
        lines += table(["TASK", "KERNEL", "TRACK", "REASON"],
                        [[f["task"], f["kernel"], f["track"],
                          _first_line(f["reason"])] for f in shown])
        if len(failures) > len(shown):
            lines.append(f"... and {len(failures) - len(shown)} more")
    else:
        lines.append("failures: none")
    return "\n".join(lines).rstrip()


def _first_line(text: Any, width: int = 100) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."
