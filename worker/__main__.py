"""python -m worker: serve one chip for a pto broker."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

from pto.wire import config
from pto.wire import protocol as P
from pto.wire.chips import host_chip
from pto.wire.procs import die_with_parent, setup_logging

from .loop import Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--broker", required=True, help="the broker's client address")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--device", type=int, help="the chip this worker serves")
    role.add_argument("--host", type=int, metavar="K", help="be host worker K (ctx.submit_host)")
    parser.add_argument("--heartbeat", type=float, default=P.HEARTBEAT_S)
    parser.add_argument("--liveness", type=int, default=P.LIVENESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-file")
    parser.add_argument("--curve", metavar="DIR", help="CURVE keys (pto keygen) for a tcp broker")
    args = parser.parse_args(argv)
    if (args.device if args.device is not None else args.host) < 0:
        parser.error("--device and --host must be >= 0")
    try:
        cfg = config.load()
    except config.ConfigError as exc:
        parser.error(str(exc))
    device = args.device if args.device is not None else host_chip(args.host)
    role_name = f"worker{args.device}" if args.device is not None else f"host{args.host}"
    setup_logging(role_name, cfg.log_level, log_file=args.log_file)
    # SIGTERM, not SIGKILL, when the broker dies: the worker removes its status segment.
    die_with_parent(args.parent_pid, signal.SIGTERM)
    gc.set_threshold(100_000, 50, 100)
    worker = Worker(args.broker, device, args.heartbeat, args.liveness, args.parent_pid,
                    args.curve or cfg.curve_dir, cfg.spin_seconds)
    gc.freeze()
    worker.run()
    return 0


def exit_now(code: int) -> None:
    """End the process with ``code``. Everything of ours is released by now
    (Worker._close): skip the interpreter's teardown of numpy, zmq and the kernels'
    modules, which made a broker's stop wait ~0.1 s per worker on a busy machine."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
