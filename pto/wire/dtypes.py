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

# numpy has no bfloat16: code 11 is raw 16-bit storage, a uint16 dtype marked by metadata
# (so it keeps its code through views). A real bfloat16 dtype (ml_dtypes) maps to it too.
BFLOAT16_CODE = 11
bfloat16 = np.dtype(np.uint16, metadata={"pto": "bfloat16"})
CODE_DTYPES[BFLOAT16_CODE] = bfloat16


def dtype_code(dtype: object) -> int:
    """Return the code of a supported dtype; raise TypeError for anything else."""
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError as exc:
        raise TypeError(f"not a numpy dtype: {dtype!r}") from exc
    if _is_bfloat16(dt):
        return BFLOAT16_CODE
    code = DTYPE_CODES.get(dt) if dt.isnative else None
    if code is None:
        supported = ", ".join(sorted(str(d) for d in DTYPE_CODES))
        raise TypeError(f"unsupported tensor dtype {dt}; supported: {supported}, "
                        "bfloat16 (pto.wire.dtypes.bfloat16 or ml_dtypes.bfloat16)")
    return code


def _is_bfloat16(dt: np.dtype) -> bool:
    if dt.metadata is not None and dt.metadata.get("pto") == "bfloat16":
        return True
    return dt.name == "bfloat16" and dt.itemsize == 2  # e.g. ml_dtypes.bfloat16
