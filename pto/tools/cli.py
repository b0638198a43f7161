"""The ``pto`` command: ``pto status``, ``pto trace summarize FILE``, ``pto keygen DIR``,
``pto clean``.

    pto status [--broker ADDR] [--json] [--timeout S]   what a broker is doing
    pto status --cluster ADDRESS [--json]               a Ray cluster's pto hosts (L4)
    pto trace summarize run.json [--top N] [--json]     busy %, critical path, top kernels
    pto keygen DIR [--force]                            CURVE keys for a tcp broker
    pto clean [--dry-run]                               remove what killed pto processes left

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
from .render import duration, nbytes, table


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

    c = sub.add_parser("clean", help="remove what killed pto processes left in /dev/shm",
                       description="Remove this user's pto shared-memory segments and "
                       "semaphores whose owning process is gone, and stale broker sockets in "
                       "the runtime directory (what a broker's start-up janitor does). Another "
                       "user's files and a live process's are never touched.")
    c.add_argument("--dry-run", action="store_true", help="list what would be removed")
    c.set_defaults(func=_cmd_clean)
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
        f"up {duration(st.get('uptime_s', 0.0))}",
        f"devices  {', '.join(map(str, st.get('devices', []))) or 'none'}",
        f"shm      {nbytes(st.get('shm_bytes', 0))} live in clients' tensors",
        "",
    ]
    workers = st.get("workers", [])
    if workers:
        lines += table(["CHIP", "PID", "STATE", "RUNNING", "INFLIGHT", "DONE", "FAILED"],
                        [[w.get("chip"), w.get("pid"), w.get("state"), w.get("running"),
                          w.get("inflight"), w.get("done"), w.get("failed")] for w in workers])
    else:
        lines.append("no workers connected")
    lines.append("")
    queues = st.get("queues", {})
    if queues:
        lines += table(["QUEUE", "READY TASKS"], [[q, n] for q, n in queues.items()])
        lines.append("")
    clients = st.get("clients", [])
    if clients:
        lines += table(["CLIENT", "PID", "OWNER", "UNFINISHED TASKS"],
                        [[c.get("client"), c.get("pid"), c.get("owner"), c.get("tasks")]
                         for c in clients])
    else:
        lines.append("no clients connected")
    graphs = st.get("graphs", [])
    if graphs:
        lines.append("")
        lines += table(["GRAPH", "CLIENT", "NAME", "TASKS", "CHIPS", "REPLAYS", "FAILED",
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
    from .trace_summary import format_summary, summarize_trace

    summary = summarize_trace(events, top=args.top)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, args.file, top=args.top))
    return 0


# ---- clean -------------------------------------------------------------------------------


def _cmd_clean(args: argparse.Namespace) -> int:
    from ..wire import shm
    from ..wire.procs import runtime_dir
    from ..wire.sockets import stale_endpoints

    found = [(os.path.join(shm.SHM_DIR, f), f) for f in shm.dead_leftovers()]
    sockets = stale_endpoints(runtime_dir(config.load().runtime_dir))
    removed = 0
    for path, name in found:
        if args.dry_run or shm.remove_file(name):
            print(f"{'would remove' if args.dry_run else 'removed'} {path}")
            removed += 1
    for path in sockets:
        if not args.dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
        print(f"{'would remove' if args.dry_run else 'removed'} {path}")
        removed += 1
    print(f"{removed} file(s) of dead pto processes {'to remove' if args.dry_run else 'removed'}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
