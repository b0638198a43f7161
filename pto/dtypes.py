"""Element types a tensor may hold, and their wire/ABI codes (PTO_* in pto_kernel.h)."""

from __future__ import annotations

import numpy as np

# Codes are part of the wire format and the C ABI: never renumber, only append.
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.bool_): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.uint8): 6,
    np.dtype(np.uint16): 7,
    np.dtype(np.uint32): 8,
    np.dtype(np.uint64): 9,
    np.dtype(np.float16): 10,
    np.dtype(np.float32): 12,
    np.dtype(np.float64): 13,
}
CODE_DTYPES: dict[int, np.dtype] = {code: dt for dt, code in DTYPE_CODES.items()}


def dtype_code(dtype: object) -> int:
    """Return the code of a supported dtype; raise TypeError for anything else."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise TypeError(f"not a numpy dtype: {dtype!r}") from exc
    code = DTYPE_CODES.get(dt) if dt.isnative else None
    if code is None:
        supported = ", ".join(sorted(str(d) for d in DTYPE_CODES))
        raise TypeError(f"unsupported tensor dtype {dt}; supported: {supported}")
    return code
