"""``pto.compile``: C/C++ kernels and an orchestration -> one cached package for a platform.

A "sim" package is a shared library holding the user's sources and prebuilt objects
(``.o``, ``.a``, ``.so`` or object bytes, vetted by ``pto.chip.prebuilt``), a generated table
of its kernels (name -> function) and the simulated chip runtime (``pto/sim/pto_sim.c``).
Builds are cached under ``PTO_CACHE_DIR`` (default ``~/.cache/pto``) by the SHA-256 of
every byte that can change the result: each source and every header it includes, each
prebuilt object, every existing file the flags name, the flags, the platform and the
compiler's version. An entry is built in a private temporary directory and renamed into
place, so concurrent builds of one package all succeed and leave one entry, a failed
build leaves none, and a reader never sees half of one.

What a package means once registered, and the L3 seam that ships it to the workers
(``kernel_registration``), live in ``pto.chip.package``; the worker's side in
``pto.chip.runner``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform as pyplatform  # "platform" names the target platform here
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..wire import config
from ..wire.errors import CompileError
from . import prebuilt
from .compile_inputs import Input, InputReader, Source, check_names
from .package import CompiledPackage, KernelRef, kernel_registration
from .prebuilt import Prebuilt

_PKG_DIR = Path(__file__).resolve().parent
_INCLUDE_DIR = _PKG_DIR / "include"
_SIM_RUNTIME = _PKG_DIR / "sim" / "pto_sim.c"

_BUILD_FORMAT = 2  # bump when the build recipe changes: old cache entries stop matching
_BASE_CFLAGS = ("-O2", "-fPIC", "-pthread")
_LINK_FLAGS = ("-shared", "-pthread", "-Wl,-z,defs", "-Wl,-Bsymbolic")  # defs: no unresolved
_LINK_LIBS = ("-lm",)
_DEFAULT_ORCH = "pto_orchestrate"
_HARDWARE_PLATFORMS = ("a2a3", "a5")
_STALE_TMP_S = 24 * 3600.0


def include_dir() -> str:
    """The directory holding ``pto_kernel.h``, for ``-I`` when building outside pto.

    >>> subprocess.run(["cc", "-I", pto.include_dir(), "-c", "add.c"])
    """
    return str(_INCLUDE_DIR)


def compile(platform: str = "sim", kernels: Iterable[Any] = (), orch: Any = None,
            flags: Sequence[str] = ()) -> CompiledPackage:
    """Build kernels (and an optional orchestration) into a package, or reuse the cache.

    >>> pkg = pto.compile(platform="sim",
    ...                   kernels=["kernels/add.c", {"source": "kernels/mul.cpp", "name": "mul"},
    ...                            "build/vadd.o", {"object": obj_bytes, "name": "vsub"}],
    ...                   orch="kernels/orch.c", flags=["-O3"])

    A kernel is a path (its symbol is the file's stem) or ``{"source": path, "name":
    symbol}``; ``orch`` likewise (default symbol ``pto_orchestrate``). A path is a C or C++
    source, or a prebuilt object linked as it is: ``.o``, ``.a`` or ``.so`` (also
    ``{"object": bytes, "name": symbol}``). C++ symbols must be ``extern "C"``. Raises
    ``pto.CompileError`` with the compiler's output, or naming the object and symbol.
    """
    _check_platform(platform)
    if isinstance(flags, (str, bytes)) or not all(isinstance(f, str) for f in flags):
        raise TypeError(f"flags must be a list of strings such as ['-O3'], not {flags!r}")
    flags = tuple(flags)
    if isinstance(kernels, (str, os.PathLike, Mapping)):
        kernels = [kernels]  # a lone kernel: surely one, not its characters
    reader = InputReader()
    named = [reader.entry(k, "kernel", None) for k in kernels]
    entry = reader.entry(orch, "orchestration", _DEFAULT_ORCH) if orch is not None else None
    check_names(named, entry)
    if not named and entry is None:
        raise ValueError("pto.compile needs at least one kernel or an orchestration")
    roles = [(n, i, "kernel") for n, i in named] + ([(*entry, "orchestration")] if entry else [])
    for name, item, role in roles:
        if isinstance(item, Prebuilt):
            prebuilt.check_defines(item, name, role)
    inputs = list(dict.fromkeys(item for _, item in named + ([entry] if entry else [])))
    srcs = [i for i in inputs if isinstance(i, Source)]
    objs = [i for i in inputs if isinstance(i, Prebuilt)]
    tools = _Toolchain.find(any(s.cxx for s in srcs) or any(o.needs_cxx for o in objs))
    table = _table_source([name for name, _ in named], entry[0] if entry else None)
    key = _cache_key(platform, srcs, objs, table, flags, tools)
    root = cache_dir() / platform
    final = root / key
    if not (final / "package.json").exists():
        _build(root, final, key, _Build(srcs, objs, table, flags, tools, named, entry))
    return _load_entry(final, platform)


def cache_dir() -> Path:
    """Where packages are cached: ``PTO_CACHE_DIR``, else ``$XDG_CACHE_HOME/pto`` or
    ``~/.cache/pto``."""
    explicit = config.load().cache_dir
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pto"


# ---- inputs ------------------------------------------------------------------------------


def _check_platform(platform: str) -> None:
    if platform == "sim":
        return
    if platform in _HARDWARE_PLATFORMS:
        raise ValueError(f"platform {platform!r} needs Ascend hardware and the Ascend toolkit "
                         "(CANN), which this machine lacks; use platform='sim' to simulate a "
                         "chip on the CPU")
    raise ValueError(f"unknown platform {platform!r}; platforms: 'sim' (CPU simulation), "
                     f"{', '.join(repr(p) for p in _HARDWARE_PLATFORMS)} (Ascend hardware)")


def _table_source(kernels: list[str], orch: str | None) -> str:
    """The generated C file that names the package's kernels and its orchestration."""
    lines = ["/* generated by pto.compile: the kernels of this package */",
             '#include "pto_kernel.h"', ""]
    lines += [f"void {k}(const pto_arg *args, int32_t nargs);" for k in kernels]
    if orch:
        lines.append(f"int {orch}(pto_chip *chip, const pto_arg *args, int32_t nargs);")
    names = "".join(f'"{k}", ' for k in kernels)
    fns = "".join(f"{k}, " for k in kernels)
    lines += [
        f"const char *const pto_sim_kernel_names[] = {{{names}0}};",
        f"const pto_kernel_fn pto_sim_kernel_fns[] = {{{fns}0}};",
        f"const int32_t pto_sim_kernel_count = {len(kernels)};",
        f"const pto_orch_fn pto_sim_orch_entry = {orch or '0'};",
        f'const char pto_sim_orch_name[] = "{orch or ""}";',
        "",
    ]
    return "\n".join(lines)


