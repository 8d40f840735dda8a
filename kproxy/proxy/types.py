"""What a proxier works on: ServicePortName, processed service ports and endpoints.

These mirror upstream kube-proxy's ``ServicePortName`` (pkg/proxy/types.go),
``BaseServicePortInfo`` (serviceport.go) and ``BaseEndpointInfo`` + the
EndpointSliceCache (endpoint.go, endpointslicecache.go), so every backend sees the
same services and endpoints upstream would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Dict, FrozenSet, Hashable, Iterable, List, Optional, Sequence, Tuple

from kproxy.model import objects as o
from kproxy.proxy.netutil import IPAddress, cidr_text_family, ip_text_family, join_host_port, parse_ip_sloppy


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
    text = _cluster_ip_text(svc, family)
    return parse_ip_sloppy(text) if text is not None else None


def _cluster_ip_text(svc: o.Service, family: str) -> Optional[str]:
    """The canonical ClusterIP of ``family``, or None."""
    for text in svc.cluster_ips or [svc.cluster_ip]:
        parsed = ip_text_family(text)
        if parsed is not None and parsed[1] == family:
            return parsed[0]
    return None


def externally_accessible_service(svc: o.Service) -> bool:
    return svc.type in ("LoadBalancer", "NodePort") or (svc.type == "ClusterIP" and bool(svc.external_ips))


def service_port_infos(svc: o.Service, ip_family: str = "IPv4") -> Dict[ServicePortName, ServicePortInfo]:
    """The Service's ports as the proxier of ``ip_family`` sees them; empty for
    Services that are skipped or have no ClusterIP of that family."""
    return {info.name: info for info in service_port_list(svc, ip_family)}


def service_port_list(svc: o.Service, ip_family: str = "IPv4") -> List[ServicePortInfo]:
    """``service_port_infos`` as a list, in the order of the Service's ports."""
    type_, cluster_ip = svc.type, svc.cluster_ip
    if type_ == "ExternalName" or not cluster_ip or cluster_ip == "None":      # should_skip_service
        return []
    canonical = None
    for text in svc.cluster_ips or (cluster_ip,):
        parsed = ip_text_family(text)
        if parsed is not None and parsed[1] == ip_family:
            canonical = parsed[0]
            break
    if canonical is None:
        return []
    external_ips = svc.external_ips
    external_local = ((type_ == "LoadBalancer" or type_ == "NodePort" or (type_ == "ClusterIP" and bool(external_ips)))
                      and svc.external_traffic_policy == "Local")
    affinity = svc.session_affinity
    vips: Tuple[str, ...] = ()
    if svc.load_balancer_ingress:
        vips = tuple(_ips_of_family([ing.ip for ing in svc.load_balancer_ingress
                                     if ing.ip and ing.ip_mode in (None, "", "VIP")], ip_family))
    ranges: Tuple[str, ...] = ()
    if svc.load_balancer_source_ranges:
        parsed_ranges = [cidr_text_family(text.strip()) for text in svc.load_balancer_source_ranges]
        ranges = tuple(p[0] for p in parsed_ranges if p is not None and p[1] == ip_family)
    # The frozen dataclasses are made through their ``__dict__`` (every field set):
    # their __init__ costs more than the rest of this.
    fields = {"cluster_ip": canonical, "load_balancer_vips": vips, "session_affinity": affinity,
              "sticky_max_age_seconds": svc.session_affinity_timeout if affinity == "ClientIP" else 0,
              "external_ips": tuple(_ips_of_family(external_ips, ip_family)) if external_ips else (),
              "load_balancer_source_ranges": ranges,
              "health_check_node_port": svc.health_check_node_port if (type_ == "LoadBalancer" and external_local)
              else 0,
              "external_policy_local": external_local, "internal_policy_local": svc.internal_traffic_policy == "Local"}
    meta = svc.metadata
    namespace, name = meta.namespace or o.DEFAULT_NAMESPACE, meta.name
    new = object.__new__
    out = []
    for p in svc.ports:
        spn = new(ServicePortName)
        d = spn.__dict__
        d["namespace"], d["name"], d["port"], d["protocol"] = namespace, name, p.name, p.protocol
        info = new(ServicePortInfo)
        d = info.__dict__
        d.update(fields)
        d["name"], d["port"], d["protocol"], d["node_port"], d["target_port"] = (
            spn, p.port, p.protocol, p.node_port, p.target_port)
        out.append(info)
    return out


