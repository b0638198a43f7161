"""How a worker turns a registered kernel into something it can call: the one seam a
new kernel kind plugs into.

A loaded kernel is called as ``kernel(values, kinds)``: ``values`` are the task's
arguments in order (zero-copy numpy views of shared memory, inputs read-only, and Python
scalars) and ``kinds`` their ``pto.ParamType`` values. Kinds:

- ``"py"``: the blob is a cloudpickled Python callable, called as ``fn(*values)``.
- ``"sim"``: the blob names a compiled package and one kernel symbol (``pto.chip.package``).
- ``"sim-orch"``: the blob names a compiled package whose C orchestration the task runs
  (it launches the package's kernels itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle

Kernel = Callable[[list[Any], list[int]], None]


def load_kernel(kind: str, name: str, blob: bytes) -> Kernel:
    if kind == "py":
        fn = cloudpickle.loads(blob)
        if not callable(fn):
            raise TypeError(f"kernel {name!r} is not callable")
        return lambda values, kinds: fn(*values)
    # Imported only where C code runs: workers of pure-Python clients never load ctypes.
    if kind == "sim":
        from pto.chip.runner import load_sim_kernel

        return load_sim_kernel(name, blob)
    if kind == "sim-orch":
        from pto.chip.runner import load_sim_orch

        return load_sim_orch(name, blob)
    raise ValueError(f"kernel {name!r} has unknown kind {kind!r}")
