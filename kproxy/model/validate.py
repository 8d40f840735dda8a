"""API-server style validation of the emulated kinds.

Each ``validate_<kind>`` returns ``(field path, reason)`` pairs; reasons follow the API
server's wording ("Invalid value: 70000: must be between 1 and 65535, inclusive",
"Required value", "Unsupported value: ...", "Duplicate value: ...").
"""

from __future__ import annotations

import ipaddress
import re
from typing import List, Optional, Tuple

from kproxy.model import objects as o

Problems = List[Tuple[str, str]]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[-a-z0-9]+$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PERCENT = re.compile(r"^[0-9]+%$")

DNS1123_LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                     "or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  "
                     "or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
DNS1035_LABEL_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
                     "start with an alphabetic character, and end with an alphanumeric character "
                     "(e.g. 'my-name',  or 'abc-123', regex used for validation is "
                     "'[a-z]([-a-z0-9]*[a-z0-9])?')")
DNS1123_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                         "characters, '-' or '.', and must start and end with an alphanumeric "
                         "character (e.g. 'example.com', regex used for validation is "
                         "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")


def _q(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _unsupported(value, supported) -> str:
    return f"Unsupported value: {_q(value)}: supported values: " + ", ".join(
        f'"{s}"' for s in supported)


def dns1123_label(value: str) -> Optional[str]:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1123_LABEL.match(value):
        return DNS1123_LABEL_MSG
    return None


def dns1035_label(value: str) -> Optional[str]:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _DNS1035_LABEL.match(value):
        return DNS1035_LABEL_MSG
    return None


def dns1123_subdomain(value: str) -> Optional[str]:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN.match(value):
        return DNS1123_SUBDOMAIN_MSG
    return None


def iana_svc_name(value: str) -> Optional[str]:
    """IANA_SVC_NAME (RFC 6335): 1-15 lowercase alphanumerics or '-', at least one
    letter, no leading/trailing or doubled '-'."""
    if len(value) > 15:
        return "must be no more than 15 characters"
    if not _IANA_SVC_NAME.match(value):
        return "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
    if "--" in value:
        return "must not contain consecutive hyphens"
    if not re.search(r"[a-z]", value):
        return "must contain at least one letter (a-z)"
    if value.startswith("-") or value.endswith("-"):
        return "must not begin or end with a hyphen"
    return None


def _port_range(value: int) -> Optional[str]:
    if not 1 <= value <= 65535:
        return f"Invalid value: {value}: must be between 1 and 65535, inclusive"
    return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _labels(problems: Problems, labels, path: str) -> None:
    for key, value in labels.items():
        name = key.rsplit("/", 1)[-1]
        prefix = key[: -len(name) - 1] if "/" in key else ""
        if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name) or (
                prefix and dns1123_subdomain(prefix)):
            problems.append((path, f"Invalid value: {_q(key)}: name part must consist of "
                                   "alphanumeric characters, '-', '_' or '.', and must start and "
                                   "end with an alphanumeric character"))
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append((f"{path}.{key}" if path else key,
                             f"Invalid value: {_q(value)}: a valid label must be an empty string or "
                             "consist of alphanumeric characters, '-', '_' or '.', and must start "
                             "and end with an alphanumeric character (at most 63 characters)"))


def _meta(problems: Problems, meta: o.ObjectMeta, name_check, namespaced: bool) -> None:
    if not meta.name:
        if not meta.generate_name:
            problems.append(("metadata.name", "Required value: name or generateName is required"))
    else:
        msg = name_check(meta.name)
        if msg:
            problems.append(("metadata.name", f"Invalid value: {_q(meta.name)}: {msg}"))
    if namespaced and meta.namespace:
        msg = dns1123_label(meta.namespace)
        if msg:
            problems.append(("metadata.namespace", f"Invalid value: {_q(meta.namespace)}: {msg}"))
    _labels(problems, meta.labels, "metadata.labels")


# --------------------------------------------------------------------------- kinds


def validate_namespace(ns: o.Namespace) -> Problems:
    problems: Problems = []
    _meta(problems, ns.metadata, dns1123_label, False)
    return problems


