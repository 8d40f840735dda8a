"""Kubernetes objects kproxy emulates, as plain dataclasses with API defaults applied.

Field names are the API's in snake_case (``targetPort`` -> ``target_port``). Each object
keeps the document it came from in ``raw`` (after unknown fields were dropped), so a
consumer can reach what is not modelled here (env, volumes, resources...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

IntOrStr = Union[int, str]

DEFAULT_NAMESPACE = "default"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
DEFAULT_SESSION_AFFINITY_SECONDS = 10800
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600    # apps/v1 Deployment spec.progressDeadlineSeconds

# Kinds kproxy models; everything else loads as NotEmulated.
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")


class _Namespaced:
    """``name`` and ``namespace`` (defaulted) of a namespaced object, from its metadata."""

    metadata: "ObjectMeta"

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or DEFAULT_NAMESPACE


@dataclass
class ObjectMeta:
    name: str = ""
    namespace: Optional[str] = None          # None for cluster-scoped kinds
    labels: Dict[str, str] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)
    generate_name: str = ""
    uid: str = ""
    deletion_timestamp: Optional[str] = None


@dataclass
class Namespace:
    metadata: ObjectMeta
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "Namespace"

    @property
    def name(self) -> str:
        return self.metadata.name


# --------------------------------------------------------------------------- Pods


@dataclass
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"
    host_port: int = 0
    host_ip: str = ""


@dataclass
class Container:
    name: str
    image: str = ""
    command: List[str] = field(default_factory=list)
    args: List[str] = field(default_factory=list)
    ports: List[ContainerPort] = field(default_factory=list)
    readiness_probe: Optional[Dict[str, Any]] = None
    liveness_probe: Optional[Dict[str, Any]] = None
    startup_probe: Optional[Dict[str, Any]] = None
    env: List[Dict[str, Any]] = field(default_factory=list)
    working_dir: str = ""


@dataclass
class PodSpec:
    containers: List[Container] = field(default_factory=list)
    init_containers: List[Container] = field(default_factory=list)
    restart_policy: str = "Always"
    node_name: str = ""
    host_network: bool = False
    hostname: str = ""
    subdomain: str = ""


@dataclass
class PodStatus:
    phase: str = ""
    pod_ip: str = ""
    pod_ips: List[str] = field(default_factory=list)
    host_ip: str = ""
    conditions: List[Dict[str, Any]] = field(default_factory=list)

    def condition(self, type_: str) -> Optional[bool]:
        """True/False for a condition present in status, None when absent."""
        for cond in self.conditions:
            if cond.get("type") == type_:
                return str(cond.get("status")) == "True"
        return None


@dataclass
class Pod(_Namespaced):
    metadata: ObjectMeta
    spec: PodSpec = field(default_factory=PodSpec)
    status: PodStatus = field(default_factory=PodStatus)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "Pod"

    @property
    def labels(self) -> Dict[str, str]:
        return self.metadata.labels

    @property
    def containers(self) -> List[Container]:
        return self.spec.containers

    @property
    def restart_policy(self) -> str:
        return self.spec.restart_policy

    @property
    def node_name(self) -> str:
        return self.spec.node_name

    @property
    def pod_ip(self) -> str:
        return self.status.pod_ip

    @property
    def pod_ips(self) -> List[str]:
        if self.status.pod_ips:
            return list(self.status.pod_ips)
        return [self.status.pod_ip] if self.status.pod_ip else []

    @property
    def terminating(self) -> bool:
        return self.metadata.deletion_timestamp is not None


@dataclass
class PodTemplate:
    metadata: ObjectMeta = field(default_factory=ObjectMeta)
    spec: PodSpec = field(default_factory=PodSpec)


# --------------------------------------------------------------------------- Deployments


@dataclass
class RollingUpdate:
    max_surge: IntOrStr = "25%"
    max_unavailable: IntOrStr = "25%"


@dataclass
class DeploymentStrategy:
    type: str = "RollingUpdate"
    rolling_update: Optional[RollingUpdate] = field(default_factory=RollingUpdate)


@dataclass
class Deployment(_Namespaced):
    metadata: ObjectMeta
    replicas: int = 1
    match_labels: Dict[str, str] = field(default_factory=dict)
    match_expressions: List[Dict[str, Any]] = field(default_factory=list)
    template: PodTemplate = field(default_factory=PodTemplate)
    strategy: DeploymentStrategy = field(default_factory=DeploymentStrategy)
    min_ready_seconds: int = 0
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "Deployment"

    @property
    def selector(self) -> Dict[str, str]:
        return self.match_labels

    @property
    def progress_deadline_seconds(self) -> int:
        """``spec.progressDeadlineSeconds``, read from ``raw`` (default 600, as apps/v1
        defaults it; a value that is not an integer, which validation refuses, also
        gives the default)."""
        value = (self.raw.get("spec") or {}).get("progressDeadlineSeconds") if isinstance(self.raw, dict) else None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return DEFAULT_PROGRESS_DEADLINE_SECONDS


# --------------------------------------------------------------------------- Services


@dataclass
class ServicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    target_port: IntOrStr = 0          # defaulted to ``port`` by the loader
    node_port: int = 0
    app_protocol: Optional[str] = None


@dataclass
class LoadBalancerIngress:
    ip: str = ""
    hostname: str = ""
    ip_mode: Optional[str] = None       # "VIP", "Proxy" or unset


@dataclass
class Service(_Namespaced):
    metadata: ObjectMeta
    type: str = "ClusterIP"
    cluster_ip: str = ""                # "" = to be allocated, "None" = headless
    cluster_ips: List[str] = field(default_factory=list)
    ports: List[ServicePort] = field(default_factory=list)
    selector: Optional[Dict[str, str]] = None
    session_affinity: str = "None"
    session_affinity_timeout: int = DEFAULT_SESSION_AFFINITY_SECONDS
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    external_ips: List[str] = field(default_factory=list)
    load_balancer_ip: str = ""
    load_balancer_source_ranges: List[str] = field(default_factory=list)
    load_balancer_ingress: List[LoadBalancerIngress] = field(default_factory=list)
    health_check_node_port: int = 0
    external_name: str = ""
    publish_not_ready_addresses: bool = False
    ip_families: List[str] = field(default_factory=list)
    allocate_load_balancer_node_ports: bool = True
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "Service"

    @property
    def namespaced_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


# --------------------------------------------------------------------------- Endpoints


@dataclass
class EndpointConditions:
    ready: Optional[bool] = None
    serving: Optional[bool] = None
    terminating: Optional[bool] = None


@dataclass
class Endpoint:
    addresses: List[str]
    conditions: EndpointConditions = field(default_factory=EndpointConditions)
    node_name: Optional[str] = None
    zone: Optional[str] = None
    hostname: Optional[str] = None
    target_ref: Optional[Dict[str, Any]] = None
    hints_for_zones: List[str] = field(default_factory=list)
    hints_for_nodes: List[str] = field(default_factory=list)


@dataclass
class EndpointPort:
    port: Optional[int]
    name: Optional[str] = ""
    protocol: Optional[str] = "TCP"
    app_protocol: Optional[str] = None


@dataclass
class EndpointSlice(_Namespaced):
    metadata: ObjectMeta
    address_type: str = "IPv4"
    endpoints: List[Endpoint] = field(default_factory=list)
    ports: List[EndpointPort] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "EndpointSlice"

    @property
    def service_name(self) -> Optional[str]:
        return self.metadata.labels.get(SERVICE_NAME_LABEL)


@dataclass
class EndpointAddress:
    ip: str
    node_name: Optional[str] = None
    hostname: Optional[str] = None
    target_ref: Optional[Dict[str, Any]] = None


@dataclass
class EndpointSubset:
    addresses: List[EndpointAddress] = field(default_factory=list)
    not_ready_addresses: List[EndpointAddress] = field(default_factory=list)
    ports: List[EndpointPort] = field(default_factory=list)


@dataclass
class Endpoints(_Namespaced):
    """core/v1 Endpoints; ``to_endpoint_slices()`` gives the discovery/v1 form."""

    metadata: ObjectMeta
    subsets: List[EndpointSubset] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "Endpoints"


    def to_endpoint_slices(self) -> List[EndpointSlice]:
        """One slice per subset and address family, as the EndpointSlice mirroring
        controller does (ready addresses ready, notReadyAddresses not ready)."""
        slices: List[EndpointSlice] = []
        for i, subset in enumerate(self.subsets):
            by_family: Dict[str, List[Endpoint]] = {}
            for addrs, ready in ((subset.addresses, True), (subset.not_ready_addresses, False)):
                for a in addrs:
                    family = "IPv6" if ":" in a.ip else "IPv4"
                    by_family.setdefault(family, []).append(Endpoint(
                        addresses=[a.ip],
                        conditions=EndpointConditions(ready=ready, serving=ready, terminating=False),
                        node_name=a.node_name, hostname=a.hostname, target_ref=a.target_ref))
            for family in sorted(by_family):
                suffix = f"{i}" if family == "IPv4" else f"{i}-v6"
                meta = ObjectMeta(
                    name=f"{self.name}-{suffix}", namespace=self.namespace,
                    labels={SERVICE_NAME_LABEL: self.name,
                            MANAGED_BY_LABEL: "endpointslicemirroring-controller.k8s.io"})
                slices.append(EndpointSlice(
                    metadata=meta, address_type=family, endpoints=by_family[family],
                    ports=[EndpointPort(port=p.port, name=p.name, protocol=p.protocol,
                                        app_protocol=p.app_protocol) for p in subset.ports]))
        return slices


# --------------------------------------------------------------------------- ResourceQuota

# The quota resources kproxy enforces (kproxy.quota); any other is kept, not enforced.
QUOTA_ENFORCED_RESOURCES = ("count/pods", "count/services", "pods", "services",
                            "services.loadbalancers", "services.nodeports")


@dataclass
class ResourceQuota(_Namespaced):
    """core/v1 ResourceQuota. ``hard`` is ``spec.hard``: resource name -> quantity, an
    int when the quantity is a whole number (``"10"``, ``"1k"``), else the quantity as
    written (``"500m"``). ``raw`` keeps the manifest (for the quantities' formats)."""

    metadata: ObjectMeta
    hard: Dict[str, Union[int, str]] = field(default_factory=dict)
    scopes: List[str] = field(default_factory=list)
    scope_selector: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)
    kind = "ResourceQuota"

    @property
    def scoped(self) -> bool:
        return bool(self.scopes or self.scope_selector)

    def enforced(self) -> Dict[str, int]:
        """The limits kproxy enforces: whole-number limits on QUOTA_ENFORCED_RESOURCES,
        none at all for a quota with scopes (scopes are not emulated)."""
        if self.scoped:
            return {}
        return {r: v for r, v in self.hard.items()
                if r in QUOTA_ENFORCED_RESOURCES and isinstance(v, int) and not isinstance(v, bool)}

    def warnings(self) -> List[str]:
        """What this quota limits that kproxy does not enforce, one line each."""
        if self.scoped:
            return ["spec.scopes/spec.scopeSelector: quota scopes are not emulated by kproxy; "
                    "this quota is kept but not enforced"]
        return [f"spec.hard[{r}]: not enforced by kproxy (it enforces "
                f"{', '.join(QUOTA_ENFORCED_RESOURCES)}); kept" for r in self.hard
                if r not in QUOTA_ENFORCED_RESOURCES]


# --------------------------------------------------------------------------- the rest


@dataclass
class NotEmulated:
    """A kind kproxy does not emulate (Secret, PersistentVolume, Ingress...): kept as
    it was written, reported, never an error."""

    api_version: str
    kind: str
    metadata: ObjectMeta
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> Optional[str]:
        return self.metadata.namespace


KubeObject = Union[Namespace, Pod, Deployment, Service, EndpointSlice, Endpoints, ResourceQuota,
                   NotEmulated]
