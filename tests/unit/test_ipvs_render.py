"""kube-proxy's IPVS mode, rendered without a kernel: the plan, its four tool inputs,
and the offline explain walk.

Expected values are upstream's (kubernetes/kubernetes pkg/proxy/ipvs proxier.go,
ipset.go, ipset/ipset.go, ipset/types.go; ipvsadm(8) save format).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.report_schema import validate

from kproxy.model import loads
from kproxy.proxy.iptables import NodeSettings
from kproxy.proxy.ipvs import explain, plan, render, split_sections, sysctls_for
from kproxy.proxy.ipvs import names as n
from kproxy.render import render_manifests, resolve_manifests
from tests.conftest import SEED, needs_seed

STATEFUL = SEED / "Sesion4-Kubernetes" / "Stateful-app"
NODE = NodeSettings("node-1", ["192.168.5.11"], cluster_cidr="10.244.0.0/16")
WORDPRESS_EPS = ["10.244.0.3:80", "10.244.0.4:80", "10.244.0.5:80", "10.244.0.6:80"]


def objects(text: str) -> list:
    return [lo.obj for lo in loads(text)]


def svc_yaml(name="svc1", ns="ns1", ip="172.30.0.41", port=80, port_name="p80", type_="ClusterIP",
             extra="", port_extra="", proto="TCP") -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  type: {type_}
  clusterIP: {ip}
  ports: [{{name: {port_name}, port: {port}, protocol: {proto}{port_extra}}}]
{extra}
"""


def slice_yaml(name="svc1", ns="ns1", port=80, port_name="p80", endpoints=(), proto="TCP") -> str:
    eps = ", ".join(
        "{addresses: [%s]%s}" % (ip, f", nodeName: {node}" if node else "") for ip, node in endpoints)
    return f"""
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: {port_name}, port: {port}, protocol: {proto}}}]
"""


def make_plan(text: str, settings: NodeSettings = NODE, **kwargs):
    objs = objects(text)
    return plan(objs, objs, settings, **kwargs)


@pytest.fixture(scope="module")
def stateful():
    if not STATEFUL.is_dir():
        pytest.skip(f"the course manifests are not at {STATEFUL}")
    resolved = resolve_manifests(str(STATEFUL), lb_pool="192.168.5.240/28")
    return plan(resolved.services, resolved.endpoint_slices, NODE)


# --------------------------------------------------------------------------- Stateful-app


@needs_seed
def test_stateful_app_virtual_servers(stateful):
    """wordpress (LoadBalancer 8080 -> 80, 4 replicas): a virtual server on the ClusterIP,
    the LB IP and the NodePort on the node IP, each with the 4 pods; the headless
    wordpress-mysql gets nothing."""
    got = {vs.key: (vs.kind, vs.scheduler, vs.persistent_timeout, [str(rs) for rs in vs.real_servers])
           for vs in stateful.virtual_servers}
    assert got == {
        "TCP 10.96.0.2:8080": ("cluster IP", "rr", None, WORDPRESS_EPS),
        "TCP 192.168.5.241:8080": ("loadbalancer IP", "rr", None, WORDPRESS_EPS),
        "TCP 192.168.5.11:30000": ("node port", "rr", None, WORDPRESS_EPS),
    }
    assert all(vs.service == "default/wordpress" for vs in stateful.virtual_servers)
    assert stateful.dummy_addresses == ["10.96.0.2/32", "192.168.5.241/32"]


@needs_seed
def test_stateful_app_ipvsadm_restore_in_upstream_format(stateful):
    """``ipvsadm -Sn`` format: ``-A -t VIP:PORT -s rr`` then ``-a -t VIP:PORT -r EP:PORT -m -w 1``."""
    lines = stateful.ipvsadm_restore().splitlines()
    assert lines[:5] == ["-A -t 10.96.0.2:8080 -s rr"] + [
        f"-a -t 10.96.0.2:8080 -r {ep} -m -w 1" for ep in WORDPRESS_EPS]
    assert "-A -t 192.168.5.11:30000 -s rr" in lines
    assert "-a -t 192.168.5.241:8080 -r 10.244.0.6:80 -m -w 1" in lines
    for line in lines:
        assert re.fullmatch(r"-A -t [\d.]+:\d+ -s rr|-a -t [\d.]+:\d+ -r [\d.]+:\d+ -m -w 1", line), line
    assert len(lines) == 3 * 5


