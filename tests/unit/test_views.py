"""kubectl-style views of model objects (kproxy.views): get tables, describe, -o json/yaml.

Expected texts follow kubectl's printers (pkg/printers/internalversion/printers.go) and
describers (kubectl/pkg/describe), with the AGE column left out.
"""

from __future__ import annotations

import ipaddress
import json
import re

import pytest
import yaml

from kproxy import views
from kproxy.model import loads
from kproxy.model import objects as o
from kproxy.render import resolve_manifests

from tests.conftest import SEED  # noqa: E402
STATEFUL = SEED / "Sesion4-Kubernetes" / "Stateful-app"
POOL = "192.168.5.240/28"

needs_seed = pytest.mark.skipif(not STATEFUL.is_dir(), reason="seed course not available")


def svc(name, type_="ClusterIP", cluster_ip="10.96.0.5", ports=((80, 0, "TCP", ""),), ns="default",
        **kw) -> o.Service:
    return o.Service(
        metadata=o.ObjectMeta(name=name, namespace=ns, labels=kw.pop("labels", {})), type=type_,
        cluster_ip=cluster_ip, cluster_ips=[cluster_ip] if cluster_ip else [],
        ports=[o.ServicePort(port=p, node_port=np_, protocol=proto, name=pname, target_port=p)
               for p, np_, proto, pname in ports], **kw)


def slice_(service: str, addrs, port=80, name="", ready=None, ns="default") -> o.EndpointSlice:
    ready = ready or [True] * len(addrs)
    return o.EndpointSlice(
        metadata=o.ObjectMeta(name=f"{service}-abcde", namespace=ns,
                              labels={o.SERVICE_NAME_LABEL: service}),
        endpoints=[o.Endpoint(addresses=[a], conditions=o.EndpointConditions(ready=r, serving=r,
                                                                              terminating=False))
                   for a, r in zip(addrs, ready)],
        ports=[o.EndpointPort(port=port, name=name)] if port is not None else [])


@pytest.fixture(scope="module")
def stateful():
    return resolve_manifests(str(STATEFUL), lb_pool=POOL)


@pytest.fixture(scope="module")
def stateful_no_pool():
    return resolve_manifests(str(STATEFUL))


def rows_of(text: str):
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def by_name(services, name):
    return next(s for s in services if s.name == name)


# --------------------------------------------------------------------------- layout


def test_table_columns_are_longest_cell_plus_three_last_unpadded():
    text = views.table([["NAME", "READY", "X"], ["a-long-name", "1/1", "last"]])
    assert text.splitlines() == ["NAME          READY   X", "a-long-name   1/1     last"]


def test_table_minimum_width_is_six():
    assert views.table([["A", "B"], ["x", "y"]]).splitlines() == ["A     B", "x     y"]


# --------------------------------------------------------------------------- services


@needs_seed
def test_stateful_app_services_table(stateful):
    text = views.services_table(stateful.services)
    rows = rows_of(text)
    assert rows[0] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    table = {r[0]: r for r in rows[1:]}
    assert list(table) == ["wordpress", "wordpress-mysql"]          # sorted by name
    wp = table["wordpress"]
    assert wp[1] == "LoadBalancer"
    assert ipaddress.ip_address(wp[2]) in ipaddress.ip_network("10.96.0.0/12")
    assert ipaddress.ip_address(wp[3]) in ipaddress.ip_network(POOL)
    assert re.fullmatch(r"8080:3\d{4}/TCP", wp[4])
    assert table["wordpress-mysql"][1:] == ["ClusterIP", "None", "<none>", "3306/TCP"]
    # every column starts where its header starts
    lines = text.splitlines()
    for header in ("TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"):
        col = lines[0].index(header)
        assert all(line[col - 1] == " " and line[col] != " " for line in lines[1:])


@needs_seed
def test_stateful_app_without_pool_is_pending(stateful_no_pool):
    rows = {r[0]: r for r in rows_of(views.services_table(stateful_no_pool.services))[1:]}
    assert rows["wordpress"][3] == "<pending>"
    assert re.fullmatch(r"8080:3\d{4}/TCP", rows["wordpress"][4])