# ---- the toolchain -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Toolchain:
    cc: tuple[str, ...]
    cxx: tuple[str, ...] | None
    identity: str  # the compilers' commands and versions: part of the cache key

    @staticmethod
    def find(need_cxx: bool) -> _Toolchain:
        cc = _command("CC", "cc")
        cxx = _command("CXX", "c++") if need_cxx else None
        identity = _version(cc) + (("\n" + _version(cxx)) if cxx else "")
        return _Toolchain(cc, cxx, identity)

    def driver(self, src: Source) -> tuple[str, ...]:
        return self.cxx if src.cxx and self.cxx else self.cc

    def linker(self) -> tuple[str, ...]:
        return self.cxx or self.cc  # C++ objects need the C++ driver's runtime libraries


def _command(var: str, default: str) -> tuple[str, ...]:
    words = tuple(shlex.split(os.environ.get(var) or default))
    if not words or shutil.which(words[0]) is None:
        lang = "C++" if var == "CXX" else "C"
        raise CompileError(f"no {lang} compiler: {words[0] if words else '(empty)'!r} is not on "
                           f"PATH; install gcc/g++ (or clang) or set {var}")
    return words


@functools.cache
def _version(cmd: tuple[str, ...]) -> str:
    out = _run([*cmd, "--version"], "asking the compiler for its version")
    return f"{shutil.which(cmd[0])} {' '.join(cmd[1:])}: {out.stdout.strip()}"


