"""``pto status --cluster ADDRESS``: the hosts of a Ray cluster and what pto runs on them.

Joins the cluster as a Ray driver of its own, lists the nodes advertising ``pto_chips``
(``ray.nodes()``) and asks every pto host actor (named ``pto-host<i>-<session>`` in the
``pto`` namespace, so any driver finds them) for its status: chips, L3 runs in flight,
tensors kept for Refs and copies of other hosts' tensors, transfer counters. One cluster
runtime is one session.
"""

from __future__ import annotations

import re
from typing import Any

from ..wire.errors import PtoError
from .host import NAMESPACE
from .placement import pto_nodes

_ACTOR_NAME = re.compile(r"^pto-host(\d+)-([0-9a-f]+)$")


def cluster_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """``{"address", "hosts": [node...], "runtimes": [{"session", "hosts": [status...]}]}``.

    >>> pto.cluster.status.cluster_status("192.0.2.2:6379")["hosts"][0]["chips"]  # doctest: +SKIP
    2
    """
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR",
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PtoError(f"cannot reach a Ray cluster at {address}: {exc}") from None
    try:
        return _gather(address, timeout)
    finally:
        if connected_here:
            ray.shutdown()


def _gather(address: str, timeout: float) -> dict[str, Any]:
    import ray

    try:
        nodes = [{"node": n.node_id, "ip": n.ip, "chips": n.chips, "index": n.index}
                 for n in pto_nodes()]
    except PtoError:
        nodes = []
    sessions: dict[str, list[tuple[int, Any]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        match = _ACTOR_NAME.match(entry.get("name", ""))
        if entry.get("namespace") == NAMESPACE and match:
            sessions.setdefault(match.group(2), []).append((int(match.group(1)), entry["name"]))
    runtimes = []
    for session, hosts in sorted(sessions.items()):
        asked = []
        for host, name in sorted(hosts):
            try:
                asked.append((host, ray.get_actor(name, namespace=NAMESPACE).status.remote()))
            except ValueError:  # gone between listing and lookup
                continue
        statuses = []
        for host, ref in asked:
            try:
                statuses.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.RayError as exc:
                statuses.append({"host": host, "error": type(exc).__name__})
        runtimes.append({"session": session, "hosts": statuses})
    return {"address": address, "hosts": nodes, "runtimes": runtimes}


def format_cluster_status(st: dict[str, Any]) -> str:
    """The status as the text ``pto status --cluster`` prints."""
    lines = [f"cluster {st['address']}: {len(st['hosts'])} pto host node(s)"]
    for n in st["hosts"]:
        index = "-" if n["index"] is None else n["index"]
        lines.append(f"  node {n['node'][:12]}  ip {n['ip']}  chips {n['chips']}  "
                     f"host label {index}")
    if not st["runtimes"]:
        lines.append("no pto cluster runtime is running")
    for rt in st["runtimes"]:
        lines.append(f"runtime {rt['session']}:")
        for h in rt["hosts"]:
            if "error" in h:
                lines.append(f"  host {h['host']}: unreachable ({h['error']})")
                continue
            s = h["stats"]
            lines.append(f"  host {h['host']}: pid {h['pid']}  chips {h['chips']}  "
                         f"runs done {s['runs']}  running {len(h['running'])}  "
                         f"kept tensors {h['kept_tensors']}  copies of other hosts' "
                         f"{h.get('copied_tensors', 0)}  transfers in {s['transfers']} "
                         f"({s['bytes_in']} B)")
            for r in h["running"]:
                lines.append(f"    run {r['run']}: {r['entry']} for {r['seconds']:.1f}s")
    return "\n".join(lines)