@needs_seed
def test_stateful_app_wide_and_all_namespaces(stateful):
    rows = rows_of(views.services_table(stateful.services, wide=True, all_namespaces=True))
    assert rows[0] == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "SELECTOR"]
    sel = {r[1]: r[6] for r in rows[1:]}
    assert sel == {"wordpress": "app=wordpress,tier=frontend", "wordpress-mysql": "app=wordpress,tier=mysql"}
    assert all(r[0] == "default" for r in rows[1:])


def test_services_table_exact():
    services = [
        svc("kubernetes", cluster_ip="10.96.0.1", ports=((443, 0, "TCP", "https"),)),
        svc("web", "NodePort", "10.96.0.20", ((80, 31234, "TCP", "http"), (443, 31235, "TCP", "https")),
            selector={"tier": "web", "app": "shop"}),
        svc("db", cluster_ip="None", ports=((5432, 0, "TCP", ""),)),
        svc("dns", cluster_ip="10.96.0.10", ports=((53, 0, "UDP", "dns"), (53, 0, "TCP", "dns-tcp"))),
        svc("ext", "ExternalName", "", (), external_name="db.example.com"),
        svc("pinned", cluster_ip="10.96.0.30", external_ips=["203.0.113.7", "203.0.113.8"]),
    ]
    assert views.services_table(services) == "\n".join([
        "NAME         TYPE           CLUSTER-IP   EXTERNAL-IP               PORT(S)",
        "db           ClusterIP      None         <none>                    5432/TCP",
        "dns          ClusterIP      10.96.0.10   <none>                    53/UDP,53/TCP",
        "ext          ExternalName   <none>       db.example.com            <none>",
        "kubernetes   ClusterIP      10.96.0.1    <none>                    443/TCP",
        "pinned       ClusterIP      10.96.0.30   203.0.113.7,203.0.113.8   80/TCP",
        "web          NodePort       10.96.0.20   <none>                    80:31234/TCP,443:31235/TCP",
    ])
    wide = views.services_table(services, wide=True).splitlines()
    assert wide[0].endswith("PORT(S)" + " " * 22 + "SELECTOR")     # 26-char PORT(S) cell + 3
    assert wide[-1].endswith("app=shop,tier=web")            # labels sorted by key
    assert wide[1].endswith("<none>")                        # no selector


def test_load_balancer_external_ip():
    lb = svc("lb", "LoadBalancer", ports=((80, 30080, "TCP", ""),))
    assert views.external_ip(lb) == "<pending>"
    lb.load_balancer_ingress = [o.LoadBalancerIngress(ip="192.168.5.242"),
                                o.LoadBalancerIngress(ip="192.168.5.241")]
    # sorted, and cut at 16 characters unless wide, as kubectl does
    assert views.external_ip(lb, wide=True) == "192.168.5.241,192.168.5.242"
    assert views.external_ip(lb) == "192.168.5.241..."
    lb.load_balancer_ingress = [o.LoadBalancerIngress(hostname="lb.example.com")]
    lb.external_ips = ["203.0.113.9"]
    assert views.external_ip(lb) == "lb.example.com,203.0.113.9"


def test_services_table_empty():
    assert views.services_table([]) == "No resources found in default namespace."
    assert views.services_table([], namespace="kube-system") == "No resources found in kube-system namespace."
    assert views.services_table([], all_namespaces=True) == "No resources found"


# --------------------------------------------------------------------------- pods


POD_ROWS = [
    {"name": "web-2", "namespace": "default", "ready": "0/1", "status": "ContainerCreating",
     "restarts": 0, "ip": "", "node": "node2"},
    {"name": "web-1", "namespace": "default", "ready": "1/1", "status": "Running",
     "restarts": 3, "ip": "10.244.1.5", "node": "node2"},
    {"name": "coredns", "namespace": "kube-system", "ready": "1/1", "status": "Running",
     "restarts": 0, "ip": "10.244.0.2", "node": "node1"},
]


def test_pods_table_exact():
    assert views.pods_table(POD_ROWS[:2], False, False) == "\n".join([
        "NAME    READY   STATUS              RESTARTS",
        "web-1   1/1     Running             3",
        "web-2   0/1     ContainerCreating   0",
    ])
    assert views.pods_table(POD_ROWS, True, True) == "\n".join([
        "NAMESPACE     NAME      READY   STATUS              RESTARTS   IP           NODE",
        "default       web-1     1/1     Running             3          10.244.1.5   node2",
        "default       web-2     0/1     ContainerCreating   0          <none>       node2",
        "kube-system   coredns   1/1     Running             0          10.244.0.2   node1",
    ])


