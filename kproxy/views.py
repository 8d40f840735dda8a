"""What kubectl prints, from kproxy's model objects: pure functions, no cluster, no root.

* ``services_table``, ``pods_table``, ``endpointslices_table``: ``kubectl get`` tables
  (kubectl's column layout: each column as wide as its longest cell plus 3 spaces, at
  least 6; the last column unpadded). The AGE column is left out: nothing here has a
  creation time. An empty list gives kubectl's ``No resources found in <ns>
  namespace.`` (``No resources found`` with ``all_namespaces``), which kubectl writes
  on stderr.
* ``describe_service``: ``kubectl describe service`` (kubectl 1.31+, which reads the
  Service's EndpointSlices).
* ``to_k8s_dict``: an object as the API server would return it, with the fields the
  control plane fills in (clusterIP(s), nodePorts, ipFamilies, the LB ingress...).
  ``as_list`` / ``as_object``: ``-o json`` and ``-o yaml`` text.

Every function returns text without the final newline.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from kproxy.model import objects as o

NONE = "<none>"
PENDING = "<pending>"
UNSET = "<unset>"
LIST_MAX = 3                     # kubectl shows 3 ports/endpoints, then " + N more..."
LB_WIDTH = 16                    # kubectl's loadBalancerWidth (EXTERNAL-IP, not wide)
MAX_ANNOTATION_LEN = 140         # kubectl describe's maxAnnotationLen
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
FORMATS = ("json", "yaml")


# --------------------------------------------------------------------------- layout


def table(rows: Sequence[Sequence[Any]], minwidth: int = 6, padding: int = 3) -> str:
    """Rows laid out as kubectl's tabwriter does (``tabwriter.NewWriter(out, 6, 4, 3,
    ' ', 0)``): every column but the last is max(minwidth, longest cell + padding)
    wide; the last column is not padded."""
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = []
    for i in range(ncols - 1):
        longest = max((len(str(r[i])) for r in rows if i < len(r) - 1), default=0)
        widths.append(max(minwidth, longest + padding))
    lines = []
    for r in rows:
        cells = [str(c) for c in r]
        line = "".join(c.ljust(widths[i]) for i, c in enumerate(cells[:-1])) + (cells[-1] if cells else "")
        lines.append(line)
    return "\n".join(lines)


def _tabbed(lines: Sequence[Sequence[str]]) -> str:
    """kubectl describe's tabbedString (``tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)``).

    Each line is a list of cells: all but its last cell are tab-terminated. A column is
    aligned over each run of consecutive lines that have a terminated cell in it, as
    Go's tabwriter aligns column blocks."""
    widths: List[Dict[int, int]] = [dict() for _ in lines]
    ncols = max((len(cells) - 1 for cells in lines), default=0)
    for col in range(ncols):
        i = 0
        while i < len(lines):
            if len(lines[i]) - 1 <= col:
                i += 1
                continue
            j = i
            while j < len(lines) and len(lines[j]) - 1 > col:
                j += 1
            width = max(len(lines[k][col]) for k in range(i, j)) + 2
            for k in range(i, j):
                widths[k][col] = width
            i = j
    out = []
    for cells, w in zip(lines, widths):
        out.append("".join(c.ljust(w[n]) for n, c in enumerate(cells[:-1])) + cells[-1])
    return "\n".join(out)


def no_resources(namespace: str = o.DEFAULT_NAMESPACE, all_namespaces: bool = False) -> str:
    """kubectl get's message for an empty result (it writes it on stderr)."""
    if all_namespaces:
        return "No resources found"
    return f"No resources found in {namespace} namespace."


def format_labels(labels: Optional[Mapping[str, str]]) -> str:
    """``labels.FormatLabels``: ``k=v,k2=v2`` sorted by key, ``<none>`` when empty."""
    if not labels:
        return NONE
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def _more(items: List[str], count: int, maximum: int = LIST_MAX, empty: str = "") -> str:
    text = ",".join(items[:maximum])
    if count > maximum:
        return f"{text} + {count - maximum} more..."
    return text or empty


def _host_port(ip: str, port: Any) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _ns_key(obj: Any):
    return (obj.namespace or "", obj.name)


# --------------------------------------------------------------------------- services


