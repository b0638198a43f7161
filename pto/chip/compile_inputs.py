"""What ``pto.compile`` is given: kernel and orchestration specs -> sources and objects.

A spec is a path (a C/C++ source, or a prebuilt ``.o``/``.a``/``.so``), ``{"source": path,
"name": symbol}`` or ``{"object": bytes or path, "name": symbol}``. ``InputReader`` turns
each into ``(symbol, input)``, where an input is a ``Source`` to compile or a
``pto.chip.prebuilt.Prebuilt`` to link as it is; ``check_names`` vets the symbols as a set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import prebuilt
from .prebuilt import Prebuilt

C_SUFFIXES = {".c"}
CXX_SUFFIXES = {".cc", ".cpp", ".cxx", ".c++", ".C"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Source:
    """A C or C++ source file to compile into the package."""

    path: Path
    cxx: bool

    @property
    def label(self) -> str:
        return str(self.path)


Input = Source | Prebuilt  # one thing to compile, or to link as it is


class InputReader:
    """Turns kernel and orchestration specs into inputs, reading each object file once
    (several kernels of one ``.o`` share its bytes, hence one consistent version)."""

    def __init__(self) -> None:
        self._objects: dict[Path | str, Prebuilt] = {}

    def entry(self, spec: Any, what: str, default_name: str | None) -> tuple[str, Input]:
        """``(symbol, input)`` of one kernel or orchestration spec."""
        if isinstance(spec, Mapping):
            keys = set(spec)
            if keys - {"name"} not in ({"source"}, {"object"}):
                raise ValueError(f"a {what} given as a dict takes 'source' (a path) or "
                                 "'object' (a path or bytes), and optionally 'name', not "
                                 f"{sorted(spec)}")
            source = spec.get("source", spec.get("object"))
            name = spec.get("name")
        elif isinstance(spec, (str, os.PathLike)):
            source, name = spec, None
        else:
            raise TypeError(f"a {what} is a path (a source, or a .o/.a/.so object), "
                            "{'source': path, 'name': symbol} or {'object': bytes, 'name': "
                            f"symbol}}, not {type(spec).__name__}")
        if isinstance(source, (bytes, bytearray, memoryview)):
            if "object" not in spec or not name:
                raise ValueError(f"a {what} given as bytes needs {{'object': bytes, 'name': "
                                 "'symbol'}} (bytes carry no file name to take a symbol from)")
            _check_ident(name, what, "the object bytes")
            return name, self._bytes(bytes(source), name)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"the {what}'s source must be a path, not {type(source).__name__}")
        path = Path(os.fspath(source)).expanduser().resolve()
        is_object = prebuilt.is_prebuilt_path(path)
        if not is_object and path.suffix not in C_SUFFIXES | CXX_SUFFIXES:
            raise ValueError(f"{what} {str(source)!r}: expected a C (.c) or C++ (.cc .cpp "
                             ".cxx) source, or a prebuilt object (.o .a .so)")
        if not path.is_file():
            raise FileNotFoundError(f"{what} {'object' if is_object else 'source'} not found: "
                                    f"{path}")
        name = name or default_name or path.stem
        _check_ident(name, what, path.name)
        if not is_object:
            return name, Source(path, path.suffix in CXX_SUFFIXES)
        if path not in self._objects:
            self._objects[path] = prebuilt.read_prebuilt(path)
        return name, self._objects[path]

    def _bytes(self, data: bytes, name: str) -> Prebuilt:
        obj = prebuilt.from_bytes(data, name)
        return self._objects.setdefault(obj.digest, obj)  # the same bytes twice: one input


def _check_ident(name: Any, what: str, origin: str) -> None:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise ValueError(f"{what} name {name!r} (from {origin}) is not a C identifier; "
                         "give {'source': ..., 'name': 'symbol'}")


def check_names(named: list[tuple[str, Input]], orch: tuple[str, Input] | None) -> None:
    seen: dict[str, Input] = {}
    for name, item in named:
        if name.startswith("pto_"):
            raise ValueError(f"kernel name {name!r} ({item.label}): names starting with 'pto_' "
                             "are reserved for the runtime")
        if name in seen:
            raise ValueError(f"two kernels are named {name!r} ({seen[name].label}, "
                             f"{item.label})")
        seen[name] = item
    if orch is not None and orch[0] in seen:
        raise ValueError(f"{orch[0]!r} is both a kernel and the orchestration")