@needs_seed
def test_stateful_app_ipsets(stateful):
    entries = {name: s.entries for name, s in stateful.ipsets.items() if s.entries}
    assert entries == {
        n.LOOP_BACK: [f"10.244.0.{i},tcp:80,10.244.0.{i}" for i in (3, 4, 5, 6)],
        n.CLUSTER_IP: ["10.96.0.2,tcp:8080"],
        n.LOAD_BALANCER: ["192.168.5.241,tcp:8080"],
        n.NODE_PORT_TCP: ["30000"],
        n.IPVS_IPS: ["10.96.0.2", "192.168.5.241"],
    }
    restore = stateful.ipset_restore()
    assert "add KUBE-CLUSTER-IP 10.96.0.2,tcp:8080" in restore.splitlines()
    assert "3306" not in restore                    # headless: no set entry, no virtual server


def test_every_upstream_set_is_created_with_its_type():
    p = make_plan(svc_yaml())
    creates = {line.split()[1]: line for line in p.ipset_restore().splitlines() if line.startswith("create ")}
    assert list(creates) == [s.name for s in n.SETS]
    types = {name: line.split()[2] for name, line in creates.items()}
    assert types == {
        "KUBE-LOOP-BACK": "hash:ip,port,ip", "KUBE-CLUSTER-IP": "hash:ip,port",
        "KUBE-EXTERNAL-IP": "hash:ip,port", "KUBE-EXTERNAL-IP-LOCAL": "hash:ip,port",
        "KUBE-LOAD-BALANCER": "hash:ip,port", "KUBE-LOAD-BALANCER-FW": "hash:ip,port",
        "KUBE-LOAD-BALANCER-LOCAL": "hash:ip,port", "KUBE-LOAD-BALANCER-SOURCE-IP": "hash:ip,port,ip",
        "KUBE-LOAD-BALANCER-SOURCE-CIDR": "hash:ip,port,net", "KUBE-NODE-PORT-TCP": "bitmap:port",
        "KUBE-NODE-PORT-LOCAL-TCP": "bitmap:port", "KUBE-NODE-PORT-UDP": "bitmap:port",
        "KUBE-NODE-PORT-LOCAL-UDP": "bitmap:port", "KUBE-NODE-PORT-SCTP-HASH": "hash:ip,port",
        "KUBE-NODE-PORT-LOCAL-SCTP-HASH": "hash:ip,port", "KUBE-HEALTH-CHECK-NODE-PORT": "bitmap:port",
        "KUBE-IPVS-IPS": "hash:ip",
    }
    assert creates["KUBE-CLUSTER-IP"] == "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536"
    assert creates["KUBE-NODE-PORT-TCP"] == "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"


