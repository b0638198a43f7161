"""The host side of a "sim" package: load its library, make chips, pack ``pto_arg``s, launch.

Calls go through ctypes, which releases the GIL for the duration of each C call, so other
Python threads run while kernels do. Tensors are passed as pointers to the caller's
memory (numpy arrays, or shared-memory views in a worker): nothing is copied.

>>> lib = open_package(pkg.path, pkg.sha256)
>>> chip = lib.new_chip(device=0, cores=4)
>>> argv = pack_args([x, y, z], [ParamType.INPUT, ParamType.INPUT, ParamType.OUTPUT], "add")
>>> chip.run(b"add", argv, block_dim=4)      # 0, or a PTO_ERR_* code
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..wire import config
from ..wire.args import ParamType
from ..wire.dtypes import dtype_code

MAX_DIMS = 8
ABI_VERSION = 1
PTO_BOOL, PTO_INT64, PTO_UINT64, PTO_FLOAT64 = 1, 5, 9, 13
ERROR_NAMES = {
    -1: "PTO_ERR_UNKNOWN_KERNEL", -2: "PTO_ERR_INVALID", -3: "PTO_ERR_KERNEL",
    -4: "PTO_ERR_NESTED", -5: "PTO_ERR_UNSUPPORTED", -6: "PTO_ERR_NO_MEMORY",
    -7: "PTO_ERR_NO_ORCH", -8: "PTO_ERR_BARRIER",
}
PTO_ERR_BARRIER = -8
_INT64_MAX, _UINT64_MAX = 2**63 - 1, 2**64 - 1
_SCALAR, _INPUT = int(ParamType.SCALAR), int(ParamType.INPUT)
_KINDS = frozenset(int(k) for k in ParamType)


class _Scalar(ctypes.Union):
    _fields_ = [("i", ctypes.c_int64), ("f", ctypes.c_double)]


class PtoArg(ctypes.Structure):
    """``pto_arg`` of pto_kernel.h (its size is checked against the library's)."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * MAX_DIMS),
        ("scalar", _Scalar),
    ]


BarrierFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class PtoLaunch(ctypes.Structure):
    """``pto_sim_launch`` of pto_sim.c: one logged launch (size checked at load)."""

    _fields_ = [
        ("kernel", ctypes.c_int32),
        ("block_dim", ctypes.c_int32),
        ("rc", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("start", ctypes.c_double),
        ("end", ctypes.c_double),
    ]


@dataclass(frozen=True)
class LaunchSpan:
    """One launch a chip ran: kernel, blocks, result code, and ``time.monotonic()`` times."""

    kernel: str
    block_dim: int
    rc: int
    start: float
    end: float


LAUNCHES_KEPT = 4096  # LAUNCH_LOG_MAX of pto_sim.c


class TaskCtx(ctypes.Structure):
    """``pto_task_ctx``: the group a chip's next task belongs to."""

    _fields_ = [
        ("rank", ctypes.c_int32),
        ("world", ctypes.c_int32),
        ("barrier", BarrierFn),
        ("barrier_state", ctypes.c_void_p),
    ]


def default_cores() -> int:
    """Cores of a simulated chip: ``PTO_SIM_CORES``, else the CPUs this process may use."""
    cores = config.load().sim_cores  # read at chip creation: tests and tools set it late
    if cores:
        return cores
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"error {code}")


def pack_args(values: Sequence[Any], kinds: Sequence[int], where: str) -> ctypes.Array:
    """A ``pto_arg`` array pointing at ``values`` (numpy arrays and Python numbers).

    Keep ``values`` alive while the array is in use: it holds raw pointers into them.
    """
    if len(values) != len(kinds):
        raise ValueError(f"{where}: {len(values)} values but {len(kinds)} kinds")
    argv = (PtoArg * len(values))()
    for i, (value, kind) in enumerate(zip(values, kinds, strict=True)):
        a = argv[i]  # a view into argv, not a copy
        if kind not in _KINDS:
            raise ValueError(f"argument {i} of {where}: unknown kind {kind!r}")
        a.kind = kind
        if kind == _SCALAR:
            _pack_scalar(a, value, i, where)
        else:
            _pack_tensor(a, value, kind, i, where)
    return argv