def _ips_of_family(texts: Iterable[str], family: str) -> List[str]:
    out = []
    for text in texts:
        parsed = ip_text_family(text)
        if parsed is not None and parsed[1] == family:
            out.append(parsed[0])
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
        # ``IP:port`` is asked for often (sorting, chain names, rules): kept once made,
        # outside the fields (so equality, hashing and repr do not see it).
        try:
            return self.__dict__["_host_port"]
        except KeyError:
            text = self.__dict__["_host_port"] = join_host_port(self.ip, self.port)
            return text


SUPPORTED_ADDRESS_TYPES = ("IPv4", "IPv6")
_EMPTY: FrozenSet[str] = frozenset()


def _slice_sort_key(s: o.EndpointSlice):
    return (s.namespace, s.service_name or "", s.name)


def _port_of(p: o.EndpointPort):
    return p.port


def _addresses_key(e: o.Endpoint) -> str:
    return ",".join(e.addresses)


PortKey = Tuple[str, str, str, str]      # (namespace, service name, port name, protocol)


def endpoints_map(slices: Iterable[object], node_name: str,
                  ip_family: str = "IPv4") -> Dict[ServicePortName, List[EndpointInfo]]:
    """Merge EndpointSlices (or core/v1 Endpoints) into endpoints per ServicePortName,
    as kube-proxy's EndpointSliceCache does: slices without the
    ``kubernetes.io/service-name`` label are ignored, a slice port matches the service
    port of the same name and protocol, only an endpoint's first address is used (and
    only if it has this proxier's IP family), duplicates collapse by ``IP:port`` with a
    non-terminating copy winning, and each list is sorted by the string ``IP:port``."""
    return {ServicePortName(*key): eps for key, eps in endpoints_by_port(slices, node_name, ip_family).items()}


def endpoints_by_port(slices: Iterable[object], node_name: str,
                      ip_family: str = "IPv4") -> Dict[PortKey, List[EndpointInfo]]:
    """``endpoints_map`` keyed by the tuple (namespace, service name, port name,
    protocol) instead of a ServicePortName (cheaper to make and to look up)."""
    flat: List[o.EndpointSlice] = []
    Endpoints = o.Endpoints
    for item in slices:
        if isinstance(item, Endpoints):
            flat.extend(item.to_endpoint_slices())
        else:
            flat.append(item)  # type: ignore[arg-type]
    if len(flat) > 1:
        flat.sort(key=_slice_sort_key)
    by_port: Dict[PortKey, Dict[str, EndpointInfo]] = {}
    new = object.__new__
    label, default_ns, supported = o.SERVICE_NAME_LABEL, o.DEFAULT_NAMESPACE, SUPPORTED_ADDRESS_TYPES
    for es in flat:
        meta = es.metadata
        svc_name = meta.labels.get(label)
        if not svc_name or es.address_type not in supported:
            continue
        ports = []
        for p in es.ports:
            if p.name is not None and p.port:
                ports.append(p)
        if not ports:
            continue
        if len(ports) > 1:
            ports.sort(key=_port_of)
        # the endpoints of this family, in address order: ("IP:" or "[IP]:", terminating,
        # the EndpointInfo fields but the port)
        endpoints = []
        listed = es.endpoints
        if len(listed) > 1:
            listed = sorted(listed, key=_addresses_key)
        for e in listed:
            addresses = e.addresses
            if not addresses:
                continue
            parsed = ip_text_family(addresses[0])
            if parsed is None or parsed[1] != ip_family:
                continue
            ip = parsed[0]
            cond = e.conditions
            terminating = cond.terminating is True
            node = e.node_name
            endpoints.append((f"[{ip}]:" if ":" in ip else ip + ":", terminating, {
                "ip": ip, "is_local": bool(node_name) and node == node_name,
                "ready": cond.ready is not False, "serving": cond.serving is not False,
                "terminating": terminating, "node_name": node or "", "zone": e.zone or "",
                "zone_hints": frozenset(e.hints_for_zones) if e.hints_for_zones else _EMPTY,
                "node_hints": frozenset(e.hints_for_nodes) if e.hints_for_nodes else _EMPTY}))
        namespace = meta.namespace or default_ns
        for port in ports:
            key = (namespace, svc_name, port.name or "", port.protocol or "TCP")
            bucket = by_port.get(key)
            if bucket is None:
                bucket = by_port[key] = {}
            number = int(port.port)
            text = str(number)
            for prefix, terminating, fields in endpoints:
                host_port = prefix + text
                if terminating and host_port in bucket:
                    continue
                info = new(EndpointInfo)
                d = info.__dict__
                d.update(fields)
                d["port"] = number
                d["_host_port"] = host_port
                bucket[host_port] = info
    out: Dict[PortKey, List[EndpointInfo]] = {}
    for key, eps in by_port.items():
        if len(eps) > 1:
            out[key] = [eps[k] for k in sorted(eps)]
        elif eps:
            out[key] = list(eps.values())
    return out


