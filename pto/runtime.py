"""``pto.Runtime(level=...)``: the one door to every level. It only picks the level's runtime
class and returns an instance of it; ``isinstance(rt, pto.Runtime)`` holds for all three.

    level="chip"     L2  pto/chip/runtime.py     ChipRuntime: one simulated chip, this process
    level="host"     L3  pto/host/runtime.py     HostRuntime: chips of a host, via a broker
    level="cluster"  L4  pto/cluster/runtime.py  ClusterRuntime: many hosts, on Ray

Each level's module is imported on first use, so ``import pto`` loads neither the compiler
nor Ray.
"""

from __future__ import annotations

from typing import Any

from .base import RuntimeBase

LEVELS = ("chip", "host", "cluster")  # L2, L3, L4


class _Door(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, RuntimeBase)


class Runtime(metaclass=_Door):
    """``pto.Runtime(level="host", ...)`` returns the runtime of that level (keyword
    arguments are the level's: see ``HostRuntime``, ``ChipRuntime``, ``ClusterRuntime``).

    >>> with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
    ...     rt.register("double", orch=double, kernels={"scale": scale})
    ...     y = rt.run("double", args={"input": np.ones(4, np.float32)})
    """

    def __new__(cls, level: str = "host", *args: Any, **kwargs: Any) -> Any:
        level = check_level(level)
        if level == "chip":
            from .chip.runtime import ChipRuntime

            return ChipRuntime(*args, **kwargs)
        if level == "cluster":
            from .cluster.runtime import ClusterRuntime

            return ClusterRuntime(*args, **kwargs)
        from .host.runtime import HostRuntime

        return HostRuntime(*args, **kwargs)


def check_level(level: Any) -> str:
    """``level`` normalised (the original's spelling is case-insensitive), or ValueError."""
    norm = level.lower() if isinstance(level, str) else level
    if norm not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))} "
                         f"(L2, L3, L4), not {level!r}")
    return norm


__all__ = ["Runtime", "LEVELS", "check_level"]
