"""The pure parts of kproxy.kernel.ipvs: what a resync sends to ipset and ipvsadm
when the node already holds an older state (no root, no kernel)."""

from __future__ import annotations

from kproxy.kernel.ipvs import ipset_sync_text, ipvsadm_sync_text
from kproxy.model import loads
from kproxy.proxy.iptables import NodeSettings
from kproxy.proxy.ipvs import plan

SETTINGS = NodeSettings("node-1", ["192.168.5.11"], cluster_cidr="10.244.0.0/16")
TEXT = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2]}, {addresses: [10.244.1.3]}]
ports: [{name: http, port: 8080, protocol: TCP}]
"""


def web_plan(text: str = TEXT, **kwargs):
    objs = [lo.obj for lo in loads(text)]
    return plan(objs, objs, SETTINGS, **kwargs)


def test_ipvsadm_sync_from_an_empty_table_is_the_full_restore():
    p = web_plan()
    assert ipvsadm_sync_text(p, "") == p.ipvsadm_restore()


def test_ipvsadm_sync_of_the_same_table_is_empty():
    p = web_plan()
    assert ipvsadm_sync_text(p, p.ipvsadm_restore()) == ""


def test_ipvsadm_sync_sends_only_the_differences():
    old = web_plan(TEXT.replace("{addresses: [10.244.1.3]}", "{addresses: [10.244.1.9]}"))
    saved = old.ipvsadm_restore() + "-A -t 10.96.0.99:53 -s rr\n-a -t 10.96.0.99:53 -r 10.244.1.7:53 -m -w 1\n"
    new = web_plan(TEXT.replace("type: NodePort", "type: NodePort\n  sessionAffinity: ClientIP"), scheduler="rr")
    lines = ipvsadm_sync_text(new, saved).splitlines()
    assert lines == [
        "-D -t 10.96.0.99:53",
        "-E -t 10.96.0.10:80 -s rr -p 10800",
        "-d -t 10.96.0.10:80 -r 10.244.1.9:8080",
        "-a -t 10.96.0.10:80 -r 10.244.1.3:8080 -m -w 1",
        "-E -t 192.168.5.11:30080 -s rr -p 10800",
        "-d -t 192.168.5.11:30080 -r 10.244.1.9:8080",
        "-a -t 192.168.5.11:30080 -r 10.244.1.3:8080 -m -w 1",
    ]


def test_ipvsadm_sync_fixes_a_weight():
    p = web_plan()
    saved = p.ipvsadm_restore().replace("-r 10.244.1.2:8080 -m -w 1", "-r 10.244.1.2:8080 -m -w 0")
    assert ipvsadm_sync_text(p, saved).splitlines() == [
        "-e -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1", "-e -t 192.168.5.11:30080 -r 10.244.1.2:8080 -m -w 1"]


def test_ipset_sync_creates_every_set_and_fixes_entries():
    p = web_plan()
    first = ipset_sync_text(p, {})
    assert first.count("create ") == 17 and "del " not in first
    assert "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in first.splitlines()
    current = {s.name: set(s.entries) for s in p.ipsets.values()}
    assert [line for line in ipset_sync_text(p, current).splitlines() if not line.startswith("create ")] == []
    current["KUBE-CLUSTER-IP"] = {"10.96.0.11,tcp:80"}
    current["KUBE-NODE-PORT-TCP"] = set()
    changes = [line for line in ipset_sync_text(p, current).splitlines() if not line.startswith("create ")]
    assert changes == ["del KUBE-CLUSTER-IP 10.96.0.11,tcp:80", "add KUBE-CLUSTER-IP 10.96.0.10,tcp:80",
                       "add KUBE-NODE-PORT-TCP 30080"]
