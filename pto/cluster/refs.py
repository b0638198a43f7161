"""``pto.Ref`` and the structures that travel between the driver and the host actors.

An L3 run's result lives on its host: the host actor returns the entry's return value with
every ``TensorHandle`` replaced by a ``TensorDesc`` (host, key, segment name, shape, dtype,
the address of the host's tensor server) and keeps the handle alive. The driver keeps that
value (pickled, as it arrived) in the run's ``RunOutput``, which every ``Ref`` (and
``ref[0]``/``ref["k"]``, the same output with a path into it) holds. A Ref is a pto-level
name, (host, run, path): nothing of Ray. When the last holder of an output is gone, its
finalizer tells the host (and every host that copied its tensors) to drop them
(pto/cluster/release.py).

Refs in a later ``ctx.submit``'s args become ``_Slot`` placeholders in an argument template
plus the list of outputs they name; once those runs are done the driver sends the host the
template and their values, and the host puts them back (``fill``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MAX_DEPTH = 16  # nesting of lists/tuples/dicts walked in args and return values


@dataclass(frozen=True, slots=True)
class TensorDesc:
    """A tensor kept by host ``host`` under ``key`` (run id, position): no bytes, ~100 B."""

    host: int
    key: tuple[int, int]
    name: str  # the host's shm segment name (for traces and errors)
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    endpoint: str = ""  # the producer host's tensor server, where a copy is pulled from


@dataclass(frozen=True, slots=True)
class _Slot:
    """In an argument template: the value of input ``index`` (an output the run reads) at
    ``path``."""

    index: int
    path: tuple[Any, ...]


class RunOutput:
    """One submitted L3 run's result, as the driver knows it: pending, then its value
    (pickled, tensors as descriptors) or its error. The host frees its tensors (and other
    hosts their copies, ``copies``) when the last holder (a Ref, or a run still waiting to
    read it) lets go of this object."""

    __slots__ = ("runtime", "run_id", "host", "entry", "done", "blob", "error", "waiters",
                 "copies", "__weakref__")

    def __init__(self, runtime: Any, run_id: int, host: int, entry: str,
                 release: Callable[[int, int, set[int]], None]):
        self.runtime = runtime  # the ClusterRuntime's token: tells its Refs from others'
        self.run_id = run_id
        self.host = host
        self.entry = entry
        self.done = False
        self.blob: bytes | None = None  # the value, pickled (once done without error)
        self.error: BaseException | None = None
        self.waiters: list[Any] = []  # runs waiting for this one (the driver's records)
        self.copies: set[int] = set()  # other hosts that may hold a copy of its tensors
        weakref.finalize(self, release, host, run_id, self.copies)


class Ref:
    """The future result of an L3 run on a host (``ctx.submit`` returns one at once).

    Pass it (or ``ref[i]`` / ``ref["key"]`` into a list/tuple/dict result) in a later
    ``ctx.submit``'s args: that run waits for this one and receives each tensor as a
    ``TensorHandle`` in its own host's shared memory. Return it from the L4 orchestration
    and ``rt.run`` hands back numpy arrays in its place.
    """

    __slots__ = ("_output", "_path")

    def __init__(self, output: RunOutput, path: tuple[Any, ...] = ()):
        self._output = output
        self._path = path

    @property
    def host(self) -> int:
        """The host the producing L3 run ran on."""
        return self._output.host

    @property
    def path(self) -> tuple[Any, ...]:
        """The indices that picked this part of the run's result (``()``: all of it)."""
        return self._path

    def __getitem__(self, key: Any) -> Ref:
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(f"a Ref is indexed by an int or a str (the L3 entry's list/tuple/"
                            f"dict result), not {type(key).__name__}")
        if len(self._path) >= _MAX_DEPTH:
            raise ValueError(f"a Ref path is at most {_MAX_DEPTH} deep")
        return Ref(self._output, (*self._path, key))

    def __reduce__(self) -> Any:
        raise TypeError("a pto.Ref cannot be pickled: pass it in ctx.submit's args, or return "
                        "it from the L4 orchestration")

    def __repr__(self) -> str:
        path = "".join(f"[{k!r}]" for k in self._path)
        return f"<pto.Ref {self._output.entry!r} on host {self._output.host}{path}>"


def output_of(ref: Ref) -> RunOutput:
    """The output ``ref`` names (the driver's record of the run it came from)."""
    return ref._output


# ---- driver side: Refs in args -> template + the outputs they name ------------------------


def split_refs(args: Any, owner: Any) -> tuple[Any, list[RunOutput]]:
    """``args`` with each Ref replaced by a ``_Slot`` and the outputs they name, in slot
    order (one slot index per distinct output). A Ref of another runtime is a ValueError."""
    outputs: list[RunOutput] = []
    index: dict[int, int] = {}

    def walk(value: Any, depth: int) -> Any:
        if isinstance(value, Ref):
            out = value._output
            if out.runtime is not owner:
                raise ValueError(f"{value!r} belongs to another pto cluster runtime")
            i = index.get(id(out))
            if i is None:
                i = index[id(out)] = len(outputs)
                outputs.append(out)
            return _Slot(i, value._path)
        if depth >= _MAX_DEPTH:
            return value
        if isinstance(value, list):
            return [walk(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            items = [walk(v, depth + 1) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, dict):
            return {k: walk(v, depth + 1) for k, v in value.items()}
        return value

    return walk(args, 0), outputs


# ---- both sides: following paths, mapping descriptors -------------------------------------


def follow(value: Any, path: tuple[Any, ...], what: str) -> Any:
    """``value[path[0]][path[1]]...``, or a KeyError/IndexError naming ``what``."""
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError) as exc:
            kind = type(exc) if not isinstance(exc, TypeError) else KeyError
            raise kind(f"{what}: the result has no [{step!r}] ({type(value).__name__} "
                       f"{_short(value)})") from None
    return value


def map_instances(value: Any, cls: type, fn: Callable[[Any], Any], depth: int = 0) -> Any:
    """``value`` with each instance of ``cls`` replaced by ``fn(it)``, the same structure
    otherwise (lists, tuples, named tuples, dict values)."""
    if isinstance(value, cls):
        return fn(value)
    if depth < _MAX_DEPTH and isinstance(value, list):
        return [map_instances(v, cls, fn, depth + 1) for v in value]
    if depth < _MAX_DEPTH and isinstance(value, tuple):
        items = [map_instances(v, cls, fn, depth + 1) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if depth < _MAX_DEPTH and isinstance(value, dict):
        return {k: map_instances(v, cls, fn, depth + 1) for k, v in value.items()}
    return value


def instances_in(value: Any, cls: type) -> list[Any]:
    """The instances of ``cls`` in ``value``, in walk order."""
    found: list[Any] = []
    map_instances(value, cls, found.append)
    return found


def fill(template: Any, values: tuple[Any, ...], depth: int = 0) -> Any:
    """Host side: the template with each ``_Slot`` replaced by its resolved value."""
    if isinstance(template, _Slot):
        return follow(values[template.index], template.path, "a Ref in the args")
    if depth < _MAX_DEPTH and isinstance(template, list):
        return [fill(v, values, depth + 1) for v in template]
    if depth < _MAX_DEPTH and isinstance(template, tuple):
        return tuple(fill(v, values, depth + 1) for v in template)
    if depth < _MAX_DEPTH and isinstance(template, dict):
        return {k: fill(v, values, depth + 1) for k, v in template.items()}
    return template


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