def test_pods_table_empty():
    assert views.pods_table([], False, False) == "No resources found in default namespace."
    assert views.pods_table([], True, True) == "No resources found"


@needs_seed
def test_pod_row_from_model(stateful):
    rows = [views.pod_row(p) for p in stateful.pods]
    text = views.pods_table(rows, wide=True, all_namespaces=False)
    body = rows_of(text)[1:]
    assert len(body) == 5
    assert all(r[1:4] == ["1/1", "Running", "0"] and r[5] == "node-1" for r in body)


# --------------------------------------------------------------------------- endpointslices


@needs_seed
def test_stateful_app_endpointslices(stateful):
    rows = rows_of(views.endpointslices_table(stateful.endpoint_slices))
    assert rows[0] == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"]
    table = {r[0].rsplit("-", 1)[0]: r for r in rows[1:]}
    assert table["wordpress"][1:3] == ["IPv4", "80"]
    assert re.fullmatch(r"(10\.244\.0\.\d+,){2}10\.244\.0\.\d+ \+ 1 more\.\.\.", table["wordpress"][3])
    assert table["wordpress-mysql"][1:3] == ["IPv4", "3306"]
    assert re.fullmatch(r"10\.244\.0\.\d+", table["wordpress-mysql"][3])


def test_endpointslices_table_unset_and_more():
    empty = slice_("lonely", [], port=None)
    many_ports = slice_("multi", ["10.0.0.1"])
    many_ports.ports = [o.EndpointPort(port=p, name=f"p{p}") for p in (80, 81, 82, 83, 84)]
    no_number = slice_("named", ["10.0.0.2"])
    no_number.ports = [o.EndpointPort(port=None, name=None)]
    text = views.endpointslices_table([empty, many_ports, no_number], all_namespaces=True)
    assert text == "\n".join([
        "NAMESPACE   NAME           ADDRESSTYPE   PORTS                  ENDPOINTS",
        "default     lonely-abcde   IPv4          <unset>                <unset>",
        "default     multi-abcde    IPv4          80,81,82 + 2 more...   10.0.0.1",
        "default     named-abcde    IPv4          *                      10.0.0.2",
    ])
    assert views.endpointslices_table([]) == "No resources found in default namespace."


# --------------------------------------------------------------------------- describe


def describe_map(text: str):
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip():
            out.setdefault(key, value.strip())
    return out


@needs_seed
def test_describe_stateful_wordpress(stateful):
    wp = by_name(stateful.services, "wordpress")
    lb_ip = wp.load_balancer_ingress[0].ip
    text = views.describe_service(wp, stateful.endpoint_slices)
    lines = text.splitlines()
    # kubectl's tabwriter: values start 2 spaces after the longest key
    assert all(line[26:27] != " " and line[:26].rstrip().endswith(":") for line in lines
               if line.split(":")[0] and not line.startswith(" "))
    fields = describe_map(text)
    assert fields["Name"] == "wordpress"
    assert fields["Namespace"] == "default"
    assert fields["Labels"] == "app=wordpress"
    assert fields["Annotations"] == "<none>"
    assert fields["Selector"] == "app=wordpress,tier=frontend"
    assert fields["Type"] == "LoadBalancer"
    assert fields["IP Family Policy"] == "SingleStack"
    assert fields["IP Families"] == "IPv4"
    assert fields["IP"] == fields["IPs"] == wp.cluster_ip
    assert fields["LoadBalancer Ingress"] == f"{lb_ip} (VIP)"
    assert fields["Port"] == "<unset>  8080/TCP"
    assert fields["TargetPort"] == "80/TCP"
    assert re.fullmatch(r"<unset>  3\d{4}/TCP", fields["NodePort"])
    assert fields["Session Affinity"] == "None"
    assert fields["External Traffic Policy"] == "Cluster"
    assert fields["Internal Traffic Policy"] == "Cluster"
    assert lines[-1] == "Events:                   <none>"
    pods = sorted(p.pod_ip for p in stateful.pods if p.labels.get("tier") == "frontend")
    assert len(pods) == 4
    # kubectl shows three, then " + 1 more..."
    shown = fields["Endpoints"]
    assert shown.endswith(" + 1 more...") and len(re.findall(r"10\.244\.0\.\d+:80", shown)) == 3
    # all of them on request
    every = describe_map(views.describe_service(wp, stateful.endpoint_slices, max_endpoints=None))
    assert sorted(every["Endpoints"].split(",")) == sorted(f"{ip}:80" for ip in pods)


