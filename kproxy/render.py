"""From manifests to a node's proxier payload, without a cluster: ``render_manifests``.

This is what ``kproxy render`` shows: the rules kube-proxy would write on one node for
the Services in the manifests, with the endpoints the manifests' Pods and Deployments
would produce once running.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, TextIO, Union

from kproxy.alloc import DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDR, Allocators
from kproxy.model import load
from kproxy.model import objects as o
from kproxy.model.endpoints import endpoint_slices_for
from kproxy.proxy.iptables.render import NodeSettings, render

DEFAULT_NODE_NAME = "node-1"
DEFAULT_NODE_IP = "192.168.5.11"
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"
NODE_CIDR_PREFIX = 24
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"   # Kubernetes' generated-name alphabet


@dataclass
class ResolvedManifests:
    """The manifests as a running cluster would hold them: Services with their
    ClusterIPs/NodePorts/LB IPs, Pods with IPs, and the EndpointSlices."""

    services: List[o.Service] = field(default_factory=list)
    pods: List[o.Pod] = field(default_factory=list)
    endpoint_slices: List[o.EndpointSlice] = field(default_factory=list)
    node_cidrs: Dict[str, str] = field(default_factory=dict)
    allocators: Optional[Allocators] = None
    warnings: List[str] = field(default_factory=list)


def _code(*parts: str, length: int) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:length])


def pod_template_hash(dep: o.Deployment) -> str:
    """The ``pod-template-hash`` label of a Deployment's current ReplicaSet: 10 characters
    of the generated-name alphabet from the template as written (``spec.template``), so
    it changes exactly when the template does."""
    return _code(json.dumps(dep.raw.get("spec", {}).get("template", {}), sort_keys=True,
                            default=str), length=10)


def replica_pods(dep: o.Deployment) -> List[o.Pod]:
    """The Pods of a Deployment's current ReplicaSet: named
    ``<deployment>-<pod-template-hash>-<5 chars>`` and labelled with the template's
    labels plus ``pod-template-hash``, as the ReplicaSet controller names them."""
    template_hash = pod_template_hash(dep)
    pods = []
    for i in range(dep.replicas):
        labels = dict(dep.template.metadata.labels, **{"pod-template-hash": template_hash})
        name = f"{dep.name}-{template_hash}-{_code(dep.namespace, dep.name, template_hash, str(i), length=5)}"
        pods.append(o.Pod(metadata=o.ObjectMeta(name=name, namespace=dep.namespace, labels=labels,
                                                annotations=dict(dep.template.metadata.annotations)),
                          spec=copy.deepcopy(dep.template.spec)))
    return pods


class _PodIPs:
    """Per-node pod CIDRs carved from the cluster CIDR (a /24 per node, in order of
    appearance, ``node_name`` first); pod IPs from ``.2`` up (``.1`` is the bridge)."""

    def __init__(self, cluster_cidr: str, first_node: str):
        self.cluster = ipaddress.ip_network(cluster_cidr, strict=False)
        prefix = NODE_CIDR_PREFIX if self.cluster.version == 4 else 64
        self.subnets = self.cluster.subnets(new_prefix=max(prefix, self.cluster.prefixlen))
        self.nodes: Dict[str, ipaddress._BaseNetwork] = {}
        self.used: set = set()
        self.node(first_node)

    def node(self, name: str):
        if name not in self.nodes:
            try:
                self.nodes[name] = next(self.subnets)
            except StopIteration:
                raise ValueError(f"cluster CIDR {self.cluster} has no room for node {name}") from None
        return self.nodes[name]

    def allocate(self, node: str) -> str:
        net = self.node(node)
        for offset in range(2, net.num_addresses - 1):
            ip = str(net.network_address + offset)
            if ip not in self.used:
                self.used.add(ip)
                return ip
        raise ValueError(f"pod CIDR {net} of node {node} is full")


def resolve_manifests(paths: Union[str, Iterable[str]], *, node_name: str = DEFAULT_NODE_NAME,
                      cluster_cidr: str = DEFAULT_CLUSTER_CIDR,
                      service_cidr: str = DEFAULT_SERVICE_CIDR,
                      node_port_range: str = DEFAULT_NODE_PORT_RANGE,
                      lb_pool: Union[None, str, Iterable[str]] = None, strict: bool = True,
                      stdin: Optional[TextIO] = None) -> ResolvedManifests:
    """Load manifests and fill in what the control plane would (see render_manifests)."""
    loaded = load(paths, strict=strict, stdin=stdin)
    out = ResolvedManifests(warnings=[w for lo in loaded for w in lo.warnings])

    # kubectl apply semantics: a later object with the same kind/namespace/name updates
    # the earlier one (its place in the order is the first appearance).
    latest: Dict[Any, Any] = {}
    for lo in loaded:
        latest[lo.key] = lo.obj
    objs, seen = [], set()
    for lo in loaded:
        if lo.key not in seen:
            seen.add(lo.key)
            objs.append(copy.deepcopy(latest[lo.key]))

    alloc = Allocators(service_cidr, node_port_range, lb_pool)
    out.allocators = alloc
    pod_ips = _PodIPs(cluster_cidr, node_name)
    for obj in objs:
        if isinstance(obj, o.Pod):
            out.pods.append(obj)
        elif isinstance(obj, o.Deployment):
            out.pods.extend(replica_pods(obj))
        elif isinstance(obj, o.Service):
            _allocate_service(obj, alloc)
            out.services.append(obj)
        elif isinstance(obj, o.EndpointSlice):
            out.endpoint_slices.append(obj)
        elif isinstance(obj, o.Endpoints):
            out.endpoint_slices.extend(obj.to_endpoint_slices())

    for pod in out.pods:                      # taken pod IPs first, then new ones in order
        pod.spec.node_name = pod.spec.node_name or node_name
        pod_ips.node(pod.spec.node_name)
        pod_ips.used.update(pod.pod_ips)
    for pod in out.pods:
        if not pod.pod_ips:
            pod.status.pod_ip = pod_ips.allocate(pod.spec.node_name)
            pod.status.pod_ips = [pod.status.pod_ip]
        pod.status.phase = pod.status.phase or "Running"
    out.node_cidrs = {n: str(c) for n, c in pod_ips.nodes.items()}

    for svc in out.services:
        if svc.selector and svc.type != "ExternalName":
            slices = endpoint_slices_for(svc, out.pods, lambda pod: True)
            out.endpoint_slices.extend(slices)
            if not any(s.endpoints for s in slices):
                out.warnings.append(f"Service {svc.namespaced_name} selects no Pod: no endpoints")
    return out


def _allocate_service(svc: o.Service, alloc: Allocators) -> None:
    owner = svc.namespaced_name
    if svc.type == "ExternalName":
        return
    if not svc.headless:
        svc.cluster_ip = alloc.cluster_ips.allocate(owner, svc.cluster_ip)
        svc.cluster_ips = [svc.cluster_ip]
    if svc.type in ("NodePort", "LoadBalancer"):
        for i, port in enumerate(svc.ports):
            wanted = svc.type == "NodePort" or svc.allocate_load_balancer_node_ports
            if port.node_port or wanted:
                port.node_port = alloc.node_ports.allocate(owner, port.node_port, f"spec.ports[{i}].nodePort")
    if svc.type == "LoadBalancer" and svc.external_traffic_policy == "Local":
        svc.health_check_node_port = alloc.node_ports.allocate(owner, svc.health_check_node_port,
                                                               "spec.healthCheckNodePort")
    if svc.type == "LoadBalancer" and alloc.load_balancers and not svc.load_balancer_ingress:
        ip = alloc.load_balancers.allocate(owner, svc.load_balancer_ip)
        svc.load_balancer_ingress = [o.LoadBalancerIngress(ip=ip, ip_mode="VIP")]


def render_manifests(paths: Union[str, Iterable[str]], backend: str = "iptables",
                     node_name: str = DEFAULT_NODE_NAME, node_ip: str = DEFAULT_NODE_IP,
                     cluster_cidr: str = DEFAULT_CLUSTER_CIDR,
                     service_cidr: str = DEFAULT_SERVICE_CIDR,
                     node_port_range: str = DEFAULT_NODE_PORT_RANGE,
                     lb_pool: Union[None, str, Iterable[str]] = None, strict: bool = True,
                     *, stdin: Optional[TextIO] = None) -> str:
    """The ruleset ``backend`` would program on ``node_name`` for these manifests.

    Manifests are loaded like ``kubectl apply -f`` (see ``kproxy.model.load``; a later
    object with the same kind/namespace/name replaces an earlier one). Then, in object
    order, each Service gets a ClusterIP from ``service_cidr`` (kubeadm keeps ``.1`` and
    ``.10``), NodePort/LoadBalancer ports get NodePorts from ``node_port_range`` (and
    LoadBalancer Services with externalTrafficPolicy Local a health-check NodePort),
    and LoadBalancer Services get an ingress IP from ``lb_pool`` when one is given
    (otherwise they stay pending, with no LB rules). Requested values are honoured.

    Assumptions, since nothing runs: the cluster is one node, ``node_name`` with
    address ``node_ip``, and every Pod lives on it unless its ``spec.nodeName`` names
    another node. Each node gets the next /24 of ``cluster_cidr`` (``node_name`` the
    first) and Pods get addresses from ``.2`` up in object order. A Deployment's
    replicas become Pods named like a ReplicaSet's. Every Pod counts as Running and
    Ready, so every selected Pod is a ready endpoint. EndpointSlices and Endpoints
    written in the manifests are used as they are (for Services without a selector).

    ``backend`` is ``"iptables"`` (kube-proxy's iptables-restore payload); another
    name is looked up as ``kproxy.proxy.<backend>`` and its ``render(services,
    endpoint_slices, settings)`` called with the same NodeSettings.
    """
    resolved = resolve_manifests(paths, node_name=node_name, cluster_cidr=cluster_cidr,
                                 service_cidr=service_cidr, node_port_range=node_port_range,
                                 lb_pool=lb_pool, strict=strict, stdin=stdin)
    settings = NodeSettings(node_name=node_name, node_ips=[node_ip], cluster_cidr=cluster_cidr)
    if backend == "iptables":
        return render(resolved.services, resolved.endpoint_slices, settings)
    try:
        module = importlib.import_module(f"kproxy.proxy.{backend}")
    except ImportError:
        module = None
    fn = getattr(module, "render", None)
    if fn is None:
        raise ValueError(f"unknown or unavailable proxier backend {backend!r} (iptables is built in)")
    if backend == "nftables":
        return fn(resolved.services, resolved.endpoint_slices, settings, service_cidrs=service_cidr)
    return fn(resolved.services, resolved.endpoint_slices, settings)