@needs_seed
def test_stateful_app_iptables_payload(stateful):
    """nat then filter; upstream's fixed rules and the ipset matches with their comments."""
    text = stateful.iptables_restore()
    assert text.startswith("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-NODE-PORT - [0:0]\n"
                           ":KUBE-LOAD-BALANCER - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n"
                           "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n")
    nat = stateful.iptables.nat_rules
    assert nat[1] == ('-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for '
                      'solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE')
    assert ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
            '-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ') in nat
    assert ('-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" '
            '-m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ') in nat
    assert nat[-4:] == ["-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN",
                        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000",
                        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
                        "-j MASQUERADE --random-fully",
                        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000"]
    # acceptIPVSTraffic comes after the NodePort jump
    assert nat.index("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT") < \
        nat.index("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT")
    filt = stateful.iptables.filter_rules
    assert filt[-6:] == [
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"]
    assert "KUBE-SVC-" not in text and "KUBE-SEP-" not in text     # no per-service chains in IPVS mode


def test_masquerade_variants_of_the_cluster_ip_rule():
    text = svc_yaml() + slice_yaml(endpoints=[("10.180.0.1", None)])
    head = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
            '-m set --match-set KUBE-CLUSTER-IP ')
    assert head + "dst,dst -j KUBE-MARK-MASQ" in make_plan(
        text, NodeSettings("n", ["192.168.0.2"], cluster_cidr="10.0.0.0/8", masquerade_all=True)).iptables.nat_rules
    assert head + "src,dst -j KUBE-MARK-MASQ" in make_plan(
        text, NodeSettings("n", ["192.168.0.2"])).iptables.nat_rules
    assert head + "dst,dst ! -i cni0 -j KUBE-MARK-MASQ" in make_plan(
        text, NodeSettings("n", ["192.168.0.2"], local_bridge="cni0")).iptables.nat_rules


@needs_seed
def test_render_manifests_with_the_ipvs_backend():
    text = render_manifests(str(STATEFUL), backend="ipvs", lb_pool="192.168.5.240/28")
    assert text.startswith("# kube-proxy IPVS mode on node node-1")
    sections = split_sections(text)
    assert list(sections) == ["kube-ipvs0 (ip -batch)", "ipset restore", "ipvsadm restore", "iptables-restore"]
    assert "# ipset restore\ncreate KUBE-LOOP-BACK hash:ip,port,ip" in text
    assert "# ipvsadm restore\n-A -t 10.96.0.2:8080 -s rr\n" in text
    assert "# iptables-restore\n*nat\n" in text
    assert sections["kube-ipvs0 (ip -batch)"] == ("link add kube-ipvs0 type dummy\n"
                                                  "addr add 10.96.0.2/32 dev kube-ipvs0\n"
                                                  "addr add 192.168.5.241/32 dev kube-ipvs0\n")
    assert sections["iptables-restore"].endswith("COMMIT\n")
    for body in sections.values():                  # nothing but tool input inside a section
        assert not any(line.startswith("# ") for line in body.splitlines())
    # without an LB pool the LoadBalancer stays pending: ClusterIP and NodePort only
    pending = split_sections(render_manifests(str(STATEFUL), backend="ipvs"))["ipvsadm restore"]
    assert [line for line in pending.splitlines() if line.startswith("-A")] == [
        "-A -t 10.96.0.2:8080 -s rr", "-A -t 192.168.5.11:30000 -s rr"]


# --------------------------------------------------------------------------- per feature


def test_session_affinity_is_persistence():
    extra = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n"
    p = make_plan(svc_yaml(extra=extra) + slice_yaml(endpoints=[("10.180.0.1", None), ("10.180.0.2", None)]))
    assert p.ipvsadm_restore().splitlines()[0] == "-A -t 172.30.0.41:80 -s rr -p 300"
    default = make_plan(svc_yaml(extra="  sessionAffinity: ClientIP\n") + slice_yaml(endpoints=[("10.180.0.1", None)]))
    assert default.virtual_servers[0].add_line() == "-A -t 172.30.0.41:80 -s rr -p 10800"
    e = explain(default, "10.244.0.9", "tcp", "172.30.0.41", 80)
    assert e["affinity"]["timeout_seconds"] == 10800


def test_nodeport_on_every_node_ip():
    settings = NodeSettings("node-1", ["192.168.5.11", "10.244.0.1", "127.0.0.1"], cluster_cidr="10.244.0.0/16")
    p = make_plan(svc_yaml(type_="NodePort", port_extra=", nodePort: 3001")
                  + slice_yaml(endpoints=[("10.180.0.1", None)]), settings)
    assert [vs.key for vs in p.virtual_servers] == ["TCP 172.30.0.41:80", "TCP 192.168.5.11:3001",
                                                    "TCP 10.244.0.1:3001"]
    assert [vs.bind for vs in p.virtual_servers] == [True, False, False]   # node IPs are not bound to kube-ipvs0
    assert p.ipset(n.NODE_PORT_TCP).entries == ["3001"]
    assert p.dummy_addresses == ["172.30.0.41/32"]
    # --nodeport-addresses narrows them
    narrowed = make_plan(svc_yaml(type_="NodePort", port_extra=", nodePort: 3001"),
                         NodeSettings("node-1", ["192.168.5.11", "10.244.0.1"], nodeport_addresses=["192.168.5.0/24"]))
    assert [vs.key for vs in narrowed.virtual_servers] == ["TCP 172.30.0.41:80", "TCP 192.168.5.11:3001"]


LOCAL_LB = svc_yaml(type_="LoadBalancer", port_extra=", nodePort: 3001",
                    extra="  externalTrafficPolicy: Local\n  healthCheckNodePort: 30100\n"
                          "status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}")


def test_external_traffic_policy_local():
    p = make_plan(LOCAL_LB + slice_yaml(endpoints=[("10.180.0.1", "node-1"), ("10.180.1.1", "node-2")]))
    by_kind = {vs.kind: [str(rs) for rs in vs.real_servers] for vs in p.virtual_servers}
    assert by_kind == {"cluster IP": ["10.180.0.1:80", "10.180.1.1:80"],     # the ClusterIP ignores eTP
                       "loadbalancer IP": ["10.180.0.1:80"], "node port": ["10.180.0.1:80"]}
    assert p.ipset(n.LOAD_BALANCER_LOCAL).entries == ["1.2.3.4,tcp:80"]
    assert p.ipset(n.NODE_PORT_LOCAL_TCP).entries == ["3001"]
    assert p.ipset(n.HEALTH_CHECK_NODE_PORT).entries == ["30100"]
    assert p.ipset(n.LOOP_BACK).entries == ["10.180.0.1,tcp:80,10.180.0.1"]   # only local endpoints
    nat = p.iptables.nat_rules
    local_rule = ('-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port with '
                  'externalTrafficPolicy=local" -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN')
    assert nat.index(local_rule) < nat.index(
        '-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" '
        '-m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ')
    e = explain(p, "203.0.113.9", "tcp", "192.168.5.11", 3001)
    assert e["verdict"]["action"] == "DNAT"
    assert [c["endpoint"] for c in e["candidates"]] == ["10.180.0.1:80"]
    assert e["masquerade"]["applied"] is False                   # source IP kept
    lb = explain(p, "203.0.113.9", "tcp", "1.2.3.4", 80)
    assert lb["masquerade"]["applied"] is False and lb["service"]["address"] == "loadbalancer IP"


def test_external_traffic_policy_local_without_local_endpoints_falls_back():
    """Upstream IPVS mode (kubernetes#97081) uses the cluster-wide endpoints then, unmasqueraded."""
    p = make_plan(LOCAL_LB + slice_yaml(endpoints=[("10.180.1.1", "node-2")]))
    nodeport = p.virtual_server("192.168.5.11", 3001, "tcp")
    assert [str(rs) for rs in nodeport.real_servers] == ["10.180.1.1:80"]
    assert "kubernetes#97081" in nodeport.note
    e = explain(p, "203.0.113.9", "tcp", "192.168.5.11", 3001)
    assert e["masquerade"]["applied"] is False
    assert any("drops it" in note for note in e["notes"])


def test_internal_traffic_policy_local_without_local_endpoints_has_no_real_server():
    p = make_plan(svc_yaml(extra="  internalTrafficPolicy: Local\n")
                  + slice_yaml(endpoints=[("10.180.1.1", "node-2")]))
    assert p.virtual_servers[0].real_servers == []
    local = make_plan(svc_yaml(extra="  internalTrafficPolicy: Local\n")
                      + slice_yaml(endpoints=[("10.180.1.1", "node-2"), ("10.180.0.1", "node-1")]))
    assert [str(rs) for rs in local.virtual_servers[0].real_servers] == ["10.180.0.1:80"]


def test_no_endpoints_keeps_the_virtual_server_without_real_servers():
    """Upstream's TestClusterIPNoEndpoint / TestNodePortNoEndpoint: the virtual servers stay,
    with 0 destinations; the kernel then answers ICMP port unreachable."""
    p = make_plan(svc_yaml(type_="NodePort", port_extra=", nodePort: 3001"))
    assert [(vs.key, vs.real_servers) for vs in p.virtual_servers] == [
        ("TCP 172.30.0.41:80", []), ("TCP 192.168.5.11:3001", [])]
    assert p.ipvsadm_restore() == "-A -t 172.30.0.41:80 -s rr\n-A -t 192.168.5.11:3001 -s rr\n"
    assert p.ipset(n.CLUSTER_IP).entries == ["172.30.0.41,tcp:80"]
    e = explain(p, "10.244.0.9", "tcp", "172.30.0.41", 80)
    assert e["verdict"]["action"] == "REJECT"
    assert "ICMP port unreachable" in e["verdict"]["reason"]
    assert "connection refused" in e["verdict"]["reason"]
    assert e["candidates"] == []
    assert e["hops"][-1]["table"] == "ipvs" and e["hops"][-1]["verdict"] == "ICMP port unreachable"


def test_headless_and_external_name_are_skipped():
    text = svc_yaml(ip="None") + """
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: ns1}
spec: {type: ExternalName, externalName: example.com}
""" + slice_yaml(endpoints=[("10.180.0.1", None)])
    p = make_plan(text)
    assert p.virtual_servers == [] and p.dummy_addresses == []
    assert all(not s.entries for s in p.ipsets.values())
    assert p.ipvsadm_restore() == ""
    assert "KUBE-CLUSTER-IP dst,dst -j ACCEPT" not in p.iptables_restore()


def test_external_ips():
    p = make_plan(svc_yaml(extra="  externalIPs: [192.168.99.33, 192.168.5.11]\n")
                  + slice_yaml(endpoints=[("10.180.0.1", None)]))
    ext = [vs for vs in p.virtual_servers if vs.kind == "external IP"]
    assert [(vs.key, vs.bind) for vs in ext] == [("TCP 192.168.99.33:80", True), ("TCP 192.168.5.11:80", False)]
    assert p.ipset(n.EXTERNAL_IP).entries == ["192.168.5.11,tcp:80", "192.168.99.33,tcp:80"]
    assert p.dummy_addresses == ["172.30.0.41/32", "192.168.99.33/32"]
    head = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and '
            'filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst')
    nat = p.iptables.nat_rules
    assert nat[nat.index(head + " -j KUBE-MARK-MASQ") + 1:][:2] == [
        head + " -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
        head + " -m addrtype --dst-type LOCAL -j ACCEPT"]
    e = explain(p, "203.0.113.9", "tcp", "192.168.99.33", 80)
    assert e["verdict"]["action"] == "DNAT" and e["masquerade"]["applied"] is True


