"""Just enough ELF and ``ar`` reading for ``pto.compile`` to vet prebuilt kernel objects.

Before a prebuilt ``.o``, ``.a`` or ``.so`` is linked into a package, the compiler asks
here what it is (relocatable object, shared library), which machine it was built for,
which global symbols it defines and needs, and a shared library's ``SONAME``, so that a
wrong input fails with a message naming the file and the symbol rather than a linker
dump. Reads bytes only; runs nothing.
"""

from __future__ import annotations

import functools
import struct
import sys
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
AR_MAGIC = b"!<arch>\n"
THIN_AR_MAGIC = b"!<thin>\n"
ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NULL, _DT_SONAME, _DT_FLAGS_1 = 0, 14, 0x6FFFFFFB
_DF_1_PIE = 0x08000000  # a position-independent executable: ET_DYN, but not a library
_STB_GLOBAL, _STB_WEAK, _STB_GNU_UNIQUE = 1, 2, 10
_STV_HIDDEN = 2
_SHN_UNDEF = 0
_MACHINES = {3: "x86", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
             62: "x86-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch"}


class NotAnObject(ValueError):
    """The bytes are not an ELF object (or archive of them) this reader understands."""


@dataclass(frozen=True)
class Machine:
    """What an ELF file was built for: word size, byte order and CPU."""

    bits: int
    little: bool
    machine: int

    def __str__(self) -> str:
        cpu = _MACHINES.get(self.machine, f"machine {self.machine}")
        return f"{cpu}, {self.bits}-bit {'little' if self.little else 'big'}-endian"


@dataclass(frozen=True)
class ElfInfo:
    """One ELF file: its type (``ET_REL``, ``ET_DYN``...), machine, the global symbols it
    defines (exported ones, for a shared library) and needs, its ``SONAME``, and whether
    it is a position-independent executable (type ``ET_DYN`` too)."""

    etype: int
    machine: Machine
    defined: frozenset[str]
    undefined: frozenset[str]
    soname: str | None
    pie: bool = False


@functools.cache
def host_machine() -> Machine | None:
    """The machine this Python runs on, read from its own executable (None: not ELF)."""
    try:
        with open(sys.executable, "rb") as f:
            head = f.read(64)
        return _header(head)[0]
    except (OSError, NotAnObject):
        return None


def read_elf(data: bytes) -> ElfInfo:
    """Parse one ELF file; raises NotAnObject if ``data`` is not one."""
    machine, etype, shoff, shentsize, shnum = _header(data)
    end = "<" if machine.little else ">"
    shdr = end + ("IIQQQQIIQQ" if machine.bits == 64 else "IIIIIIIIII")
    if shnum and shentsize < struct.calcsize(shdr):
        raise NotAnObject("malformed ELF section headers")
    sections = []
    for i in range(shnum):
        start = shoff + i * shentsize
        if start + struct.calcsize(shdr) > len(data):
            raise NotAnObject("truncated ELF file (section headers past its end)")
        name, stype, _flags, _addr, offset, size, link, _info, _align, entsize = \
            struct.unpack_from(shdr, data, start)
        sections.append((stype, offset, size, link, entsize))
    want = _SHT_DYNSYM if etype == ET_DYN else _SHT_SYMTAB
    defined: set[str] = set()
    undefined: set[str] = set()
    soname, pie = None, False
    for stype, offset, size, link, entsize in sections:
        if stype == want and link < len(sections):
            strtab = _section_bytes(data, sections[link])
            _symbols(data[offset:offset + size], entsize, strtab, machine, etype == ET_DYN,
                     defined, undefined)
        elif stype == _SHT_DYNAMIC and link < len(sections):
            name, flags_1 = _dynamic(data[offset:offset + size],
                                     _section_bytes(data, sections[link]), machine)
            soname, pie = name or soname, pie or bool(flags_1 & _DF_1_PIE)
    return ElfInfo(etype, machine, frozenset(defined), frozenset(undefined), soname, pie)