def _containers(problems: Problems, containers: List[o.Container], path: str, required: bool) -> None:
    if required and not containers:
        problems.append((path, "Required value"))
    seen = set()
    for i, c in enumerate(containers):
        cp = f"{path}[{i}]"
        if not c.name:
            problems.append((f"{cp}.name", "Required value"))
        else:
            msg = dns1123_label(c.name)
            if msg:
                problems.append((f"{cp}.name", f"Invalid value: {_q(c.name)}: {msg}"))
            if c.name in seen:
                problems.append((f"{cp}.name", f"Duplicate value: {_q(c.name)}"))
            seen.add(c.name)
        if not c.image:
            problems.append((f"{cp}.image", "Required value"))
        port_names = set()
        for j, p in enumerate(c.ports):
            pp = f"{cp}.ports[{j}]"
            msg = _port_range(p.container_port)
            if msg:
                problems.append((f"{pp}.containerPort", msg))
            if p.host_port and not 1 <= p.host_port <= 65535:
                problems.append((f"{pp}.hostPort",
                                 f"Invalid value: {p.host_port}: must be between 1 and 65535, inclusive"))
            if p.protocol not in o.PROTOCOLS:
                problems.append((f"{pp}.protocol", _unsupported(p.protocol, sorted(o.PROTOCOLS))))
            if p.name:
                msg = iana_svc_name(p.name)
                if msg:
                    problems.append((f"{pp}.name", f"Invalid value: {_q(p.name)}: {msg}"))
                elif p.name in port_names:
                    problems.append((f"{pp}.name", f"Duplicate value: {_q(p.name)}"))
                port_names.add(p.name)


def _pod_spec(problems: Problems, spec: o.PodSpec, path: str, restart_policies) -> None:
    _containers(problems, spec.containers, f"{path}.containers", True)
    _containers(problems, spec.init_containers, f"{path}.initContainers", False)
    if spec.restart_policy not in restart_policies:
        problems.append((f"{path}.restartPolicy", _unsupported(spec.restart_policy, restart_policies)))
    if spec.node_name:
        msg = dns1123_subdomain(spec.node_name)
        if msg:
            problems.append((f"{path}.nodeName", f"Invalid value: {_q(spec.node_name)}: {msg}"))


def validate_pod(pod: o.Pod) -> Problems:
    problems: Problems = []
    _meta(problems, pod.metadata, dns1123_subdomain, True)
    _pod_spec(problems, pod.spec, "spec", ("Always", "OnFailure", "Never"))
    for ip in pod.pod_ips:
        if not _is_ip(ip):
            problems.append(("status.podIP", f"Invalid value: {_q(ip)}: must be a valid IP address"))
    return problems


def _int_or_percent(problems: Problems, value, path: str) -> Optional[int]:
    """Validate an int-or-percent value; return the int or percentage number."""
    if isinstance(value, int):
        if value < 0:
            problems.append((path, f"Invalid value: {value}: must be greater than or equal to 0"))
        return value
    if not _PERCENT.match(value):
        problems.append((path, f"Invalid value: {_q(value)}: a valid percent string must be a "
                               "numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex "
                               "used for validation is '[0-9]+%')"))
        return None
    pct = int(value[:-1])
    if pct > 100:
        problems.append((path, f"Invalid value: {_q(value)}: must not be greater than 100%"))
    return pct


