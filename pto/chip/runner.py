"""The worker's side of compiled kernels: a registration's description (``kind``, ``blob``,
made by ``pto/chip/package.py`` ``kernel_registration`` in the client) becomes a callable
``(values, kinds)``. ``worker/kernels.py`` imports this module and nothing else of
``pto.chip``, so a worker never loads the compiler; ctypes and the simulator binding
(``simtasks``, ``simlib``) load only when a C kernel is first registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SIM_KERNEL, SIM_ORCH = "sim", "sim-orch"  # registration kinds, shared with package.py


def load_sim_kernel(name: str, blob: bytes) -> Callable[[list[Any], list[int]], None]:
    """The worker side of ``kernel_registration`` for ``"sim"``: a callable ``(values, kinds)``."""
    from .simtasks import package_kernel  # ctypes only where C kernels run

    spec = json.loads(blob)
    return package_kernel(name, spec["path"], spec["sha256"], spec["symbol"],
                          int(spec.get("block_dim", 1)))


def load_sim_orch(name: str, blob: bytes) -> Callable[[list[Any], list[int]], None]:
    """The worker side for ``"sim-orch"``: a callable running the package's orchestration."""
    from .simtasks import package_orchestration

    spec = json.loads(blob)
    return package_orchestration(name, spec["path"], spec["sha256"], spec["orch"])
