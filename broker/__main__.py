"""python -m broker: run a pto broker (and optionally its workers) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from pto.wire import config
from pto.wire import protocol as P
from pto.wire.procs import parent_gone, runtime_dir, setup_logging

from .supervisor import Supervisor


def default_address(cfg: config.Config) -> str:
    return f"ipc://{runtime_dir(cfg.runtime_dir)}/broker-{os.getpid()}.sock"


def parse_devices(text: str) -> list[int]:
    try:
        devices = sorted({int(d) for d in text.split(",") if d.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"devices must be integers like 0,1,2: {text!r}") from None
    if any(d < 0 for d in devices):
        raise argparse.ArgumentTypeError("device ids must be >= 0")
    return devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    parser.add_argument("--listen", help="client address, ipc://PATH or tcp://HOST:PORT "
                        "(default: ipc in the per-user runtime dir); workers use PATH.w / PORT+1")
    parser.add_argument("--workers", type=int, default=0, help="start N workers, devices 0..N-1")
    parser.add_argument("--devices", type=parse_devices, help="start workers for these devices")
    parser.add_argument("--heartbeat", type=float, default=P.HEARTBEAT_S,
                        help="seconds between heartbeats")
    parser.add_argument("--liveness", type=int, default=P.LIVENESS,
                        help="missed heartbeats = dead peer")
    parser.add_argument("--credit", type=int, default=512, help="tasks in flight per worker")
    parser.add_argument("--host-workers", type=int, default=1,
                        help="processes that run host sub-tasks (ctx.submit_host), with workers")
    parser.add_argument("--transition-log", type=int, default=1000, metavar="N",
                        help="keep the last N task state moves for `pto status --json` and "
                        "error messages (0: none)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help="write broker and worker logs here")
    parser.add_argument("--curve", metavar="DIR", help="require CURVE keys from `pto keygen DIR` "
                        "(needed for tcp:// unless --insecure)")
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help="serve Prometheus /metrics and a live dashboard (/) on port N "
                        "(0: any free port, logged)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                        help="interface for --metrics-port (default 127.0.0.1)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow tcp:// without CURVE: any local user could run code on workers")
    args = parser.parse_args(argv)
    if not 1 <= args.credit <= P.MAX_CREDIT:
        parser.error(f"--credit must be in 1..{P.MAX_CREDIT}")
    if args.workers < 0 or args.host_workers < 0 or args.transition_log < 0:
        parser.error("--workers, --host-workers and --transition-log must be >= 0")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be in 0..65535")
    if args.workers and args.devices:
        parser.error("give --workers or --devices, not both")
    try:
        cfg = config.load()
    except config.ConfigError as exc:
        parser.error(str(exc))
    devices = args.devices or list(range(args.workers))
    address = args.listen or default_address(cfg)
    if address.startswith("tcp://*:"):
        parser.error("listen on an explicit interface (tcp://127.0.0.1:PORT is the safe choice)")
    if address.startswith("tcp://") and not args.curve and not args.insecure:
        parser.error("a tcp broker needs --curve DIR (keys from `pto keygen DIR`) so that only key "
                     "holders can submit code; --insecure allows it without")

    if args.log_dir:
        os.makedirs(args.log_dir, mode=0o700, exist_ok=True)
    log_file = os.path.join(args.log_dir, "broker.log") if args.log_dir else None
    setup_logging("broker", cfg.log_level, log_file=log_file)
    if parent_gone(args.parent_pid):
        return 1  # our parent died before we started
    gc.set_threshold(100_000, 50, 100)  # per-task objects are short-lived; full GCs dominate
    # The workers' fork server starts now, so that its imports overlap the rest of ours.
    supervisor = Supervisor(address, devices, args.host_workers, args.heartbeat, args.liveness,
                            args.log_dir, args.curve, cfg.fork_workers)
    from .server import Broker

    metrics, http = None, None
    if args.metrics_port is not None:
        from .metrics import BrokerMetrics
        from .metrics_http import MetricsServer

        metrics = BrokerMetrics()
        try:
            http = MetricsServer(metrics, args.metrics_host, args.metrics_port)
        except OSError as exc:
            print(f"error: cannot serve metrics on {args.metrics_host}:{args.metrics_port}: "
                  f"{exc}", file=sys.stderr)
            supervisor.stop()
            return 1
    try:
        broker = Broker(address, devices, spawn_workers=bool(devices), heartbeat=args.heartbeat,
                        liveness=args.liveness, credit=args.credit, parent_pid=args.parent_pid,
                        log_dir=args.log_dir, host_workers=args.host_workers, curve=args.curve,
                        spin_seconds=cfg.spin_seconds, metrics=metrics,
                        transition_log=args.transition_log, supervisor=supervisor)
    except Exception as exc:  # noqa: BLE001 - report bind errors plainly
        logging.getLogger("pto.broker").error("cannot start: %s", exc)
        print(f"error: cannot start broker on {address}: {exc}", file=sys.stderr)
        supervisor.stop()
        if http is not None:
            http.stop()
        return 1
    print(address, flush=True)
    gc.freeze()
    try:
        broker.serve()
    finally:
        if http is not None:
            http.stop()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything of ours is released by now (Broker._shutdown): skip the interpreter's
    # teardown (numpy, zmq), so that a runtime's close() does not wait for it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
