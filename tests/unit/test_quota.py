"""ResourceQuota: the model kind, its validation, and kproxy.quota's admission."""
from __future__ import annotations

import textwrap

import pytest

from kproxy import quota
from kproxy.errors import KproxyError
from kproxy.model import ManifestError, NotEmulated, ResourceQuota, loads
from kproxy.model import objects as o
from kproxy.render import render_manifests
from kproxy.store import Store


def docs(text: str, source: str = "test.yaml"):
    return loads(textwrap.dedent(text), source=source)


def objs(text: str, source: str = "test.yaml"):
    return [lo.obj for lo in docs(text, source)]


def rq(name="q", ns="default", **hard):
    hard_yaml = ", ".join(f'"{k.replace("__", "/").replace("_", ".")}": "{v}"' for k, v in hard.items())
    return objs(f"""
        apiVersion: v1
        kind: ResourceQuota
        metadata: {{name: {name}, namespace: {ns}}}
        spec: {{hard: {{{hard_yaml}}}}}
        """)[0]


def svc(name, type_="ClusterIP", ports=1, ns="default", extra=""):
    port_list = ", ".join(f"{{name: p{i}, port: {80 + i}}}" for i in range(ports))
    return objs(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: {ns}}}
        spec: {{type: {type_}, ports: [{port_list}]{extra}}}
        """)[0]


def pod(name, ns="default", phase=""):
    status = f"\n        status: {{phase: {phase}}}" if phase else ""
    return objs(f"""
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: {ns}}}
        spec: {{containers: [{{name: c, image: nginx}}]}}{status}
        """)[0]


# --------------------------------------------------------------------------- the model


def test_resource_quota_is_a_modelled_kind():
    [lo] = docs("""
        apiVersion: v1
        kind: ResourceQuota
        metadata: {name: compute, namespace: dev}
        spec:
          hard: {pods: "10", count/services: 2, services.nodeports: 1k, requests.cpu: 500m, requests.memory: 1Gi}
        """)
    assert lo.emulated and isinstance(lo.obj, ResourceQuota) and not isinstance(lo.obj, NotEmulated)
    assert lo.obj.hard == {"pods": 10, "count/services": 2, "services.nodeports": 1000,
                           "requests.cpu": "500m", "requests.memory": 1024 ** 3}
    assert lo.obj.enforced() == {"pods": 10, "count/services": 2, "services.nodeports": 1000}
    assert len(lo.warnings) == 2
    assert lo.warnings[0].startswith("ResourceQuota dev/compute: spec.hard[requests.cpu]: not enforced by kproxy")


def test_a_scoped_quota_is_kept_but_not_enforced():
    [lo] = docs("""
        apiVersion: v1
        kind: ResourceQuota
        metadata: {name: be}
        spec: {hard: {pods: "1"}, scopes: [BestEffort]}
        """)
    assert lo.obj.enforced() == {} and "scopes are not emulated" in lo.warnings[0]
    stored = {"ResourceQuota": [lo.obj], "Pod": [pod("a")]}
    quota.check_apply(stored, [pod("b")])
    assert quota.pod_headroom(stored, "default", 5) is None


@pytest.mark.parametrize("hard,field,reason", [
    ('pods: "ten"', "spec.hard[pods]", "quantities must match the regular expression"),
    ("pods: [1]", "spec.hard[pods]", "expected a quantity"),
    ('services: "-1"', "spec.hard[services]", 'Invalid value: "-1": must be greater than or equal to 0'),
    ('count/services: "1500m"', "spec.hard[count/services]", 'Invalid value: "1500m": must be an integer'),
    ('services.nodeports: "2.5"', "spec.hard[services.nodeports]", "must be an integer"),
    ("nodeports: 3", "spec.hard[nodeports]", "must be a standard resource for quota"),
])
def test_a_bad_quota_names_file_object_and_field(hard, field, reason):
    with pytest.raises(ManifestError) as err:
        loads(f"apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: q, namespace: dev}}\n"
              f"spec:\n  hard: {{{hard}}}\n", source="quota.yaml")
    e = err.value
    assert (e.file, e.obj, e.field) == ("quota.yaml", "ResourceQuota dev/q", field)
    assert reason in e.reason
    assert str(e).startswith(f"quota.yaml: document 0: ResourceQuota dev/q: {field}: ")


def test_unknown_quota_fields_are_refused_like_other_kinds():
    with pytest.raises(ManifestError, match='unknown field "spec.hardd"'):
        loads("apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: q}\nspec: {hardd: {pods: 1}}\n")


def test_render_and_the_loaders_ignore_quotas(tmp_path):
    svc_yaml = textwrap.dedent("""
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec: {type: NodePort, selector: {app: web}, ports: [{port: 80}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: web, labels: {app: web}}
        spec: {containers: [{name: c, image: nginx}]}
        """)
    (tmp_path / "a.yaml").write_text(svc_yaml)
    without = render_manifests(str(tmp_path))
    (tmp_path / "b-quota.yaml").write_text(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: q}\nspec: {hard: {services: 0}}\n")
    assert render_manifests(str(tmp_path)) == without
    assert render_manifests(str(tmp_path), backend="nftables")


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("service,want", [
    (lambda: svc("a"), {"services": 1, "count/services": 1, "services.nodeports": 0, "services.loadbalancers": 0}),
    (lambda: svc("a", "NodePort", 2), {"services.nodeports": 2, "services.loadbalancers": 0}),
    (lambda: svc("a", "LoadBalancer", 3), {"services.nodeports": 3, "services.loadbalancers": 1}),
    (lambda: svc("a", "LoadBalancer", 2, extra=", allocateLoadBalancerNodePorts: false"),
     {"services.nodeports": 0, "services.loadbalancers": 1}),
    (lambda: objs("""
        apiVersion: v1
        kind: Service
        metadata: {name: lb}
        spec:
          type: LoadBalancer
          allocateLoadBalancerNodePorts: false
          externalTrafficPolicy: Local
          ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81}]
        """)[0], {"services.nodeports": 1, "services.loadbalancers": 1}),
    (lambda: objs("""
        apiVersion: v1
        kind: Service
        metadata: {name: ext}
        spec: {type: ExternalName, externalName: example.com}
        """)[0], {"services": 1, "services.nodeports": 0, "services.loadbalancers": 0}),
])
def test_service_usage_counts_like_upstreams_evaluator(service, want):
    got = quota.service_usage(service())
    assert {k: got[k] for k in want} == want


def test_pod_usage_terminal_pods_only_count_as_objects():
    assert quota.pod_usage(pod("a")) == {"count/pods": 1, "pods": 1}
    assert quota.pod_usage(pod("a", phase="Succeeded")) == {"count/pods": 1, "pods": 0}
    assert quota.pod_usage(pod("a", phase="Failed")) == {"count/pods": 1, "pods": 0}


def test_usage_for_describe():
    stored = {"ResourceQuota": [rq("a", services=5, services_nodeports=4), rq("b", services=3)],
              "Service": [svc("x", "NodePort", 2), svc("y"), svc("z", ns="other")],
              "Pod": [pod("p1"), pod("p2", phase="Failed")]}
    assert quota.usage_by_quota(stored, "default") == {
        "a": {"services": (2, 5), "services.nodeports": (2, 4)}, "b": {"services": (2, 3)}}
    assert quota.usage(stored, "default") == {"services": (2, 3), "services.nodeports": (2, 4)}
    assert quota.usage(stored, "other") == {}
    stored["ResourceQuota"].append(rq("pods", pods=4, count__pods=9))
    assert quota.usage(stored, "default")["pods"] == (1, 4)
    assert quota.usage(stored, "default")["count/pods"] == (2, 9)
    assert quota.usage(stored, "default", pods=3)["pods"] == (3, 4)


# --------------------------------------------------------------------------- admission


def test_create_over_quota_gives_kubectls_message():
    stored = {"ResourceQuota": [rq("svc-quota", count__services=2)], "Service": [svc("a"), svc("b")]}
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("c")], source_of=lambda obj: "svc-c.yaml")
    e = err.value
    assert str(e) == ('Error from server (Forbidden): error when creating "svc-c.yaml": services "c" is '
                      "forbidden: exceeded quota: svc-quota, requested: count/services=1, "
                      "used: count/services=2, limited: count/services=2")
    assert e.forbidden.startswith('services "c" is forbidden: exceeded quota: svc-quota')
    assert isinstance(e, KproxyError)
    assert (e.quota, e.namespace, e.kind, e.name) == ("svc-quota", "default", "Service", "c")


def test_loaded_objects_carry_their_file_and_stdin_is_named_like_kubectl():
    stored = {"ResourceQuota": [rq(services=0)]}
    with pytest.raises(quota.QuotaExceeded, match='error when creating "web.yaml": services "web"'):
        quota.check_apply(stored, docs("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                                       "spec: {ports: [{port: 80}]}\n", source="web.yaml"))
    with pytest.raises(quota.QuotaExceeded, match='error when creating "STDIN"'):
        quota.check_apply(stored, [svc("web")], source_of=lambda obj: "-")
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("web")])
    assert str(err.value) == err.value.forbidden.join(("Error from server (Forbidden): ", ""))


def test_every_exceeded_resource_is_listed_sorted():
    stored = {"ResourceQuota": [rq("q", services=1, count__services=1, services_nodeports=10)],
              "Service": [svc("a")]}
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("b", "NodePort")], source_of=lambda obj: "b.yaml")
    assert err.value.reason == ("exceeded quota: q, requested: count/services=1,services=1, "
                                "used: count/services=1,services=1, limited: count/services=1,services=1")


def test_limits_print_as_the_api_server_prints_quantities():
    stored = {"ResourceQuota": [rq("q", services="1k")], "Service": [svc("a"), svc("b")]}
    quota.check_apply(stored, [svc("c")])
    stored["ResourceQuota"] = [rq("q", services="2000m")]          # a whole number: 2
    with pytest.raises(quota.QuotaExceeded, match="used: services=2, limited: services=2$"):
        quota.check_apply(stored, [svc("c")])
    stored["ResourceQuota"] = [rq("q", services="2e0")]
    with pytest.raises(quota.QuotaExceeded, match="limited: services=2$"):
        quota.check_apply(stored, [svc("c")])


def test_the_first_object_that_exceeds_is_reported():
    stored = {"ResourceQuota": [rq(services=2)], "Service": [svc("a")]}
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("b"), svc("c"), svc("d")])
    assert err.value.name == "c" and err.value.used == {"services": 2}


def test_a_quota_in_the_same_apply_applies_and_replaces_a_stored_one():
    with pytest.raises(quota.QuotaExceeded, match="exceeded quota: q"):
        quota.check_apply({}, [rq(services=1), svc("a"), svc("b")])
    stored = {"ResourceQuota": [rq(services=1)], "Service": [svc("a")]}
    quota.check_apply(stored, [rq(services=2), svc("b")])           # raised in the same apply


def test_quotas_only_see_their_namespace():
    stored = {"ResourceQuota": [rq(ns="dev", services=1)], "Service": [svc("a", ns="dev")]}
    quota.check_apply(stored, [svc("b"), svc("c", ns="prod")])
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("b", ns="dev")])
    assert err.value.namespace == "dev"


def test_an_update_that_does_not_increase_usage_passes_even_over_quota():
    # the quota was lowered below what the namespace already uses
    stored = {"ResourceQuota": [rq(services=1, services_nodeports=1)],
              "Service": [svc("a", "NodePort", 2), svc("b"), svc("c")]}
    quota.check_apply(stored, [svc("a", "NodePort", 2, extra=", sessionAffinity: ClientIP")])
    quota.check_apply(stored, [svc("a", "NodePort", 1)])
    quota.check_apply(stored, [svc("b")])


def test_clusterip_to_nodeport_requests_node_ports():
    stored = {"ResourceQuota": [rq("np", services_nodeports=1)],
              "Service": [svc("a", "NodePort", 1), svc("b")]}
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [svc("b", "NodePort", 1)], source_of=lambda obj: "b.yaml")
    e = err.value
    assert e.operation == "patching"
    assert e.reason == ("exceeded quota: np, requested: services.nodeports=1, used: services.nodeports=1, "
                        "limited: services.nodeports=1")
    assert str(e) == ('Error from server (Forbidden): error when applying patch:\n'
                      '{"spec":{"type":"NodePort"}}\nto:\n'
                      'Resource: "/v1, Resource=services", GroupVersionKind: "/v1, Kind=Service"\n'
                      'Name: "b", Namespace: "default"\n'
                      'for: "b.yaml": error when patching "b.yaml": services "b" is forbidden: '
                      + e.reason)
    # ClusterIP -> LoadBalancer asks for a load balancer as well
    stored["ResourceQuota"] = [rq("lb", services_loadbalancers=0)]
    with pytest.raises(quota.QuotaExceeded, match="requested: services.loadbalancers=1"):
        quota.check_apply(stored, [svc("b", "LoadBalancer", 1)])


def test_nodeport_to_clusterip_frees_node_ports():
    stored = {"ResourceQuota": [rq("np", services_nodeports=2)], "Service": [svc("a", "NodePort", 2)]}
    with pytest.raises(quota.QuotaExceeded, match='services "b" is forbidden'):
        quota.check_apply(stored, [svc("b", "NodePort", 1)])
    # in the same apply: a's ports are freed before b asks for one
    quota.check_apply(stored, [svc("a"), svc("b", "NodePort", 1)])
    # and once stored
    stored["Service"] = [svc("a")]
    quota.check_apply(stored, [svc("b", "NodePort", 2)])
    assert quota.usage(stored, "default") == {"services.nodeports": (0, 2)}


def test_services_from_a_real_store(tmp_path):
    st = Store(str(tmp_path / "store.db"), "10.96.0.0/12", "30000-32767", None)
    try:
        st.apply(docs("""
            apiVersion: v1
            kind: ResourceQuota
            metadata: {name: np}
            spec: {hard: {services.nodeports: "2", services.loadbalancers: "0"}}
            ---
            apiVersion: v1
            kind: Service
            metadata: {name: a}
            spec: {type: NodePort, ports: [{name: x, port: 80}, {name: y, port: 81}]}
            """, "a.yaml"))
        stored = st.objects()
        [a] = stored["Service"]
        assert a.type == "NodePort" and all(p.node_port for p in a.ports)      # allocated
        assert [q.name for q in stored["ResourceQuota"]] == ["np"]
        assert quota.usage(stored, "default") == {"services.loadbalancers": (0, 0),
                                                  "services.nodeports": (2, 2)}
        with pytest.raises(quota.QuotaExceeded, match="used: services.nodeports=2, limited: services.nodeports=2"):
            quota.check_apply(stored, [svc("b", "NodePort", 1)], source_of=lambda obj: "b.yaml")
        quota.check_apply(stored, [svc("a"), svc("b", "NodePort", 1)])
    finally:
        st.close()


def test_bare_pods_count_on_create_only():
    stored = {"ResourceQuota": [rq("pq", pods=2)], "Pod": [pod("a"), pod("b"), pod("done", phase="Succeeded")]}
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.check_apply(stored, [pod("c")], source_of=lambda obj: "c.yaml")
    assert str(err.value) == ('Error from server (Forbidden): error when creating "c.yaml": pods "c" is '
                              "forbidden: exceeded quota: pq, requested: pods=1, used: pods=2, limited: pods=2")
    quota.check_apply(stored, [pod("a")])                      # an update is not charged
    quota.check_apply(stored, [pod("c", phase="Failed")])      # a terminal pod takes no "pods"
    stored["ResourceQuota"] = [rq("cq", count__pods=3)]
    with pytest.raises(quota.QuotaExceeded, match="requested: count/pods=1, used: count/pods=3"):
        quota.check_apply(stored, [pod("c", phase="Failed")])  # but it is an object
    stored["ResourceQuota"] = [rq("pq", pods=3)]
    with pytest.raises(quota.QuotaExceeded, match="used: pods=3"):
        quota.check_apply(stored, [pod("c")], replica_pods={"default": 1})


def test_kinds_quota_does_not_count_pass():
    stored = {"ResourceQuota": [rq(services=0, pods=0)]}
    quota.check_apply(stored, objs("""
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          replicas: 5
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec: {containers: [{name: c, image: nginx}]}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: dev}
        """))


def test_pod_headroom_for_the_deployment_controller():
    assert quota.pod_headroom({}, "default", 10) is None
    stored = {"ResourceQuota": [rq("a", pods=5), rq("b", count__pods=3), rq("c", services=1),
                                rq("d", ns="other", pods=1)]}
    assert quota.pod_headroom(stored, "default", 1) == 2
    assert quota.pod_headroom(stored, "default", 7) == 0
    assert quota.pod_headroom(stored, "other", 0) == 1
    assert quota.pod_headroom(stored, "third", 0) is None


def test_pod_forbidden_is_the_api_servers_refusal():
    stored = {"ResourceQuota": [rq("pod-demo", pods=2)]}
    assert quota.pod_forbidden(stored, "default", "web-5d8c9b7f4-x2k9p", 1) is None
    assert quota.pod_forbidden(stored, "default", "web-5d8c9b7f4-x2k9p", 2) == (
        'pods "web-5d8c9b7f4-x2k9p" is forbidden: exceeded quota: pod-demo, requested: pods=1, '
        "used: pods=2, limited: pods=2")
    stored = {"ResourceQuota": [rq("both", pods=2, count__pods=2)]}
    assert quota.pod_forbidden(stored, "default", "p", 2).endswith(
        "requested: count/pods=1,pods=1, used: count/pods=2,pods=2, limited: count/pods=2,pods=2")


def test_quota_kind_constant_matches_the_model():
    assert set(quota.SERVICE_RESOURCES) | set(quota.POD_RESOURCES) == set(o.QUOTA_ENFORCED_RESOURCES)
