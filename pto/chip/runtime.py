"""L2: one simulated chip in the calling process (``pto.Runtime(level="chip")``).

No broker and no worker: ``run`` calls the package's C orchestration (or one kernel)
through ctypes, with the GIL released, on pointers into the caller's numpy arrays.
Outputs are written in place. A C crash here takes the calling process with it; run at
``level="host"`` to isolate kernels in worker processes.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import RuntimeBase
from ..wire.args import Arg
from ..wire.errors import TaskError
from .compiler import _check_platform
from .compiler import compile as compile_package
from .package import CompiledPackage, KernelRef, entry_of
from .simlib import ERROR_NAMES, SimChip, error_name, open_package, pack_args


@dataclass
class _Registration:
    name: str
    package: CompiledPackage
    entry: KernelRef | None  # the kernel the name launches, or None: the orchestration
    chip: SimChip


class ChipRuntime(RuntimeBase):
    """One simulated chip: register compiled packages, run them on numpy arrays.

    >>> with pto.Runtime(level="chip", platform="sim", device=0) as rt:
    ...     rt.register("vector_add", orch="orch.c", kernels=["add.c"])   # or pkg=pkg
    ...     rt.run("vector_add", args=[pto.Arg.input(x), pto.Arg.input(y),
    ...                                pto.Arg.output(z)])                # z written in place

    ``cores`` is the chip's number of cores (default ``PTO_SIM_CORES`` or the CPUs this
    process may use): the blocks of a launch run on that many threads.
    """

    level = "chip"

    def __init__(self, platform: str = "sim", device: int = 0, cores: int | None = None):
        _check_platform(platform)
        if not isinstance(device, int) or isinstance(device, bool) or device < 0:
            raise ValueError(f"device must be a non-negative int, not {device!r}")
        if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool)
                                  or cores < 1):
            raise ValueError(f"cores must be a positive int or None, not {cores!r}")
        self.platform = platform
        self.device = device
        self.cores = cores
        self._registry: dict[str, _Registration] = {}
        self._chips: dict[str, SimChip] = {}  # one chip per loaded package (by hash)
        self._lock = threading.Lock()  # one run at a time: a chip's error state is per run
        # Stop the core threads even if the user never calls close().
        self._finalizer = weakref.finalize(self, _close_chips, self._chips)
        self._opened()

    # ---- registration ------------------------------------------------------------------

    def register(self, name: str, orch: str | os.PathLike | dict | None = None,
                 kernels: Iterable[Any] | None = None,
                 pkg: CompiledPackage | KernelRef | None = None,
                 flags: Sequence[str] = ()) -> CompiledPackage:
        """Register a package under ``name``: built from sources, or a ``pto.compile`` result.

        >>> rt.register("vector_add", orch="orch.c", kernels=["add.c", "scale.c"])
        >>> rt.register("matmul", pkg=pto.compile(kernels=["matmul.c"]))
        >>> rt.register("scale", pkg=pkg.kernel("scale", block_dim=4))

        ``name`` then runs the package's orchestration, or the one kernel it stands for (a
        ``pkg.kernel(...)``, or the only kernel of a package without orchestration); a
        package without orchestration and several kernels is refused (ValueError) as
        ambiguous. Every kernel of a registered package also runs by its own name.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise TypeError("register() needs a non-empty name")
        if callable(orch):
            raise TypeError(f"orch for {name!r}: at level='chip' the orchestration is C source "
                            "(a path); Python orchestrations run at level='host'")
        if pkg is not None:
            if orch is not None or kernels is not None or flags:
                raise ValueError(f"register({name!r}): give pkg=, or sources (orch=, kernels=, "
                                 "flags=), not both")
            if not isinstance(pkg, (CompiledPackage, KernelRef)):
                raise TypeError(f"pkg must come from pto.compile (or be pkg.kernel(...)), not "
                                f"{type(pkg).__name__}")
            entry = entry_of(name, pkg, f"register({name!r}, pkg=PKG)")
            pkg = pkg.package if isinstance(pkg, KernelRef) else pkg
            if pkg.platform != self.platform:
                raise ValueError(f"package for {pkg.platform!r} cannot run on {self.platform!r}")
        else:
            if orch is None and not kernels:
                raise ValueError(f"register({name!r}) needs orch= and/or kernels=, or pkg=")
            pkg = compile_package(self.platform, kernels=kernels or (), orch=orch, flags=flags)
            entry = entry_of(name, pkg, f"register({name!r}, pkg=PKG)")
        with self._lock:
            chip = self._chips.get(pkg.sha256)
            if chip is None:
                lib = open_package(pkg.path, pkg.sha256)
                chip = self._chips[pkg.sha256] = lib.new_chip(self.device, self.cores)
            self._registry[name] = _Registration(name, pkg, entry, chip)
        return pkg

    # ---- running -----------------------------------------------------------------------

    def run(self, name: str, args: Sequence[Arg] = (), block_dim: int | None = None) -> None:
        """Run a registered orchestration, or launch one kernel; outputs are written in place.

        >>> rt.run("vector_add", [pto.Arg.input(x), pto.Arg.input(y), pto.Arg.output(z)])
        >>> rt.run("matmul", [pto.Arg.input(a), pto.Arg.input(b), pto.Arg.output(c)],
        ...        block_dim=8)                      # a package without orch: its kernel

        ``name`` is a registered name (its orchestration, or the kernel it stands for) or
        the name of a kernel in a registered package. ``block_dim`` applies to a kernel
        launch (default: the ``pkg.kernel(..., block_dim)`` registered, else 1); an
        orchestration chooses its own. Raises ``pto.TaskError`` naming the orchestration
        or kernel and the chip if it returns non-zero or a launch fails.
        """
        self._check_open()
        reg, kernel, default_blocks = self._resolve(name)
        if block_dim is not None and (not isinstance(block_dim, int)
                                      or isinstance(block_dim, bool) or block_dim < 1):
            raise ValueError(f"block_dim must be a positive int, not {block_dim!r}")
        if kernel is None and block_dim not in (None, 1):
            raise ValueError(f"{name!r} runs an orchestration, which picks its own block_dim")
        block_dim = block_dim or default_blocks
        label = kernel or name
        values, kinds = _split(args, label)
        argv = pack_args(values, kinds, repr(label))
        with self._lock:
            self._check_open()
            chip = reg.chip
            rc = chip.run(kernel.encode() if kernel is not None else None, argv, block_dim)
            # An orchestration may return 0 after ignoring a failed launch: that fails too.
            code = chip.error_code() if rc == 0 and kernel is None else rc
            message = chip.error_message() if code != 0 else ""
        del values  # the arrays had to outlive the call: argv points into them
        if code != 0:
            raise TaskError(label, self.device, _reason(reg, kernel, rc, code, message))

    def _resolve(self, name: str) -> tuple[_Registration, str | None, int]:
        """(registration, kernel to launch or None for the orchestration, its block_dim)."""
        reg = self._registry.get(name)
        if reg is not None:
            if reg.entry is None:
                return reg, None, 1
            return reg, reg.entry.name, reg.entry.block_dim
        owners = {r.package.sha256: r for r in self._registry.values()
                  if name in r.package.kernels}
        if len(owners) == 1:
            return next(iter(owners.values())), name, 1
        if len(owners) > 1:
            regs = ", ".join(sorted(r.name for r in owners.values()))
            raise ValueError(f"kernel {name!r} is in several registered packages ({regs})")
        kernels = sorted({k for r in self._registry.values() for k in r.package.kernels})
        raise KeyError(f"nothing registered as {name!r}; registered: {sorted(self._registry)}, "
                       f"kernels: {kernels}")

    # ---- life --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the chip's core threads. Idempotent."""
        with self._lock:
            self._closed = True
            self._registry.clear()
            self._finalizer()

    def _describe(self) -> str:
        return f"{self.platform} device={self.device} registered={sorted(self._registry)}"