def port_string(ports: Iterable[o.ServicePort]) -> str:
    """PORT(S): ``80/TCP``, ``8080:31234/TCP`` (port:nodePort), comma-joined."""
    pieces = []
    for p in ports:
        if p.node_port:
            pieces.append(f"{p.port}:{p.node_port}/{p.protocol}")
        else:
            pieces.append(f"{p.port}/{p.protocol}")
    return ",".join(pieces)


def _lb_ingress(svc: o.Service, wide: bool) -> str:
    ips = sorted({ing.ip or ing.hostname for ing in svc.load_balancer_ingress if ing.ip or ing.hostname})
    text = ",".join(ips)
    if not wide and len(text) > LB_WIDTH:
        text = text[:LB_WIDTH - 3] + "..."
    return text


def external_ip(svc: o.Service, wide: bool = False) -> str:
    """EXTERNAL-IP as kubectl's getServiceExternalIP computes it."""
    if svc.type in ("ClusterIP", "NodePort"):
        return ",".join(svc.external_ips) if svc.external_ips else NONE
    if svc.type == "LoadBalancer":
        lb = _lb_ingress(svc, wide)
        if svc.external_ips:
            return ",".join(([*lb.split(",")] if lb else []) + list(svc.external_ips))
        return lb or PENDING
    if svc.type == "ExternalName":
        return svc.external_name
    return "<unknown>"


def _cluster_ips(svc: o.Service) -> List[str]:
    """spec.clusterIPs as the API server holds them ("None" for headless)."""
    if svc.type == "ExternalName":
        return []
    if svc.cluster_ips:
        return list(svc.cluster_ips)
    if svc.cluster_ip:
        return [svc.cluster_ip]
    return []


def services_table(services: Iterable[o.Service], wide: bool = False, all_namespaces: bool = False,
                   *, namespace: str = o.DEFAULT_NAMESPACE) -> str:
    """``kubectl get services [-o wide] [-A]``: NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S)
    (wide: SELECTOR; -A: NAMESPACE first). ``namespace`` only words the empty message."""
    services = sorted(services, key=_ns_key)
    if not services:
        return no_resources(namespace, all_namespaces)
    head = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    if wide:
        head.append("SELECTOR")
    rows = [(["NAMESPACE"] if all_namespaces else []) + head]
    for svc in services:
        ips = _cluster_ips(svc)
        row = [svc.name, svc.type, ips[0] if ips else NONE, external_ip(svc, wide),
               port_string(svc.ports) or NONE]
        if wide:
            row.append(format_labels(svc.selector))
        rows.append(([svc.namespace] if all_namespaces else []) + row)
    return table(rows)


# --------------------------------------------------------------------------- pods


def pods_table(rows: Iterable[Mapping[str, Any]], wide: bool = False, all_namespaces: bool = False,
               *, namespace: str = o.DEFAULT_NAMESPACE) -> str:
    """``kubectl get pods [-o wide] [-A]`` from dicts with keys name, namespace, ready
    (``"1/1"``), status, restarts, ip, node: NAME READY STATUS RESTARTS (wide: IP NODE;
    -A: NAMESPACE first). A missing IP or node shows ``<none>``, as kubectl does."""
    items = sorted(rows, key=lambda r: (r.get("namespace") or o.DEFAULT_NAMESPACE, r.get("name") or ""))
    if not items:
        return no_resources(namespace, all_namespaces)
    head = ["NAME", "READY", "STATUS", "RESTARTS"] + (["IP", "NODE"] if wide else [])
    out = [(["NAMESPACE"] if all_namespaces else []) + head]
    for r in items:
        restarts = r.get("restarts", 0)
        row = [r.get("name", ""), r.get("ready", "0/0"), r.get("status", ""),
               "0" if restarts in (None, "") else restarts]
        if wide:
            row += [r.get("ip") or NONE, r.get("node") or NONE]
        out.append(([r.get("namespace") or o.DEFAULT_NAMESPACE] if all_namespaces else []) + row)
    return table(out)


def pod_row(pod: o.Pod, ready: Optional[bool] = None, restarts: int = 0) -> Dict[str, Any]:
    """A ``pods_table`` row for a model Pod (``ready`` None: the Pod's Ready condition,
    or ready when it has none)."""
    total = len(pod.spec.containers)
    if ready is None:
        cond = pod.status.condition("Ready")
        ready = True if cond is None else cond
    status = "Terminating" if pod.terminating else (pod.status.phase or "Pending")
    return {"name": pod.name, "namespace": pod.namespace, "ready": f"{total if ready else 0}/{total}",
            "status": status, "restarts": restarts, "ip": pod.pod_ip, "node": pod.node_name}


