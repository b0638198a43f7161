"""Placeholder until the simulation platform lands (issue 3)."""

from __future__ import annotations

from typing import Any


def kernel_registration(name: str, obj: Any) -> tuple[str, bytes]:
    raise TypeError(f"kernel {name!r} must be callable or a compiled package, "
                    f"not {type(obj).__name__}")


def load_sim_kernel(name: str, blob: bytes) -> Any:
    raise ValueError(f"kernel {name!r}: compiled kernels are not supported yet")
