"""What every level's runtime shares: ``with`` blocks, ``repr``, closing at interpreter exit,
refusing calls once closed, and checking timeouts.

``pto.Runtime(level=...)`` (pto/runtime.py) returns one of three subclasses:
``pto.chip.runtime.ChipRuntime`` (L2, in this process), ``pto.host.runtime.HostRuntime``
(L3, through a broker) and ``pto.cluster.runtime.ClusterRuntime`` (L4, on Ray). This module
imports nothing above the shared layer, so every level can build on it.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, ClassVar

from .wire.errors import PtoError


class RuntimeBase:
    """A runtime of one level. Subclasses set ``level``, implement ``close()`` (idempotent)
    and ``_describe()`` (what ``repr`` shows while open), and call ``_opened()`` once fully
    started."""

    level: ClassVar[str]
    _closed: bool = True  # until _opened(): close() has nothing to do

    def _opened(self) -> None:
        """Mark the runtime usable and close it at interpreter exit if the user does not."""
        self._closed = False
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run (or start-up never finished)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise PtoError("the runtime is closed")

    def close(self) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        return ""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._describe()
        return f"<pto.Runtime {self.level} {state}>"


def check_timeout(value: Any, what: str = "timeout") -> float:
    """``value`` as seconds, or ValueError unless it is a positive number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _close_at_exit(ref: weakref.ref) -> None:
    rt = ref()
    if rt is not None:
        rt.close()