def _split(args: Sequence[Arg], label: str) -> tuple[list[Any], list[int]]:
    if not isinstance(args, (list, tuple)):
        raise TypeError(f"args of {label!r} must be a list of pto.Arg, not {type(args).__name__}")
    values, kinds = [], []
    for i, arg in enumerate(args):
        if not isinstance(arg, Arg):
            raise TypeError(f"argument {i} of {label!r} is a {type(arg).__name__}, not a "
                            "pto.Arg (use pto.Arg.input/output/inout/scalar)")
        values.append(arg.value)
        kinds.append(int(arg.kind))
    return values, kinds


def _reason(reg: _Registration, kernel: str | None, rc: int, code: int, message: str) -> str:
    if kernel is not None:
        what = f"kernel {kernel!r}"
    else:
        symbol = reg.package.orch
        what = f"orchestration {reg.name!r}" + (f" ({symbol})" if symbol != reg.name else "")
    detail = f": {message}" if message else ""
    if rc == 0:  # the orchestration ignored a failed launch; the failure still counts
        return f"{what} returned 0 but a launch failed with {error_name(code)}{detail}"
    code_text = f"{rc} ({ERROR_NAMES[rc]})" if rc in ERROR_NAMES else str(rc)
    return f"{what} returned {code_text}{detail}"


def _close_chips(chips: dict[str, SimChip]) -> None:
    for chip in chips.values():
        chip.close()
    chips.clear()
