"""Which endpoints a node uses for a service port (upstream ``CategorizeEndpoints``).

* **Cluster list**: Ready endpoints, narrowed by topology hints when every Ready endpoint
  carries hints and some are for this node (PreferSameNode) or this zone
  (PreferSameZone); if none is Ready, the Serving-and-Terminating ones.
* **Local list**: local Ready endpoints; if none, local Serving-and-Terminating ones.
* **all reachable**: the union (the endpoints that get a KUBE-SEP chain).
* **has_any**: some endpoint somewhere is Ready, or Serving-and-Terminating.

A list is left empty when the service port never uses that policy. Lists keep the
input order, which is sorted by the string ``IP:port`` (so ``10.1.1.11:11`` comes before
``10.1.1.1:11``); the merged list is sorted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from kproxy.proxy.types import EndpointInfo, ServicePortInfo

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@dataclass
class Categorized:
    cluster: List[EndpointInfo] = field(default_factory=list)
    local: List[EndpointInfo] = field(default_factory=list)
    all_reachable: List[EndpointInfo] = field(default_factory=list)
    has_any: bool = False


def topology_mode(endpoints: Sequence[EndpointInfo], node_name: str, zone: Optional[str]) -> str:
    all_node_hints = all_zone_hints = True
    ready = []
    for ep in endpoints:
        if ep.ready:
            ready.append(ep)
            if not ep.node_hints:
                all_node_hints = False
            if not ep.zone_hints:
                all_zone_hints = False
    if not ready or not (all_node_hints or all_zone_hints):
        return ""
    if all_node_hints and any(node_name in ep.node_hints for ep in ready):
        return PREFER_SAME_NODE
    if all_zone_hints and zone and any(zone in ep.zone_hints for ep in ready):
        return PREFER_SAME_ZONE
    return ""


def _available(ep: EndpointInfo, mode: str, node_name: str, zone: Optional[str]) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in ep.node_hints
    if mode == PREFER_SAME_ZONE:
        return zone in ep.zone_hints
    return True


def categorize_endpoints(endpoints: Sequence[EndpointInfo], svc: ServicePortInfo, node_name: str,
                         zone: Optional[str] = None) -> Categorized:
    """Split ``endpoints`` of ``svc`` as seen from node ``node_name`` (in ``zone``)."""
    if not endpoints:
        return Categorized()
    return Categorized(*categorize(endpoints, svc.uses_cluster_endpoints, svc.uses_local_endpoints, node_name, zone))


def categorize(endpoints: Sequence[EndpointInfo], uses_cluster: bool, uses_local: bool, node_name: str,
               zone: Optional[str] = None) -> Tuple[List[EndpointInfo], List[EndpointInfo], List[EndpointInfo], bool]:
    """``categorize_endpoints`` as a tuple (cluster, local, all_reachable, has_any), for
    a service port that uses cluster / local endpoints (``ServicePortInfo``'s
    ``uses_cluster_endpoints`` / ``uses_local_endpoints``)."""
    cluster: List[EndpointInfo] = []
    local: List[EndpointInfo] = []
    if not endpoints:
        return cluster, local, [], False
    has_any = False
    mode = ""
    if uses_cluster:
        mode = topology_mode(endpoints, node_name, zone)
        if mode:
            cluster = [ep for ep in endpoints if ep.ready and _available(ep, mode, node_name, zone)]
        else:
            for ep in endpoints:
                if ep.ready:
                    cluster.append(ep)
        if not cluster:
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
        has_any = bool(cluster)
    if not uses_local:
        return cluster, local, list(cluster), has_any

    local_ready = local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or ep.is_local
        elif ep.serving and ep.terminating:
            has_any = True
            local_serving_terminating = local_serving_terminating or ep.is_local
    use_terminating = False
    if local_ready:
        local = [ep for ep in endpoints if ep.is_local and ep.ready]
    elif local_serving_terminating:
        use_terminating = True
        local = [ep for ep in endpoints if ep.is_local and ep.serving and ep.terminating]

    if not uses_cluster:
        all_reachable = list(local)
    elif mode == "" and not use_terminating:
        all_reachable = list(cluster)      # a superset of the local list
    else:
        merged: Dict[str, EndpointInfo] = {str(ep): ep for ep in cluster}
        merged.update({str(ep): ep for ep in local})
        all_reachable = [merged[k] for k in sorted(merged)]
    return cluster, local, all_reachable, has_any