@needs_seed
def test_describe_stateful_headless(stateful):
    fields = describe_map(views.describe_service(by_name(stateful.services, "wordpress-mysql"),
                                                 stateful.endpoint_slices))
    assert fields["IP"] == fields["IPs"] == "None"
    assert fields["Port"] == "<unset>  3306/TCP"
    assert re.fullmatch(r"10\.244\.0\.\d+:3306", fields["Endpoints"])
    assert "External Traffic Policy" not in fields and "NodePort" not in fields
    assert "LoadBalancer Ingress" not in fields


def test_describe_exact_named_ports_and_readiness():
    s = svc("web", "NodePort", "10.96.0.20", ((80, 30080, "TCP", "http"), (443, 30443, "TCP", "https")),
            selector={"app": "web"}, labels={"tier": "front", "app": "web"})
    s.metadata.annotations = {"team": "blue", views.LAST_APPLIED: "{...}"}
    s.ports[1].target_port = "https"
    http = slice_("web", ["10.244.1.2", "10.244.1.3"], 8080, "http", ready=[True, False])
    https = slice_("web", ["10.244.1.2"], 8443, "https")
    other = slice_("other", ["10.244.9.9"], 8080, "http")
    assert views.describe_service(s, [http, https, other]) == "\n".join([
        "Name:                     web",
        "Namespace:                default",
        "Labels:                   app=web",
        "                          tier=front",
        "Annotations:              team: blue",
        "Selector:                 app=web",
        "Type:                     NodePort",
        "IP Family Policy:         SingleStack",
        "IP Families:              IPv4",
        "IP:                       10.96.0.20",
        "IPs:                      10.96.0.20",
        "Port:                     http  80/TCP",
        "TargetPort:               80/TCP",
        "NodePort:                 http  30080/TCP",
        "Endpoints:                10.244.1.2:8080",
        "Port:                     https  443/TCP",
        "TargetPort:               https/TCP",
        "NodePort:                 https  30443/TCP",
        "Endpoints:                10.244.1.2:8443",
        "Session Affinity:         None",
        "External Traffic Policy:  Cluster",
        "Internal Traffic Policy:  Cluster",
        "Events:                   <none>",
    ])


def test_describe_without_endpoints_and_external_name():
    lonely = svc("lonely", selector={"app": "nobody"})
    assert describe_map(views.describe_service(lonely, []))["Endpoints"] == "<none>"
    placeholder = slice_("lonely", [], port=None)
    assert describe_map(views.describe_service(lonely, [placeholder]))["Endpoints"] == "<none>"
    ext = svc("ext", "ExternalName", "", (), external_name="db.example.com")
    fields = describe_map(views.describe_service(ext))
    assert fields["External Name"] == "db.example.com"
    assert fields["IP Families"] == "<none>" and fields["IPs"] == "<none>" and fields["IP"] == ""
    assert "IP Family Policy" not in fields and "Internal Traffic Policy" not in fields


# --------------------------------------------------------------------------- API objects


def _reload(text: str) -> o.Service:
    (lo,) = loads(text, source="<views>")
    assert isinstance(lo.obj, o.Service)
    return lo.obj


