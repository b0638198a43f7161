"""Sending Python callables to workers: by value (cloudpickle), never by import path
when the worker could not import it."""

from __future__ import annotations

import os
import sys
import sysconfig
import types
from collections.abc import Callable
from typing import Any

import cloudpickle


def pickle_by_value(fn: Callable[..., Any]) -> bytes:
    """cloudpickle ``fn`` with its defining module by value unless workers can import it.

    cloudpickle sends functions of importable modules by reference; a test module or a
    user's script next to it is importable here but not from a worker's working directory.
    """
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    by_value = module is not None and _is_user_module(module)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(fn)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _is_user_module(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", None)
    if module.__name__ == "__main__" or not path:
        return False
    path = os.path.realpath(path)
    installed = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
    ours = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # pto itself
    return not path.startswith(ours) and not any(path.startswith(p + os.sep) for p in installed)