def validate_deployment(dep: o.Deployment) -> Problems:
    problems: Problems = []
    _meta(problems, dep.metadata, dns1123_subdomain, True)
    if dep.replicas < 0:
        problems.append(("spec.replicas", f"Invalid value: {dep.replicas}: must be greater than or equal to 0"))
    if not dep.match_labels and not dep.match_expressions:
        problems.append(("spec.selector", "Required value"))
    _labels(problems, dep.match_labels, "spec.selector.matchLabels")
    _labels(problems, dep.template.metadata.labels, "spec.template.metadata.labels")
    for key, value in dep.match_labels.items():
        if dep.template.metadata.labels.get(key) != value:
            problems.append(("spec.template.metadata.labels",
                             f"Invalid value: {dep.template.metadata.labels!r}: `selector` does not "
                             "match template `labels`"))
            break
    _pod_spec(problems, dep.template.spec, "spec.template.spec", ("Always",))
    st = dep.strategy
    if st.type not in ("RollingUpdate", "Recreate"):
        problems.append(("spec.strategy.type", _unsupported(st.type, ("Recreate", "RollingUpdate"))))
    elif st.type == "Recreate" and st.rolling_update is not None:
        problems.append(("spec.strategy.rollingUpdate",
                         "Forbidden: may not be specified when strategy `type` is 'Recreate'"))
    elif st.type == "RollingUpdate" and st.rolling_update is not None:
        base = "spec.strategy.rollingUpdate"
        surge = _int_or_percent(problems, st.rolling_update.max_surge, f"{base}.maxSurge")
        unavailable = _int_or_percent(problems, st.rolling_update.max_unavailable,
                                      f"{base}.maxUnavailable")
        if surge == 0 and unavailable == 0:
            problems.append((f"{base}.maxUnavailable",
                             "Invalid value: 0: may not be 0 when `maxSurge` is 0"))
    if dep.min_ready_seconds < 0:
        problems.append(("spec.minReadySeconds",
                         f"Invalid value: {dep.min_ready_seconds}: must be greater than or equal to 0"))
    raw_deadline = (dep.raw.get("spec") or {}).get("progressDeadlineSeconds") if isinstance(dep.raw, dict) else None
    if raw_deadline is not None and (isinstance(raw_deadline, bool) or not isinstance(raw_deadline, (int, float))
                                     or raw_deadline != int(raw_deadline)):
        problems.append(("spec.progressDeadlineSeconds", f"Invalid value: {_q(raw_deadline)}: must be an integer"))
    else:
        # apps/v1 defaults the deadline to 600 before validating, so minReadySeconds: 600
        # alone is refused as well.
        deadline = dep.progress_deadline_seconds
        if deadline < 0:
            problems.append(("spec.progressDeadlineSeconds",
                             f"Invalid value: {deadline}: must be greater than or equal to 0"))
        if deadline <= dep.min_ready_seconds:
            problems.append(("spec.progressDeadlineSeconds",
                             f"Invalid value: {deadline}: must be greater than minReadySeconds"))
    return problems


