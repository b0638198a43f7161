"""No-op task throughput and single-task round trip: pto vs the process pools and the
zmq floor. A shortcut for ``python -m benchmarks --cases noop,roundtrip``:

    python benchmarks/noop.py            # 20,000 tasks x 5 repeats, 1,000 round trips x 5
    python benchmarks/noop.py --quick    # a few seconds

(a) throughput: one orchestration submits N independent no-op tasks (no arguments),
    round-robin over the chips; wall time of ``rt.run``, median of the repeats.
(b) round trip: ``rt.run`` of an orchestration that submits one no-op task.

This module also holds the pto kernel and orchestrations of those two cases.
"""

from __future__ import annotations

import sys
from pathlib import Path


def noop():
    pass


def many_noops(ctx, args):
    peers = ctx.peers()
    n_peers = len(peers)
    submit = ctx.submit
    for i in range(args["n"]):
        submit(peers[i % n_peers], "noop", [])


def one_noop(ctx, args):
    ctx.submit(ctx.peers()[0], "noop", [])


def main(argv=None) -> int:
    from benchmarks.__main__ import main as suite

    argv = list(sys.argv[1:] if argv is None else argv)
    systems = ["--systems", "floor,pool,executor,pto"] if "--systems" not in argv else []
    return suite(["--cases", "noop,roundtrip", *systems, *argv])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    sys.exit(main())