# --------------------------------------------------------------------------- endpointslices


def _slice_ports(ports: Iterable[o.EndpointPort]) -> str:
    shown, count = [], 0
    for p in ports:
        if p.port is not None:
            shown.append(str(p.port))
        else:
            shown.append(p.name if p.name is not None else "*")
        count += 1
    return _more(shown, count, empty=UNSET)


def _slice_endpoints(endpoints: Iterable[o.Endpoint]) -> str:
    addrs = [a for e in endpoints for a in e.addresses]
    return _more(addrs, len(addrs), empty=UNSET)


def endpointslices_table(slices: Iterable[o.EndpointSlice], all_namespaces: bool = False,
                         *, namespace: str = o.DEFAULT_NAMESPACE) -> str:
    """``kubectl get endpointslices [-A]``: NAME ADDRESSTYPE PORTS ENDPOINTS. Ports are
    numbers, endpoints addresses; 3 of each then `` + N more...``; ``<unset>`` if none."""
    slices = sorted(slices, key=_ns_key)
    if not slices:
        return no_resources(namespace, all_namespaces)
    rows = [(["NAMESPACE"] if all_namespaces else []) + ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"]]
    for s in slices:
        rows.append(([s.namespace] if all_namespaces else [])
                    + [s.name, s.address_type, _slice_ports(s.ports), _slice_endpoints(s.endpoints)])
    return table(rows)


# --------------------------------------------------------------------------- describe


def _is_ready(ep: o.Endpoint) -> bool:
    return ep.conditions.ready is None or bool(ep.conditions.ready)


def service_endpoints(service: o.Service, slices: Iterable[o.EndpointSlice],
                      port_name: Optional[str] = None,
                      max_endpoints: Optional[int] = LIST_MAX) -> str:
    """The ``Endpoints:`` value of ``kubectl describe service`` for one Service port:
    ready ``ip:port`` of the Service's slices whose port has that name (a slice
    without ports gives bare addresses), the first ``max_endpoints`` then `` + N
    more...`` (None lists all). ``<none>`` when there is no ready endpoint."""
    mine = [s for s in slices if s.namespace == service.namespace and s.service_name == service.name]
    found: List[str] = []
    for s in mine:
        if not s.ports:
            found += [e.addresses[0] for e in s.endpoints if e.addresses and _is_ready(e)]
            continue
        for p in s.ports:
            if port_name is not None and (p.name or "") != port_name:
                continue
            for e in s.endpoints:
                if e.addresses and _is_ready(e):
                    found.append(_host_port(e.addresses[0], p.port if p.port is not None else ""))
    if not found:
        return NONE
    if max_endpoints is None:
        return ",".join(found)
    return _more(found, len(found), max_endpoints)


def _multiline(title: str, entries: List[str]) -> List[List[str]]:
    if not entries:
        return [[f"{title}:", NONE]]
    return [[f"{title}:", entries[0]]] + [["", e] for e in entries[1:]]


def _annotation_lines(annotations: Mapping[str, str]) -> List[str]:
    out = []
    for k in sorted(annotations):
        if k == LAST_APPLIED:
            continue
        v = annotations[k]
        if len(v) > MAX_ANNOTATION_LEN:
            v = v[:MAX_ANNOTATION_LEN] + "..."
        out.append(f"{k}: {v}")
    return out


def _ip_family(ip: str) -> str:
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return "IPv4"


def _ip_families(svc: o.Service) -> List[str]:
    if svc.type == "ExternalName":
        return list(svc.ip_families)
    if svc.ip_families:
        return list(svc.ip_families)
    ips = [ip for ip in _cluster_ips(svc) if ip != "None"]
    return [_ip_family(ip) for ip in ips] or ["IPv4"]


def _ip_family_policy(svc: o.Service) -> Optional[str]:
    if svc.type == "ExternalName":
        return None
    policy = (svc.raw.get("spec") or {}).get("ipFamilyPolicy") if isinstance(svc.raw, dict) else None
    if policy:
        return str(policy)
    if svc.headless and not svc.selector:
        return "RequireDualStack"
    return "DualStack" if len(_ip_families(svc)) > 1 else "SingleStack"


def _ingress_string(ingress: Iterable[o.LoadBalancerIngress]) -> str:
    parts = []
    for ing in ingress:
        text = ing.ip or ing.hostname
        if ing.ip_mode:
            text += f" ({ing.ip_mode})"
        parts.append(text)
    return ", ".join(parts)


def describe_service(service: o.Service, slices: Iterable[o.EndpointSlice] = (),
                     *, max_endpoints: Optional[int] = LIST_MAX) -> str:
    """``kubectl describe service`` with ``Events: <none>``.

    ``slices`` may hold any EndpointSlices: those of this Service are picked by their
    ``kubernetes.io/service-name`` label. ``Endpoints:`` lists ready endpoints, three
    then `` + N more...`` as kubectl does; ``max_endpoints=None`` lists them all."""
    svc = service
    slices = list(slices)
    lines: List[List[str]] = [["Name:", svc.name], ["Namespace:", svc.namespace]]
    lines += _multiline("Labels", [f"{k}={svc.metadata.labels[k]}" for k in sorted(svc.metadata.labels)])
    lines += _multiline("Annotations", _annotation_lines(svc.metadata.annotations))
    lines.append(["Selector:", format_labels(svc.selector)])
    lines.append(["Type:", svc.type])
    policy = _ip_family_policy(svc)
    if policy:
        lines.append(["IP Family Policy:", policy])
    families = _ip_families(svc)
    lines.append(["IP Families:", ",".join(families) if families else NONE])
    ips = _cluster_ips(svc)
    lines.append(["IP:", svc.cluster_ip if svc.type != "ExternalName" else ""])
    lines.append(["IPs:", ",".join(ips) if ips else NONE])
    if svc.external_ips:
        lines.append(["External IPs:", ",".join(svc.external_ips)])
    if svc.load_balancer_ip:
        lines.append(["IP:", svc.load_balancer_ip])
    if svc.external_name:
        lines.append(["External Name:", svc.external_name])
    if svc.load_balancer_ingress:
        lines.append(["LoadBalancer Ingress:", _ingress_string(svc.load_balancer_ingress)])
    for p in svc.ports:
        name = p.name or UNSET
        lines.append(["Port:", name, f"{p.port}/{p.protocol}"])
        lines.append(["TargetPort:", f"{p.target_port or p.port}/{p.protocol}"])
        if p.node_port:
            lines.append(["NodePort:", name, f"{p.node_port}/{p.protocol}"])
        lines.append(["Endpoints:", service_endpoints(svc, slices, p.name or "", max_endpoints)])
    lines.append(["Session Affinity:", svc.session_affinity])
    if svc.type in ("NodePort", "LoadBalancer"):
        lines.append(["External Traffic Policy:", svc.external_traffic_policy])
    if svc.health_check_node_port:
        lines.append(["HealthCheck NodePort:", str(svc.health_check_node_port)])
    if svc.load_balancer_source_ranges:
        lines.append(["LoadBalancer Source Ranges:", ",".join(svc.load_balancer_source_ranges)])
    if svc.type != "ExternalName":
        lines.append(["Internal Traffic Policy:", svc.internal_traffic_policy])
    lines.append(["Events:", NONE])
    return _tabbed(lines)


# --------------------------------------------------------------------------- API objects


def _metadata(meta: o.ObjectMeta, raw: Mapping[str, Any], namespaced: bool = True) -> Dict[str, Any]:
    out: Dict[str, Any] = copy.deepcopy(dict(raw.get("metadata") or {}))
    if meta.generate_name:
        out["generateName"] = meta.generate_name
    out["name"] = meta.name
    if namespaced:
        out["namespace"] = meta.namespace or o.DEFAULT_NAMESPACE
    else:
        out.pop("namespace", None)
    for key, value in (("labels", meta.labels), ("annotations", meta.annotations)):
        if value:
            out[key] = dict(value)
        else:
            out.pop(key, None)
    if meta.uid:
        out["uid"] = meta.uid
    if meta.deletion_timestamp:
        out["deletionTimestamp"] = meta.deletion_timestamp
    return out


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _service_dict(svc: o.Service) -> Dict[str, Any]:
    raw = svc.raw if isinstance(svc.raw, dict) else {}
    raw_spec = raw.get("spec") or {}
    ports = []
    for p in svc.ports:
        ports.append(_drop_none({
            "name": p.name or None, "protocol": p.protocol, "appProtocol": p.app_protocol,
            "port": p.port, "targetPort": p.target_port or p.port,
            "nodePort": p.node_port or None}))
    spec: Dict[str, Any] = {}
    if ports:
        spec["ports"] = ports
    if svc.selector:
        spec["selector"] = dict(svc.selector)
    ips = _cluster_ips(svc)
    if svc.type != "ExternalName" and ips:
        spec["clusterIP"] = svc.cluster_ip or ips[0]
        spec["clusterIPs"] = ips
    spec["type"] = svc.type
    if svc.external_ips:
        spec["externalIPs"] = list(svc.external_ips)
    spec["sessionAffinity"] = svc.session_affinity
    if svc.load_balancer_ip:
        spec["loadBalancerIP"] = svc.load_balancer_ip
    if svc.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(svc.load_balancer_source_ranges)
    if svc.external_name:
        spec["externalName"] = svc.external_name
    if svc.type in ("NodePort", "LoadBalancer"):
        spec["externalTrafficPolicy"] = svc.external_traffic_policy
    if svc.health_check_node_port:
        spec["healthCheckNodePort"] = svc.health_check_node_port
    if svc.publish_not_ready_addresses:
        spec["publishNotReadyAddresses"] = True
    if svc.session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.session_affinity_timeout}}
    families = _ip_families(svc)
    if families:
        spec["ipFamilies"] = families
    policy = _ip_family_policy(svc)
    if policy:
        spec["ipFamilyPolicy"] = policy
    if svc.type == "LoadBalancer":
        spec["allocateLoadBalancerNodePorts"] = svc.allocate_load_balancer_node_ports
    for key in ("loadBalancerClass",):
        if raw_spec.get(key) is not None:
            spec[key] = copy.deepcopy(raw_spec[key])
    if svc.type != "ExternalName":
        spec["internalTrafficPolicy"] = svc.internal_traffic_policy
    if raw_spec.get("trafficDistribution") is not None:
        spec["trafficDistribution"] = copy.deepcopy(raw_spec["trafficDistribution"])
    ingress = [_drop_none({"ip": i.ip or None, "hostname": i.hostname or None, "ipMode": i.ip_mode})
               for i in svc.load_balancer_ingress]
    status: Dict[str, Any] = {"loadBalancer": {"ingress": ingress} if ingress else {}}
    conditions = (raw.get("status") or {}).get("conditions")
    if conditions:
        status["conditions"] = copy.deepcopy(conditions)
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(svc.metadata, raw),
            "spec": spec, "status": status}