def test_load_balancer_source_ranges():
    lb = svc_yaml(type_="LoadBalancer", port_extra=", nodePort: 3001",
                  extra="  loadBalancerSourceRanges: [203.0.113.0/25]\n"
                        "status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}")
    p = make_plan(lb + slice_yaml(endpoints=[("10.180.0.1", None)]))
    assert p.ipset(n.LOAD_BALANCER_FW).entries == ["1.2.3.4,tcp:80"]
    assert p.ipset(n.LOAD_BALANCER_SOURCE_CIDR).entries == ["1.2.3.4,tcp:80,203.0.113.0/25"]
    assert p.ipset(n.LOAD_BALANCER_SOURCE_IP).entries == []
    # the node is outside the ranges: it may not reach the LB IP either (kubernetes#119656)
    assert "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP" \
        in p.iptables.filter_rules
    assert ('-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port for load '
            'balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst '
            '-j KUBE-SOURCE-RANGES-FIREWALL') in p.iptables.filter_rules
    allowed = explain(p, "203.0.113.9", "tcp", "1.2.3.4", 80)
    assert allowed["verdict"]["action"] == "DNAT"
    denied = explain(p, "198.51.100.7", "tcp", "1.2.3.4", 80)
    assert denied["verdict"]["action"] == "DROP"
    assert denied["hops"][-1]["rule"] == "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP"
    # a range holding the node IP lets the node in: a SOURCE-IP entry, no OUT-FILTER rule
    p2 = make_plan(lb.replace("203.0.113.0/25", "192.168.5.0/24") + slice_yaml(endpoints=[("10.180.0.1", None)]))
    assert p2.ipset(n.LOAD_BALANCER_SOURCE_IP).entries == ["1.2.3.4,tcp:80,1.2.3.4"]
    assert not any("KUBE-IPVS-OUT-FILTER -s" in r for r in p2.iptables.filter_rules)


