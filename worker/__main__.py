"""python -m worker: serve one chip for a pto broker."""

from __future__ import annotations

import argparse
import gc
import sys

from pto.procs import die_with_parent, setup_logging

from .loop import Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--broker", required=True, help="the broker's client address")
    parser.add_argument("--device", type=int, required=True, help="the chip this worker serves")
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--liveness", type=int, default=4)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-file")
    args = parser.parse_args(argv)
    if args.device < 0:
        parser.error("--device must be >= 0")
    setup_logging(f"worker{args.device}", log_file=args.log_file)
    die_with_parent(args.parent_pid)
    gc.set_threshold(100_000, 50, 100)
    worker = Worker(args.broker, args.device, args.heartbeat, args.liveness, args.parent_pid)
    gc.freeze()
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
