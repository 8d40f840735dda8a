"""What a proxier works on: ServicePortName, processed service ports and endpoints.

These mirror upstream kube-proxy's ``ServicePortName`` (pkg/proxy/types.go),
``BaseServicePortInfo`` (serviceport.go) and ``BaseEndpointInfo`` + the
EndpointSliceCache (endpoint.go, endpointslicecache.go), so every backend sees the
same services and endpoints upstream would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from kproxy.model import objects as o
from kproxy.proxy.netutil import (IPAddress, IPNetwork, join_host_port, parse_cidr_sloppy,
                                  parse_ip_sloppy)


@dataclass(frozen=True, order=True)
class ServicePortName:
    """The key used everywhere: ``str()`` is ``<namespace>/<name>:<port>``, or
    ``<namespace>/<name>`` for an unnamed port. The protocol is part of the identity
    but not of the string (upstream's ``String()``)."""

    namespace: str
    name: str
    port: str = ""
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.port}" if self.port else "")

    @property
    def namespaced_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def proto(self) -> str:
        """Lower-case protocol as iptables and the chain-name hashes use it."""
        return self.protocol.lower()


@dataclass(frozen=True)
class ServicePortInfo:
    """One port of one Service, as the proxier needs it (upstream BaseServicePortInfo)."""

    name: ServicePortName
    cluster_ip: str
    port: int
    protocol: str
    node_port: int = 0
    load_balancer_vips: Tuple[str, ...] = ()
    session_affinity: str = "None"
    sticky_max_age_seconds: int = 0
    external_ips: Tuple[str, ...] = ()
    load_balancer_source_ranges: Tuple[str, ...] = ()
    health_check_node_port: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    target_port: object = 0       # informational (the slices carry the real port)

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.load_balancer_vips or self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with eTP=Local, Cluster endpoints are needed for the short-circuit rules.
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (self.external_policy_local and self.externally_accessible)

    @property
    def client_ip_affinity(self) -> bool:
        return self.session_affinity == "ClientIP"


def _family_of(ip: IPAddress) -> str:
    return "IPv6" if ip.version == 6 else "IPv4"


def should_skip_service(svc: o.Service) -> bool:
    """Headless (clusterIP None or unset) and ExternalName Services get no rules."""
    return svc.type == "ExternalName" or not svc.cluster_ip or svc.cluster_ip == "None"


def _cluster_ip_for_family(svc: o.Service, family: str) -> Optional[IPAddress]:
    candidates = svc.cluster_ips or [svc.cluster_ip]
    for text in candidates:
        ip = parse_ip_sloppy(text)
        if ip is not None and _family_of(ip) == family:
            return ip
    return None


def externally_accessible_service(svc: o.Service) -> bool:
    return svc.type in ("LoadBalancer", "NodePort") or (svc.type == "ClusterIP" and bool(svc.external_ips))


def service_port_infos(svc: o.Service, ip_family: str = "IPv4") -> Dict[ServicePortName, ServicePortInfo]:
    """The Service's ports as the proxier of ``ip_family`` sees them; empty for
    Services that are skipped or have no ClusterIP of that family."""
    if should_skip_service(svc):
        return {}
    cluster_ip = _cluster_ip_for_family(svc, ip_family)
    if cluster_ip is None:
        return {}
    external_local = externally_accessible_service(svc) and svc.external_traffic_policy == "Local"
    internal_local = svc.internal_traffic_policy == "Local"
    sticky = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0

    external_ips = _ips_of_family(svc.external_ips, ip_family)
    ranges: List[str] = []
    for text in svc.load_balancer_source_ranges:
        net: Optional[IPNetwork] = parse_cidr_sloppy(text.strip())
        if net is not None and _family_of(net.network_address) == ip_family:
            ranges.append(str(net))
    vips: List[str] = []
    for ing in svc.load_balancer_ingress:
        if not ing.ip or ing.ip_mode not in (None, "", "VIP"):
            continue
        ip = parse_ip_sloppy(ing.ip)
        if ip is not None and _family_of(ip) == ip_family:
            vips.append(str(ip))
    health = svc.health_check_node_port if (svc.type == "LoadBalancer" and external_local) else 0

    out: Dict[ServicePortName, ServicePortInfo] = {}
    for p in svc.ports:
        spn = ServicePortName(svc.namespace, svc.name, p.name, p.protocol)
        out[spn] = ServicePortInfo(
            name=spn, cluster_ip=str(cluster_ip), port=p.port, protocol=p.protocol,
            node_port=p.node_port, load_balancer_vips=tuple(vips),
            session_affinity=svc.session_affinity, sticky_max_age_seconds=sticky,
            external_ips=tuple(external_ips), load_balancer_source_ranges=tuple(ranges),
            health_check_node_port=health, external_policy_local=external_local,
            internal_policy_local=internal_local, target_port=p.target_port)
    return out


