"""L4: many hosts on Ray. ``pto.Runtime(level="cluster")`` is a ``ClusterRuntime``.

Ray is imported only here and below (``import pto`` alone does not import it).
"""

from .errors import HostLostError, HostTaskError
from .refs import Ref
from .runtime import ClusterRuntime

__all__ = ["ClusterRuntime", "Ref", "HostTaskError", "HostLostError"]