def _env() -> dict[str, str]:
    # The C locale keeps the linker's messages parseable and the quotes in them ASCII.
    return {**os.environ, "LC_ALL": "C"}


def _run(cmd: Sequence[str], doing: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=_env(), cwd=cwd,
                              check=False)
    except OSError as exc:
        raise CompileError(f"{doing}: cannot run {cmd[0]}: {exc}", command=list(cmd)) from exc
    if proc.returncode != 0:
        raise CompileError(f"{doing} failed (exit {proc.returncode}):\n{proc.stderr.strip()}",
                           stderr=proc.stderr, command=list(cmd))
    return proc


def _cflags(flags: tuple[str, ...]) -> list[str]:
    return [*_BASE_CFLAGS, "-I", str(_INCLUDE_DIR), *flags]


# ---- the cache key -----------------------------------------------------------------------


def _headers(src: Source, tools: _Toolchain, flags: tuple[str, ...]) -> list[Path]:
    """Every header ``src`` includes, as the preprocessor resolves them (system ones aside)."""
    cmd = [*tools.driver(src), *_cflags(flags), "-MM", "-MT", "pto", str(src.path)]
    out = _run(cmd, f"reading the includes of {src.path}").stdout
    words = re.split(r"(?<!\\)\s+", out.replace("\\\n", " ").strip())
    paths = [w.replace("\\ ", " ") for w in words[1:] if w]  # words[0] is the target "pto:"
    return [Path(p) for p in paths if Path(p).resolve() != src.path]


def _flag_files(flags: tuple[str, ...]) -> list[Path]:
    """Every existing file a flag names (``extra.o``, ``-Wl,--version-script=v.map``,
    ``-Wl,/x/libk.a``): linked or read, so its bytes belong in the key."""
    found: dict[Path, None] = {}
    for flag in flags:
        words = [flag]
        if flag.startswith("-Wl,"):
            words += flag.split(",")[1:]
        words += [w.split("=", 1)[1] for w in list(words) if "=" in w]
        for word in words:
            with contextlib.suppress(OSError, ValueError):
                path = Path(word).expanduser()
                if word and path.is_file():
                    found[path.resolve()] = None
    return list(found)


def _cache_key(platform: str, srcs: list[Source], objs: list[Prebuilt], table: str,
               flags: tuple[str, ...], tools: _Toolchain) -> str:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(srcs)))) as pool:
        headers = list(pool.map(lambda s: _headers(s, tools, flags), srcs))
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}\n".encode())  # lengths keep boundaries unambiguous
        h.update(data)

    meta = {"format": _BUILD_FORMAT, "platform": platform, "flags": flags,
            "base": [_BASE_CFLAGS, _LINK_FLAGS, _LINK_LIBS], "compilers": tools.identity}
    feed("meta", json.dumps(meta, sort_keys=True).encode())
    if any("native" in f for f in flags):  # -march=native: the code depends on this CPU
        feed("cpu", _cpu_identity().encode())
    feed("table", table.encode())
    feed("runtime", _SIM_RUNTIME.read_bytes())
    feed("abi", (_INCLUDE_DIR / "pto_kernel.h").read_bytes())
    # Contents, not paths: a project that moves keeps its cache entries.
    for src, deps in zip(srcs, headers, strict=True):
        feed("c++" if src.cxx else "c", src.path.read_bytes())
        for dep in deps:
            feed("header", dep.read_bytes())
    for obj in objs:  # the bytes read once, which are also the ones linked
        feed(f"prebuilt-{obj.kind}", obj.data)
        if obj.kind == "so":
            feed("soname", (obj.soname or "").encode())
    for path in _flag_files(flags):
        feed("flag-file", path.read_bytes())
    return h.hexdigest()


@functools.cache
def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))  # the first CPU's lines; the rest repeat them
    except OSError:
        return pyplatform.machine() + pyplatform.processor()


# ---- building ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Build:
    """Everything one build needs, as resolved by ``compile``."""

    srcs: list[Source]
    objs: list[Prebuilt]
    table: str
    flags: tuple[str, ...]
    tools: _Toolchain
    named: list[tuple[str, Input]]
    orch: tuple[str, Input] | None