def test_udp_and_sctp_nodeports():
    udp = make_plan(svc_yaml(type_="NodePort", port_extra=", nodePort: 3001", proto="UDP")
                    + slice_yaml(endpoints=[("10.180.0.1", None)], proto="UDP"))
    assert udp.ipset(n.NODE_PORT_UDP).entries == ["3001"]
    assert udp.ipvsadm_restore().splitlines()[0] == "-A -u 172.30.0.41:80 -s rr"
    assert udp.ipset(n.CLUSTER_IP).entries == ["172.30.0.41,udp:80"]
    sctp = make_plan(svc_yaml(type_="NodePort", port_extra=", nodePort: 3001", proto="SCTP")
                     + slice_yaml(endpoints=[("10.180.0.1", None)], proto="SCTP"))
    assert sctp.ipset(n.NODE_PORT_SCTP).entries == ["192.168.5.11,sctp:3001"]
    assert sctp.ipvsadm_restore().splitlines()[0] == "-A --sctp-service 172.30.0.41:80 -s rr"
    assert ('-A KUBE-NODE-PORT -p sctp -m comment --comment "Kubernetes nodeport SCTP port for masquerade purpose '
            "with type 'hash ip:port'\" -m set --match-set KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ") \
        in sctp.iptables.nat_rules


