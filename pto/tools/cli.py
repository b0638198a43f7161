"""The ``pto`` command: ``pto status``, ``pto trace summarize FILE``, ``pto keygen DIR``.

    pto status [--broker ADDR] [--json] [--timeout S]   what a broker is doing
    pto status --cluster ADDRESS [--json]               a Ray cluster's pto hosts (L4)
    pto trace summarize run.json [--top N] [--json]     busy %, critical path, top kernels
    pto keygen DIR [--force]                            CURVE keys for a tcp broker

Exit status: 0 on success, 1 when the command could not do its job (no broker answered,
unreadable trace, keys already there), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..wire import config
from ..wire.errors import BrokerLost


class _Failed(Exception):
    """A command could not do its job: the message is printed, the exit status is 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (_Failed, config.ConfigError) as exc:
        print(f"pto {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pto status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pto", description="Inspect and operate pto brokers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="what a broker is doing: workers, clients, queues, shm",
                       description="Ask a running broker for its workers, clients, queue "
                       "depths, live shared memory and uptime.")
    p.add_argument("--broker", metavar="ADDR",
                   help="the broker's client address (default: $PTO_BROKER)")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=_positive, default=2.0, metavar="S",
                   help="seconds to wait for an answer (default 2)")
    p.add_argument("--curve", metavar="DIR",
                   help="CURVE keys for a tcp broker (default: $PTO_CURVE_DIR)")
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="a Ray cluster's address: list its pto hosts, chips and L3 runs")
    p.set_defaults(func=_cmd_status)

    t = sub.add_parser("trace", help="work with trace files (Runtime(trace=...), PTO_TRACE)")
    tsub = t.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    s = tsub.add_parser("summarize", help="per-chip busy %%, critical path, top kernels, failures",
                        description="Summarize a Chrome trace-event JSON file written by "
                        "pto.Runtime(trace=...).")
    s.add_argument("file", help="the trace file (JSON)")
    s.add_argument("--top", type=int, default=10, metavar="N",
                   help="kernels and failures to list (default 10)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_cmd_trace_summarize)

    k = sub.add_parser("keygen", help="create CURVE keys for a tcp broker and its clients",
                       description="Create DIR/broker.key(_secret), DIR/client.key(_secret) and "
                       "DIR/authorized/client.key. DIR is mode 0700, secret files 0600.")
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--force", action="store_true", help="replace keys already in DIR")
    k.set_defaults(func=_cmd_keygen)
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


# ---- status ------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    import zmq

    from .status import status

    if args.cluster:
        return _cmd_cluster_status(args)
    settings = config.load()
    address = args.broker or settings.broker
    if not address:
        raise _Failed("no broker address: pass --broker ADDR or set PTO_BROKER")
    try:
        st = status(address, timeout=args.timeout, curve=args.curve or settings.curve_dir)
    except BrokerLost as exc:
        hint = ""
        if address.startswith("tcp://") and not (args.curve or settings.curve_dir):
            hint = " (a tcp broker started with --curve needs --curve DIR or PTO_CURVE_DIR)"
        raise _Failed(f"{exc}{hint}") from None
    except (zmq.ZMQError, OSError, ValueError) as exc:
        raise _Failed(f"cannot ask the broker at {address}: {exc}") from None
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


def _cmd_cluster_status(args: argparse.Namespace) -> int:
    from ..cluster.status import cluster_status, format_cluster_status
    from ..wire.errors import PtoError

    try:
        st = cluster_status(args.cluster, timeout=args.timeout)
    except PtoError as exc:
        raise _Failed(str(exc)) from None
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else format_cluster_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    """A broker status (``pto.status()``) as the tables ``pto status`` prints."""
    lines = [
        f"broker   {st.get('address', '?')}  pid {st.get('pid', '?')}  "
        f"up {_duration(st.get('uptime_s', 0.0))}",
        f"devices  {', '.join(map(str, st.get('devices', []))) or 'none'}",
        f"shm      {_bytes(st.get('shm_bytes', 0))} live in clients' tensors",
        "",
    ]
    workers = st.get("workers", [])
    if workers:
        lines += _table(["CHIP", "PID", "STATE", "RUNNING", "INFLIGHT", "DONE", "FAILED"],
                        [[w.get("chip"), w.get("pid"), w.get("state"), w.get("running"),
                          w.get("inflight"), w.get("done"), w.get("failed")] for w in workers])
    else:
        lines.append("no workers connected")
    lines.append("")
    queues = st.get("queues", {})
    if queues:
        lines += _table(["QUEUE", "READY TASKS"], [[q, n] for q, n in queues.items()])
        lines.append("")
    clients = st.get("clients", [])
    if clients:
        lines += _table(["CLIENT", "PID", "OWNER", "UNFINISHED TASKS"],
                        [[c.get("client"), c.get("pid"), c.get("owner"), c.get("tasks")]
                         for c in clients])
    else:
        lines.append("no clients connected")
    graphs = st.get("graphs", [])
    if graphs:
        lines.append("")
        lines += _table(["GRAPH", "CLIENT", "NAME", "TASKS", "CHIPS", "REPLAYS", "FAILED",
                         "QUEUED"],
                        [[g.get("graph"), g.get("client"), g.get("name"), g.get("tasks"),
                          ",".join(map(str, g.get("chips", []))), g.get("replays"),
                          g.get("failed"), g.get("queued")] for g in graphs])
    return "\n".join(lines)


# ---- trace summarize ---------------------------------------------------------------------


def _cmd_trace_summarize(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise _Failed("--top must be >= 1")
    try:
        with open(args.file) as f:
            data = json.load(f)
    except OSError as exc:
        raise _Failed(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Failed(f"{args.file} is not JSON: {exc}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise _Failed(f"{args.file} is not a Chrome trace (no traceEvents list)")
    summary = summarize_trace(events, top=args.top)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, args.file, top=args.top))
    return 0


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
             f"{len(summary['tracks'])} track(s) over {_us(summary['span_us'])}", ""]
    if summary["tracks"]:
        lines += _table(["TRACK", "SLICES", "BUSY", "BUSY %"],
                        [[t["track"], t["slices"], _us(t["busy_us"]), f"{t['busy_pct']:.1f}%"]
                         for t in summary["tracks"]])
        lines.append("")
    path = summary["critical_path"]
    if path["tasks"]:
        lines.append(f"critical path: {len(path['tasks'])} task(s), {_us(path['length_us'])} "
                     f"({_us(path['running_us'])} running, {_us(path['waiting_us'])} waiting)")
        lines += _table(["TASK", "KERNEL", "TRACK", "WAITED", "AFTER", "RAN"],
                        [[s["task"], s["kernel"], s["track"], _us(s["wait_us"]),
                          s["after"] if s["after"] == "submit" else f"task {s['after']}",
                          _us(s["run_us"])] for s in path["tasks"]])
        lines.append("")
    if summary["top_kernels"]:
        lines.append("top kernels by total time")
        lines += _table(["KERNEL", "CALLS", "TOTAL", "MEAN", "MAX"],
                        [[k["kernel"], k["calls"], _us(k["total_us"]), _us(k["mean_us"]),
                          _us(k["max_us"])] for k in summary["top_kernels"]])
        lines.append("")
    failures = summary["failures"]
    ran = sum(f["ran"] for f in failures)
    if failures:
        lines.append(f"failures: {len(failures)} task(s) ({ran} failed running, "
                     f"{len(failures) - ran} not run)")
        shown = failures[:top]
        lines += _table(["TASK", "KERNEL", "TRACK", "REASON"],
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


# ---- keygen ------------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ..wire.security import keygen

    directory = os.path.abspath(args.dir)
    try:
        keygen(directory, force=args.force)
    except FileExistsError as exc:
        raise _Failed(str(exc)) from None
    except OSError as exc:
        raise _Failed(f"cannot write keys in {directory}: {exc}") from None
    print(f"wrote CURVE keys in {directory} (mode 0700; *.key_secret files 0600):\n"
          f"  broker.key, broker.key_secret   the broker's certificate\n"
          f"  client.key, client.key_secret   what clients and workers present\n"
          f"  authorized/client.key           the certificates the broker accepts\n"
          f"start a broker:  python -m broker --listen tcp://127.0.0.1:5555 --curve {directory}\n"
          f"connect:         PTO_CURVE_DIR={directory} (or Runtime(curve=...), "
          f"pto status --curve ...)")
    return 0


# ---- rendering ---------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns separated by two spaces; None shows as '-'."""
    cells = [[str(h) for h in headers]]
    cells += [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _duration(seconds: float) -> str:
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _us(us: float) -> str:
    us = float(us)
    if us < 1000:
        return f"{us:.1f} us"
    if us < 1e6:
        return f"{us / 1e3:.1f} ms"
    return f"{us / 1e6:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
