"""What a compiled package is, and what registering one means.

``pto.compile`` returns a ``CompiledPackage``; ``pkg.kernel(name, block_dim)`` a
``KernelRef``. Registered under a name (``kernels={"compute": pkg}`` at L3,
``register("x", pkg=pkg)`` at L2), a package stands for one of two things, decided here
once for both levels (``entry_of``):

- a package with an orchestration runs that orchestration (the whole L2 program: every
  ``pto_launch`` it makes, with their ``block_dim``) on the task's chip;
- a ``KernelRef``, or a package without orchestration holding exactly one kernel, launches
  that kernel.

Anything else is ambiguous and refused at registration, saying what to write instead; a
kernel that happens to share the registered name is never picked silently.

This module is also the client's side of the seam between the L3 runtime and compiled
code: ``kernel_registration`` describes the entry for the workers, and
``pto/chip/runner.py`` (the worker's side) turns that description into a callable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .runner import SIM_KERNEL, SIM_ORCH  # registration kinds


@dataclass(frozen=True)
class KernelRef:
    """One kernel of a package, as a value for ``kernels={...}`` at L3 or ``pkg=`` at L2.

    >>> rt.register("p", orch=pipeline, kernels={"scale": pkg.kernel("mul", block_dim=4)})
    """

    package: CompiledPackage
    name: str
    block_dim: int = 1


@dataclass(frozen=True)
class CompiledPackage:
    """A built package: ``path`` (the shared library), ``sha256`` (its cache key),
    ``kernels`` (names) and ``orch`` (the orchestration's symbol, or None).

    >>> pkg = pto.compile(platform="sim", kernels=["add.c"], orch="orch.c")
    >>> pkg.kernels
    ('add',)
    """

    path: str
    sha256: str
    kernels: tuple[str, ...]
    orch: str | None
    platform: str = "sim"

    def kernel(self, name: str, block_dim: int = 1) -> KernelRef:
        """The kernel ``name`` of this package, launched with ``block_dim`` blocks."""
        if name not in self.kernels:
            raise ValueError(f"package {self.sha256[:12]} has no kernel {name!r}; "
                             f"it has: {', '.join(self.kernels) or 'no kernels'}")
        if not isinstance(block_dim, int) or isinstance(block_dim, bool) or block_dim < 1:
            raise ValueError(f"block_dim must be a positive int, not {block_dim!r}")
        return KernelRef(self, name, block_dim)


def entry_of(name: str, obj: CompiledPackage | KernelRef, where: str) -> KernelRef | None:
    """What registering ``obj`` as ``name`` runs: one kernel (a KernelRef), or None for
    the package's orchestration. ValueError when that is ambiguous; ``where`` is how the
    caller wrote the registration, for the message (e.g. ``kernels={'compute': ...}``)."""
    if isinstance(obj, KernelRef):
        return obj
    if obj.orch is not None:
        return None
    if len(obj.kernels) == 1:
        return obj.kernel(obj.kernels[0])
    kernels = ", ".join(obj.kernels)
    first = name if name in obj.kernels else (obj.kernels or ("name",))[0]  # a hint only
    raise ValueError(
        f"{name!r}: package {obj.sha256[:12]} has no orchestration and {len(obj.kernels)} "
        f"kernels ({kernels}), so it does not say which one {name!r} runs; register one "
        f"kernel, {where.replace('PKG', f'pkg.kernel({first!r})')}, or build the package "
        "with an orchestration (pto.compile(orch=...)) that launches them")


# ---- the seam with the L3 runtime --------------------------------------------------------


def kernel_registration(name: str, obj: Any) -> tuple[str, bytes]:
    """``(kind, blob)`` that tells workers how to load kernel ``name`` (for Runtime.register):
    ``"sim-orch"`` for a package's orchestration, ``"sim"`` for one of its kernels."""
    if not isinstance(obj, (CompiledPackage, KernelRef)):
        raise TypeError(f"kernel {name!r} must be callable or a compiled package "
                        f"(pto.compile), not {type(obj).__name__}")
    ref = entry_of(name, obj, f"kernels={{{name!r}: PKG}}")
    if ref is None:
        assert isinstance(obj, CompiledPackage)
        blob = {"path": obj.path, "sha256": obj.sha256, "orch": obj.orch}
        return SIM_ORCH, json.dumps(blob).encode()
    blob = {"path": ref.package.path, "sha256": ref.package.sha256, "symbol": ref.name,
            "block_dim": ref.block_dim}
    return SIM_KERNEL, json.dumps(blob).encode()
