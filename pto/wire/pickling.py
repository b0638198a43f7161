"""Sending Python callables to workers: by value (cloudpickle), never by import path
when the worker could not import it.

cloudpickle sends a function of an importable module by reference (module + name). A test
module, or a user's script and the helper modules next to it, is importable here but not
from a worker's (or an L4 host's) working directory, so every such *user* module that the
callable reaches (its own, and the modules of the functions, classes and modules its code
names, transitively) is registered to travel by value for the one ``dumps``.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle


def pickle_by_value(fn: Callable[..., Any]) -> bytes:
    """cloudpickle ``fn``, with every user module it reaches by value (see above)."""
    modules = user_modules_reached(fn)
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(fn)
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)


def user_modules_reached(fn: Callable[..., Any]) -> list[types.ModuleType]:
    """The user modules (neither installed nor pto's, nor ``__main__``, which cloudpickle
    always sends by value) that ``fn`` and what its code names reach, transitively (all
    of a module named as an object: cloudpickle sends a by-value module whole)."""
    found: dict[str, types.ModuleType] = {}
    seen: set[int] = set()
    todo: list[Any] = [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.ModuleType):
            if _is_user_module(obj):
                found.setdefault(obj.__name__, obj)
                # a module named as an object travels whole: all it holds is reached too
                todo.extend(vars(obj).values())
            continue
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None or not (module.__name__ == "__main__" or _is_user_module(module)):
            continue  # installed code: its own imports work on the worker too
        if module.__name__ != "__main__":
            found.setdefault(module.__name__, module)
        todo.extend(_named_by(obj))
    return list(found.values())


def _named_by(obj: Any) -> Iterator[Any]:
    """What a user function's code (or a user class's methods) names: globals, closure
    cells and defaults."""
    if isinstance(obj, type):
        for member in vars(obj).values():
            member = getattr(member, "__func__", member)  # staticmethod / classmethod
            if isinstance(member, types.FunctionType):
                yield member
        return
    obj = getattr(obj, "__func__", obj)  # bound methods
    if isinstance(obj, types.FunctionType):
        code_globals = obj.__globals__
        for name in _global_names(obj.__code__):
            if name in code_globals:
                yield code_globals[name]
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                continue
        yield from obj.__defaults__ or ()
        yield from (obj.__kwdefaults__ or {}).values()
    elif callable(obj):  # an instance with __call__ (e.g. functools.partial's func)
        yield from (v for v in (getattr(obj, "func", None), type(obj)) if v is not None)


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions, lambdas, comprehensions
            yield from _global_names(const)


def _is_user_module(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if module.__name__ == "__main__" or not path:
        return False
    path = os.path.realpath(path)
    return not any(path.startswith(p + os.sep) for p in _not_user_code())


@functools.cache
def _not_user_code() -> tuple[str, ...]:
    """Folders whose modules every process imports by itself: pto, and the interpreter's
    installed packages and standard library."""
    pto_dir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return (pto_dir, *{os.path.realpath(p) for p in sysconfig.get_paths().values()})