@pytest.mark.parametrize("scheduler,line", [
    ("rr", "-A -t 172.30.0.41:80 -s rr"), ("wrr", "-A -t 172.30.0.41:80 -s wrr"),
    ("lc", "-A -t 172.30.0.41:80 -s lc"), ("sh", "-A -t 172.30.0.41:80 -s sh"),
    ("mh", "-A -t 172.30.0.41:80 -s mh -b mh-port"),      # upstream sets FlagSourceHash for mh
])
def test_schedulers(scheduler, line):
    p = make_plan(svc_yaml() + slice_yaml(endpoints=[("10.180.0.1", None), ("10.180.0.2", None)]),
                  scheduler=scheduler)
    assert p.virtual_servers[0].add_line() == line
    e = explain(p, "10.244.0.9", "tcp", "172.30.0.41", 80)
    assert [c["probability"] for c in e["candidates"]] == [0.5, 0.5]
    assert e["hops"][-1]["note"].startswith(scheduler + ":")


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="unknown IPVS scheduler"):
        make_plan(svc_yaml(), scheduler="fastest")


@pytest.mark.parametrize("kernel,reuse", [("4.19.0-17-amd64", True), ("5.8.0", True), ("5.9.0", False),
                                          ("6.1.0-18-amd64", False), ("3.10.0", False)])