def _endpoint_slice_dict(es: o.EndpointSlice) -> Dict[str, Any]:
    raw = es.raw if isinstance(es.raw, dict) else {}
    endpoints = []
    for e in es.endpoints:
        d: Dict[str, Any] = {"addresses": list(e.addresses),
                             "conditions": _drop_none({"ready": e.conditions.ready,
                                                       "serving": e.conditions.serving,
                                                       "terminating": e.conditions.terminating})}
        if e.hostname:
            d["hostname"] = e.hostname
        if e.target_ref:
            d["targetRef"] = dict(e.target_ref)
        if e.node_name:
            d["nodeName"] = e.node_name
        if e.zone:
            d["zone"] = e.zone
        if e.hints_for_zones or e.hints_for_nodes:
            hints: Dict[str, Any] = {}
            if e.hints_for_zones:
                hints["forZones"] = [{"name": z} for z in e.hints_for_zones]
            if e.hints_for_nodes:
                hints["forNodes"] = [{"name": n} for n in e.hints_for_nodes]
            d["hints"] = hints
        endpoints.append(d)
    ports = [_drop_none({"name": p.name, "protocol": p.protocol, "port": p.port,
                         "appProtocol": p.app_protocol}) for p in es.ports]
    # The API's endpoints and ports have no omitempty: empty ones are null.
    return {"addressType": es.address_type, "apiVersion": "discovery.k8s.io/v1",
            "endpoints": endpoints or None, "kind": "EndpointSlice",
            "metadata": _metadata(es.metadata, raw), "ports": ports or None}


