"""Shipping an L3 entry (orchestration + kernels) from the driver to every host.

Callables travel by value (``pto.wire.pickling``: a test module or script need not be importable
on the hosts). A compiled package travels as its shared library's bytes: a host on another
machine has no file at the driver's path, so it writes the bytes into its own cache
directory (named by the package's SHA-256) and registers a package pointing there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..chip.compiler import CompiledPackage, KernelRef
from ..wire.pickling import pickle_by_value


@dataclass(frozen=True)
class _ShippedKernel:
    library: bytes
    sha256: str
    kernels: tuple[str, ...]
    orch: str | None
    platform: str
    symbol: str
    block_dim: int


def pack_registration(name: str, orch: Callable[..., Any],
                      kernels: Mapping[str, Any]) -> bytes:
    """The bytes a host needs to register ``name``; TypeError if something cannot travel."""
    shipped: dict[str, Any] = {}
    for kname, kernel in kernels.items():
        if isinstance(kernel, CompiledPackage):
            if kname not in kernel.kernels:
                raise ValueError(f"kernel {kname!r}: the package has no kernel {kname!r} (it "
                                 f"has: {', '.join(kernel.kernels) or 'none'})")
            kernel = kernel.kernel(kname)
        if isinstance(kernel, KernelRef):
            pkg = kernel.package
            with open(pkg.path, "rb") as f:
                library = f.read()
            shipped[kname] = _ShippedKernel(library, pkg.sha256, tuple(pkg.kernels), pkg.orch,
                                            pkg.platform, kernel.name, kernel.block_dim)
        elif callable(kernel):
            shipped[kname] = _by_value(f"kernel {kname!r} of {name!r}", kernel)
        else:
            raise TypeError(f"kernel {kname!r} must be callable or a compiled package "
                            f"(pto.compile), not {type(kernel).__name__}")
    return cloudpickle.dumps((_by_value(f"orchestration {name!r}", orch), shipped))


def unpack_registration(packed: tuple[bytes, dict[str, Any]]
                        ) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Host side: ``(orch, kernels)`` ready for ``Runtime.register``."""
    orch_blob, shipped = packed
    kernels: dict[str, Any] = {}
    for kname, item in shipped.items():
        if isinstance(item, _ShippedKernel):
            pkg = CompiledPackage(_library_path(item), item.sha256, item.kernels, item.orch,
                                  item.platform)
            kernels[kname] = KernelRef(pkg, item.symbol, item.block_dim)
        else:
            kernels[kname] = cloudpickle.loads(item)
    return cloudpickle.loads(orch_blob), kernels


def _by_value(what: str, fn: Callable[..., Any]) -> bytes:
    try:
        return pickle_by_value(fn)
    except Exception as exc:
        raise TypeError(f"{what} cannot be sent to the hosts: {exc}") from exc


def _library_path(item: _ShippedKernel) -> str:
    """The package's library on this host: written once into our cache (its name is the
    package's cache key, so an existing file holds these bytes)."""
    from ..wire.procs import runtime_dir

    folder = os.path.join(runtime_dir(), "cluster-packages")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"{item.sha256}.so")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(item.library)
        os.replace(tmp, path)  # atomic: concurrent hosts on one machine agree
    return path
