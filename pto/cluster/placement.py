"""Finding the hosts of a Ray cluster and starting one host actor on each.

Connecting: a Ray this process already joined, else ``cluster=ADDRESS``, else
``RAY_ADDRESS``, else a local one-host Ray started here (``pto_chips`` = the number of
devices). A connection pto made ends when the last runtime using it closes.

Hosts are the live Ray nodes advertising a ``pto_chips`` resource (``ray.nodes()``), in a
stable order: by the index each node names for itself (a ``pto.host`` label, as
``pto.LocalCluster`` gives its nodes, or a ``pto_host_index_<i>`` resource) when every
host names one, else by (IP, node id). Each gets a ``HostActor`` pinned to its node with
``NodeAffinitySchedulingStrategy(soft=False)``; Ray restarts it there up to ``retries``
times (the driver resends the runs it died in). Runs do not go through Ray: a host actor
runs them from its own endpoint's threads, so Ray's own concurrency serves only the
control calls (``open``, ``register``, ``status``, the parked ``watch``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from ..wire.errors import PtoError
from .host import CONTROL, CONTROL_THREADS, NAMESPACE, WATCH, HostActor, actor_name

INDEX_RESOURCE = "pto_host_index_"
INDEX_LABEL = "pto.host"


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    chips: int
    index: int | None  # what the node says its host index is, if it says


class _Connection:
    """This process's Ray connection as pto runtimes share it: made by the first runtime
    that needs one (unless the process had joined Ray itself), ended with the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._ours = False  # we called ray.init: we call ray.shutdown

    def join(self, address: str | None, local_chips: int) -> None:
        import ray

        address = address or os.environ.get("RAY_ADDRESS") or None
        with self._lock:
            if ray.is_initialized():
                current = ray.get_runtime_context().gcs_address
                if address and address not in ("auto", current):
                    raise ValueError(f"this process is already connected to the Ray cluster "
                                     f"at {current}, not {address!r} (one Ray cluster per "
                                     "process: close the runtimes using it first)")
            elif address:
                ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING",
                         log_to_driver=False)
                self._ours = True
            else:
                # address="local": a bare ray.init() would join whatever Ray cluster
                # /tmp/ray/ray_current_cluster names (another LocalCluster, say).
                ray.init(address="local", resources={"pto_chips": local_chips},
                         namespace=NAMESPACE, include_dashboard=False,
                         logging_level="WARNING", log_to_driver=False)
                self._ours = True
            self._users += 1

    def leave(self) -> None:
        import ray

        with self._lock:
            self._users -= 1
            if self._users == 0 and self._ours:
                self._ours = False
                if ray.is_initialized():
                    ray.shutdown()


CONNECTION = _Connection()


def pto_nodes() -> list[Node]:
    """The live nodes advertising ``pto_chips``, in host order."""
    import ray

    nodes = []
    for n in ray.nodes():
        chips = n.get("Resources", {}).get("pto_chips")
        if not n.get("Alive") or not chips:
            continue
        nodes.append(Node(n["NodeID"], n.get("NodeManagerAddress", ""), int(chips),
                          _declared_index(n)))
    if not nodes:
        raise PtoError("no Ray node advertises a 'pto_chips' resource: start each host with "
                       "ray start --resources '{\"pto_chips\": N}'")
    if all(n.index is not None for n in nodes):
        return sorted(nodes, key=lambda n: n.index or 0)
    return sorted(nodes, key=lambda n: (n.ip, n.node_id))


def _declared_index(node: dict[str, Any]) -> int | None:
    label = (node.get("Labels") or {}).get(INDEX_LABEL)
    if label is not None and str(label).isdigit():
        return int(label)
    for key in node.get("Resources", {}):
        if key.startswith(INDEX_RESOURCE) and key[len(INDEX_RESOURCE):].isdigit():
            return int(key[len(INDEX_RESOURCE):])
    return None


def start_hosts(nodes: list[Node], session: str, timeout: float, trace: bool,
                retries: int) -> list[Any]:
    """One pinned, named host actor per node (not yet known to be up: see ``wait_up``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_cls = ray.remote(concurrency_groups={CONTROL: CONTROL_THREADS, WATCH: 2})(HostActor)
    actors = []
    for host, node in enumerate(nodes):
        actors.append(remote_cls.options(
            name=actor_name(session, host), namespace=NAMESPACE, num_cpus=0,
            max_concurrency=2, max_restarts=retries,
            max_task_retries=retries, lifetime=None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(host, node.chips, session, timeout, trace))
    return actors


def wait_up(actors: list[Any], timeout: float) -> list[dict[str, Any]]:
    """Each actor's ``info()``, or PtoError naming the host that did not start in time."""
    import ray
    import ray.exceptions as rex

    refs = [a.info.remote() for a in actors]
    infos = []
    for host, ref in enumerate(refs):
        try:
            infos.append(ray.get(ref, timeout=timeout))
        except rex.GetTimeoutError:
            raise PtoError(f"host {host}'s actor did not start within {timeout:g}s") from None
        except rex.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise PtoError(f"host {host}'s actor failed to start: {cause}") from None
    return infos
