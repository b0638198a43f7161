"""Prebuilt kernel objects for ``pto.compile``: ``.o``, ``.a``, ``.so`` files and object bytes.

An object built elsewhere (by the system compiler against ``pto.include_dir()``, or by a
vendor's script) is linked into the package as it is. This module is the compiler's half
that knows about such inputs: it reads them once (the same bytes are hashed into the
cache key and staged for the link, so a file rewritten mid-build cannot mix versions),
checks they are objects for this machine that define the symbols asked for, stages them
into the build directory, and proves a package that links shared libraries can be loaded.

    >>> obj = read_prebuilt(Path("add.o"))            # or from_bytes(data, "add")
    >>> check_defines(obj, "add", "kernel")           # CompileError naming file and symbol
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..wire.errors import CompileError
from . import elf

OBJECT_SUFFIXES = (".o", ".a", ".so")
# Undefined symbols that only the C++ runtime defines (C code uses __cxa_atexit/_finalize).
_CXX_RUNTIME = re.compile(r"_Z|__gxx_personality|__cxa_(?!atexit|finalize|thread_atexit)")


def is_prebuilt_path(path: Path) -> bool:
    """Whether a kernel path names an object rather than a source (``libx.so.1`` too)."""
    return path.suffix in OBJECT_SUFFIXES or ".so." in path.name


@dataclass(frozen=True)
class Prebuilt:
    """One prebuilt input: ``kind`` is ``"o"`` (relocatable), ``"a"`` (archive) or ``"so"``."""

    label: str  # how errors name it: the path, or "object bytes for 'symbol'"
    path: Path | None
    data: bytes
    kind: str
    members: tuple[elf.ElfInfo, ...]  # one per object (several for an archive)
    digest: str  # sha256 of data: identifies a bytes input

    @property
    def defined(self) -> frozenset[str]:
        return frozenset().union(*(m.defined for m in self.members))

    @property
    def needs_cxx(self) -> bool:
        """Linking it needs the C++ driver (its runtime library); a .so brings its own."""
        return self.kind != "so" and any(_CXX_RUNTIME.match(s) for m in self.members
                                         for s in m.undefined)

    @property
    def soname(self) -> str | None:
        return self.members[0].soname if self.kind == "so" else None


def read_prebuilt(path: Path) -> Prebuilt:
    """Read and vet the object at ``path`` (an absolute path that exists)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CompileError(f"cannot read prebuilt object {path}: {exc}") from None
    return _classify(str(path), path, data)


def from_bytes(data: bytes, symbol: str) -> Prebuilt:
    """Vet object bytes given as ``{"object": data, "name": symbol}``."""
    return _classify(f"object bytes given for {symbol!r}", None, bytes(data))


def _classify(label: str, path: Path | None, data: bytes) -> Prebuilt:
    digest = hashlib.sha256(data).hexdigest()
    try:
        if data.startswith((elf.AR_MAGIC, elf.THIN_AR_MAGIC)):
            members = elf.archive_members(data)
            if not members:
                raise elf.NotAnObject("an empty archive")
            infos = []
            for name, body in members:
                try:
                    infos.append(_object_for_this_machine(body, {elf.ET_REL}))
                except elf.NotAnObject as exc:
                    raise elf.NotAnObject(f"archive member {name!r}: {exc}") from None
            return Prebuilt(label, path, data, "a", tuple(infos), digest)
        info = _object_for_this_machine(data, {elf.ET_REL, elf.ET_DYN})
    except elf.NotAnObject as exc:
        raise CompileError(f"{label} is not an object pto can link for this machine: {exc}"
                           ) from None
    kind = "so" if info.etype == elf.ET_DYN else "o"
    return Prebuilt(label, path, data, kind, (info,), digest)


def _object_for_this_machine(data: bytes, types: set[int]) -> elf.ElfInfo:
    if not data.startswith(elf.ELF_MAGIC):
        start = data[:8]
        raise elf.NotAnObject(f"not an ELF object (it starts with {start!r}); build it with "
                              "`cc -c -fPIC` (a .o), `ar rcs` (a .a) or `cc -shared` (a .so)")
    info = elf.read_elf(data)
    host = elf.host_machine()
    if host is not None and info.machine != host:
        raise elf.NotAnObject(f"it was built for {info.machine}, this machine is {host}")
    if info.etype not in types or info.pie:
        what = ("an executable" if info.etype == elf.ET_EXEC or info.pie
                else f"an ELF file of type {info.etype}")
        raise elf.NotAnObject(f"{what}, not a relocatable object (cc -c) or shared library")
    return info