def _container_dict(c: o.Container) -> Dict[str, Any]:
    d: Dict[str, Any] = {"name": c.name}
    if c.image:
        d["image"] = c.image
    if c.command:
        d["command"] = list(c.command)
    if c.args:
        d["args"] = list(c.args)
    if c.ports:
        d["ports"] = [_drop_none({"name": p.name or None, "containerPort": p.container_port,
                                  "protocol": p.protocol, "hostPort": p.host_port or None})
                      for p in c.ports]
    return d


def _pod_dict(pod: o.Pod) -> Dict[str, Any]:
    raw = copy.deepcopy(pod.raw) if isinstance(pod.raw, dict) and pod.raw else {}
    spec = raw.get("spec") or {"containers": [_container_dict(c) for c in pod.spec.containers]}
    if pod.spec.node_name:
        spec["nodeName"] = pod.spec.node_name
    status = raw.get("status") or {}
    if pod.status.phase:
        status["phase"] = pod.status.phase
    if pod.status.host_ip:
        status["hostIP"] = pod.status.host_ip
    if pod.pod_ips:
        status["podIP"] = pod.pod_ips[0]
        status["podIPs"] = [{"ip": ip} for ip in pod.pod_ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(pod.metadata, raw),
            "spec": spec, "status": status}


def _deployment_dict(dep: o.Deployment) -> Dict[str, Any]:
    raw = copy.deepcopy(dep.raw) if isinstance(dep.raw, dict) else {}
    spec = raw.get("spec") or {}
    spec["replicas"] = dep.replicas
    return {"apiVersion": raw.get("apiVersion", "apps/v1"), "kind": "Deployment",
            "metadata": _metadata(dep.metadata, raw), "spec": spec, "status": raw.get("status") or {}}


