"""Callables travel by value with every user module they reach (pto.wire.pickling): a
kernel in the user's module that calls a helper from another of the user's modules must run
in a process that can import neither (a worker, an L4 host)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pto.wire.pickling import pickle_by_value, user_modules_reached

LIB = '''
import numpy as np
import userdeep_{tag} as deep
SCALE = 3.0

def helper(x):
    return x * SCALE + inner(x) + deep.zero(x)

def shifted(x):
    return deep.zero(x) + 5

def inner(x):
    return np.ones_like(x)

class Shift:
    def __call__(self, x):
        return x + 100
'''

# reached only through LIB's functions
DEEP = '''
import numpy as np

def zero(x):
    return np.zeros_like(x)
'''

KERNELS = '''
import numpy as np
import userlib_{tag} as lib
from userlib_{tag} import helper, Shift

def direct(x, y):
    y[:] = helper(x)

def via_module(x, y):
    y[:] = lib.helper(x)

def nested(x, y):
    f = lambda v: [helper(e) for e in v]
    y[:] = np.array(f(x))

def via_class(x, y):
    y[:] = Shift()(x)

def via_module_only(x, y):  # `shifted` is no global here: only the module object is named
    y[:] = lib.shifted(x)

def plain(x, y):
    y[:] = np.sqrt(x)
'''

# Runs the pickled function where neither user module can be imported.
LOAD = '''
import sys, pickle
import numpy as np
blob = sys.stdin.buffer.read()
fn = pickle.loads(blob)
x = np.arange(4, dtype=np.float64)
y = np.zeros_like(x)
fn(x, y)
print(",".join(str(v) for v in y))
'''


@pytest.fixture
def user_modules(tmp_path, monkeypatch, request):
    """Two fresh user modules in a folder only this process has on its path."""
    tag = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (tmp_path / f"userdeep_{tag}.py").write_text(DEEP)
    (tmp_path / f"userlib_{tag}.py").write_text(LIB.format(tag=tag))
    (tmp_path / f"userkernels_{tag}.py").write_text(KERNELS.format(tag=tag))
    monkeypatch.syspath_prepend(str(tmp_path))
    kernels = importlib.import_module(f"userkernels_{tag}")
    yield kernels, tag
    for name in (f"userdeep_{tag}", f"userlib_{tag}", f"userkernels_{tag}"):
        sys.modules.pop(name, None)


def _run_elsewhere(blob: bytes, cwd) -> list[float]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD)], input=blob,
                         capture_output=True, cwd=cwd, check=False, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return [float(v) for v in out.stdout.decode().split(",")]


ALL = ("kernels", "lib", "deep")


@pytest.mark.parametrize("name, modules, expected", [
    ("direct", ALL, [1.0, 4.0, 7.0, 10.0]),
    ("via_module", ALL, [1.0, 4.0, 7.0, 10.0]),
    ("nested", ALL, [1.0, 4.0, 7.0, 10.0]),
    ("via_class", ("kernels", "lib"), [100.0, 101.0, 102.0, 103.0]),  # Shift needs no deep
    ("via_module_only", ALL, [5.0, 5.0, 5.0, 5.0]),
])
def test_helpers_from_other_user_modules_travel_too(user_modules, tmp_path_factory, name,
                                                    modules, expected):
    kernels, tag = user_modules
    reached = {m.__name__ for m in user_modules_reached(getattr(kernels, name))}
    assert reached == {f"user{m}_{tag}" for m in modules}
    blob = pickle_by_value(getattr(kernels, name))
    assert _run_elsewhere(blob, tmp_path_factory.mktemp("elsewhere")) == expected


def test_installed_modules_stay_by_reference(user_modules, tmp_path_factory):
    kernels, tag = user_modules
    reached = {m.__name__ for m in user_modules_reached(kernels.plain)}
    assert reached == {f"userkernels_{tag}"}  # numpy is not shipped
    assert _run_elsewhere(pickle_by_value(kernels.plain), tmp_path_factory.mktemp("e")) == (
        np.sqrt(np.arange(4.0)).tolist())


def test_registration_is_undone(user_modules):
    import cloudpickle

    kernels, tag = user_modules
    pickle_by_value(kernels.direct)
    registered = cloudpickle.list_registry_pickle_by_value()
    assert not {f"userlib_{tag}", f"userkernels_{tag}"} & registered
