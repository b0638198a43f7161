"""How a worker turns a registered kernel into something it can call: the one seam a
new kernel kind plugs into.

A loaded kernel is called as ``kernel(values, kinds)``: ``values`` are the task's
arguments in order (zero-copy numpy views of shared memory, inputs read-only, and Python
scalars) and ``kinds`` their ``pto.ParamType`` values. Kinds:

- ``"py"``: the blob is a cloudpickled Python callable, called as ``fn(*values)``.
- ``"sim"``: the blob names a compiled package and symbol (see ``pto.compiler``).
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
    if kind == "sim":
        from pto.compiler import load_sim_kernel  # only workers that run C kernels need it

        return load_sim_kernel(name, blob)
    raise ValueError(f"kernel {name!r} has unknown kind {kind!r}")
