"""Task arguments: tensors (by handle) and scalars, with the way a task uses each."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ParamType(IntEnum):
    """How a task uses an argument. The values are the PTO_* kinds of pto_kernel.h."""

    SCALAR = 0
    INPUT = 1  # read
    OUTPUT = 2  # written
    INOUT = 3  # read and written
    NO_DEP = 4  # passed writable, but takes part in no dependency (the caller orders it)
    OUTPUT_EXISTING = 5  # written over an existing tensor's data, never zeroed or reallocated


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a task.

    >>> pto.Arg.input(x), pto.Arg.output(y), pto.Arg.scalar(2.0)

    A tensor argument takes a ``TensorHandle`` or a numpy array. An array is copied into
    shared memory once when the task is submitted; for ``output``/``inout`` the result is
    copied back into the array when the run ends. Pass handles to avoid those copies.
    """

    kind: ParamType
    value: Any

    @staticmethod
    def input(tensor: Any) -> Arg:
        return Arg(ParamType.INPUT, tensor)

    @staticmethod
    def output(tensor: Any) -> Arg:
        return Arg(ParamType.OUTPUT, tensor)

    @staticmethod
    def inout(tensor: Any) -> Arg:
        return Arg(ParamType.INOUT, tensor)

    @staticmethod
    def scalar(value: int | float | bool) -> Arg:
        return Arg(ParamType.SCALAR, value)

    @staticmethod
    def no_dep(tensor: Any) -> Arg:
        """A tensor the task may read and write that orders nothing (upstream's NO_DEP)."""
        return Arg(ParamType.NO_DEP, tensor)

    @staticmethod
    def output_existing(tensor: Any) -> Arg:
        """An output written over an existing tensor (its other bytes keep their values)."""
        return Arg(ParamType.OUTPUT_EXISTING, tensor)