def validate_service(svc: o.Service) -> Problems:
    problems: Problems = []
    _meta(problems, svc.metadata, dns1035_label, True)
    if svc.type not in o.SERVICE_TYPES:
        problems.append(("spec.type", _unsupported(svc.type, o.SERVICE_TYPES)))
        return problems
    if svc.type == "ExternalName":
        if not svc.external_name:
            problems.append(("spec.externalName", "Required value"))
        elif dns1123_subdomain(svc.external_name.rstrip(".")):
            problems.append(("spec.externalName",
                             f"Invalid value: {_q(svc.external_name)}: {DNS1123_SUBDOMAIN_MSG}"))
    if svc.cluster_ip and svc.cluster_ip != "None" and not _is_ip(svc.cluster_ip):
        problems.append(("spec.clusterIP", f"Invalid value: {_q(svc.cluster_ip)}: must be a valid "
                                           "IP address, (e.g. 10.9.8.7 or 2001:db8::ffff), \"None\" "
                                           "or empty"))
    if svc.headless and svc.type in ("NodePort", "LoadBalancer"):
        problems.append(("spec.clusterIP", f'Invalid value: "None": may not be set to \'None\' for '
                                           f"{svc.type} services"))
    if not svc.ports and svc.type != "ExternalName" and not svc.headless:
        problems.append(("spec.ports", "Required value"))
    names = set()
    seen_ports = set()
    seen_node_ports = set()
    for i, p in enumerate(svc.ports):
        pp = f"spec.ports[{i}]"
        if len(svc.ports) > 1 and not p.name:
            problems.append((f"{pp}.name", "Required value"))
        elif p.name:
            msg = dns1123_label(p.name)
            if msg:
                problems.append((f"{pp}.name", f"Invalid value: {_q(p.name)}: {msg}"))
            elif p.name in names:
                problems.append((f"{pp}.name", f"Duplicate value: {_q(p.name)}"))
            names.add(p.name)
        msg = _port_range(p.port)
        if msg:
            problems.append((f"{pp}.port", msg))
        if p.protocol not in o.PROTOCOLS:
            problems.append((f"{pp}.protocol", _unsupported(p.protocol, sorted(o.PROTOCOLS))))
        if isinstance(p.target_port, int):
            msg = _port_range(p.target_port)
            if msg:
                problems.append((f"{pp}.targetPort", msg))
        else:
            msg = iana_svc_name(p.target_port)
            if msg:
                problems.append((f"{pp}.targetPort", f"Invalid value: {_q(p.target_port)}: {msg}"))
        if p.node_port:
            if svc.type not in ("NodePort", "LoadBalancer"):
                problems.append((f"{pp}.nodePort",
                                 f"Forbidden: may not be used when `type` is '{svc.type}'"))
            elif not 0 <= p.node_port <= 65535:
                problems.append((f"{pp}.nodePort", f"Invalid value: {p.node_port}: must be between "
                                                   "1 and 65535, inclusive"))
            elif (p.node_port, p.protocol) in seen_node_ports:
                problems.append((f"{pp}.nodePort", f"Duplicate value: {p.node_port}"))
            seen_node_ports.add((p.node_port, p.protocol))
        if (p.port, p.protocol) in seen_ports:
            problems.append((pp, f'Duplicate value: {{"port": {p.port}, "protocol": "{p.protocol}"}}'))
        seen_ports.add((p.port, p.protocol))
    if svc.selector:
        _labels(problems, svc.selector, "spec.selector")
    if svc.session_affinity not in ("None", "ClientIP"):
        problems.append(("spec.sessionAffinity", _unsupported(svc.session_affinity, ("ClientIP", "None"))))
    elif svc.session_affinity == "ClientIP" and not 0 < svc.session_affinity_timeout <= 86400:
        problems.append(("spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                         f"Invalid value: {svc.session_affinity_timeout}: must be greater than 0 and "
                         "less than 86400"))
    for field_name, value in (("externalTrafficPolicy", svc.external_traffic_policy),
                              ("internalTrafficPolicy", svc.internal_traffic_policy)):
        if value not in ("Cluster", "Local"):
            problems.append((f"spec.{field_name}", _unsupported(value, ("Cluster", "Local"))))
    for i, ip in enumerate(svc.external_ips):
        if not _is_ip(ip):
            problems.append((f"spec.externalIPs[{i}]", f"Invalid value: {_q(ip)}: must be a valid IP address"))
    if svc.load_balancer_ip and not _is_ip(svc.load_balancer_ip):
        problems.append(("spec.loadBalancerIP", f"Invalid value: {_q(svc.load_balancer_ip)}: must "
                                                "be a valid IP address"))
    for i, cidr in enumerate(svc.load_balancer_source_ranges):
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            problems.append((f"spec.loadBalancerSourceRanges[{i}]",
                             f"Invalid value: {_q(cidr)}: must be a list of IP ranges. For example, "
                             "10.240.0.0/24,10.250.0.0/24 "))
    if svc.load_balancer_source_ranges and svc.type != "LoadBalancer":
        problems.append(("spec.loadBalancerSourceRanges",
                         "Forbidden: may only be used when `type` is 'LoadBalancer'"))
    if svc.health_check_node_port and not (svc.type == "LoadBalancer"
                                           and svc.external_traffic_policy == "Local"):
        problems.append(("spec.healthCheckNodePort", "Invalid value: may only be set when `type` "
                                                     "is 'LoadBalancer' and `externalTrafficPolicy` "
                                                     "is 'Local'"))
    for i, ing in enumerate(svc.load_balancer_ingress):
        ip_path = f"status.loadBalancer.ingress[{i}]"
        if ing.ip and not _is_ip(ing.ip):
            problems.append((f"{ip_path}.ip", f"Invalid value: {_q(ing.ip)}: must be a valid IP address"))
        if ing.ip_mode is not None and ing.ip_mode not in ("VIP", "Proxy"):
            problems.append((f"{ip_path}.ipMode", _unsupported(ing.ip_mode, ("Proxy", "VIP"))))
    return problems


