"""Which fields each emulated kind accepts: kubectl's strict field validation.

A schema is a dict of field name -> sub-schema, where a sub-schema is another dict (an
object whose fields are checked too), ``ListOf(schema)``, ``MAP`` (string -> string), or
``ANY`` (accepted as it is: kproxy does not look inside). ``unknown_fields`` walks a
document against a schema and returns the dotted paths of fields the API server would
reject with ``strict decoding error: unknown field "<path>"``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

ANY = "any"
MAP = "map"


class ListOf:
    def __init__(self, item: Any):
        self.item = item


OBJECT_META = {f: ANY for f in (
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
    "finalizers", "managedFields")}
OBJECT_META.update(labels=MAP, annotations=MAP)

CONTAINER_PORT = {f: ANY for f in ("name", "hostPort", "containerPort", "protocol", "hostIP")}

CONTAINER = {f: ANY for f in (
    "name", "image", "command", "args", "workingDir", "envFrom", "env", "resources",
    "resizePolicy", "restartPolicy", "restartPolicyRules", "volumeMounts", "volumeDevices",
    "livenessProbe", "readinessProbe", "startupProbe", "lifecycle", "terminationMessagePath",
    "terminationMessagePolicy", "imagePullPolicy", "securityContext", "stdin", "stdinOnce",
    "tty")}
CONTAINER["ports"] = ListOf(CONTAINER_PORT)

POD_SPEC = {f: ANY for f in (
    "volumes", "ephemeralContainers", "restartPolicy", "terminationGracePeriodSeconds",
    "activeDeadlineSeconds", "dnsPolicy", "nodeSelector", "serviceAccountName", "serviceAccount",
    "automountServiceAccountToken", "nodeName", "hostNetwork", "hostPID", "hostIPC",
    "shareProcessNamespace", "securityContext", "imagePullSecrets", "hostname", "subdomain",
    "affinity", "schedulerName", "tolerations", "hostAliases", "priorityClassName", "priority",
    "dnsConfig", "readinessGates", "runtimeClassName", "enableServiceLinks", "preemptionPolicy",
    "overhead", "topologySpreadConstraints", "setHostnameAsFQDN", "os", "hostUsers",
    "schedulingGates", "resourceClaims", "resources", "hostnameOverride")}
POD_SPEC["containers"] = ListOf(CONTAINER)
POD_SPEC["initContainers"] = ListOf(CONTAINER)

POD_TEMPLATE = {"metadata": OBJECT_META, "spec": POD_SPEC}

LABEL_SELECTOR = {"matchLabels": MAP, "matchExpressions": ANY}

DEPLOYMENT_SPEC = {
    "replicas": ANY, "selector": LABEL_SELECTOR, "template": POD_TEMPLATE,
    "strategy": {"type": ANY, "rollingUpdate": {"maxUnavailable": ANY, "maxSurge": ANY}},
    "minReadySeconds": ANY, "revisionHistoryLimit": ANY, "paused": ANY,
    "progressDeadlineSeconds": ANY,
}

SERVICE_PORT = {f: ANY for f in ("name", "protocol", "appProtocol", "port", "targetPort", "nodePort")}

SERVICE_SPEC = {f: ANY for f in (
    "clusterIP", "clusterIPs", "type", "externalIPs", "sessionAffinity", "loadBalancerIP",
    "loadBalancerSourceRanges", "externalName", "externalTrafficPolicy", "healthCheckNodePort",
    "publishNotReadyAddresses", "ipFamilies", "ipFamilyPolicy", "allocateLoadBalancerNodePorts",
    "loadBalancerClass", "internalTrafficPolicy", "trafficDistribution")}
SERVICE_SPEC["ports"] = ListOf(SERVICE_PORT)
SERVICE_SPEC["selector"] = MAP
SERVICE_SPEC["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": ANY}}

SERVICE_STATUS = {
    "loadBalancer": {"ingress": ListOf({"ip": ANY, "hostname": ANY, "ipMode": ANY, "ports": ANY})},
    "conditions": ANY,
}

ENDPOINT_PORT = {f: ANY for f in ("name", "protocol", "port", "appProtocol")}

ENDPOINT = {
    "addresses": ANY, "conditions": {"ready": ANY, "serving": ANY, "terminating": ANY},
    "hostname": ANY, "targetRef": ANY, "nodeName": ANY, "zone": ANY, "deprecatedTopology": ANY,
    "hints": {"forZones": ListOf({"name": ANY}), "forNodes": ListOf({"name": ANY})},
}

ENDPOINT_ADDRESS = {"ip": ANY, "hostname": ANY, "nodeName": ANY, "targetRef": ANY}

TOP = {"apiVersion": ANY, "kind": ANY, "metadata": OBJECT_META}

KIND_SCHEMAS: Dict[str, Dict[str, Any]] = {
    "Namespace": dict(TOP, spec={"finalizers": ANY}, status=ANY),
    "Pod": dict(TOP, spec=POD_SPEC, status=ANY),
    "Deployment": dict(TOP, spec=DEPLOYMENT_SPEC, status=ANY),
    "Service": dict(TOP, spec=SERVICE_SPEC, status=SERVICE_STATUS),
    "EndpointSlice": dict(TOP, addressType=ANY, endpoints=ListOf(ENDPOINT),
                          ports=ListOf(ENDPOINT_PORT)),
    "ResourceQuota": dict(TOP, spec={"hard": ANY, "scopes": ANY, "scopeSelector": ANY}, status=ANY),
    "Endpoints": dict(TOP, subsets=ListOf({
        "addresses": ListOf(ENDPOINT_ADDRESS), "notReadyAddresses": ListOf(ENDPOINT_ADDRESS),
        "ports": ListOf(ENDPOINT_PORT)})),
}


def unknown_fields(doc: Any, schema: Any, path: str = "") -> List[str]:
    """Paths of fields in ``doc`` that ``schema`` does not know, in document order."""
    found: List[str] = []
    _walk(doc, schema, path, found)
    return found


def _walk(value: Any, schema: Any, path: str, found: List[str]) -> None:
    if schema is ANY or schema is MAP or value is None:
        return
    if isinstance(schema, ListOf):
        if isinstance(value, list):
            for i, item in enumerate(value):
                _walk(item, schema.item, f"{path}[{i}]", found)
        return
    if isinstance(schema, dict) and isinstance(value, dict):
        for key, sub in value.items():
            sub_path = f"{path}.{key}" if path else str(key)
            if key not in schema:
                found.append(sub_path)
            else:
                _walk(sub, schema[key], sub_path, found)


def drop_unknown(doc: Any, paths: List[str]) -> Any:
    """A copy of ``doc`` without the fields at ``paths`` (as returned by unknown_fields)."""
    import copy

    out = copy.deepcopy(doc)
    for p in paths:
        parent, key = _resolve_parent(out, p)
        if isinstance(parent, dict):
            parent.pop(key, None)
    return out


def _split(path: str) -> List[Tuple[str, Any]]:
    tokens: List[Tuple[str, Any]] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        if name:
            tokens.append(("key", name))
        while rest:
            idx, _, rest = rest.partition("]")
            tokens.append(("idx", int(idx)))
            rest = rest[1:] if rest.startswith("[") else rest
    return tokens


def _resolve_parent(doc: Any, path: str):
    tokens = _split(path)
    node = doc
    for kind, tok in tokens[:-1]:
        node = node[tok]
    return node, tokens[-1][1]