def test_sysctls(kernel, reuse):
    s = sysctls_for(kernel)
    assert s[n.SYSCTL_VS_CONNTRACK] == "1"
    assert s[n.SYSCTL_EXPIRE_NODEST_CONN] == "1" and s[n.SYSCTL_EXPIRE_QUIESCENT_TEMPLATE] == "1"
    assert s[n.SYSCTL_FORWARD] == "1"
    assert s[n.SYSCTL_ARP_IGNORE] == "1" and s[n.SYSCTL_ARP_ANNOUNCE] == "2"
    assert (s.get(n.SYSCTL_CONN_REUSE) == "0") is reuse
    assert n.SYSCTL_ARP_IGNORE not in sysctls_for(kernel, strict_arp=False)
    assert all(k.startswith("net.") for k in s)      # per-namespace sysctls only


def test_ipv6_set_names_and_family():
    text = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: NodePort
  clusterIP: fd00::41
  ipFamilies: [IPv6]
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv6
endpoints: [{addresses: ["fd00:10::1"]}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""
    p = make_plan(text, NodeSettings("node-1", ["fd00:5::11"], cluster_cidr="fd00:10::/64", ip_family="IPv6"))
    assert p.ipset(n.CLUSTER_IP).name == "KUBE-6-CLUSTER-IP"
    assert p.ipset(n.NODE_PORT_LOCAL_SCTP).name == "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"      # cut to 31
    assert all(len(s.name) <= 31 for s in p.ipsets.values())
    assert "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536" in p.ipset_restore()
    assert p.dummy_addresses == ["fd00::41/128"]
    assert p.ipvsadm_restore().splitlines()[:2] == ["-A -t [fd00::41]:80 -s rr",
                                                    "-a -t [fd00::41]:80 -r [fd00:10::1]:80 -m -w 1"]
    assert p.iptables.nat_rules[0] == "-A KUBE-SERVICES -s ::1/128 -j RETURN"


# --------------------------------------------------------------------------- explain


@needs_seed
def test_explain_wordpress_from_a_pod(stateful):
    e = explain(stateful, "10.244.0.9", "tcp", "10.96.0.2", 8080)
    assert e["backend"] == "ipvs" and e["schema_version"] == 1
    assert e["verdict"]["action"] == "DNAT"
    assert e["service"] == {"namespace": "default", "name": "wordpress", "port": "", "address": "cluster IP"}
    assert [(c["endpoint"], c["probability"]) for c in e["candidates"]] == [(ep, 0.25) for ep in WORDPRESS_EPS]
    assert sum(c["probability"] for c in e["candidates"]) == pytest.approx(1.0)
    assert e["virtual_server"]["key"] == "TCP 10.96.0.2:8080"
    assert e["virtual_server"]["persistent_timeout"] is None and e["affinity"] is None
    assert e["masquerade"]["applied"] is False                   # pod -> ClusterIP keeps its source
    assert e["flow"]["entry"] == "nat PREROUTING" and e["flow"]["from_node"] is False
    assert [h["chain"] for h in e["hops"]][:2] == ["PREROUTING", "KUBE-SERVICES"]
    assert e["hops"][-1]["table"] == "ipvs" and e["hops"][-1]["verdict"] == "schedule rr"
    assert e["candidates"][0]["hops"][0]["verdict"] == "DNAT to 10.244.0.3:80"


@needs_seed
def test_explain_wordpress_masquerade_decisions(stateful):
    outside = explain(stateful, "192.168.5.100", "tcp", "192.168.5.11", 30000)        # NodePort
    assert outside["masquerade"] == {"applied": True, "reason":
                                     "a NodePort with externalTrafficPolicy Cluster (KUBE-NODE-PORT-TCP)"}
    assert all(c["masquerade"] for c in outside["candidates"])
    assert outside["service"]["address"] == "node port"
    lb = explain(stateful, "192.168.5.100", "tcp", "192.168.5.241", 8080)
    assert lb["masquerade"]["applied"] is True and "KUBE-LOAD-BALANCER" in lb["masquerade"]["reason"]
    off_cluster = explain(stateful, "192.168.5.100", "tcp", "10.96.0.2", 8080)       # routed to the ClusterIP
    assert off_cluster["masquerade"]["applied"] is True and "KUBE-CLUSTER-IP" in off_cluster["masquerade"]["reason"]
    hairpin = explain(stateful, "10.244.0.4", "tcp", "10.96.0.2", 8080)
    assert [c["masquerade"] for c in hairpin["candidates"]] == [False, True, False, False]
    assert hairpin["masquerade"]["reason"].startswith("only when 10.244.0.4:80: hairpin")
    node = explain(stateful, "192.168.5.11", "tcp", "10.96.0.2", 8080)
    assert node["flow"]["from_node"] is True and node["flow"]["entry"] == "nat OUTPUT"
    assert node["verdict"]["action"] == "DNAT"


@needs_seed
def test_explain_wordpress_misses(stateful):
    wrong_port = explain(stateful, "10.244.0.9", "tcp", "10.96.0.2", 9999)
    assert wrong_port["verdict"]["action"] == "REJECT"
    assert "KUBE-IPVS-FILTER" in wrong_port["verdict"]["reason"]
    unallocated = explain(stateful, "10.244.0.9", "tcp", "10.96.0.99", 80)
    assert unallocated["verdict"]["action"] == "ACCEPT"
    assert unallocated["verdict"]["reason"].startswith("no virtual server")
    node_other_port = explain(stateful, "192.168.5.100", "tcp", "192.168.5.11", 22)
    assert node_other_port["verdict"]["action"] == "ACCEPT" and node_other_port["virtual_server"] is None
    with pytest.raises(ValueError):
        explain(stateful, "10.244.0.9", "icmp", "10.96.0.2", 8080)


@needs_seed
def test_explain_report_has_the_schema_keys(stateful):
    e = explain(stateful, "10.244.0.9", "tcp", "10.96.0.2", 8080)
    for key in ("schema_version", "source", "flow", "service", "hops", "candidates", "masquerade", "verdict",
                "affinity", "notes"):
        assert key in e
    for hop in e["hops"] + [h for c in e["candidates"] for h in c["hops"]]:
        assert set(hop) == {"table", "chain", "rule", "verdict", "note"}
    for c in e["candidates"]:
        assert {"endpoint", "probability", "chains", "hops", "masquerade"} <= set(c)
    validate(json.loads(json.dumps(e)))
    for args in (("10.244.0.9", "tcp", "10.96.0.2", 9999), ("192.168.5.100", "tcp", "192.168.5.11", 30000),
                 ("10.244.0.9", "udp", "10.96.0.99", 53)):
        validate(json.loads(json.dumps(explain(stateful, *args))))


def test_weights_give_the_shares_under_wrr():
    p = make_plan(svc_yaml() + slice_yaml(endpoints=[("10.180.0.1", None), ("10.180.0.2", None)]), scheduler="wrr")
    vs = p.virtual_servers[0]
    vs.real_servers[0] = type(vs.real_servers[0])(vs.real_servers[0].address, 80, weight=3)
    e = explain(p, "10.244.0.9", "tcp", "172.30.0.41", 80)
    assert [c["probability"] for c in e["candidates"]] == [0.75, 0.25]


def test_render_is_stable_and_plan_text_round_trips():
    text = svc_yaml() + slice_yaml(endpoints=[("10.180.0.2", None), ("10.180.0.1", None)])
    objs = objects(text)
    a = render(objs, objs, NODE)
    assert a == render(list(reversed(objs)), objs, NODE)
    p = make_plan(text)
    sections = split_sections(p.text())
    assert sections["ipset restore"] == p.ipset_restore()
    assert sections["ipvsadm restore"] == p.ipvsadm_restore()
    assert sections["iptables-restore"] == p.iptables_restore()
    assert [str(rs) for rs in p.virtual_servers[0].real_servers] == ["10.180.0.1:80", "10.180.0.2:80"]