def _pack_scalar(a: PtoArg, value: Any, i: int, where: str) -> None:
    if isinstance(value, (bool, np.bool_)):
        a.dtype, a.scalar.i = PTO_BOOL, int(value)
    elif isinstance(value, (int, np.integer)):
        v = int(value)
        if not -(2**63) <= v <= _UINT64_MAX:
            raise OverflowError(f"scalar argument {i} of {where} does not fit in 64 bits")
        # Above int64, the bits of a uint64; the dtype says how to read them.
        a.dtype, a.scalar.i = (PTO_INT64, v) if v <= _INT64_MAX else (PTO_UINT64, v - 2**64)
    elif isinstance(value, (float, np.floating)):
        a.dtype, a.scalar.f = PTO_FLOAT64, float(value)
    else:
        raise TypeError(f"scalar argument {i} of {where} must be a bool, int or float, "
                        f"not {type(value).__name__}")


def _pack_tensor(a: PtoArg, value: Any, kind: int, i: int, where: str) -> None:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"argument {i} of {where} ({_kind_name(kind)}) must be a numpy array, "
                        f"not {type(value).__name__}")
    flags = value.flags
    if not flags.c_contiguous:
        # A copy would hide the kernel's writes from the caller: refuse, don't copy.
        raise ValueError(f"argument {i} of {where} ({_kind_name(kind)}) is not C-contiguous "
                         f"(strides {value.strides} for shape {value.shape}); pass "
                         "np.ascontiguousarray(...) and read results from that array")
    if kind != _INPUT and not flags.writeable:
        raise ValueError(f"argument {i} of {where} is read-only and cannot be an "
                         f"{_kind_name(kind)}")
    shape = value.shape
    if len(shape) > MAX_DIMS:
        raise ValueError(f"argument {i} of {where} has {len(shape)} dimensions; the kernel "
                         f"ABI takes at most {MAX_DIMS}")
    a.dtype = _code_of(value.dtype, i, where)
    a.data = value.ctypes.data
    a.nbytes = value.nbytes
    a.ndim = len(shape)
    a.shape[: len(shape)] = shape


def _kind_name(kind: int) -> str:
    return ParamType(kind).name.lower()


_codes: dict[int, tuple[np.dtype, int]] = {}  # id(dtype) -> (dtype, code): the hot path


def _code_of(dtype: np.dtype, i: int, where: str) -> int:
    # By identity, not equality: a bfloat16 dtype equals uint16 but has its own code.
    hit = _codes.get(id(dtype))
    if hit is not None and hit[0] is dtype:
        return hit[1]
    try:
        code = dtype_code(dtype)
    except TypeError as exc:
        raise TypeError(f"argument {i} of {where}: {exc}") from None
    if len(_codes) > 1024:
        _codes.clear()
    _codes[id(dtype)] = (dtype, code)  # holding the dtype keeps its id from being reused
    return code


class Library:
    """A package's shared library, loaded once per process per package hash."""

    def __init__(self, path: str, sha256: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"compiled package {sha256[:12]} not found at {path} "
                                    "(was the cache cleared, or is this another host?)")
        self.path, self.sha256 = path, sha256
        dll = ctypes.CDLL(path)  # CDLL, not PyDLL: calls release the GIL
        self._dll = dll
        _declare(dll)
        if dll.pto_sim_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path}: kernel ABI {dll.pto_sim_abi_version()}, expected "
                               f"{ABI_VERSION}; recompile it")
        if dll.pto_sim_arg_size() != ctypes.sizeof(PtoArg):
            raise RuntimeError(f"{path}: sizeof(pto_arg) is {dll.pto_sim_arg_size()}, "
                               f"Python expects {ctypes.sizeof(PtoArg)}")
        if dll.pto_sim_launch_record_size() != ctypes.sizeof(PtoLaunch):
            raise RuntimeError(f"{path}: its launch records do not match pto/chip/simlib.py; "
                               "recompile it")
        self.kernels = tuple(dll.pto_sim_kernel_name(i).decode()
                             for i in range(dll.pto_sim_kernel_total()))
        orch = dll.pto_sim_orch_symbol()
        self.orch: str | None = orch.decode() if orch else None
        self._process_chip: SimChip | None = None
        self._lock = threading.Lock()

    def new_chip(self, device: int, cores: int | None = None) -> SimChip:
        """A new simulated chip running this library's kernels."""
        return SimChip(self, device, cores or default_cores())

    def process_chip(self, device: int) -> SimChip:
        """This process's chip for the library (a worker runs one chip)."""
        with self._lock:
            if self._process_chip is None:
                self._process_chip = self.new_chip(device)
            return self._process_chip