def check_defines(obj: Prebuilt, symbol: str, what: str) -> None:
    """CompileError unless ``obj`` defines the global symbol ``symbol`` (a kernel's or the
    orchestration's), with the symbols it does define and a hint for C++ names."""
    defined = obj.defined
    if symbol in defined:
        return
    mangled = sorted(s for s in defined if re.match(rf"_Z{len(symbol)}{symbol}\D", s + " "))
    hint = (f' (it has the C++ symbol {mangled[0]}: declare the function extern "C")'
            if mangled else "")
    shown = sorted(s for s in defined if not s.startswith("_"))[:12]
    listing = ", ".join(shown) if shown else "no exported functions"
    raise CompileError(f"missing symbol: {what} {symbol!r}: {obj.label} defines no global "
                       f"symbol {symbol!r}{hint}; it defines: {listing}. Give the symbol "
                       "as {'source': path, 'name': 'symbol'} (or 'object': bytes)")


@dataclass(frozen=True)
class Staged:
    """Where prebuilt inputs went in the build directory, in the order the link needs."""

    objects: list[Path]  # relocatable objects: linked whole, beside the compiled sources
    archives: list[Path]  # after every object, so their members resolve what those need
    shared: list[str]  # file names of the shared libraries, next to package.so
    link_args: list[str]  # -L/-l/-rpath for the shared libraries


def stage(objs: Sequence[Prebuilt], tmp: Path) -> Staged:
    """Write each input's bytes (the ones hashed) into ``tmp`` for the link."""
    objects, archives, shared, rpaths = [], [], [], []
    for i, obj in enumerate(objs):
        if obj.kind == "o":
            target = tmp / f"prebuilt{i}.o"
            objects.append(target)
        elif obj.kind == "a":
            target = tmp / f"libprebuilt{i}.a"
            archives.append(target)
        else:
            # The dynamic linker looks a library up by its SONAME (else the name it was
            # linked as): the copy kept next to package.so carries exactly that name.
            name = obj.soname or (obj.path.name if obj.path else f"libpto_prebuilt{i}.so")
            if "/" in name or name in shared or name in ("package.so",):
                raise CompileError(f"{obj.label}: two shared libraries (or a reserved name) "
                                   f"would be kept as {name!r} in the package; give them "
                                   "distinct SONAMEs")
            target = tmp / name
            shared.append(name)
            if obj.path is not None:  # its own dependencies may sit next to it
                rpaths.append(str(obj.path.parent))
        target.write_bytes(obj.data)
    link_args: list[str] = []
    if shared:
        link_args = [f"-L{tmp}", *(f"-l:{n}" for n in shared),
                     "-Wl,-rpath," + ":".join(["$ORIGIN", *dict.fromkeys(rpaths)])]
    return Staged(objects, archives, shared, link_args)


_LOAD_SCRIPT = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"


def check_loadable(library: Path, objs: Sequence[Prebuilt], symbols: dict[str, str]) -> None:
    """Load the built package in a child process (RTLD_NOW, as ctypes does) so that a
    shared library that cannot be loaded fails the build, not the first run.

    ``symbols`` maps each shared input's label to the symbols the package takes from it.
    """
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(library)],
                          capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode == 0:
        return
    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else \
        f"exit {proc.returncode}"
    missing = re.search(r"undefined symbol: (\S+)", err)
    named = [o for o in objs if o.kind == "so" and (o.soname or (o.path.name if o.path else
                                                                  "")) in err]
    culprits = named or [o for o in objs if o.kind == "so"]
    parts = [f"{o.label} (for {symbols.get(o.label, 'its symbols')})" for o in culprits]
    detail = f"; symbol {missing.group(1)!r} is defined nowhere" if missing else ""
    raise CompileError(f"shared library {' / '.join(parts)} cannot be loaded{detail}: {err}",
                       stderr=proc.stderr)
