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

Options add the other shapes of graph: ``--groups P`` makes a fraction P of the ops group
tasks (``ctx.submit_group`` on 2-4 chips whose members meet in a barrier), ``--scopes P``
a fraction P of two-task ops whose intermediate tensor lives in ``ctx.scope()``.

With ``--tolerate-failures`` (the chaos tests kill workers under it) a run may fail with a
``pto.TaskError``: that is counted, and since the pool's contents are then unknown, every
slot is replaced by a fresh tensor in the next run (the reference is re-initialized the
same way). Every run that reports done is still checked in full. Each run waits at most
``--run-timeout`` seconds: a run that has not ended by then is reported as hung.

``--min-seconds S`` keeps starting runs after ``--runs`` until S seconds have passed.

Progress (``connected ...``, then ``run N ok|failed``) goes to stderr. The last line of
stdout is one JSON object: ``{"seed", "tasks", "tasks_ok", "runs", "runs_ok", "runs_failed",
"errors", "error_samples", "checks", "wrong", "first_wrong", "hung", "seconds"}``
(``tasks``: tasks submitted, ``tasks_ok``: tasks of the runs that completed, ``runs``: runs
started).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import itertools
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


def gshift(a, tmp, out):
    """A group kernel: each member fills its share of ``tmp``, waits for all the others at
    the barrier, then fills its share of ``out`` from another member's share of ``tmp``."""
    t = pto.task()
    idx = np.array_split(np.arange(out.shape[0]), t.world)[t.rank]
    tmp[idx] = (a[idx] * 2 + 1) % M
    t.barrier(timeout=60)
    out[idx] = tmp[(idx + out.shape[0] // 2) % out.shape[0]]


def gshift_reference(a, tmp, out):
    tmp[:] = (a * 2 + 1) % M
    out[:] = np.roll(tmp, -(out.shape[0] // 2))


def scoped_reference(x, acc, k):
    acc[:] = (acc + (x * int(k)) % M) % M


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
GROUP_KINDS = ("in", "out", "out")  # gshift
SCOPED_KINDS = ("in", "inout", "s")  # scale into a scoped temporary, then accumulate it

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
        if name == "gshift":  # a group: chip is a list of chip indices
            ctx.submit_group([peers[c % len(peers)] for c in chip], name,
                             [_arg(k, v, pool) for k, v in params])
        elif name == "scoped":
            (_, x), (_, acc), (_, k) = params
            with ctx.scope():
                tmp = ctx.alloc((SIZE,), DTYPE)
                ctx.submit(peers[chip % len(peers)], "scale",
                           [pto.Arg.input(pool[x]), pto.Arg.output(tmp), pto.Arg.scalar(k)])
                ctx.submit(peers[(chip + 1) % len(peers)], "accumulate",
                           [pto.Arg.inout(pool[acc]), pto.Arg.input(tmp)])
        else:
            ctx.submit(peers[chip % len(peers)], name, [_arg(k, v, pool) for k, v in params])
    return pool


# ---- the random program and its numpy reference --------------------------------------


def _slots(rng, pool_size, kinds):
    slots = iter(rng.choice(pool_size, size=len(kinds), replace=False).tolist())
    return [(k, int(rng.integers(1, 97)) if k == "s" else next(slots)) for k in kinds]


def make_op(rng, pool_size, groups=0.0, scopes=0.0):
    """One op: (kernel name, chip index, [(kind, slot or value), ...]).

    A group op ("gshift") has a list of 2-4 distinct chip indices instead of one; a
    "scoped" op is two tasks (scale into a scoped temporary, accumulate it).
    """
    if groups and rng.random() < groups:
        world = int(rng.integers(2, 5))
        chips = rng.choice(4, size=world, replace=False).tolist()
        return "gshift", chips, _slots(rng, pool_size, GROUP_KINDS)
    if scopes and rng.random() < scopes:
        return "scoped", int(rng.integers(4)), _slots(rng, pool_size, SCOPED_KINDS)
    if rng.random() < 0.03:  # now and then, a numpy array straight in an Arg
        arr = rng.integers(0, M, SIZE, dtype=DTYPE)
        return "accumulate", int(rng.integers(4)), [("inout", int(rng.integers(pool_size))),
                                                    ("array", arr)]
    name = str(rng.choice(list(KERNELS)))
    return name, int(rng.integers(4)), _slots(rng, pool_size, KERNELS[name][1])


def op_tasks(op) -> int:
    return 2 if op[0] == "scoped" else 1


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
    fn = {"gshift": gshift_reference, "scoped": scoped_reference}.get(name)
    (fn or KERNELS[name][0])(*values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", default=None, help="broker address; default: embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tasks-per-run", type=int, default=100, help="ops per run")
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--groups", type=float, default=0.0, help="fraction of group ops")
    ap.add_argument("--scopes", type=float, default=0.0, help="fraction of scoped ops")
    ap.add_argument("--tolerate-failures", action="store_true",
                    help="a run failing with pto.TaskError is counted, not fatal")
    ap.add_argument("--run-timeout", type=float, default=60.0)
    ap.add_argument("--min-seconds", type=float, default=0.0,
                    help="after --runs, keep running until this many seconds have passed")
    a = ap.parse_args(argv)

    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic()
    kwargs = {"broker": a.broker} if a.broker else {"devices": [0, 1, 2, 3]}
    checks = wrong = tasks = tasks_ok = runs = runs_ok = runs_failed = 0
    errors: dict[str, int] = {}
    samples: list[str] = []
    first_wrong = hung = None
    with pto.Runtime(level="host", platform="sim", **kwargs) as rt:
        kernels = {name: fn for name, (fn, _) in KERNELS.items()}
        kernels["gshift"] = gshift
        rt.register("random_dag", orch=random_dag, kernels=kernels)
        print(f"connected to {rt.address}, chips {rt.devices}", file=sys.stderr, flush=True)
        ref = [np.zeros(SIZE, DTYPE) for _ in range(a.pool)]
        pool = [None] * a.pool
        reset = True  # every slot gets a fresh tensor in the next run
        for run in itertools.count():
            if run >= a.runs and time.monotonic() - t0 >= a.min_seconds:
                break
            runs += 1
            if reset:
                fresh = {s: (rng.integers(0, M, SIZE, dtype=DTYPE) if s % 2 else None)
                         for s in range(a.pool)}
            else:
                fresh = {int(s): (rng.integers(0, M, SIZE, dtype=DTYPE) if rng.random() < .5
                                  else None)
                         for s in rng.choice(a.pool, size=2, replace=False)}
            for s, init in fresh.items():
                ref[s] = np.zeros(SIZE, DTYPE) if init is None else init.copy()
            ops = [make_op(rng, a.pool, a.groups, a.scopes) for _ in range(a.tasks_per_run)]
            for op in ops:
                apply_reference(ref, op)
            n_tasks = sum(op_tasks(op) for op in ops)
            tasks += n_tasks

            future = rt.submit("random_dag", args={"pool": pool, "fresh": fresh, "ops": ops})
            try:
                new_pool = future.result(timeout=a.run_timeout)
            except concurrent.futures.TimeoutError:
                hung = run
                print(f"run {run} hung", file=sys.stderr, flush=True)
                break
            except pto.TaskError as exc:
                if not a.tolerate_failures:
                    raise
                runs_failed += 1
                kind = type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                if not isinstance(exc, pto.WorkerLost) and len(samples) < 5:
                    samples.append(str(exc)[:500])
                print(f"run {run} failed: {kind}", file=sys.stderr, flush=True)
                del exc
                # The pool's contents are unknown now: start the next run from fresh tensors.
                for h in pool:
                    if h is not None:
                        h.free()  # the failed run's tasks have all ended
                pool = [None] * a.pool
                reset = True
                gc.collect()  # the failed run's own tensors go with its exception
                continue
            runs_ok += 1
            tasks_ok += n_tasks
            reset = False
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
            print(f"run {run} ok", file=sys.stderr, flush=True)
        for h in pool:
            if h is not None:
                h.free()
    print(json.dumps({"seed": a.seed, "tasks": tasks, "tasks_ok": tasks_ok, "runs": runs,
                      "runs_ok": runs_ok, "runs_failed": runs_failed, "errors": errors,
                      "error_samples": samples, "checks": checks, "wrong": wrong,
                      "first_wrong": first_wrong, "hung": hung,
                      "seconds": round(time.monotonic() - t0, 3)}), flush=True)
    return 3 if hung is not None else 0


if __name__ == "__main__":
    sys.exit(main())
