"""From a decoded YAML document to the dataclasses in objects.py, with API defaults.

Type problems (a string where an integer belongs, a list where a map belongs) are
collected as ``(field path, reason)`` pairs in an ``Issues`` list rather than raised, so
one load can report every problem at once. Semantic checks live in validate.py.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from kproxy.model import objects as o

_PLACEHOLDER = re.compile(r"^<[^<>]*>$")


class Issues:
    """An accumulator of ``(path, reason)`` pairs."""

    def __init__(self) -> None:
        self.items: List[Tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append((path, reason))

    def __bool__(self) -> bool:
        return bool(self.items)


def _p(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _type_error(issues: Issues, path: str, value: Any, expected: str) -> None:
    reason = f"Invalid value: {_show(value)}: expected {expected}, got {_describe(value)}"
    if isinstance(value, str) and _PLACEHOLDER.match(value.strip()):
        reason += " (an unfilled template placeholder?)"
    issues.add(path, reason)


def get_int(issues: Issues, d: Dict[str, Any], key: str, path: str,
            default: Optional[int] = 0) -> Optional[int]:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        _type_error(issues, _p(path, key), value, "an integer")
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    _type_error(issues, _p(path, key), value, "an integer")
    return default


def get_str(issues: Issues, d: Dict[str, Any], key: str, path: str,
            default: Optional[str] = "") -> Optional[str]:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, str):
        return value
    _type_error(issues, _p(path, key), value, "a string")
    return default


def get_bool(issues: Issues, d: Dict[str, Any], key: str, path: str,
             default: Optional[bool] = False) -> Optional[bool]:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    _type_error(issues, _p(path, key), value, "a boolean")
    return default


def get_int_or_str(issues: Issues, d: Dict[str, Any], key: str, path: str,
                   default: o.IntOrStr = 0) -> o.IntOrStr:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        _type_error(issues, _p(path, key), value, "an integer or a string")
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value
    _type_error(issues, _p(path, key), value, "an integer or a string")
    return default


def get_map(issues: Issues, d: Dict[str, Any], key: str, path: str) -> Optional[Dict[str, Any]]:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    _type_error(issues, _p(path, key), value, "a map")
    return None


def get_list(issues: Issues, d: Dict[str, Any], key: str, path: str) -> List[Any]:
    value = d.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        return value
    _type_error(issues, _p(path, key), value, "a list")
    return []


def get_str_map(issues: Issues, d: Dict[str, Any], key: str, path: str) -> Optional[Dict[str, str]]:
    """A map of string to string (labels, selectors); None when absent."""
    value = get_map(issues, d, key, path)
    if value is None:
        return None
    out: Dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            _type_error(issues, _p(path, key), k, "string keys")
            continue
        if not isinstance(v, str):
            _type_error(issues, f"{_p(path, key)}.{k}", v, "a string")
            continue
        out[k] = v
    return out


def get_str_list(issues: Issues, d: Dict[str, Any], key: str, path: str) -> List[str]:
    out: List[str] = []
    for i, v in enumerate(get_list(issues, d, key, path)):
        if isinstance(v, str):
            out.append(v)
        else:
            _type_error(issues, f"{_p(path, key)}[{i}]", v, "a string")
    return out


def _items(issues: Issues, d: Dict[str, Any], key: str, path: str):
    """(index, item, item_path) for each map in the list ``d[key]``."""
    for i, item in enumerate(get_list(issues, d, key, path)):
        item_path = f"{_p(path, key)}[{i}]"
        if not isinstance(item, dict):
            _type_error(issues, item_path, item, "a map")
            continue
        yield i, item, item_path


# --------------------------------------------------------------------------- metadata


def parse_meta(issues: Issues, doc: Dict[str, Any], namespaced: bool,
               default_namespace: str) -> o.ObjectMeta:
    meta = get_map(issues, doc, "metadata", "") or {}
    ns = get_str(issues, meta, "namespace", "metadata", None)
    if namespaced:
        ns = ns or default_namespace
    else:
        ns = None
    return o.ObjectMeta(
        name=get_str(issues, meta, "name", "metadata"),
        namespace=ns,
        labels=get_str_map(issues, meta, "labels", "metadata") or {},
        annotations=get_str_map(issues, meta, "annotations", "metadata") or {},
        generate_name=get_str(issues, meta, "generateName", "metadata"),
        uid=str(meta.get("uid") or ""),
        deletion_timestamp=(str(meta["deletionTimestamp"])
                            if meta.get("deletionTimestamp") is not None else None),
    )


# --------------------------------------------------------------------------- pods


def parse_container(issues: Issues, c: Dict[str, Any], path: str) -> o.Container:
    ports = []
    for _, p, pp in _items(issues, c, "ports", path):
        ports.append(o.ContainerPort(
            container_port=get_int(issues, p, "containerPort", pp),
            name=get_str(issues, p, "name", pp),
            protocol=get_str(issues, p, "protocol", pp) or "TCP",
            host_port=get_int(issues, p, "hostPort", pp),
            host_ip=get_str(issues, p, "hostIP", pp),
        ))
    env = [e for _, e, _ in _items(issues, c, "env", path)]
    return o.Container(
        name=get_str(issues, c, "name", path),
        image=get_str(issues, c, "image", path),
        command=get_str_list(issues, c, "command", path),
        args=get_str_list(issues, c, "args", path),
        ports=ports,
        readiness_probe=get_map(issues, c, "readinessProbe", path),
        liveness_probe=get_map(issues, c, "livenessProbe", path),
        startup_probe=get_map(issues, c, "startupProbe", path),
        env=env,
        working_dir=get_str(issues, c, "workingDir", path),
    )


def parse_pod_spec(issues: Issues, spec: Dict[str, Any], path: str) -> o.PodSpec:
    return o.PodSpec(
        containers=[parse_container(issues, c, cp) for _, c, cp in _items(issues, spec, "containers", path)],
        init_containers=[parse_container(issues, c, cp)
                         for _, c, cp in _items(issues, spec, "initContainers", path)],
        restart_policy=get_str(issues, spec, "restartPolicy", path) or "Always",
        node_name=get_str(issues, spec, "nodeName", path),
        host_network=get_bool(issues, spec, "hostNetwork", path),
        hostname=get_str(issues, spec, "hostname", path),
        subdomain=get_str(issues, spec, "subdomain", path),
    )


def parse_pod(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.Pod:
    spec = get_map(issues, doc, "spec", "") or {}
    status = get_map(issues, doc, "status", "") or {}
    pod_ips = []
    for _, entry, ep in _items(issues, status, "podIPs", "status"):
        ip = get_str(issues, entry, "ip", ep)
        if ip:
            pod_ips.append(ip)
    return o.Pod(
        metadata=parse_meta(issues, doc, True, default_namespace),
        spec=parse_pod_spec(issues, spec, "spec"),
        status=o.PodStatus(
            phase=get_str(issues, status, "phase", "status"),
            pod_ip=get_str(issues, status, "podIP", "status"),
            pod_ips=pod_ips,
            host_ip=get_str(issues, status, "hostIP", "status"),
            conditions=[c for _, c, _ in _items(issues, status, "conditions", "status")],
        ),
        raw=doc,
    )


# --------------------------------------------------------------------------- deployments


def parse_deployment(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.Deployment:
    spec = get_map(issues, doc, "spec", "") or {}
    selector = get_map(issues, spec, "selector", "spec") or {}
    template = get_map(issues, spec, "template", "spec") or {}
    strategy = get_map(issues, spec, "strategy", "spec") or {}
    stype = get_str(issues, strategy, "type", "spec.strategy") or "RollingUpdate"
    ru = get_map(issues, strategy, "rollingUpdate", "spec.strategy")
    rolling: Optional[o.RollingUpdate] = None
    if stype == "RollingUpdate" or ru is not None:
        ru = ru or {}
        rolling = o.RollingUpdate(
            max_surge=get_int_or_str(issues, ru, "maxSurge", "spec.strategy.rollingUpdate", "25%"),
            max_unavailable=get_int_or_str(issues, ru, "maxUnavailable",
                                           "spec.strategy.rollingUpdate", "25%"),
        )
    tmeta = get_map(issues, template, "metadata", "spec.template") or {}
    return o.Deployment(
        metadata=parse_meta(issues, doc, True, default_namespace),
        replicas=get_int(issues, spec, "replicas", "spec", 1),
        match_labels=get_str_map(issues, selector, "matchLabels", "spec.selector") or {},
        match_expressions=[e for _, e, _ in _items(issues, selector, "matchExpressions",
                                                    "spec.selector")],
        template=o.PodTemplate(
            metadata=o.ObjectMeta(
                name=get_str(issues, tmeta, "name", "spec.template.metadata"),
                labels=get_str_map(issues, tmeta, "labels", "spec.template.metadata") or {},
                annotations=get_str_map(issues, tmeta, "annotations", "spec.template.metadata") or {},
            ),
            spec=parse_pod_spec(issues, get_map(issues, template, "spec", "spec.template") or {},
                                "spec.template.spec"),
        ),
        strategy=o.DeploymentStrategy(type=stype, rolling_update=rolling),
        min_ready_seconds=get_int(issues, spec, "minReadySeconds", "spec"),
        raw=doc,
    )


# --------------------------------------------------------------------------- services


def parse_service(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.Service:
    spec = get_map(issues, doc, "spec", "") or {}
    status = get_map(issues, doc, "status", "") or {}
    lb = get_map(issues, status, "loadBalancer", "status") or {}
    ports = []
    for _, p, pp in _items(issues, spec, "ports", "spec"):
        port = get_int(issues, p, "port", pp)
        target = get_int_or_str(issues, p, "targetPort", pp)
        if target in (0, ""):
            target = port                        # API default: targetPort = port
        ports.append(o.ServicePort(
            port=port, name=get_str(issues, p, "name", pp),
            protocol=get_str(issues, p, "protocol", pp) or "TCP",
            target_port=target, node_port=get_int(issues, p, "nodePort", pp),
            app_protocol=get_str(issues, p, "appProtocol", pp, None)))
    stype = get_str(issues, spec, "type", "spec") or "ClusterIP"
    affinity = get_str(issues, spec, "sessionAffinity", "spec") or "None"
    timeout = o.DEFAULT_SESSION_AFFINITY_SECONDS
    sac = get_map(issues, spec, "sessionAffinityConfig", "spec") or {}
    cip = get_map(issues, sac, "clientIP", "spec.sessionAffinityConfig") or {}
    timeout = get_int(issues, cip, "timeoutSeconds", "spec.sessionAffinityConfig.clientIP", timeout)
    ingress = []
    for _, ing, ip_path in _items(issues, lb, "ingress", "status.loadBalancer"):
        ingress.append(o.LoadBalancerIngress(
            ip=get_str(issues, ing, "ip", ip_path), hostname=get_str(issues, ing, "hostname", ip_path),
            ip_mode=get_str(issues, ing, "ipMode", ip_path, None)))
    cluster_ip = get_str(issues, spec, "clusterIP", "spec")
    cluster_ips = get_str_list(issues, spec, "clusterIPs", "spec")
    if not cluster_ip and cluster_ips:
        cluster_ip = cluster_ips[0]
    selector = get_str_map(issues, spec, "selector", "spec")
    return o.Service(
        metadata=parse_meta(issues, doc, True, default_namespace),
        type=stype,
        cluster_ip=cluster_ip,
        cluster_ips=cluster_ips,
        ports=ports,
        selector=selector or None,
        session_affinity=affinity,
        session_affinity_timeout=timeout,
        external_traffic_policy=get_str(issues, spec, "externalTrafficPolicy", "spec") or "Cluster",
        internal_traffic_policy=get_str(issues, spec, "internalTrafficPolicy", "spec") or "Cluster",
        external_ips=get_str_list(issues, spec, "externalIPs", "spec"),
        load_balancer_ip=get_str(issues, spec, "loadBalancerIP", "spec"),
        load_balancer_source_ranges=get_str_list(issues, spec, "loadBalancerSourceRanges", "spec"),
        load_balancer_ingress=ingress,
        health_check_node_port=get_int(issues, spec, "healthCheckNodePort", "spec"),
        external_name=get_str(issues, spec, "externalName", "spec"),
        publish_not_ready_addresses=get_bool(issues, spec, "publishNotReadyAddresses", "spec"),
        ip_families=get_str_list(issues, spec, "ipFamilies", "spec"),
        allocate_load_balancer_node_ports=get_bool(issues, spec, "allocateLoadBalancerNodePorts",
                                                   "spec", True),
        raw=doc,
    )


# --------------------------------------------------------------------------- endpoints


def _endpoint_ports(issues: Issues, d: Dict[str, Any], path: str) -> List[o.EndpointPort]:
    out = []
    for _, p, pp in _items(issues, d, "ports", path):
        out.append(o.EndpointPort(
            port=get_int(issues, p, "port", pp, None),
            name=get_str(issues, p, "name", pp, ""),
            protocol=get_str(issues, p, "protocol", pp, "TCP") or "TCP",
            app_protocol=get_str(issues, p, "appProtocol", pp, None)))
    return out


def parse_endpoint_slice(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.EndpointSlice:
    endpoints = []
    for _, e, ep in _items(issues, doc, "endpoints", ""):
        cond = get_map(issues, e, "conditions", ep) or {}
        hints = get_map(issues, e, "hints", ep) or {}
        cp = _p(ep, "conditions")
        endpoints.append(o.Endpoint(
            addresses=get_str_list(issues, e, "addresses", ep),
            conditions=o.EndpointConditions(
                ready=get_bool(issues, cond, "ready", cp, None),
                serving=get_bool(issues, cond, "serving", cp, None),
                terminating=get_bool(issues, cond, "terminating", cp, None)),
            node_name=get_str(issues, e, "nodeName", ep, None),
            zone=get_str(issues, e, "zone", ep, None),
            hostname=get_str(issues, e, "hostname", ep, None),
            target_ref=get_map(issues, e, "targetRef", ep),
            hints_for_zones=[get_str(issues, z, "name", zp) for _, z, zp
                             in _items(issues, hints, "forZones", _p(ep, "hints"))],
            hints_for_nodes=[get_str(issues, n, "name", np_) for _, n, np_
                             in _items(issues, hints, "forNodes", _p(ep, "hints"))],
        ))
    return o.EndpointSlice(
        metadata=parse_meta(issues, doc, True, default_namespace),
        address_type=get_str(issues, doc, "addressType", "") or "",
        endpoints=endpoints,
        ports=_endpoint_ports(issues, doc, ""),
        raw=doc,
    )


def _addresses(issues: Issues, d: Dict[str, Any], key: str, path: str) -> List[o.EndpointAddress]:
    out = []
    for _, a, ap in _items(issues, d, key, path):
        out.append(o.EndpointAddress(
            ip=get_str(issues, a, "ip", ap), node_name=get_str(issues, a, "nodeName", ap, None),
            hostname=get_str(issues, a, "hostname", ap, None), target_ref=get_map(issues, a, "targetRef", ap)))
    return out


def parse_endpoints(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.Endpoints:
    subsets = []
    for _, s, sp in _items(issues, doc, "subsets", ""):
        subsets.append(o.EndpointSubset(
            addresses=_addresses(issues, s, "addresses", sp),
            not_ready_addresses=_addresses(issues, s, "notReadyAddresses", sp),
            ports=_endpoint_ports(issues, s, sp)))
    return o.Endpoints(metadata=parse_meta(issues, doc, True, default_namespace),
                       subsets=subsets, raw=doc)


def parse_resource_quota(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.ResourceQuota:
    from kproxy.model.quantity import parse_quantity

    spec = get_map(issues, doc, "spec", "") or {}
    hard: Dict[str, Any] = {}
    for key, value in (get_map(issues, spec, "hard", "spec") or {}).items():
        if not isinstance(key, str):
            _type_error(issues, "spec.hard", key, "string keys")
            continue
        path = f"spec.hard[{key}]"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _type_error(issues, path, value, "a quantity (a number or a string such as \"10\")")
            continue
        try:
            q = parse_quantity(value)
        except ValueError as exc:
            issues.add(path, f"Invalid value: {_show(value)}: {exc}")
            continue
        hard[key] = int(q.value) if q.is_integer else str(value)
    return o.ResourceQuota(
        metadata=parse_meta(issues, doc, True, default_namespace),
        hard=hard,
        scopes=get_str_list(issues, spec, "scopes", "spec"),
        scope_selector=get_map(issues, spec, "scopeSelector", "spec"),
        raw=doc,
    )


def parse_namespace(issues: Issues, doc: Dict[str, Any], default_namespace: str) -> o.Namespace:
    return o.Namespace(metadata=parse_meta(issues, doc, False, default_namespace), raw=doc)


# kind -> (accepted apiVersions, parser)
PARSERS = {
    "Namespace": (("v1",), parse_namespace),
    "Pod": (("v1",), parse_pod),
    "Deployment": (("apps/v1",), parse_deployment),
    "Service": (("v1",), parse_service),
    "EndpointSlice": (("discovery.k8s.io/v1",), parse_endpoint_slice),
    "Endpoints": (("v1",), parse_endpoints),
    "ResourceQuota": (("v1",), parse_resource_quota),
}

# Kinds without a namespace (for NotEmulated objects, so they are not put in "default").
CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass", "CSIDriver",
    "CSINode", "VolumeAttachment", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration", "APIService", "ServiceCIDR", "IPAddress",
}
