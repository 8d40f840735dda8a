"""`kproxy trace` on live flows: the story must match what the kernel did, failures explained."""
from __future__ import annotations

import subprocess

import pytest

from kproxy.reconciler import current_view
from kproxy.trace import live, story
from tests.report_schema import validate
from tests.integration.test_services import BACKENDS, Lab, deployment, service

pytestmark = pytest.mark.root

SCHEMA_KEYS = {"source", "flow", "service", "hops", "candidates", "masquerade", "verdict", "trap",
               "conntrack", "packets", "trace_events", "later_packets", "probes", "path", "diagram"}


@pytest.fixture(params=BACKENDS)
def lab(request, make_cluster, tmp_path):
    c = make_cluster(nodes=2, backend=request.param)
    lab = Lab(c, tmp_path)
    yield lab
    lab.store.close()


def trace(lab, src, dst, **kw):
    services, slices = current_view(lab.c, lab.store)
    return story.build(live.run(lab.c, services, slices, src, dst, **kw))


def test_clusterip_story_matches_conntrack_and_captures(lab, tmp_path):
    lab.apply(deployment("web", 3) + service("web", 8080, 80))
    pcap = tmp_path / "flow.pcap"
    r = trace(lab, "client", "web", http=True, count=3, pcap=str(pcap))
    assert SCHEMA_KEYS <= set(r)
    validate(r)       # the same JSON Schema as `kproxy explain -o json`
    vip = lab.svc("web").cluster_ip
    assert r["verdict"]["action"] == "DNAT" and r["trap"]["before"] == f"{vip}:8080"
    assert r["trap"]["after"] in [c["endpoint"] for c in r["candidates"]]
    assert [round(c["probability"], 3) for c in r["candidates"]] == [0.333, 0.333, 0.333]
    assert r["chosen"]["endpoint"] == r["trap"]["after"]
    assert not r["masquerade"]["applied"]
    # three connections, each DNATed by its own first packet; the rest never saw nat
    flows = [c for c in r["conntrack"] if c["original"]["src"] == lab.client.ip and c["node"] == r["flow"]["node"]]
    assert len(flows) == 3 and all(c["dnat"] for c in flows)
    assert r["later_packets"]["count"] > 0 and r["later_packets"]["nat_walks"] == 2   # packet 1 of flows 2 and 3
    # the client's own capture shows the VIP on the wire, the endpoint's shows its own IP
    hops = {p["hop"] for p in r["path"]}
    assert "pod default/client eth0" in hops
    sent = next(p for p in r["path"] if p["hop"] == "pod default/client eth0" and p["flags"] == "S")
    assert sent["dst"] == f"{vip}:8080"
    ep_ip = r["trap"]["after"].split(":")[0]
    assert any(p["dst"].startswith(ep_ip + ":") and "client" not in p["hop"] for p in r["path"])
    reply = next(p for p in r["path"] if p["hop"] == "pod default/client eth0" and p["flags"] == "SA")
    assert reply["src"] == f"{vip}:8080", "the reply is un-NATed before the client sees it"
    assert all(p["ok"] for p in r["probes"]) and "pod: web-" in r["probes"][0]["answer"]
    out = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True)
    assert out.returncode == 0 and f"{vip}.8080" in out.stdout
    text = story.text(r)
    assert f"TRAP: {vip}:8080 -> " in text and "NAT is decided on the first packet only" in text


def test_no_endpoints_is_explained_as_the_reject_rule(lab):
    lab.apply(service("empty", 80))
    r = trace(lab, "client", "empty")
    assert r["verdict"] == {"action": "REJECT", "reason": "default/empty has no endpoints"}
    assert r["trap"] is None and not r["probes"][0]["ok"] and "Refused" in r["probes"][0]["error"]
    assert any("reject" in h["rule"] for h in r["hops"])


def test_target_port_nobody_listens_on_dnat_then_rst(lab):
    lab.apply(deployment("bad", 1) + service("bad", 80, 8081))
    r = trace(lab, "client", "bad")
    assert r["verdict"]["action"] == "DNAT" and r["trap"]["after"].endswith(":8081")
    assert r["refused_after_dnat"]
    ep_ip = r["trap"]["after"].split(":")[0]
    assert any(p["src"] == ep_ip and "R" in p.get("flags", "") for p in r["packets"]), "the pod answered RST"
    assert "nothing listens on" in story.text(r)


def test_external_traffic_policy_local_drop_and_cluster_masquerade(lab):
    lab.apply(deployment("loc", 1) + service("loc", 80, type_="NodePort", extra="  externalTrafficPolicy: Local"))
    [pod] = [p for p in lab.c.pods.values() if p.name.startswith("loc-")]
    other = next(n for n in lab.c.nodes if n.name != pod.node)
    np_ = lab.svc("loc").ports[0].node_port
    r = trace(lab, "external", f"node/{other.name}:{np_}", timeout=1.0)
    assert r["verdict"]["action"] == "DROP" and "has no local endpoints" in r["verdict"]["reason"]
    r = trace(lab, "external", f"node/{pod.node}:{np_}")
    assert r["verdict"]["action"] == "DNAT" and not r["masquerade"]["applied"]
    lab.apply(deployment("loc", 1) + service("loc", 80, type_="NodePort"))
    r = trace(lab, "external", f"node/{other.name}:{np_}")
    assert r["masquerade"]["applied"] and "externalTrafficPolicy Cluster" in r["masquerade"]["reason"]
    ct = next(c for c in r["conntrack"] if c["node"] == other.name and c["original"]["sport"] == r["flow"]["sport"])
    assert ct["snat"] and ct["reply"]["dst"] == other.ip


def test_hairpin_is_masqueraded(lab):
    lab.apply(deployment("hp", 1) + service("hp", 80))
    [pod] = [p for p in lab.c.pods.values() if p.name.startswith("hp-")]
    r = trace(lab, pod.name, "hp")
    assert r["trap"]["after"] == f"{pod.ip}:80"
    assert r["masquerade"]["applied"] and "hairpin" in r["masquerade"]["reason"]
    assert r["probes"][0]["ok"]


def test_udp_and_headless(lab):
    lab.apply(deployment("u", 1, image="example/udp", port=5353).replace("containerPort: 5353}",
                                                                       "containerPort: 5353, protocol: UDP}")
              + service("u", 53, 5353).replace("targetPort: 5353", "targetPort: 5353, protocol: UDP")
              + "\n---" + deployment("db", 1, image="mysql", port=3306) + """
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 3306}]}
""")
    r = trace(lab, "client", "u", udp=True)
    assert r["flow"]["proto"] == "udp" and r["verdict"]["action"] == "DNAT" and r["probes"][0]["ok"]
    r = trace(lab, "client", "db")
    assert r["flow"]["kind"] == "Headless" and r["trap"] is None and r["probes"][0]["ok"]
    assert not any(h["chain"].startswith("KUBE-SVC-") for h in r["hops"])
