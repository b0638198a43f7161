"""pto: run tensor task graphs across the chips of a host.

>>> import numpy as np, pto
>>> def scale(x, y, factor):            # a Python kernel: numpy views and scalars
...     y[:] = x * factor
>>> def double(ctx, args):              # an orchestration: builds the task graph
...     x = ctx.tensor(args)
...     y = ctx.alloc(x.shape, x.dtype)
...     ctx.submit(ctx.peers()[0], "scale", [pto.Arg.input(x), pto.Arg.output(y),
...                                          pto.Arg.scalar(2.0)])
...     return y
>>> with pto.Runtime(level="host", platform="sim", devices=[0, 1]) as rt:
...     rt.register("double", orch=double, kernels={"scale": scale})
...     print(rt.run("double", np.ones(3, np.float32)).numpy())
[2. 2. 2.]
"""

from .runtime import Runtime
from .wire.args import Arg, ParamType
from .wire.errors import (
    BrokerLost,
    CompileError,
    HostLost,
    OutOfMemory,
    ProtocolError,
    PtoError,
    TaskError,
    TensorFreed,
    WorkerLost,
)
from .wire.taskinfo import TaskInfo, task

__version__ = "0.1.0"

# Names from the levels load on first use: ``import pto`` (and so every broker and worker,
# which import ``pto.wire``) loads neither the compiler, nor the client, nor Ray.
_LAZY = {
    "compile": "pto.chip.compiler", "include_dir": "pto.chip.compiler",
    "CompiledPackage": "pto.chip.package", "KernelRef": "pto.chip.package",
    "OrchContext": "pto.host.orchestration", "TensorHandle": "pto.host.tensor",
    "Graph": "pto.host.graph",
    "status": "pto.tools.status", "Ref": "pto.cluster.refs", "LocalCluster": "pto.cluster.local",
}


def __getattr__(name: str) -> object:
    import importlib

    if name == "types":  # the original's module: pto.types.Arg is pto.Arg
        return importlib.import_module("pto.types")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pto' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"types"})


__all__ = [
    "Arg", "ParamType", "Runtime", "OrchContext", "TensorHandle", "TaskInfo", "task",
    "PtoError", "TaskError", "WorkerLost", "BrokerLost", "HostLost", "TensorFreed", "OutOfMemory",
    "ProtocolError", "CompileError", "compile", "include_dir", "CompiledPackage", "KernelRef",
    "status", "Ref", "LocalCluster", "types", "Graph",
]