def _build(root: Path, final: Path, key: str, build: _Build) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
    try:
        log = _compile_and_link(tmp, build)
        (tmp / "build.log").write_text(log)
        manifest = {"sha256": key, "kernels": [n for n, _ in build.named],
                    "orch": build.orch[0] if build.orch else None,
                    "sources": [str(s.path) for s in build.srcs],
                    "objects": [{"from": o.label, "kind": o.kind, "sha256": o.digest}
                                for o in build.objs],
                    "flags": list(build.flags), "compilers": build.tools.identity,
                    "built": time.time()}
        (tmp / "package.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, final)  # atomic: readers see no entry or a whole one
        except OSError:
            if not (final / "package.json").exists():
                raise
            # Another process built the same package first; theirs is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind


def _compile_and_link(tmp: Path, build: _Build) -> str:
    tools, flags = build.tools, build.flags
    (tmp / "pto_sim_table.c").write_text(build.table)
    jobs = [(s, tmp / f"src{i}.o") for i, s in enumerate(build.srcs)]
    jobs.append((Source(_SIM_RUNTIME, False), tmp / "pto_sim.o"))
    jobs.append((Source(tmp / "pto_sim_table.c", False), tmp / "pto_sim_table.o"))

    def one(job: tuple[Source, Path]) -> str:
        src, obj = job
        cmd = [*tools.driver(src), *_cflags(flags), "-c", str(src.path), "-o", str(obj)]
        return _run(cmd, f"compiling {src.path}").stderr

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(jobs))) as pool:
        logs = list(pool.map(one, jobs))
    staged = prebuilt.stage(build.objs, tmp)
    out = tmp / "package.so"
    # Archives after every object, so their members resolve what the objects need.
    link = [*tools.linker(), *_LINK_FLAGS, "-o", str(out), *(str(o) for _, o in jobs),
            *map(str, staged.objects), *map(str, staged.archives), *staged.link_args, *flags,
            *_LINK_LIBS]
    try:
        logs.append(_run(link, "linking the package").stderr)
    except CompileError as exc:
        raise _missing_symbol_error(exc, build.named, build.orch) or exc from None
    if staged.shared:
        uses: dict[str, list[str]] = {}
        for name, item in build.named + ([build.orch] if build.orch else []):
            uses.setdefault(item.label, []).append(repr(name))
        prebuilt.check_loadable(out, build.objs, {k: ", ".join(v) for k, v in uses.items()})
    for obj in [*(o for _, o in jobs), *staged.objects, *staged.archives]:
        obj.unlink()  # the entry keeps the library, shared inputs, the table and the log
    return "".join(logs)


def _missing_symbol_error(exc: CompileError, named: list[tuple[str, Input]],
                          orch: tuple[str, Input] | None) -> CompileError | None:
    """A clearer error when the link failed because a kernel or the orchestration is missing."""
    undefined = set(re.findall(r"undefined reference to [`']([A-Za-z_][A-Za-z0-9_]*)'",
                               exc.stderr))
    wanted = [(n, p, "kernel") for n, p in named] + ([(*orch, "orchestration")] if orch else [])
    missing = [(n, p, what) for n, p, what in wanted if n in undefined]
    if not missing:
        return None
    lines = []
    for name, item, what in missing:
        cxx = isinstance(item, Source) and item.cxx
        hint = ' (C++: declare it extern "C")' if cxx else ""
        lines.append(f"{what} {name!r}: no exported function {name!r} in {item.label}{hint}")
    return CompileError("missing symbol: " + "; ".join(lines) + "\n" + exc.stderr.strip(),
                        stderr=exc.stderr, command=exc.command)


def _remove_stale_builds(root: Path) -> None:
    """Temporary directories of builds that died (killed compilers) more than a day ago."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)


def _load_entry(final: Path, platform: str) -> CompiledPackage:
    manifest = json.loads((final / "package.json").read_text())
    return CompiledPackage(path=str(final / "package.so"), sha256=manifest["sha256"],
                           kernels=tuple(manifest["kernels"]), orch=manifest["orch"],
                           platform=platform)


__all__ = ["compile", "include_dir", "cache_dir", "CompiledPackage", "KernelRef",
           "kernel_registration"]
