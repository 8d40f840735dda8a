"""Endpoint selection (CategorizeEndpoints), the endpoints map, and the EndpointSlice
controller as a pure function."""

from __future__ import annotations


import pytest

from kproxy.model import endpoint_slices_for, find_port, loads
from kproxy.proxy.endpoints import categorize_endpoints
from kproxy.proxy.types import (EndpointInfo, ServicePortInfo, ServicePortName, endpoints_map,
                                service_port_infos)

NODE = "test-node"
SPN = ServicePortName("ns1", "svc1", "p80", "TCP")


def svc(**kw) -> ServicePortInfo:
    return ServicePortInfo(name=SPN, cluster_ip="172.30.0.41", port=80, protocol="TCP", **kw)


def ep(ip, local=False, ready=True, serving=True, terminating=False, port=80, **kw) -> EndpointInfo:
    return EndpointInfo(ip=ip, port=port, is_local=local, ready=ready, serving=serving,
                        terminating=terminating, **kw)


def strs(eps):
    return [str(e) for e in eps]


# --------------------------------------------------------------------------- the map


def slices(text: str):
    return [lo.obj for lo in loads(text, validate=False)]


def test_sort_order_quirk_from_upstream_complex_case():
    """upstream TestUpdateEndpointsMap "complex add and remove": 10.1.1.11:11 sorts
    before 10.1.1.1:11, and 10.2.2.22:22 before 10.2.2.2:22 (string order)."""
    m = endpoints_map(slices("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ep1-1, namespace: ns1, labels: {kubernetes.io/service-name: ep1}}
addressType: IPv4
endpoints: [{addresses: [10.1.1.1]}, {addresses: [10.1.1.11]}]
ports: [{name: p11, port: 11, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ep2-1, namespace: ns2, labels: {kubernetes.io/service-name: ep2}}
addressType: IPv4
endpoints: [{addresses: [10.2.2.2], nodeName: test-node}, {addresses: [10.2.2.22], nodeName: test-node}]
ports: [{name: p22, port: 22, protocol: UDP}]
"""), NODE)
    assert strs(m[ServicePortName("ns1", "ep1", "p11", "UDP")]) == ["10.1.1.11:11", "10.1.1.1:11"]
    p22 = m[ServicePortName("ns2", "ep2", "p22", "UDP")]
    assert strs(p22) == ["10.2.2.22:22", "10.2.2.2:22"] and all(e.is_local for e in p22)
    # and categorisation keeps that order, so the probability cascade follows it
    cat = categorize_endpoints(m[ServicePortName("ns1", "ep1", "p11", "UDP")],
                               svc(), NODE)
    assert strs(cat.cluster) == ["10.1.1.11:11", "10.1.1.1:11"]


def test_map_merges_slices_by_port_name_and_protocol():
    """upstream "no change, multiple endpoints, subsets, IPs, and ports" (case 4)."""
    m = endpoints_map(slices("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ep1-1, namespace: ns1, labels: {kubernetes.io/service-name: ep1}}
addressType: IPv4
endpoints: [{addresses: [10.1.1.1]}, {addresses: [10.1.1.2], nodeName: test-node}]
ports: [{name: p11, port: 11, protocol: UDP}, {name: p12, port: 12, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ep1-2, namespace: ns1, labels: {kubernetes.io/service-name: ep1}}
addressType: IPv4
endpoints: [{addresses: [10.1.1.3]}, {addresses: [10.1.1.4], nodeName: test-node}]
ports: [{name: p13, port: 13, protocol: UDP}, {name: p14, port: 14, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ep2-1, namespace: ns2, labels: {kubernetes.io/service-name: ep2}}
addressType: IPv4
endpoints: [{addresses: [10.2.2.1]}, {addresses: [10.2.2.2], nodeName: test-node}]
ports: [{name: p21, port: 21, protocol: UDP}, {name: p22, port: 22, protocol: UDP}]
"""), NODE)
    got = {str(k) + "/" + k.protocol: [(str(e), e.is_local) for e in v] for k, v in m.items()}
    assert got == {
        "ns1/ep1:p11/UDP": [("10.1.1.1:11", False), ("10.1.1.2:11", True)],
        "ns1/ep1:p12/UDP": [("10.1.1.1:12", False), ("10.1.1.2:12", True)],
        "ns1/ep1:p13/UDP": [("10.1.1.3:13", False), ("10.1.1.4:13", True)],
        "ns1/ep1:p14/UDP": [("10.1.1.3:14", False), ("10.1.1.4:14", True)],
        "ns2/ep2:p21/UDP": [("10.2.2.1:21", False), ("10.2.2.2:21", True)],
        "ns2/ep2:p22/UDP": [("10.2.2.1:22", False), ("10.2.2.2:22", True)],
    }


def test_map_dedupes_prefers_non_terminating_and_filters_family_and_labels():
    m = endpoints_map(slices("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}]
ports: [{name: p80, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1], nodeName: test-node}, {addresses: [010.0.000.002]}]
ports: [{name: p80, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: c, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.9]}]
ports: [{name: p80, port: 80, protocol: UDP}, {name: other, port: 81, protocol: TCP}, {name: nil, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: d, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv6
endpoints: [{addresses: ["fd00::1"]}]
ports: [{name: p80, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: e, namespace: ns1}
addressType: IPv4
endpoints: [{addresses: [10.9.9.9]}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""), NODE)
    eps = m[SPN]
    assert strs(eps) == ["10.0.0.1:80", "10.0.0.2:80"]          # canonicalised, deduplicated
    assert not eps[0].terminating and eps[0].ready and eps[0].is_local
    assert strs(m[ServicePortName("ns1", "svc1", "p80", "UDP")]) == ["10.0.0.9:80"]
    assert strs(m[ServicePortName("ns1", "svc1", "other", "TCP")]) == ["10.0.0.9:81"]
    assert ServicePortName("ns1", "svc1", "nil", "TCP") not in m     # a port without a number
    v6 = endpoints_map(slices("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: d, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv6
endpoints: [{addresses: ["fd00:0::1"]}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""), NODE, "IPv6")
    assert strs(v6[SPN]) == ["[fd00::1]:80"]


def test_conditions_nil_defaults():
    m = endpoints_map(slices("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
ports: [{name: p80, port: 80}]
"""), NODE)
    (e,) = m[SPN]
    assert (e.ready, e.serving, e.terminating, e.is_local) == (True, True, False, False)


# --------------------------------------------------------------------------- categorisation


def test_cluster_policy_uses_ready_endpoints():
    eps = [ep("10.0.1.1", local=True), ep("10.0.1.2", ready=False, serving=True, terminating=True),
           ep("10.0.1.3", ready=False, serving=False, terminating=True), ep("10.0.1.5")]
    cat = categorize_endpoints(eps, svc(), NODE)
    assert strs(cat.cluster) == ["10.0.1.1:80", "10.0.1.5:80"] and cat.local == []
    assert strs(cat.all_reachable) == strs(cat.cluster) and cat.has_any


def test_cluster_falls_back_to_serving_terminating():
    eps = [ep("10.0.1.2", ready=False, terminating=True), ep("10.0.1.3", ready=False, terminating=True),
           ep("10.0.1.4", ready=False, serving=False, terminating=True)]
    cat = categorize_endpoints(eps, svc(), NODE)
    assert strs(cat.cluster) == ["10.0.1.2:80", "10.0.1.3:80"] and cat.has_any


def test_no_usable_endpoints():
    cat = categorize_endpoints([ep("10.0.1.5", ready=False, serving=False, terminating=True)], svc(), NODE)
    assert (cat.cluster, cat.local, cat.all_reachable, cat.has_any) == ([], [], [], False)
    assert categorize_endpoints([], svc(), NODE).has_any is False


def test_internal_local_only():
    s = svc(internal_policy_local=True)
    eps = [ep("10.0.1.1", local=True), ep("10.0.1.2"), ep("10.0.1.3", local=True)]
    cat = categorize_endpoints(eps, s, NODE)
    assert cat.cluster == [] and strs(cat.local) == ["10.0.1.1:80", "10.0.1.3:80"]
    assert strs(cat.all_reachable) == strs(cat.local) and cat.has_any
    cat = categorize_endpoints([ep("10.0.1.2")], s, NODE)
    assert cat.local == [] and cat.has_any        # others exist: DROP, not REJECT


def test_external_local_uses_both_lists():
    s = svc(external_policy_local=True, node_port=3001)
    eps = [ep("10.0.1.1", local=True), ep("10.0.1.2")]
    cat = categorize_endpoints(eps, s, NODE)
    assert strs(cat.cluster) == ["10.0.1.1:80", "10.0.1.2:80"] and strs(cat.local) == ["10.0.1.1:80"]
    assert strs(cat.all_reachable) == strs(cat.cluster)


def test_local_terminating_fallback_merges_lists():
    """Ready remote endpoints plus only serving-terminating local ones: the SEP set is
    the union (upstream "only terminating endpoints exist", eTP=Local)."""
    s = svc(external_policy_local=True, node_port=3001)
    eps = [ep("10.0.1.2", local=True, ready=False, terminating=True),
           ep("10.0.1.3", local=True, ready=False, terminating=True),
           ep("10.0.1.4", local=True, ready=False, serving=False, terminating=True), ep("10.0.1.5")]
    cat = categorize_endpoints(eps, s, NODE)
    assert strs(cat.cluster) == ["10.0.1.5:80"]
    assert strs(cat.local) == ["10.0.1.2:80", "10.0.1.3:80"]
    assert strs(cat.all_reachable) == ["10.0.1.2:80", "10.0.1.3:80", "10.0.1.5:80"]


def test_topology_hints():
    s = svc()
    zoned = [ep("10.0.1.1", zone_hints=frozenset({"a"})), ep("10.0.1.2", zone_hints=frozenset({"b"}))]
    assert strs(categorize_endpoints(zoned, s, NODE, zone="a").cluster) == ["10.0.1.1:80"]
    assert len(categorize_endpoints(zoned, s, NODE, zone="c").cluster) == 2      # no hint for zone c
    assert len(categorize_endpoints(zoned, s, NODE, zone=None).cluster) == 2
    partial = [ep("10.0.1.1", zone_hints=frozenset({"a"})), ep("10.0.1.2")]
    assert len(categorize_endpoints(partial, s, NODE, zone="a").cluster) == 2
    noded = [ep("10.0.1.1", node_hints=frozenset({NODE})), ep("10.0.1.2", node_hints=frozenset({"other"}))]
    assert strs(categorize_endpoints(noded, s, NODE).cluster) == ["10.0.1.1:80"]


def test_service_port_infos_processing():
    (lo,) = loads("""
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.41
  externalTrafficPolicy: Local
  healthCheckNodePort: 30000
  externalIPs: [192.168.99.11, "2001:db8::5"]
  loadBalancerSourceRanges: [" 203.0.113.0/25", "2001:db8::/64"]
  sessionAffinity: ClientIP
  ports: [{name: p80, port: 80, nodePort: 3001}, {name: dns, port: 53, protocol: UDP, nodePort: 3002}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8, ipMode: Proxy}, {hostname: lb.example.com}]}}
""")
    infos = service_port_infos(lo.obj)
    info = infos[SPN]
    assert set(infos) == {SPN, ServicePortName("ns1", "svc1", "dns", "UDP")}
    assert info.external_ips == ("192.168.99.11",) and info.load_balancer_vips == ("1.2.3.4",)
    assert info.load_balancer_source_ranges == ("203.0.113.0/25",)
    assert info.health_check_node_port == 30000 and info.external_policy_local
    assert info.sticky_max_age_seconds == 10800 and info.client_ip_affinity
    assert info.uses_cluster_endpoints and info.uses_local_endpoints and info.externally_accessible
    assert service_port_infos(lo.obj, "IPv6") == {}      # no IPv6 ClusterIP


# --------------------------------------------------------------------------- the controller


def pods_and_service(text: str):
    objs = [lo.obj for lo in loads(text)]
    return [o for o in objs if o.kind == "Pod"], next(o for o in objs if o.kind == "Service")


NAMED = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9100, targetPort: 9100}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 9000}]}]}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-c, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: web, containerPort: 80}]}]}
status: {podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-udp, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 7000, protocol: UDP}]}]}
status: {podIP: 10.244.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: db}}
spec: {containers: [{name: c, image: db}]}
status: {podIP: 10.244.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: no-ip, labels: {app: web}}
spec: {containers: [{name: c, image: nginx}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, labels: {app: web}}
spec: {containers: [{name: c, image: nginx}]}
status: {podIP: 10.244.0.8, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere, namespace: other, labels: {app: web}}
spec: {containers: [{name: c, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.244.0.7}
"""


def test_named_target_port_resolves_per_pod():
    pods, service = pods_and_service(NAMED)
    assert find_port(pods[0], service.ports[0]) == 8080 and find_port(pods[1], service.ports[0]) == 9000
    assert find_port(pods[2], service.ports[0]) is None                 # no port named http
    assert find_port(pods[3], service.ports[0]) is None                 # http, but UDP
    assert find_port(pods[2], service.ports[1]) == 9100                 # numbers need no lookup
    slices_ = endpoint_slices_for(service, pods)
    by_ports = {tuple((p.name, p.port) for p in s.ports): [(e.addresses[0], e.node_name) for e in s.endpoints]
                for s in slices_}
    assert by_ports == {
        (("metrics", 9100),): [("10.244.0.3", None), ("10.244.0.4", None)],
        (("http", 8080), ("metrics", 9100)): [("10.244.0.2", "node-1")],
        (("http", 9000), ("metrics", 9100)): [("10.244.1.2", "node-2")],
    }
    for s in slices_:
        assert s.metadata.labels["kubernetes.io/service-name"] == "web"
        assert s.metadata.labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert s.name.startswith("web-") and len(s.name) == len("web-") + 5 and s.address_type == "IPv4"
    assert [s.name for s in slices_] == [s.name for s in endpoint_slices_for(service, pods)]   # stable
    # and the proxier sees each port with the pods that have it
    m = endpoints_map(slices_, "node-1")
    assert strs(m[ServicePortName("default", "web", "http", "TCP")]) == ["10.244.0.2:8080", "10.244.1.2:9000"]
    assert len(m[ServicePortName("default", "web", "metrics", "TCP")]) == 4


def test_readiness_terminating_and_publish_not_ready():
    pods, service = pods_and_service(NAMED)
    pods[0].metadata.deletion_timestamp = "2024-01-01T00:00:00Z"
    slices_ = endpoint_slices_for(service, pods, {"web-b": False})
    conds = {e.addresses[0]: (e.conditions.ready, e.conditions.serving, e.conditions.terminating)
             for s in slices_ for e in s.endpoints}
    assert conds["10.244.0.2"] == (False, True, True)      # terminating: serving but not ready
    assert conds["10.244.1.2"] == (False, False, False)    # not ready
    assert conds["10.244.0.3"] == (True, True, False)
    service.publish_not_ready_addresses = True
    conds = {e.addresses[0]: e.conditions.ready for s in endpoint_slices_for(service, pods, lambda p: False)
             for e in s.endpoints}
    assert set(conds.values()) == {True}


def test_pod_ready_condition_from_status():
    pods, service = pods_and_service(NAMED)
    pods[2].status.conditions = [{"type": "Ready", "status": "False"}]
    conds = {e.addresses[0]: e.conditions.ready for s in endpoint_slices_for(service, pods) for e in s.endpoints}
    assert conds["10.244.0.3"] is False and conds["10.244.0.2"] is True


def test_no_selector_external_name_and_placeholder():
    pods, service = pods_and_service(NAMED)
    service.selector = None
    assert endpoint_slices_for(service, pods) == []
    service.selector = {"app": "nothing"}
    (placeholder,) = endpoint_slices_for(service, pods)
    assert placeholder.endpoints == [] and placeholder.ports == []
    service.type = "ExternalName"
    assert endpoint_slices_for(service, pods) == []


def test_slices_hold_at_most_100_endpoints():
    pods_text = "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: p{i}, labels: {{app: big}}}}
spec: {{containers: [{{name: c, image: i}}]}}
status: {{podIP: 10.244.{i // 250}.{i % 250 + 2}}}
""" for i in range(230))
    pods, service = pods_and_service("""apiVersion: v1
kind: Service
metadata: {name: big}
spec: {clusterIP: 10.96.0.30, selector: {app: big}, ports: [{port: 80}]}
""" + pods_text)
    slices_ = endpoint_slices_for(service, pods)
    assert [len(s.endpoints) for s in slices_] == [100, 100, 30]
    assert len({s.name for s in slices_}) == 3


from tests.conftest import SEED  # noqa: E402


@pytest.mark.skipif(not SEED.is_dir(), reason="seed exercise not available")
def test_dashboard_in_curso_selects_no_wordpress_pods():
    """Seed README 2.2: selectors only match Pods in the Service's namespace."""
    from kproxy.render import resolve_manifests

    resolved = resolve_manifests([str(SEED / "Sesion4-Kubernetes/Stateful-app"),
                                  str(SEED / "Sesion4-Kubernetes/service.yaml")])
    by_service = {}
    for s in resolved.endpoint_slices:
        by_service.setdefault((s.namespace, s.service_name), []).extend(s.endpoints)
    assert len(by_service[("default", "wordpress")]) == 4
    assert by_service[("curso", "dashboard")] == []
    assert "Service curso/dashboard selects no Pod: no endpoints" in resolved.warnings
