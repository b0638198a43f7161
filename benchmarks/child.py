"""Runs the cases for ONE system in a fresh interpreter (``python -m benchmarks`` starts
one per system, so no system's threads, children or memory disturb another's figures).

    python -m benchmarks.child SYSTEM --cases noop,roundtrip --config JSON --out FILE

Writes ``{"rows": {case: [row, ...]}, "errors": {case: message}}`` to FILE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

from . import cases as C
from .common import Config

# key -> (module, class, module that must be importable)
SYSTEMS = {
    "floor": ("benchmarks.floors", "Floors", None),
    "pool": ("benchmarks.pools", "PoolSystem", None),
    "executor": ("benchmarks.pools", "ExecutorSystem", None),
    "pto": ("benchmarks.pto_system", "PtoSystem", "pto"),
    "ray": ("benchmarks.ray_system", "RaySystem", "ray"),
    "dask": ("benchmarks.dask_system", "DaskSystem", "distributed"),
    "cluster": ("benchmarks.cluster_system", "ClusterSystem", "ray"),
}
# systems that run only some cases, and cases only they run
ONLY_CASES = {"cluster": ("cluster",)}


def cases_of(system: str, cases: list[str]) -> list[str]:
    """The cases of ``cases`` that ``system`` runs."""
    own = ONLY_CASES.get(system)
    if own is not None:
        return [c for c in cases if c in own]
    exclusive = {c for only in ONLY_CASES.values() for c in only}
    return [c for c in cases if c not in exclusive]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=sorted(SYSTEMS))
    ap.add_argument("--cases", required=True)
    ap.add_argument("--config", required=True, help="Config as JSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = Config(**json.loads(a.config))
    module, cls, _ = SYSTEMS[a.system]
    system_cls = getattr(importlib.import_module(module), cls)
    result: dict = {"rows": {}, "errors": {}}
    with system_cls(cfg) as system:
        for case in a.cases.split(","):
            t0 = time.monotonic()
            try:
                result["rows"][case] = getattr(C, case)(system, cfg)
            except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
                traceback.print_exc()
                result["errors"][case] = f"{type(exc).__name__}: {exc}"
            print(f"[{a.system}] {case}: {time.monotonic() - t0:.1f}s", file=sys.stderr,
                  flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
