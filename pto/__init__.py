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

from . import types as types  # the original's module: pto.types.Arg is pto.Arg
from .args import Arg, ParamType
from .compiler import CompiledPackage, KernelRef, compile, include_dir
from .errors import (
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
from .runtime import OrchContext, Runtime
from .status import status
from .taskinfo import TaskInfo, task
from .tensor import TensorHandle

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # L4 names load on first use: ``import pto`` must not import Ray.
    if name == "Ref":
        from .cluster.refs import Ref

        return Ref
    if name == "LocalCluster":
        from .cluster.local import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'pto' has no attribute {name!r}")


__all__ = [
    "Arg", "ParamType", "Runtime", "OrchContext", "TensorHandle", "TaskInfo", "task",
    "PtoError", "TaskError", "WorkerLost", "BrokerLost", "HostLost", "TensorFreed", "OutOfMemory",
    "ProtocolError", "CompileError", "compile", "include_dir", "CompiledPackage", "KernelRef",
    "status", "Ref", "LocalCluster",
]