def validate_endpoint_slice(es: o.EndpointSlice) -> Problems:
    problems: Problems = []
    _meta(problems, es.metadata, dns1123_subdomain, True)
    if es.address_type not in ("IPv4", "IPv6", "FQDN"):
        problems.append(("addressType", _unsupported(es.address_type, ("FQDN", "IPv4", "IPv6"))))
    for i, ep in enumerate(es.endpoints):
        if not ep.addresses:
            problems.append((f"endpoints[{i}].addresses", "Required value: must contain at least 1 address"))
        for j, addr in enumerate(ep.addresses):
            ap = f"endpoints[{i}].addresses[{j}]"
            if es.address_type in ("IPv4", "IPv6"):
                try:
                    ip = ipaddress.ip_address(addr)
                except ValueError:
                    problems.append((ap, f"Invalid value: {_q(addr)}: must be a valid IP address"))
                    continue
                if (ip.version == 6) != (es.address_type == "IPv6"):
                    problems.append((ap, f"Invalid value: {_q(addr)}: must be an {es.address_type} address"))
    names = set()
    for i, p in enumerate(es.ports):
        pp = f"ports[{i}]"
        if p.port is not None:
            msg = _port_range(p.port)
            if msg:
                problems.append((f"{pp}.port", msg))
        if p.protocol not in o.PROTOCOLS:
            problems.append((f"{pp}.protocol", _unsupported(p.protocol, sorted(o.PROTOCOLS))))
        if p.name in names:
            problems.append((f"{pp}.name", f"Duplicate value: {_q(p.name)}"))
        names.add(p.name)
    return problems


def validate_endpoints(eps: o.Endpoints) -> Problems:
    problems: Problems = []
    _meta(problems, eps.metadata, dns1123_subdomain, True)
    for i, s in enumerate(eps.subsets):
        for key, addrs in (("addresses", s.addresses), ("notReadyAddresses", s.not_ready_addresses)):
            for j, a in enumerate(addrs):
                if not _is_ip(a.ip):
                    problems.append((f"subsets[{i}].{key}[{j}].ip",
                                     f"Invalid value: {_q(a.ip)}: must be a valid IP address"))
        for j, p in enumerate(s.ports):
            if p.port is None:
                problems.append((f"subsets[{i}].ports[{j}].port", "Required value"))
            else:
                msg = _port_range(p.port)
                if msg:
                    problems.append((f"subsets[{i}].ports[{j}].port", msg))
    return problems


# core/v1 quota resource names (a name without "/" must be one of them, or hugepages).
STANDARD_QUOTA_RESOURCES = frozenset((
    "cpu", "memory", "ephemeral-storage", "requests.cpu", "requests.memory", "requests.storage",
    "requests.ephemeral-storage", "limits.cpu", "limits.memory", "limits.ephemeral-storage",
    "pods", "resourcequotas", "services", "replicationcontrollers", "secrets",
    "persistentvolumeclaims", "configmaps", "services.nodeports", "services.loadbalancers"))
# Quota resources whose quantity must be a whole number (count/<resource> too).
INTEGER_QUOTA_RESOURCES = frozenset((
    "pods", "resourcequotas", "services", "replicationcontrollers", "secrets", "configmaps",
    "persistentvolumeclaims", "services.nodeports", "services.loadbalancers"))


def validate_resource_quota(rq: o.ResourceQuota) -> Problems:
    from kproxy.model.quantity import format_quantity, parse_quantity

    problems: Problems = []
    _meta(problems, rq.metadata, dns1123_subdomain, True)
    for name, value in rq.hard.items():
        path = f"spec.hard[{name}]"
        if "/" not in name and name not in STANDARD_QUOTA_RESOURCES and not name.startswith(
                ("hugepages-", "requests.hugepages-")):
            problems.append((path, f"Invalid value: {_q(name)}: must be a standard resource for quota"))
            continue
        q = parse_quantity(value)
        if q.value < 0:
            problems.append((path, f'Invalid value: "{format_quantity(q)}": must be greater than or '
                                   "equal to 0"))
        if (name in INTEGER_QUOTA_RESOURCES or name.startswith("count/")) and not q.is_integer:
            problems.append((path, f'Invalid value: "{format_quantity(q)}": must be an integer'))
    scopes = ("BestEffort", "CrossNamespacePodAffinity", "NotBestEffort", "NotTerminating",
              "PriorityClass", "Terminating")
    for i, scope in enumerate(rq.scopes):
        if scope not in scopes:
            problems.append((f"spec.scopes[{i}]", _unsupported(scope, scopes)))
    return problems


VALIDATORS = {
    "Namespace": validate_namespace,
    "Pod": validate_pod,
    "Deployment": validate_deployment,
    "Service": validate_service,
    "EndpointSlice": validate_endpoint_slice,
    "Endpoints": validate_endpoints,
    "ResourceQuota": validate_resource_quota,
}
