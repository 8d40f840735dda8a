"""ResourceQuota admission for the objects kproxy emulates, as the API server does it.

Enforced resources (``kproxy.model.objects.QUOTA_ENFORCED_RESOURCES``), counted as
upstream's quota evaluators count them (pkg/quota/v1/evaluator/core):

* ``services``, ``count/services``: one per Service.
* ``services.loadbalancers``: one per LoadBalancer Service.
* ``services.nodeports``: for a NodePort Service, its number of ports; for a
  LoadBalancer Service also its number of ports, or, with
  ``allocateLoadBalancerNodePorts: false``, the number of ports that set a nodePort.
  A ClusterIP/ExternalName Service has none (the health-check node port is not counted).
* ``pods``: one per Pod that is not terminal (phase Succeeded or Failed).
* ``count/pods``: one per Pod object, terminal or not.

Admission follows the quota admission plugin (apiserver
pkg/admission/plugin/resourcequota): a create is charged its whole usage; an update of a
Service is charged only what it adds (per resource, never negative), so an update that
does not increase usage always passes; a Pod update is never charged (Pods are only
quota-checked on create). For each quota of the namespace that limits a charged
resource, used + requested must stay <= hard, else the request is refused with
``exceeded quota: NAME, requested: R, used: U, limited: H`` (R, U, H sorted by
resource, only the resources that would exceed).

Differences from a real cluster, on purpose: usage is recomputed from the objects
(there is no quota controller lagging behind, so a NodePort -> ClusterIP update frees
its node ports at once, even for a later object of the same apply); a quota in the
same apply applies to every object of that apply (a real quota applies once its
controller has filled in status.hard); quotas with scopes are not enforced.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from kproxy.errors import KproxyError
from kproxy.model import objects as o
from kproxy.model.quantity import DECIMAL_SI, Quantity, format_quantity, parse_quantity

ENFORCED = o.QUOTA_ENFORCED_RESOURCES
SERVICE_RESOURCES = ("count/services", "services", "services.loadbalancers", "services.nodeports")
POD_RESOURCES = ("count/pods", "pods")
TERMINAL_PHASES = ("Succeeded", "Failed")

Key = Tuple[str, str, str]          # (kind, namespace, name)

# kind -> (API resource, the Resource/GroupVersionKind line kubectl prints for a patch)
_RESOURCE = {"Service": ("services", '"/v1, Resource=services", GroupVersionKind: "/v1, Kind=Service"'),
             "Pod": ("pods", '"/v1, Resource=pods", GroupVersionKind: "/v1, Kind=Pod"')}


class QuotaExceeded(KproxyError):
    """A create or update that a ResourceQuota refuses.

    ``str(e)`` is kubectl's whole line (``Error from server (Forbidden): error when
    creating "FILE": services "NAME" is forbidden: exceeded quota: ...``); ``forbidden``
    is the API server's message alone (``services "NAME" is forbidden: ...``, what a
    ReplicaSet's FailedCreate event carries after ``Error creating: ``) and ``reason``
    its last part (``exceeded quota: ...``). ``requested``, ``used`` and ``hard`` hold
    only the exceeded resources.
    """

    def __init__(self, *, quota: str, namespace: str, kind: str, name: str,
                 requested: Dict[str, int], used: Dict[str, int], hard: Dict[str, str],
                 source: Optional[str] = None, operation: str = "creating", patch: str = ""):
        self.quota = quota
        self.namespace = namespace
        self.kind = kind
        self.name = name
        self.requested = requested
        self.used = used
        self.hard = hard
        self.source = source
        self.operation = operation
        self.reason = (f"exceeded quota: {quota}, requested: {_pretty(requested)}, "
                       f"used: {_pretty(used)}, limited: {_pretty(hard)}")
        resource = _RESOURCE.get(kind, (kind.lower() + "s", ""))[0]
        self.forbidden = f'{resource} "{name}" is forbidden: {self.reason}'
        super().__init__(self._kubectl(patch))

    def _kubectl(self, patch: str) -> str:
        if self.source is None:
            return f"Error from server (Forbidden): {self.forbidden}"
        src = json.dumps(self.source)
        if self.operation == "creating":
            return f"Error from server (Forbidden): error when creating {src}: {self.forbidden}"
        mapping = _RESOURCE.get(self.kind, ("", ""))[1]
        return ("Error from server (Forbidden): error when applying patch:\n"
                f"{patch}\nto:\nResource: {mapping}\n"
                f'Name: "{self.name}", Namespace: "{self.namespace}"\n'
                f"for: {src}: error when patching {src}: {self.forbidden}")


def _pretty(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v if isinstance(v, str) else format_quantity(v)}"
                    for k, v in sorted(values.items()))


# --------------------------------------------------------------------------- usage


def service_usage(svc: o.Service) -> Dict[str, int]:
    """What one Service counts against quota (upstream's service evaluator)."""
    nodeports, lbs = 0, 0
    if svc.type == "NodePort":
        nodeports = len(svc.ports)
    elif svc.type == "LoadBalancer":
        lbs = 1
        nodeports = (len(svc.ports) if svc.allocate_load_balancer_node_ports
                     else sum(1 for p in svc.ports if p.node_port))
    return {"count/services": 1, "services": 1, "services.loadbalancers": lbs,
            "services.nodeports": nodeports}


def pod_usage(pod: o.Pod) -> Dict[str, int]:
    """What one Pod counts against quota: count/pods always, pods unless terminal."""
    return {"count/pods": 1, "pods": 0 if pod.status.phase in TERMINAL_PHASES else 1}


def object_usage(obj: Any) -> Dict[str, int]:
    if isinstance(obj, o.Service):
        return service_usage(obj)
    if isinstance(obj, o.Pod):
        return pod_usage(obj)
    return {}


def _add(a: Dict[str, int], b: Mapping[str, int]) -> None:
    for k, v in b.items():
        a[k] = a.get(k, 0) + v


def _namespace_usage(objects: Iterable[Any], namespace: str, extra_pods: int = 0) -> Dict[str, int]:
    used = {r: 0 for r in ENFORCED}
    for obj in objects:
        if getattr(obj, "namespace", None) == namespace:
            _add(used, object_usage(obj))
    _add(used, {"pods": extra_pods, "count/pods": extra_pods})
    return used


def _stored_objects(stored: Mapping[str, list]) -> List[Any]:
    return list(stored.get("Service", [])) + list(stored.get("Pod", []))


def _quotas(stored: Mapping[str, list], namespace: str) -> List[o.ResourceQuota]:
    return sorted((q for q in stored.get("ResourceQuota", [])
                   if isinstance(q, o.ResourceQuota) and q.namespace == namespace),
                  key=lambda q: q.name)


def _hard_text(q: o.ResourceQuota, resource: str) -> str:
    """The limit as the API server prints it (its canonical quantity form)."""
    raw = ((q.raw.get("spec") or {}).get("hard") or {}).get(resource) if isinstance(q.raw, dict) else None
    try:
        fmt = parse_quantity(raw).format if raw is not None else DECIMAL_SI
    except ValueError:
        fmt = DECIMAL_SI
    return format_quantity(Quantity(q.enforced()[resource], fmt))


def usage_by_quota(stored: Mapping[str, list], namespace: str, *,
                   pods: Optional[int] = None) -> Dict[str, Dict[str, Tuple[int, int]]]:
    """quota name -> {resource: (used, hard)} for the enforced limits of each quota in
    ``namespace`` (``kubectl describe quota``). ``pods``, when given, is the number of
    Pods the namespace runs (bare and replica Pods) instead of the stored bare Pods."""
    objects = _stored_objects(stored)
    if pods is not None:
        objects = [x for x in objects if not isinstance(x, o.Pod)]
    used = _namespace_usage(objects, namespace, pods or 0)
    return {q.name: {r: (used[r], hard) for r, hard in sorted(q.enforced().items())}
            for q in _quotas(stored, namespace)}


def usage(stored: Mapping[str, list], namespace: str, *,
          pods: Optional[int] = None) -> Dict[str, Tuple[int, int]]:
    """resource -> (used, hard) over every quota of ``namespace`` (hard is the smallest
    limit when several quotas limit the same resource); see usage_by_quota."""
    out: Dict[str, Tuple[int, int]] = {}
    for limits in usage_by_quota(stored, namespace, pods=pods).values():
        for r, (u, h) in limits.items():
            if r not in out or h < out[r][1]:
                out[r] = (u, h)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- admission


def _check(quotas: List[o.ResourceQuota], used: Dict[str, int], delta: Dict[str, int],
           kind: str, name: str, namespace: str, source: Optional[str], operation: str,
           patch: str = "") -> None:
    for q in quotas:
        limits = q.enforced()
        requested = {r: v for r, v in delta.items() if v and r in limits}
        exceeded = sorted(r for r, v in requested.items() if used.get(r, 0) + v > limits[r])
        if exceeded:
            raise QuotaExceeded(
                quota=q.name, namespace=namespace, kind=kind, name=name,
                requested={r: requested[r] for r in exceeded},
                used={r: used.get(r, 0) for r in exceeded},
                hard={r: _hard_text(q, r) for r in exceeded},
                source=source, operation=operation, patch=patch)


def _merge_patch(old: Any, new: Any) -> Any:
    """An RFC 7386 JSON merge patch from ``old`` to ``new``."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch = {}
    for k in old:
        if k not in new:
            patch[k] = None
    for k, v in new.items():
        if k not in old:
            patch[k] = v
        elif old[k] != v:
            patch[k] = _merge_patch(old[k], v)
    return patch


def _patch_text(old: Any, new: Any) -> str:
    old_raw = {k: v for k, v in (getattr(old, "raw", None) or {}).items() if k != "status"}
    new_raw = {k: v for k, v in (getattr(new, "raw", None) or {}).items() if k != "status"}
    return json.dumps(_merge_patch(old_raw, new_raw), sort_keys=True, separators=(",", ":"))


def _source_name(source: Optional[str]) -> Optional[str]:
    return "STDIN" if source == "-" else source


def check_apply(stored: Mapping[str, list], incoming: Iterable[Any],
                source_of: Optional[Callable[[Any], str]] = None, *,
                replica_pods: Optional[Mapping[str, int]] = None) -> None:
    """Raise QuotaExceeded, with kubectl's message, for the first object of
    ``incoming`` that a ResourceQuota of its namespace refuses.

    ``stored`` is ``Store.objects()`` (model objects by kind). ``incoming`` is the apply,
    in order: model objects or LoadedObjects (whose ``source`` names the file); objects
    of kinds quota does not count pass. Quotas in ``incoming`` replace stored ones of the
    same name and apply to the whole apply. Each object is checked against the objects
    before it (an object that appears twice is created, then updated, as kubectl does).
    ``source_of(obj)`` names the file of a model object ("-" prints as STDIN).
    ``replica_pods`` counts Pods per namespace that exist outside the store (the
    Deployment controller's), which take quota too.
    """
    items: List[Tuple[Any, Optional[str]]] = []
    for item in incoming:
        obj = getattr(item, "obj", item)
        source = getattr(item, "source", None) if obj is not item else None
        if source_of is not None and source is None:
            source = source_of(obj)
        items.append((obj, _source_name(source) if source is not None else None))

    quotas: Dict[Key, o.ResourceQuota] = {
        ("ResourceQuota", q.namespace, q.name): q for q in stored.get("ResourceQuota", [])
        if isinstance(q, o.ResourceQuota)}
    for obj, _ in items:
        if isinstance(obj, o.ResourceQuota):
            quotas[("ResourceQuota", obj.namespace, obj.name)] = obj
    limited = {ns for (_, ns, _), q in quotas.items() if q.enforced()}
    if not limited:
        return
    by_ns: Dict[str, List[o.ResourceQuota]] = {}
    for (_, ns, _), q in sorted(quotas.items()):
        by_ns.setdefault(ns, []).append(q)

    current: Dict[Key, Any] = {(x.kind, x.namespace, x.name): x for x in _stored_objects(stored)}
    extra = dict(replica_pods or {})
    for obj, source in items:
        if not isinstance(obj, (o.Service, o.Pod)):
            continue
        key = (obj.kind, obj.namespace, obj.name)
        old = current.get(key)
        if obj.namespace in limited:
            new_usage = object_usage(obj)
            if old is None:
                delta, operation = new_usage, "creating"
            elif isinstance(obj, o.Service):
                old_usage = object_usage(old)
                delta = {r: max(0, v - old_usage.get(r, 0)) for r, v in new_usage.items()}
                operation = "patching"
            else:
                delta, operation = {}, "patching"       # Pod updates are not quota-checked
            if any(delta.values()):
                used = _namespace_usage(current.values(), obj.namespace, extra.get(obj.namespace, 0))
                _check(by_ns.get(obj.namespace, []), used, delta, obj.kind, obj.name,
                       obj.namespace, source, operation,
                       _patch_text(old, obj) if operation == "patching" else "")
        current[key] = obj


# --------------------------------------------------------------------------- Deployment pods


def pod_headroom(stored: Mapping[str, list], namespace: str, pods_in_namespace: int) -> Optional[int]:
    """How many more Pods the quotas of ``namespace`` allow (None: no quota limits Pods).

    ``pods_in_namespace`` is the number of Pods the namespace already has (bare and
    replica Pods; terminal ones excepted). Kubernetes checks this quota when the
    ReplicaSet controller creates each Pod, not when the Deployment is applied.
    """
    room: Optional[int] = None
    for q in _quotas(stored, namespace):
        for r in POD_RESOURCES:
            if r in q.enforced():
                left = max(0, q.enforced()[r] - pods_in_namespace)
                room = left if room is None else min(room, left)
    return room


def pod_forbidden(stored: Mapping[str, list], namespace: str, pod_name: str,
                  pods_in_namespace: int) -> Optional[str]:
    """The API server's refusal of creating Pod ``pod_name`` now (``pods "NAME" is
    forbidden: exceeded quota: ...``), or None when the quotas allow it. The
    ReplicaSet controller records it as a FailedCreate event ``Error creating: <this>``."""
    used = {"pods": pods_in_namespace, "count/pods": pods_in_namespace}
    try:
        _check(_quotas(stored, namespace), used, {"pods": 1, "count/pods": 1}, "Pod", pod_name,
               namespace, None, "creating")
    except QuotaExceeded as e:
        return e.forbidden
    return None
