"""The original runtime's ``pto.types`` module, under its own name: ``Arg``, ``TensorHandle``,
``CompiledPackage``, ``ParamType`` and ``Graph`` (the same objects as ``pto.Arg`` and so on), so
``from pto.types import Arg`` in ported code keeps working.

>>> from pto.types import Arg, ParamType
>>> Arg.input(x).kind is ParamType.INPUT
True
"""

from .chip.package import CompiledPackage
from .host.graph import Graph
from .host.tensor import TensorHandle
from .wire.args import Arg, ParamType

__all__ = ["Arg", "TensorHandle", "CompiledPackage", "ParamType", "Graph"]