class SimChip:
    """One simulated chip: a pool of cores in a library. Not shared between threads
    without a lock of the caller's (launches serialize in C; error state is per chip)."""

    def __init__(self, lib: Library, device: int, cores: int):
        self.lib = lib
        self.device = device
        self.cores = cores
        self._dll = lib._dll
        self._ptr = self._dll.pto_sim_chip_create(device, cores)
        if not self._ptr:
            raise MemoryError("cannot create a simulated chip")
        self._task: tuple[int, int, Callable[[], None] | None] = (0, 1, None)
        self.barrier_error: BaseException | None = None
        # One C callback for the chip's lifetime (ctypes must keep it alive); it calls the
        # current task's Python barrier, re-taking the GIL for that call only.
        self._barrier_cb = BarrierFn(self._on_barrier)
        self._launch_buf: ctypes.Array | None = None  # made on the first take_launches

    def run(self, kernel: bytes | None, argv: ctypes.Array, block_dim: int = 1) -> int:
        """Clear the chip's error, then launch ``kernel`` or (None) run the orchestration.

        One C call (the GIL is released during it); returns 0 or the non-zero code.
        """
        return self._dll.pto_sim_run(self._ptr, kernel, argv, len(argv), block_dim)

    def set_task(self, rank: int, world: int, barrier: Callable[[], None] | None = None) -> None:
        """The group of the next task: ``pto_rank()``, ``pto_world()``, and the function
        ``pto_barrier()`` calls (e.g. ``pto.task().barrier``) in a group of several."""
        task = (rank, world, barrier)
        if task != self._task:
            ctx = TaskCtx(rank, world, self._barrier_cb if barrier is not None else BarrierFn())
            self._dll.pto_sim_set_task(self._ptr, ctypes.byref(ctx))
            self._task = task
        self.barrier_error = None

    def _on_barrier(self, _state: int) -> int:
        try:
            self._task[2]()  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - C cannot take it: kept, raised later
            self.barrier_error = exc
            return PTO_ERR_BARRIER
        return 0

    def record_launches(self, on: bool = True) -> None:
        """Log every launch from now on (or stop); the log starts empty either way."""
        self._dll.pto_sim_record_launches(self._ptr, int(on))

    def take_launches(self) -> tuple[list[LaunchSpan], int]:
        """The launches logged since the last take (emptying the log), and how many more
        ran than were kept."""
        if self._launch_buf is None:
            self._launch_buf = (PtoLaunch * LAUNCHES_KEPT)()
        buf = self._launch_buf
        total = self._dll.pto_sim_take_launches(self._ptr, buf, LAUNCHES_KEPT)
        names = self.lib.kernels
        spans = [LaunchSpan(names[r.kernel], r.block_dim, r.rc, r.start, r.end)
                 for r in buf[:min(total, LAUNCHES_KEPT)]]
        return spans, total - len(spans)

    def error_code(self) -> int:
        """The code of the first failure since the last ``run`` began (0: none)."""
        return self._dll.pto_sim_error_code(self._ptr)

    def error_message(self) -> str:
        """The message of that failure ("" if none)."""
        buf = ctypes.create_string_buffer(1024)
        self._dll.pto_sim_error_message(self._ptr, buf, len(buf))
        return buf.value.decode(errors="replace")

    def close(self) -> None:
        """Stop the chip's core threads and free it."""
        if self._ptr:
            ptr, self._ptr = self._ptr, None
            self._dll.pto_sim_chip_destroy(ptr)


def _declare(dll: ctypes.CDLL) -> None:
    chip, argv = ctypes.c_void_p, ctypes.POINTER(PtoArg)
    i32, cstr = ctypes.c_int32, ctypes.c_char_p
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "pto_sim_abi_version": (i32, []),
        "pto_sim_arg_size": (i32, []),
        "pto_sim_chip_create": (chip, [i32, i32]),
        "pto_sim_chip_destroy": (None, [chip]),
        "pto_sim_set_task": (None, [chip, ctypes.POINTER(TaskCtx)]),
        "pto_sim_run": (ctypes.c_int, [chip, cstr, argv, i32, i32]),
        "pto_sim_error_code": (ctypes.c_int, [chip]),
        "pto_sim_error_message": (i32, [chip, ctypes.c_char_p, i32]),
        "pto_sim_kernel_total": (i32, []),
        "pto_sim_kernel_name": (cstr, [i32]),
        "pto_sim_orch_symbol": (cstr, []),
        "pto_sim_record_launches": (None, [chip, i32]),
        "pto_sim_take_launches": (i32, [chip, ctypes.POINTER(PtoLaunch), i32]),
        "pto_sim_launch_record_size": (i32, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes


_libraries: dict[str, Library] = {}
_libraries_lock = threading.Lock()


def open_package(path: str, sha256: str) -> Library:
    """The loaded library of a package (loaded on first use, then shared)."""
    with _libraries_lock:
        lib = _libraries.get(sha256)
        if lib is None:
            lib = _libraries[sha256] = Library(path, sha256)
        return lib