# --------------------------------------------------------------------------- fingerprints

_service_fields = attrgetter("type", "cluster_ip", "session_affinity", "session_affinity_timeout",
                             "external_traffic_policy", "internal_traffic_policy", "health_check_node_port")
_service_port_fields = attrgetter("name", "protocol", "port", "node_port", "target_port")
_ingress_fields = attrgetter("ip", "ip_mode")
_slice_port_fields = attrgetter("name", "port", "protocol")
_endpoint_fields = attrgetter("node_name", "zone")
_condition_fields = attrgetter("ready", "serving", "terminating")


def service_fingerprint(svc: o.Service) -> Hashable:
    """Everything of a Service that shapes its proxy rules, as an immutable value: two
    Services with equal fingerprints get the same rules (their lists are copied into
    tuples, so a later change to the object in place is not hidden)."""
    return (_service_fields(svc), tuple(svc.cluster_ips), tuple(map(_service_port_fields, svc.ports)),
            tuple(svc.external_ips), tuple(svc.load_balancer_source_ranges),
            tuple(map(_ingress_fields, svc.load_balancer_ingress)) if svc.load_balancer_ingress else ())


def slice_fingerprint(es: o.EndpointSlice) -> tuple:
    """Everything of an EndpointSlice that shapes the endpoints map, as an immutable
    value (see ``service_fingerprint``); its name comes first."""
    cf, ef = _condition_fields, _endpoint_fields
    return (es.metadata.name, es.address_type, tuple(map(_slice_port_fields, es.ports)),
            tuple([(tuple(e.addresses), cf(e.conditions), ef(e),
                    tuple(e.hints_for_zones) if e.hints_for_zones else (),
                    tuple(e.hints_for_nodes) if e.hints_for_nodes else ()) for e in es.endpoints]))


def _first(item: tuple):
    return item[0]


def service_group_fingerprint(services: Sequence[o.Service], slices: Iterable[object]) -> Hashable:
    """The fingerprint of one Service: of its Service objects (in order: a later one
    with the same name wins) and of the EndpointSlices / core-v1 Endpoints that name it
    (the slices sorted by name, as the endpoints map sorts them, so their order in the
    input does not matter). Equal fingerprints, equal rules."""
    flat = []
    for item in slices:
        if isinstance(item, o.Endpoints):
            flat.extend(map(slice_fingerprint, item.to_endpoint_slices()))
        else:
            flat.append(slice_fingerprint(item))  # type: ignore[arg-type]
    if len(flat) > 1:
        flat.sort(key=_first)      # stable: slices of one name keep their order, as in the map
    return tuple(map(service_fingerprint, services)), tuple(flat)


def slice_service_key(item: object) -> Optional[Tuple[str, str]]:
    """(namespace, Service name) an EndpointSlice or Endpoints belongs to; None for a
    slice without the service-name label."""
    if isinstance(item, o.Endpoints):
        return item.namespace, item.name
    name = item.metadata.labels.get(o.SERVICE_NAME_LABEL)  # type: ignore[attr-defined]
    if not name:
        return None
    return item.metadata.namespace or o.DEFAULT_NAMESPACE, name  # type: ignore[attr-defined]


def service_fingerprints(services: Iterable[o.Service], slices: Iterable[object]) -> Dict[str, Hashable]:
    """``service_group_fingerprint`` of every Service, by ``"namespace/name"``: equal
    fingerprints, equal rules (for one node's settings). A caller that keeps these
    between syncs can diff them to find the changed Services, and hand them to
    ``IncrementalRenderer`` (which then skips computing its own)."""
    by_svc: Dict[Tuple[str, str], list] = {}
    for item in slices:
        if isinstance(item, (o.EndpointSlice, o.Endpoints)):
            key = slice_service_key(item)
            if key is not None:
                by_svc.setdefault(key, []).append(item)
    groups: Dict[Tuple[str, str], list] = {}
    for svc in services:
        if isinstance(svc, o.Service):
            meta = svc.metadata
            groups.setdefault((meta.namespace or o.DEFAULT_NAMESPACE, meta.name), []).append(svc)
    return {f"{key[0]}/{key[1]}": service_group_fingerprint(svcs, by_svc.get(key, ()))
            for key, svcs in groups.items()}