def _ips_of_family(texts: Iterable[str], family: str) -> List[str]:
    out = []
    for text in texts:
        ip = parse_ip_sloppy(text)
        if ip is not None and _family_of(ip) == family:
            out.append(str(ip))
    return out


def service_port_map(services: Iterable[o.Service], ip_family: str = "IPv4") -> Dict[ServicePortName, ServicePortInfo]:
    out: Dict[ServicePortName, ServicePortInfo] = {}
    for svc in services:
        out.update(service_port_infos(svc, ip_family))
    return out


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class EndpointInfo:
    """One endpoint (IP, target port) of one service port (upstream BaseEndpointInfo)."""

    ip: str
    port: int
    is_local: bool = False
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: FrozenSet[str] = field(default_factory=frozenset)
    node_hints: FrozenSet[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        return join_host_port(self.ip, self.port)


SUPPORTED_ADDRESS_TYPES = ("IPv4", "IPv6")


def endpoints_map(slices: Iterable[object], node_name: str,
                  ip_family: str = "IPv4") -> Dict[ServicePortName, List[EndpointInfo]]:
    """Merge EndpointSlices (or core/v1 Endpoints) into endpoints per ServicePortName,
    as kube-proxy's EndpointSliceCache does: slices without the
    ``kubernetes.io/service-name`` label are ignored, a slice port matches the service
    port of the same name and protocol, only an endpoint's first address is used (and
    only if it has this proxier's IP family), duplicates collapse by ``IP:port`` with a
    non-terminating copy winning, and each list is sorted by the string ``IP:port``."""
    flat: List[o.EndpointSlice] = []
    for item in slices:
        if isinstance(item, o.Endpoints):
            flat.extend(item.to_endpoint_slices())
        else:
            flat.append(item)  # type: ignore[arg-type]
    by_spn: Dict[ServicePortName, Dict[str, EndpointInfo]] = {}
    for es in sorted(flat, key=lambda s: (s.namespace, s.service_name or "", s.name)):
        svc_name = es.service_name
        if not svc_name or es.address_type not in SUPPORTED_ADDRESS_TYPES:
            continue
        ports = sorted((p for p in es.ports if p.name is not None and p.port), key=lambda p: p.port)
        endpoints = sorted((e for e in es.endpoints if e.addresses),
                           key=lambda e: ",".join(e.addresses))
        for port in ports:
            spn = ServicePortName(es.namespace, svc_name, port.name or "", port.protocol or "TCP")
            bucket = by_spn.setdefault(spn, {})
            for ep in endpoints:
                ip = parse_ip_sloppy(ep.addresses[0])
                if ip is None or _family_of(ip) != ip_family:
                    continue
                cond = ep.conditions
                terminating = cond.terminating is True
                info = EndpointInfo(
                    ip=str(ip), port=int(port.port),
                    is_local=bool(node_name) and ep.node_name == node_name,
                    ready=cond.ready is not False, serving=cond.serving is not False,
                    terminating=terminating, node_name=ep.node_name or "", zone=ep.zone or "",
                    zone_hints=frozenset(ep.hints_for_zones), node_hints=frozenset(ep.hints_for_nodes))
                key = str(info)
                if key not in bucket or not terminating:
                    bucket[key] = info
    return {spn: sorted(eps.values(), key=str) for spn, eps in by_spn.items() if eps}