def archive_members(data: bytes) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each member of a (GNU or BSD) ``ar`` archive, symbol tables aside."""
    if data.startswith(THIN_AR_MAGIC):
        raise NotAnObject("a thin archive (its members live in other files); build a normal "
                          "archive with `ar rcs` or pass the objects themselves")
    if not data.startswith(AR_MAGIC):
        raise NotAnObject("not an ar archive")
    members, pos, long_names = [], len(AR_MAGIC), b""
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise NotAnObject(f"malformed archive member header at byte {pos}")
        raw_name = header[:16].decode("latin-1").rstrip()
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise NotAnObject(f"malformed archive member size at byte {pos}") from None
        body = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
        if raw_name in ("/", "/SYM64/", "__.SYMDEF", "__.SYMDEF SORTED"):
            continue  # the archive's symbol index
        if raw_name == "//":
            long_names = body
            continue
        if raw_name.startswith("#1/"):  # BSD: the name leads the body
            n = int(raw_name[3:])
            name, body = body[:n].rstrip(b"\0").decode("latin-1"), body[n:]
        elif raw_name.startswith("/") and raw_name[1:].isdigit():  # GNU long name
            off = int(raw_name[1:])
            name = long_names[off:long_names.find(b"\n", off)].decode("latin-1").rstrip("/")
        else:
            name = raw_name.rstrip("/")
        members.append((name, body))
    return members


def _header(data: bytes) -> tuple[Machine, int, int, int, int]:
    if not data.startswith(ELF_MAGIC) or len(data) < 52:
        raise NotAnObject("not an ELF file")
    bits = {1: 32, 2: 64}.get(data[4])
    little = {1: True, 2: False}.get(data[5])
    if bits is None or little is None:
        raise NotAnObject("an ELF file of unknown class or byte order")
    end = "<" if little else ">"
    etype, machine = struct.unpack_from(end + "HH", data, 16)
    if bits == 64:
        if len(data) < 64:
            raise NotAnObject("truncated ELF header")
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
    return Machine(bits, little, machine), etype, shoff, shentsize, shnum


def _section_bytes(data: bytes, section: tuple[int, int, int, int, int]) -> bytes:
    _stype, offset, size, _link, _entsize = section
    return data[offset:offset + size]


def _cstring(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset:end if end >= 0 else len(table)].decode("utf-8", errors="replace")


def _symbols(table: bytes, entsize: int, strtab: bytes, machine: Machine, exported: bool,
             defined: set[str], undefined: set[str]) -> None:
    end = "<" if machine.little else ">"
    fmt = end + ("IBBHQQ" if machine.bits == 64 else "IIIBBH")
    size = struct.calcsize(fmt)
    step = entsize if entsize >= size else size
    for pos in range(step, len(table) - size + 1, step):  # entry 0 is the null symbol
        fields = struct.unpack_from(fmt, table, pos)
        if machine.bits == 64:
            name_off, info, other, shndx = fields[0], fields[1], fields[2], fields[3]
        else:
            name_off, info, other, shndx = fields[0], fields[3], fields[4], fields[5]
        if info >> 4 not in (_STB_GLOBAL, _STB_WEAK, _STB_GNU_UNIQUE) or not name_off:
            continue
        name = _cstring(strtab, name_off).split("@", 1)[0]  # drop a symbol version
        if shndx == _SHN_UNDEF:
            undefined.add(name)
        elif not exported or (other & 3) != _STV_HIDDEN:  # a library hides hidden ones
            defined.add(name)


def _dynamic(dynamic: bytes, strtab: bytes, machine: Machine) -> tuple[str | None, int]:
    """``(SONAME or None, DT_FLAGS_1)`` from a dynamic section."""
    fmt = ("<" if machine.little else ">") + ("qQ" if machine.bits == 64 else "iI")
    size = struct.calcsize(fmt)
    soname, flags_1 = None, 0
    for pos in range(0, len(dynamic) - size + 1, size):
        tag, value = struct.unpack_from(fmt, dynamic, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_SONAME:
            soname = _cstring(strtab, value)
        elif tag == _DT_FLAGS_1:
            flags_1 = value
    return soname, flags_1
