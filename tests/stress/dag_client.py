"""One stress client: random task DAGs over a pool of shared tensors, checked against numpy.

Run as a script (its kernels then live in ``__main__`` and travel to the workers by value):

    python tests/stress/dag_client.py --broker ipc://... --seed 1
    python tests/stress/dag_client.py --seed 1          # embedded broker with 4 chips

It builds ``--runs`` orchestrations of ``--tasks-per-run`` tasks each from a seeded RNG.
Every task names 1-3 distinct tensors of the pool (inputs, outputs, inouts) plus scalars,
on a random chip. The pool persists across runs: each run returns its handles and the next
run gets them in ``args``; between runs a few slots are replaced by fresh tensors and the
old handles are freed. A numpy reference executes the same tasks sequentially, in
submission order; after every run all pool tensors must equal the reference exactly
(int64 arithmetic modulo a prime, so there is no rounding and no overflow).

Prints one JSON line: ``{"seed", "tasks", "runs", "checks", "wrong", "first_wrong", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import pto

M = 1_000_003  # every tensor value stays in [0, M)
SIZE = 512
DTYPE = np.int64

# ---- kernels: module level, deterministic, elementwise -------------------------------


def add(a, b, out):
    out[:] = (a + b) % M


def sum3(a, b, c, out):
    out[:] = (a + b + c) % M


def scale(x, out, k):
    out[:] = (x * int(k)) % M


def copy(x, out):
    out[:] = x


def accumulate(acc, x):
    acc[:] = (acc + x) % M


def axpy(acc, x, k):
    acc[:] = (acc + int(k) * x) % M


def mix(a, b):
    s, d = (a + b) % M, (a - b) % M
    a[:] = s
    b[:] = d


def iota(out, start):
    out[:] = (np.arange(out.shape[0], dtype=DTYPE) * 7 + int(start)) % M


def bump(acc, k):
    acc[:] = (acc * 3 + int(k)) % M


# name -> (kernel, kinds of its arguments in order); "s" is a scalar
KERNELS = {
    "add": (add, ("in", "in", "out")),
    "sum3": (sum3, ("in", "in", "in", "out")),
    "scale": (scale, ("in", "out", "s")),
    "copy": (copy, ("in", "out")),
    "accumulate": (accumulate, ("inout", "in")),
    "axpy": (axpy, ("inout", "in", "s")),
    "mix": (mix, ("inout", "inout")),
    "iota": (iota, ("out", "s")),
    "bump": (bump, ("inout", "s")),
}

# ---- orchestration -------------------------------------------------------------------


def _arg(kind, value, pool):
    if kind == "s":
        return pto.Arg.scalar(value)
    if kind == "array":  # a plain numpy array: copied into shm by the runtime
        return pto.Arg.input(value)
    return {"in": pto.Arg.input, "out": pto.Arg.output, "inout": pto.Arg.inout}[kind](pool[value])


def random_dag(ctx, args):
    """Replace the slots in ``args["fresh"]``, submit ``args["ops"]``, return the pool."""
    pool = list(args["pool"])
    for slot, init in args["fresh"].items():
        pool[slot] = ctx.alloc((SIZE,), DTYPE) if init is None else ctx.tensor(init)
    peers = ctx.peers()
    for name, chip, params in args["ops"]:
        ctx.submit(peers[chip % len(peers)], name, [_arg(k, v, pool) for k, v in params])
    return pool


# ---- the random program and its numpy reference --------------------------------------


def make_op(rng, pool_size):
    """One task: (kernel name, chip index, [(kind, slot or value), ...])."""
    if rng.random() < 0.03:  # now and then, a numpy array straight in an Arg
        arr = rng.integers(0, M, SIZE, dtype=DTYPE)
        return "accumulate", int(rng.integers(4)), [("inout", int(rng.integers(pool_size))),
                                                    ("array", arr)]
    name = str(rng.choice(list(KERNELS)))
    kinds = KERNELS[name][1]
    slots = iter(rng.choice(pool_size, size=len(kinds), replace=False).tolist())
    params = [(k, int(rng.integers(1, 97)) if k == "s" else next(slots)) for k in kinds]
    return name, int(rng.integers(4)), params


def apply_reference(ref, op):
    name, _, params = op
    values = []
    for kind, v in params:
        if kind == "s":
            values.append(v)
        elif kind == "array":
            values.append(v.copy())
        elif kind == "in":
            view = ref[v].view()
            view.flags.writeable = False
            values.append(view)
        else:
            values.append(ref[v])
    KERNELS[name][0](*values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=None, help="broker address; default: embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tasks-per-run", type=int, default=100)
    ap.add_argument("--pool", type=int, default=16)
    a = ap.parse_args(argv)

    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic()
    kwargs = {"broker": a.broker} if a.broker else {"devices": [0, 1, 2, 3]}
    checks = wrong = 0
    first_wrong = None
    with pto.Runtime(level="host", platform="sim", **kwargs) as rt:
        rt.register("random_dag", orch=random_dag,
                    kernels={name: fn for name, (fn, _) in KERNELS.items()})
        ref = [np.zeros(SIZE, DTYPE) for _ in range(a.pool)]
        pool = [None] * a.pool
        for run in range(a.runs):
            if run == 0:
                fresh = {s: (rng.integers(0, M, SIZE, dtype=DTYPE) if s % 2 else None)
                         for s in range(a.pool)}
            else:
                fresh = {int(s): (rng.integers(0, M, SIZE, dtype=DTYPE) if rng.random() < .5
                                  else None)
                         for s in rng.choice(a.pool, size=2, replace=False)}
            for s, init in fresh.items():
                ref[s] = np.zeros(SIZE, DTYPE) if init is None else init.copy()
            ops = [make_op(rng, a.pool) for _ in range(a.tasks_per_run)]
            for op in ops:
                apply_reference(ref, op)

            new_pool = rt.run("random_dag", args={"pool": pool, "fresh": fresh, "ops": ops})
            for s in fresh:
                if pool[s] is not None:
                    pool[s].free()  # its last tasks finished in an earlier run
            pool = new_pool
            for s, h in enumerate(pool):
                checks += 1
                got = h.numpy()
                if got.shape != (SIZE,) or not np.array_equal(got, ref[s]):
                    wrong += 1
                    if first_wrong is None:
                        bad = int(np.flatnonzero(got != ref[s])[0]) if got.shape == (SIZE,) else -1
                        first_wrong = f"run {run} slot {s} index {bad}"
                del got
        for h in pool:
            h.free()
    print(json.dumps({"seed": a.seed, "tasks": a.runs * a.tasks_per_run, "runs": a.runs,
                      "checks": checks, "wrong": wrong, "first_wrong": first_wrong,
                      "seconds": round(time.monotonic() - t0, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