@needs_seed
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_service_round_trip(stateful, fmt):
    wp = by_name(stateful.services, "wordpress")
    before = json.dumps(wp.raw, sort_keys=True)
    d = views.to_k8s_dict(wp)
    assert json.dumps(wp.raw, sort_keys=True) == before            # raw left alone
    assert (d["apiVersion"], d["kind"]) == ("v1", "Service")
    assert d["metadata"] == {"name": "wordpress", "namespace": "default", "labels": {"app": "wordpress"}}
    assert d["spec"]["clusterIP"] == wp.cluster_ip and d["spec"]["clusterIPs"] == [wp.cluster_ip]
    assert d["spec"]["ports"] == [{"protocol": "TCP", "port": 8080, "targetPort": 80,
                                   "nodePort": wp.ports[0].node_port}]
    assert d["status"] == {"loadBalancer": {"ingress": [{"ip": wp.load_balancer_ingress[0].ip,
                                                         "ipMode": "VIP"}]}}
    back = _reload(views.as_object(wp, fmt))
    assert back.cluster_ip == wp.cluster_ip and back.cluster_ips == wp.cluster_ips
    assert back.ports == wp.ports and back.selector == wp.selector and back.type == wp.type
    assert back.load_balancer_ingress == wp.load_balancer_ingress
    assert views.to_k8s_dict(back) == d                                # a fixed point


@needs_seed
def test_headless_service_dict(stateful):
    d = views.to_k8s_dict(by_name(stateful.services, "wordpress-mysql"))
    assert d["spec"]["clusterIP"] == "None" and d["spec"]["clusterIPs"] == ["None"]
    assert d["status"] == {"loadBalancer": {}}
    assert "externalTrafficPolicy" not in d["spec"]
    assert _reload(json.dumps(d)).headless


@needs_seed
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_as_list(stateful, fmt):
    text = views.as_list(stateful.services + stateful.endpoint_slices, fmt)
    doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    assert doc["metadata"] == {"resourceVersion": ""}
    kinds = [(i["apiVersion"], i["kind"]) for i in doc["items"]]
    assert kinds == [("v1", "Service")] * 2 + [("discovery.k8s.io/v1", "EndpointSlice")] * 2
    loaded = loads(text)
    assert [lo.kind for lo in loaded] == ["Service", "Service", "EndpointSlice", "EndpointSlice"]
    slices = [lo.obj for lo in loaded if lo.kind == "EndpointSlice"]
    assert [s.endpoints for s in slices] == [s.endpoints for s in stateful.endpoint_slices]
    assert [s.ports for s in slices] == [s.ports for s in stateful.endpoint_slices]
    if fmt == "json":
        assert text.startswith('{\n    "apiVersion": "v1",\n    "items": [')
    else:
        assert text.startswith("apiVersion: v1\nitems:\n- apiVersion: v1\n")
        assert text.endswith('kind: List\nmetadata:\n  resourceVersion: ""')


def test_empty_endpoint_slice_is_null_like_the_api():
    d = views.to_k8s_dict(slice_("lonely", [], port=None))
    assert d["endpoints"] is None and d["ports"] is None
    assert d["metadata"]["labels"] == {o.SERVICE_NAME_LABEL: "lonely"}
    (lo,) = loads(views.as_object(d, "yaml"))
    assert lo.obj.endpoints == [] and lo.obj.ports == []


def test_pod_and_other_kinds():
    pod = o.Pod(metadata=o.ObjectMeta(name="p", namespace="default", labels={"app": "x"}),
                spec=o.PodSpec(containers=[o.Container(name="c", image="nginx",
                                                       ports=[o.ContainerPort(container_port=80)])],
                               node_name="node1"),
                status=o.PodStatus(phase="Running", pod_ip="10.244.0.9"))
    d = views.to_k8s_dict(pod)
    assert d["spec"] == {"containers": [{"name": "c", "image": "nginx",
                                         "ports": [{"containerPort": 80, "protocol": "TCP"}]}],
                         "nodeName": "node1"}
    assert d["status"] == {"phase": "Running", "podIP": "10.244.0.9", "podIPs": [{"ip": "10.244.0.9"}]}
    (lo,) = loads(json.dumps(d))
    assert lo.obj.pod_ip == "10.244.0.9" and lo.obj.node_name == "node1"
    other = loads("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: dg==}\n")[0].obj
    assert views.to_k8s_dict(other) == {"apiVersion": "v1", "kind": "Secret", "data": {"k": "dg=="},
                                        "metadata": {"name": "s", "namespace": "default"}}


def test_bad_format():
    with pytest.raises(ValueError, match="allowed formats are: json,yaml"):
        views.as_list([], "xml")
