"""How a worker turns a registered kernel into something it can call: the one seam a
new kernel kind (e.g. a compiled package) plugs into."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cloudpickle

KernelFn = Callable[..., Any]


def load_kernel(kind: str, name: str, blob: bytes) -> KernelFn:
    """Return a callable taking the task's arguments in order (numpy views and scalars)."""
    if kind == "py":
        fn = cloudpickle.loads(blob)
        if not callable(fn):
            raise TypeError(f"kernel {name!r} is not callable")
        return fn
    raise ValueError(f"kernel {name!r} has unknown kind {kind!r}")
