"""Services through kube-proxy's own rules on the emulated cluster, with real traffic."""
from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
import time

import pytest

from kproxy.model import load
from kproxy.reconciler import converge, open_store
from tests.conftest import SEED, kproxy_cli

pytestmark = pytest.mark.root

# N fresh connections to ip:port; prints {"pods": {...}, "clients": [...], "errors": [...]}
PROBE = textwrap.dedent("""
    import json, sys
    from kproxy.workload.client import http_get, parse_facts, udp_ask
    ip, port, n, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = float(sys.argv[5])
    pods, clients, errors = {}, [], []
    for _ in range(n):
        try:
            if proto == "udp":
                facts = parse_facts(udp_ask(ip, port, b"ping", timeout=timeout))
            else:
                facts = parse_facts(http_get(ip, port, timeout=timeout)[2])
            pods[facts["pod"]] = pods.get(facts["pod"], 0) + 1
            clients.append(facts["client_ip"])
        except Exception as e:
            errors.append(type(e).__name__ + ": " + str(e))
    print(json.dumps({"pods": pods, "clients": sorted(set(clients)), "errors": errors}))
""")


def probe(cluster, ns, ip, port, n=1, proto="http", timeout=2.0) -> dict:
    res = cluster.exec_in(ns, [sys.executable, "-c", PROBE, ip, str(port), str(n), proto, str(timeout)],
                          capture_output=True, text=True, timeout=60 + n * timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


class Lab:
    """A cluster with a store; apply YAML text and converge, like `kproxy apply -f`."""

    def __init__(self, cluster, tmp_path):
        self.c = cluster
        self.tmp = tmp_path
        self.store = open_store(cluster)
        self.client = cluster.add_pod("client", node="node1")

    def apply(self, yaml_text: str = None, path=None, strict=True):
        if yaml_text is not None:
            path = self.tmp / f"m{time.monotonic_ns()}.yaml"
            path.write_text(textwrap.dedent(yaml_text))
        result = self.store.apply(load(str(path), strict=strict))
        converge(self.c, self.store)
        return result

    def delete(self, yaml_text: str):
        path = self.tmp / f"d{time.monotonic_ns()}.yaml"
        path.write_text(textwrap.dedent(yaml_text))
        self.store.delete(load(str(path), strict=False))
        converge(self.c, self.store)

    def svc(self, name, namespace="default"):
        return next(s for s in self.store.objects()["Service"] if s.name == name and s.namespace == namespace)

    @property
    def backend(self) -> str:
        return self.c.config.backend

    def rules(self, node="node1", table="nat") -> str:
        """The node's kube-proxy rules: one iptables table, or (nftables mode) the whole
        `ip kube-proxy` table whatever ``table`` says."""
        argv = (["nft", "list", "table", "ip", "kube-proxy"] if self.backend == "nftables"
                else ["iptables-save", "-t", table])
        return self.c.exec_in(self.c.node(node).netns, argv, capture_output=True, text=True).stdout

    def no_endpoints_rule(self, svc: str, node="node1", local=False) -> bool:
        """Whether the node holds the rule that turns away traffic to ``svc`` (ns/name)
        for want of (local) endpoints: a filter REJECT/DROP with kube-proxy's comment
        in iptables mode, an element of a no-endpoint map in nftables mode."""
        if self.backend == "nftables":
            text = self.rules(node)
            return f'comment "{svc}' in text and ("no-endpoint" in text)
        return f"{svc} has no {'local ' if local else ''}endpoints" in self.rules(node, "filter")


BACKENDS = ["iptables", "nftables"]


@pytest.fixture(params=BACKENDS)
def lab(request, make_cluster, tmp_path):
    c = make_cluster(nodes=3, backend=request.param)
    lab = Lab(c, tmp_path)
    yield lab
    lab.store.close()


def deployment(name, replicas, image="nginx", port=80, labels=None, extra=""):
    labels = labels or {"app": name}
    lab_yaml = "\n".join(f"        {k}: {v}" for k, v in labels.items())
    sel_yaml = "\n".join(f"      {k}: {v}" for k, v in labels.items())
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
{sel_yaml}
  template:
    metadata:
      labels:
{lab_yaml}
    spec:
      containers:
      - name: c
        image: {image}
        ports: [{{containerPort: {port}}}]
{extra}
"""


def service(name, port, target=None, type_="ClusterIP", selector=None, extra=""):
    selector = selector or {"app": name}
    sel = ", ".join(f"{k}: {v}" for k, v in selector.items())
    tp = f", targetPort: {target}" if target else ""
    return f"""
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: {type_}
  selector: {{{sel}}}
  ports: [{{port: {port}{tp}}}]
{extra}
"""


def test_clusterip_balances_over_pods_on_every_node(lab):
    lab.apply(deployment("web", 3) + service("web", 8080, 80))
    pods = {p.name: p.node for p in lab.c.pods.values() if p.name.startswith("web-")}
    assert len(set(pods.values())) == 3, "the 3 replicas are spread over the 3 nodes"
    vip = lab.svc("web").cluster_ip
    assert vip.startswith("10.96.")
    out = probe(lab.c, lab.client.netns, vip, 8080, n=600)
    assert not out["errors"] and sum(out["pods"].values()) == 600
    assert set(out["pods"]) == set(pods)
    # chi-square against an even split: 2 degrees of freedom, p = 0.001 -> 13.82
    chi2 = sum((v - 200) ** 2 / 200 for v in out["pods"].values())
    assert chi2 < 13.82, f"uneven spread {out['pods']} (chi2={chi2:.1f})"
    # a pod client's source is kept (no masquerade for pod traffic to a ClusterIP)
    assert out["clients"] == [lab.client.ip]


def test_nodeport_on_every_node_and_loadbalancer_from_outside(lab):
    lab.apply(deployment("np", 2) + service("np", 80, type_="LoadBalancer"))
    svc = lab.svc("np")
    nodeport = svc.ports[0].node_port
    assert 30000 <= nodeport <= 32767
    for node in lab.c.nodes:
        out = probe(lab.c, lab.c.external_ns, node.ip, nodeport)
        assert not out["errors"], f"NodePort on {node.name}: {out['errors']}"
        assert out["clients"][0] in [n.ip for n in lab.c.nodes] + ["10.244.0.1", "10.244.1.1", "10.244.2.1"], \
            "externalTrafficPolicy Cluster masquerades to the node"
    lb_ip = svc.load_balancer_ingress[0].ip
    assert lb_ip.startswith("192.168.5.24")
    out = probe(lab.c, lab.c.external_ns, lb_ip, 80, n=10)
    assert not out["errors"] and sum(out["pods"].values()) == 10


def test_external_traffic_policy_local_vs_cluster(lab):
    lab.apply(deployment("loc", 1) + service("loc", 80, type_="NodePort",
                                             extra="  externalTrafficPolicy: Local"))
    [pod] = [p for p in lab.c.pods.values() if p.name.startswith("loc-")]
    np_ = lab.svc("loc").ports[0].node_port
    ext_ip = lab.c.config.external_ip()
    for node in lab.c.nodes:
        out = probe(lab.c, lab.c.external_ns, node.ip, np_, timeout=1.0)
        if node.name == pod.node:
            assert not out["errors"] and out["clients"] == [ext_ip], "Local keeps the client's address"
        else:
            assert out["errors"] and "timed out" in out["errors"][0], "a node without a local endpoint drops"
    lab.apply(deployment("loc", 1) + service("loc", 80, type_="NodePort",
                                             extra="  externalTrafficPolicy: Cluster"))
    other = next(n for n in lab.c.nodes if n.name != pod.node)
    out = probe(lab.c, lab.c.external_ns, other.ip, np_)
    assert not out["errors"] and out["clients"] == [other.ip], "Cluster SNATs to the node"


def test_session_affinity_client_ip(lab):
    affinity = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"
    lab.apply(deployment("aff", 3) + service("aff", 80, extra=affinity))
    if lab.backend == "iptables":
        assert "--rcheck --seconds 60 --reap" in lab.rules()
    else:
        assert "timeout 1m" in lab.rules() and "update @affinity-" in lab.rules()
    out = probe(lab.c, lab.client.netns, lab.svc("aff").cluster_ip, 80, n=30)
    assert not out["errors"] and len(out["pods"]) == 1, out["pods"]


def test_no_endpoints_rejects_at_once_and_headless_gets_no_rules(lab):
    lab.apply(service("empty", 80) + """
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  selector: {app: nothing}
  ports: [{port: 3306}]
""")
    t0 = time.monotonic()
    out = probe(lab.c, lab.client.netns, lab.svc("empty").cluster_ip, 80, timeout=5.0)
    assert out["errors"] and "ConnectionRefused" in out["errors"][0]
    assert time.monotonic() - t0 < 3.0
    assert lab.no_endpoints_rule("default/empty")
    assert "headless" not in lab.rules() and "headless" not in lab.rules(table="filter")


def test_target_port_nobody_listens_on_is_refused(lab):
    # the course's NodePort example: bitnami/nginx listens on 8080, the Service targets 80
    lab.apply(path=SEED / "UltimaSesion" / "NodePort" / "nodeport.yaml", strict=False)
    svc = lab.svc("my-nginx")
    assert "default/my-nginx" in lab.rules() and svc.ports[0].node_port != 31234
    out = probe(lab.c, lab.client.netns, svc.cluster_ip, 80, timeout=2.0)
    assert out["errors"] and "ConnectionRefused" in out["errors"][0]
    out = probe(lab.c, lab.c.external_ns, lab.c.nodes[0].ip, svc.ports[0].node_port, timeout=2.0)
    assert out["errors"] and "ConnectionRefused" in out["errors"][0]


def test_udp_service_and_stale_conntrack(lab):
    lab.apply(deployment("dns", 2, image="example/udp-app", port=5353).replace("containerPort: 5353}", "containerPort: 5353, protocol: UDP}")
              + service("dns", 53, 5353).replace("port: 53, targetPort: 5353", "port: 53, targetPort: 5353, protocol: UDP"))
    vip = lab.svc("dns").cluster_ip
    out = probe(lab.c, lab.client.netns, vip, 53, n=20, proto="udp")
    assert not out["errors"] and sum(out["pods"].values()) == 20
    lab.apply(deployment("dns", 1, image="example/udp-app", port=5353)
              .replace("containerPort: 5353}", "containerPort: 5353, protocol: UDP}")
              + service("dns", 53, 5353).replace("port: 53, targetPort: 5353", "port: 53, targetPort: 5353, protocol: UDP"))
    out = probe(lab.c, lab.client.netns, vip, 53, n=10, proto="udp")
    assert not out["errors"] and len(out["pods"]) == 1


def test_port_change_scale_and_delete_take_effect(lab):
    lab.apply(deployment("chg", 2) + service("chg", 80))
    vip = lab.svc("chg").cluster_ip
    assert not probe(lab.c, lab.client.netns, vip, 80)["errors"]
    lab.apply(deployment("chg", 4) + service("chg", 8080, 80))
    assert lab.svc("chg").cluster_ip == vip, "an update keeps the ClusterIP"
    if lab.backend == "iptables":
        assert "--dport 8080" in lab.rules() and \
            f"-d {vip}/32 -p tcp -m comment --comment \"default/chg cluster IP\" -m tcp --dport 80 " not in lab.rules()
    else:
        assert f"{vip} . tcp . 8080 :" in lab.rules() and f"{vip} . tcp . 80 :" not in lab.rules()
    out = probe(lab.c, lab.client.netns, vip, 8080, n=80)
    assert not out["errors"] and len(out["pods"]) == 4
    assert probe(lab.c, lab.client.netns, vip, 80, timeout=1.0)["errors"]
    chg = {p.ip for p in lab.c.pods.values() if p.name.startswith("chg-")}
    targets = re.findall(r"(?:--to-destination|dnat to) ([\d.]+):", lab.rules())
    assert sorted(t for t in targets if t in chg) == sorted(chg) and len(chg) == 4
    lab.delete(service("chg", 8080, 80))
    if lab.backend == "iptables":
        assert "default/chg" not in lab.rules()
    else:
        # the Service's map elements go at once; its chains are flushed now and deleted
        # by the next sync's cleanup transaction, as upstream does
        assert vip not in lab.rules() and "default/chg" not in lab.rules().split("chain ")[0]
    assert probe(lab.c, lab.client.netns, vip, 8080, timeout=1.0)["errors"]


def test_apply_is_atomic(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(deployment("ok", 1) + service("ok", 80) + service("broken", 70000)))
    with pytest.raises(Exception) as err:
        lab.store.apply(load(str(bad)))
    assert "bad.yaml" in str(err.value) and "spec.ports[0].port" in str(err.value)
    assert lab.store.objects() == {}


def test_seed_stateful_app_as_kubectl_apply_dot(lab):
    """sesiones/Sesion4-Kubernetes/Stateful-app with `kproxy apply -f .` from inside the folder."""
    res = kproxy_cli("apply", "-f", ".", env={"KPROXY_CLUSTER": lab.c.name},
                     cwd=SEED / "Sesion4-Kubernetes" / "Stateful-app")
    assert res.returncode == 0, res.stderr
    assert "service/wordpress created" in res.stdout and "not emulated" in res.stdout
    lab.c = type(lab.c).open(lab.c.name)
    wp = [p for p in lab.c.pods.values() if p.name.startswith("wordpress-") and "mysql" not in p.name]
    assert len(wp) == 4 and all(p.status["ready"] for p in wp)
    svc = lab.svc("wordpress")
    rules = lab.rules()
    if lab.backend == "iptables":
        # ClusterIP 8080 -> 4 endpoints :80 with the probability cascade 1/4, 1/3, 1/2
        assert rules.count("default/wordpress -> ") == 4
        for p in ("0.25000000000", "0.33333333349", "0.50000000000"):
            assert p in rules
    else:
        assert "numgen random mod 4 vmap" in rules
        assert sum(1 for ln in rules.splitlines() if "chain endpoint-" in ln and "default/wordpress/" in ln) == 4
    client = lab.c.add_pod("student", node="node2")
    out = probe(lab.c, client.netns, svc.cluster_ip, 8080, n=40)
    assert not out["errors"] and len(out["pods"]) == 4
    # NodePort on every node and the LoadBalancer address from outside
    assert not probe(lab.c, lab.c.external_ns, lab.c.nodes[2].ip, svc.ports[0].node_port)["errors"]
    assert not probe(lab.c, lab.c.external_ns, svc.load_balancer_ingress[0].ip, 8080)["errors"]
    # wordpress-mysql is headless: no kube-proxy rules at all; pods reach MySQL pod to pod
    assert "wordpress-mysql" not in rules
    [mysql] = [p for p in lab.c.pods.values() if p.name.startswith("wordpress-mysql-")]
    banner = lab.c.exec(wp[0], [sys.executable, "-m", "kproxy.workload.client", "tcp", mysql.ip, "3306"],
                        capture_output=True, text=True, timeout=20)
    assert banner.returncode == 0 and f"client={wp[0].ip}" in banner.stdout


def test_seed_namespaced_dashboard_has_no_endpoints(lab):
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "Stateful-app" / "wordpress.yaml")
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "Ejercicios" / "example.yaml")
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "service.yaml")
    dash = lab.svc("dashboard", "curso")
    out = probe(lab.c, lab.client.netns, dash.cluster_ip, 80, timeout=2.0)
    assert out["errors"] and "ConnectionRefused" in out["errors"][0]
    assert lab.no_endpoints_rule("curso/dashboard")


def test_seed_ejercicio1_spreads_over_four_pods(lab):
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "Ejercicios" / "Ejercicio1")
    busybox = lab.c.pod("busybox")
    assert busybox.status["ready"], busybox.status     # runs `sleep 3600` as given
    out = probe(lab.c, busybox.netns, lab.svc("store-products").cluster_ip, 80, n=80)
    assert not out["errors"] and len(out["pods"]) == 4


def test_cli_get_and_describe_like_kubectl(lab):
    env = {"KPROXY_CLUSTER": lab.c.name}
    res = kproxy_cli("apply", "-f", str(SEED / "Sesion4-Kubernetes" / "Stateful-app"), env=env)
    assert res.returncode == 0, res.stderr
    svc = kproxy_cli("get", "svc", env=env, check=True).stdout
    wp = next(line for line in svc.splitlines() if line.startswith("wordpress "))
    assert "LoadBalancer" in wp and "192.168.5.241" in wp and ":3" in wp and "8080:" in wp
    mysql = next(line for line in svc.splitlines() if line.startswith("wordpress-mysql "))
    assert " None " in mysql and "3306/TCP" in mysql
    desc = kproxy_cli("describe", "svc", "wordpress", env=env, check=True).stdout
    pods = [p for p in lab.c.__class__.open(lab.c.name).pods.values()
            if p.name.startswith("wordpress-") and "mysql" not in p.name]
    for p in pods:
        assert f"{p.ip}:80" in desc
    slices = kproxy_cli("get", "endpointslices", env=env, check=True).stdout
    assert "wordpress-" in slices and "IPv4" in slices
    pods_out = kproxy_cli("get", "pods", "-o", "wide", env=env, check=True).stdout
    assert pods_out.count("1/1") == 5 and "Running" in pods_out
    as_json = json.loads(kproxy_cli("get", "svc", "-o", "json", env=env, check=True).stdout)
    assert {i["metadata"]["name"] for i in as_json["items"]} == {"wordpress", "wordpress-mysql"}
    bad = kproxy_cli("describe", "svc", "nope", env=env)
    assert bad.returncode == 1 and 'services "nope" not found' in bad.stderr


def test_a_change_rewrites_only_the_changed_service(lab):
    """Upstream's partial sync: B's change leaves A's chains (and their counters) alone."""
    if lab.backend != "iptables":
        pytest.skip("iptables counters; nftables partial syncs are covered in test_nft_apply")
    lab.apply(deployment("a", 1) + "\n---" + deployment("b", 1) + service("a", 80) + service("b", 80))
    assert not probe(lab.c, lab.client.netns, lab.svc("a").cluster_ip, 80, n=5)["errors"]

    def a_counts():
        out = lab.c.exec_in(lab.c.node("node1").netns, ["iptables-save", "-c", "-t", "nat"],
                            capture_output=True, text=True).stdout
        return [ln for ln in out.splitlines() if "default/a" in ln and "-j DNAT" in ln]

    before = a_counts()
    assert before and not before[0].startswith("[0:0]"), before
    path = lab.tmp / "scale.yaml"
    path.write_text(textwrap.dedent(deployment("a", 1) + "\n---" + deployment("b", 2) + service("a", 80)
                                    + service("b", 80)))
    lab.store.apply(load(str(path)))
    report = converge(lab.c, lab.store)
    assert set(report.syncs.values()) == {"partial"}
    assert a_counts() == before, "service a's chains were rewritten"
    assert len(probe(lab.c, lab.client.netns, lab.svc("b").cluster_ip, 80, n=30)["pods"]) == 2
    # nothing changed: no sync at all
    assert set(converge(lab.c, lab.store).syncs.values()) == {"none"}


def test_iptables_legacy_flavour(make_cluster, tmp_path):
    """The same rules through iptables-legacy (faster restores at scale)."""
    c = make_cluster(nodes=2, iptables_flavour="legacy")
    lab = Lab(c, tmp_path)
    try:
        lab.apply(deployment("web", 2) + service("web", 80, type_="NodePort") + service("none", 81,
                                                                                        selector={"app": "x"}))
        assert "KUBE-SVC-" in c.exec_in(c.node("node1").netns, ["iptables-legacy-save", "-t", "nat"],
                                        capture_output=True, text=True).stdout
        assert "KUBE-SVC-" not in lab.rules(), "nothing went to the nft flavour"
        out = probe(c, lab.client.netns, lab.svc("web").cluster_ip, 80, n=20)
        assert not out["errors"] and len(out["pods"]) == 2
        assert not probe(c, c.external_ns, c.nodes[1].ip, lab.svc("web").ports[0].node_port)["errors"]
        refused = probe(c, lab.client.netns, lab.svc("none").cluster_ip, 81)
        assert "ConnectionRefused" in refused["errors"][0]
    finally:
        lab.store.close()


def test_load_balancer_source_ranges(lab):
    ext = lab.c.config.external_ip()
    lab.apply(deployment("fw", 1) + service("fw", 80, type_="LoadBalancer",
                                            extra=f"  loadBalancerSourceRanges: [{ext}/32]"))
    lb = lab.svc("fw").load_balancer_ingress[0].ip
    assert not probe(lab.c, lab.c.external_ns, lb, 80)["errors"]
    assert ("KUBE-FW-" if lab.backend == "iptables" else "firewall-") in lab.rules()
    lab.apply(deployment("fw", 1) + service("fw", 80, type_="LoadBalancer",
                                            extra="  loadBalancerSourceRanges: [203.0.113.0/24]"))
    out = probe(lab.c, lab.c.external_ns, lb, 80, timeout=1.0)
    assert out["errors"] and "timed out" in out["errors"][0], "a source outside the ranges is dropped"
    if lab.backend == "iptables":
        assert "traffic not accepted by KUBE-FW" in lab.rules(table="filter")
    else:
        assert "203.0.113.0/24" in lab.rules() and "drop" in lab.rules()


def test_internal_traffic_policy_local(lab):
    lab.apply(deployment("itp", 1) + service("itp", 80, extra="  internalTrafficPolicy: Local"))
    [pod] = [p for p in lab.c.pods.values() if p.name.startswith("itp-")]
    vip = lab.svc("itp").cluster_ip
    near = lab.c.add_pod("near", node=pod.node)
    assert not probe(lab.c, near.netns, vip, 80)["errors"]
    far_node = next(n.name for n in lab.c.nodes if n.name != pod.node)
    far = lab.c.add_pod("far", node=far_node)
    out = probe(lab.c, far.netns, vip, 80, timeout=1.0)
    assert out["errors"] and "timed out" in out["errors"][0], "no local endpoint: dropped"
    assert lab.no_endpoints_rule("default/itp", node=far_node, local=True)


def test_proxier_cleanup_leaves_nothing(lab):
    from kproxy.proxier import proxier_for
    if lab.backend == "nftables":
        lab.apply(deployment("cl", 2) + service("cl", 80, type_="NodePort"))
        proxier_for(lab.c, lab.c.node("node1")).cleanup()
        assert lab.rules() == ""
        return
    from kproxy.proxier import IptablesProxier
    lab.apply(deployment("cl", 2) + service("cl", 80, type_="NodePort"))
    node = lab.c.node("node1")
    IptablesProxier(lab.c, node).cleanup()
    for table in ("nat", "filter"):
        left = [ln for ln in lab.rules(table=table).splitlines() if "KUBE-" in ln]
        assert left == [], left


def test_the_periodic_check_finds_drift_only_when_there_is_some(make_cluster, tmp_path):
    """iptables mode: the daemon's periodic check compares each node's tables with a full
    render and rewrites them only when they differ (a rule edited in place, a flushed
    chain, a deleted jump)."""
    from kproxy.proxier import fingerprints, proxier_for
    from kproxy.reconciler import current_view
    lab = Lab(make_cluster(nodes=2), tmp_path)
    try:
        lab.apply(deployment("web", 3) + service("web", 8080, 80, type_="NodePort") + service("lone", 80, 80))
        services, slices = current_view(lab.c, lab.store)
        for node in lab.c.nodes:
            assert not proxier_for(lab.c, node).drifted(services, slices), node.name
        ns1, ns2 = lab.c.node("node1").netns, lab.c.node("node2").netns

        # a rule edited in place: one endpoint's DNAT sent to another port (same rule count)
        saved = lab.c.exec_in(ns1, ["iptables-save", "-t", "nat"], capture_output=True, text=True,
                              check=True).stdout
        dnat = next(ln for ln in saved.splitlines() if ln.startswith("-A KUBE-SEP-") and "DNAT" in ln)
        chain, dest = dnat.split()[1], dnat.split("--to-destination ")[1].split()[0]
        rules = [ln for ln in saved.splitlines() if ln.startswith(f"-A {chain} ")]
        edited = dnat.replace(f"--to-destination {dest}", f"--to-destination {dest.rsplit(':', 1)[0]}:9")
        lab.c.exec_in(ns1, ["iptables", "-t", "nat", "-R", chain, str(rules.index(dnat) + 1),
                            *shlex.split(edited)[2:]], check=True)
        assert proxier_for(lab.c, lab.c.node("node1")).drifted(services, slices)
        assert not proxier_for(lab.c, lab.c.node("node2")).drifted(services, slices)
        proxier_for(lab.c, lab.c.node("node1")).sync(services, slices, fingerprints(services, slices),
                                                     force_full=True)
        assert not proxier_for(lab.c, lab.c.node("node1")).drifted(services, slices)

        lab.c.exec_in(ns1, ["iptables", "-t", "nat", "-F", "KUBE-SERVICES"], check=True)
        lab.c.exec_in(ns2, ["iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
                            "kubernetes forwarding rules", "-j", "KUBE-FORWARD"], check=True)
        assert proxier_for(lab.c, lab.c.node("node1")).drifted(services, slices)
        assert proxier_for(lab.c, lab.c.node("node2")).drifted(services, slices)
    finally:
        lab.store.close()
