"""The EndpointSlice controller as a pure function: Service x Pods -> EndpointSlices.

What upstream's controller (pkg/controller/endpointslice) does, reduced to what decides
the dataplane:

* only Services with a selector are managed (a selector-less Service keeps whatever
  EndpointSlices the user wrote), and ExternalName Services get none;
* a Pod is selected when it is in the Service's namespace, its labels match the
  selector, it has an IP of the Service's family and it is not in a terminal phase
  (Succeeded/Failed); Pods being deleted stay in, marked terminating;
* each Service port resolves per Pod: an integer targetPort is used as it is, a named
  targetPort is looked up among the Pod's container ports with the same protocol, and a
  Pod without that named port is left out *for that port only*;
* Pods with the same resolved port list share a slice (at most 100 endpoints each);
* conditions: ``serving`` = the Pod is Ready, ``terminating`` = it is being deleted,
  ``ready`` = serving and not terminating (always true with publishNotReadyAddresses).

A Service that selects nothing gets one empty placeholder slice, as upstream does.
Slice names are ``<service>-<5 chars>``, derived from a hash so they are stable.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from kproxy.model import objects as o

MAX_ENDPOINTS_PER_SLICE = 100
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
# The alphabet Kubernetes uses for generated name suffixes (no vowels, no 0/1/3).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

PodReady = Union[None, Callable[[o.Pod], bool], Mapping[str, bool]]


def find_port(pod: o.Pod, svc_port: o.ServicePort) -> Optional[int]:
    """The Pod's port for ``svc_port`` (upstream ``podutil.FindPort``), or None when a
    named targetPort is not among the Pod's container ports of that protocol."""
    target = svc_port.target_port
    if isinstance(target, int):
        return target or svc_port.port
    for container in pod.spec.containers:
        for cp in container.ports:
            if cp.name == target and cp.protocol == svc_port.protocol:
                return cp.container_port
    return None


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_ip_family(service: o.Service) -> str:
    if service.ip_families:
        return service.ip_families[0]
    ip = service.cluster_ip
    if ip and ip != "None":
        try:
            return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
        except ValueError:
            pass
    return "IPv4"


def _pod_ip(pod: o.Pod, family: str) -> Optional[str]:
    for ip in pod.pod_ips:
        try:
            if (ipaddress.ip_address(ip).version == 6) == (family == "IPv6"):
                return ip
        except ValueError:
            continue
    return None


def _is_ready(pod: o.Pod, pod_ready: PodReady) -> bool:
    if pod_ready is None:
        cond = pod.status.condition("Ready")
        return True if cond is None else cond
    if callable(pod_ready):
        return bool(pod_ready(pod))
    if pod.name in pod_ready:
        return bool(pod_ready[pod.name])
    return bool(pod_ready.get(f"{pod.namespace}/{pod.name}", True))


def _suffix(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)] for b in digest[:5])


def endpoint_slices_for(service: o.Service, pods: Iterable[o.Pod],
                        pod_ready: PodReady = None) -> List[o.EndpointSlice]:
    """The EndpointSlices the controller would keep for ``service`` given ``pods``.

    ``pod_ready`` says whether a Pod is Ready: a callable taking the Pod, a mapping from
    Pod name (or ``namespace/name``) to bool (missing Pods count as ready), or None to
    use the Pod's own Ready condition (a Pod without status counts as ready).
    """
    if service.type == "ExternalName" or not service.selector:
        return []
    family = service_ip_family(service)
    groups: Dict[Tuple[Tuple[str, int, str], ...], List[o.Endpoint]] = {}
    for pod in sorted(pods, key=lambda p: (p.namespace, p.name)):
        if pod.namespace != service.namespace or not selects(service.selector, pod.labels):
            continue
        if pod.status.phase in ("Succeeded", "Failed"):
            continue
        ip = _pod_ip(pod, family)
        if ip is None:
            continue
        ports = []
        for sp in service.ports:
            number = find_port(pod, sp)
            if number is not None:
                ports.append((sp.name, number, sp.protocol))
        serving = _is_ready(pod, pod_ready)
        terminating = pod.terminating
        ready = True if service.publish_not_ready_addresses else (serving and not terminating)
        endpoint = o.Endpoint(
            addresses=[ip],
            conditions=o.EndpointConditions(ready=ready, serving=serving, terminating=terminating),
            node_name=pod.spec.node_name or None,
            target_ref={"kind": "Pod", "namespace": pod.namespace, "name": pod.name,
                        **({"uid": pod.metadata.uid} if pod.metadata.uid else {})},
        )
        groups.setdefault(tuple(ports), []).append(endpoint)

    app_protocols = {(sp.name, sp.protocol): sp.app_protocol for sp in service.ports}
    slices: List[o.EndpointSlice] = []
    if not groups:
        slices.append(_slice(service, family, [], [], _suffix(service.namespaced_name, "placeholder")))
        return slices
    for ports_key in sorted(groups):
        endpoints = groups[ports_key]
        ep_ports = [o.EndpointPort(port=num, name=name, protocol=proto,
                                   app_protocol=app_protocols.get((name, proto)))
                    for name, num, proto in ports_key]
        for chunk in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            suffix = _suffix(service.namespaced_name, repr(ports_key), str(chunk))
            slices.append(_slice(service, family, endpoints[chunk:chunk + MAX_ENDPOINTS_PER_SLICE],
                                 ep_ports, suffix))
    return slices


def _slice(service: o.Service, family: str, endpoints: List[o.Endpoint],
           ports: List[o.EndpointPort], suffix: str) -> o.EndpointSlice:
    labels = dict(service.metadata.labels)
    labels[o.SERVICE_NAME_LABEL] = service.name
    labels[o.MANAGED_BY_LABEL] = CONTROLLER_NAME
    meta = o.ObjectMeta(name=f"{service.name}-{suffix}", namespace=service.namespace,
                        labels=labels, generate_name=f"{service.name}-")
    return o.EndpointSlice(metadata=meta, address_type=family, endpoints=list(endpoints),
                           ports=list(ports))