def to_k8s_dict(obj: Any) -> Dict[str, Any]:
    """``obj`` as the API server would return it (apiVersion, kind, metadata, spec,
    status). Services carry what the control plane fills in: clusterIP(s), nodePorts,
    ipFamilies/ipFamilyPolicy, traffic policies, status.loadBalancer.ingress; fields
    the dataclass does not model come from the object's ``raw`` manifest. EndpointSlices
    are built as discovery.k8s.io/v1. A dict is returned as a deep copy."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    if isinstance(obj, o.Service):
        return _service_dict(obj)
    if isinstance(obj, o.EndpointSlice):
        return _endpoint_slice_dict(obj)
    if isinstance(obj, o.Pod):
        return _pod_dict(obj)
    if isinstance(obj, o.Deployment):
        return _deployment_dict(obj)
    raw = copy.deepcopy(getattr(obj, "raw", None) or {})
    meta = getattr(obj, "metadata", None)
    if isinstance(meta, o.ObjectMeta):
        namespaced = meta.namespace is not None and not isinstance(obj, o.Namespace)
        raw["metadata"] = _metadata(meta, raw, namespaced)
    if isinstance(obj, o.NotEmulated):
        raw.setdefault("apiVersion", obj.api_version)
        raw.setdefault("kind", obj.kind)
    elif not raw.get("kind"):
        raw.setdefault("apiVersion", "v1")
        raw["kind"] = getattr(obj, "kind", type(obj).__name__)
    return raw


class _KubectlDumper(yaml.SafeDumper):
    """PyYAML in the style of kubectl's YAML printer: ``""`` for an empty string."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    if value == "":
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


_KubectlDumper.add_representer(str, _represent_str)


def _dump(doc: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=4, sort_keys=True, ensure_ascii=False)
    if fmt == "yaml":
        return yaml.dump(doc, Dumper=_KubectlDumper, default_flow_style=False, sort_keys=True,
                         allow_unicode=True).rstrip("\n")
    raise ValueError(f"unable to match a printer suitable for the output format {fmt!r}, "
                     f"allowed formats are: {','.join(FORMATS)}")


def as_object(obj: Any, fmt: str) -> str:
    """``kubectl get <kind> <name> -o json|yaml`` for one object."""
    return _dump(to_k8s_dict(obj), fmt)


def as_list(items: Iterable[Any], fmt: str) -> str:
    """``kubectl get ... -o json|yaml``: a v1 List of ``to_k8s_dict(item)``. Keys are
    sorted and JSON is indented by 4 spaces, as kubectl prints them."""
    doc = {"apiVersion": "v1", "items": [to_k8s_dict(i) for i in items], "kind": "List",
           "metadata": {"resourceVersion": ""}}
    return _dump(doc, fmt)
