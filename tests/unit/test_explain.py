"""`kproxy.explain`: packet-flow tables in the style of upstream's proxier_test.go.

Each table (source, protocol, destination, port -> endpoints, masquerade) runs against
the rules kproxy renders for a fixture and against the same rules as the kernel prints
them back (``<case>.iptables-save.txt``, made by explain_fixtures/make_fixtures.py in a
throwaway namespace): both must give identical candidates, probabilities and verdicts.
The nftables tables run on upstream's TestOverallNFTablesRules ruleset in its three
forms (the ``nft -f`` script, ``nft list ruleset`` text, ``nft -j`` JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest

from kproxy.explain import explain, parse_ruleset
from kproxy.model import load
from kproxy.proxy.iptables import NodeSettings, render

HERE = Path(__file__).parent
FIX = HERE / "explain_fixtures"
GOLDEN = HERE / "golden" / "upstream"

TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP]
EXTERNAL_CLIENT = "203.0.113.2"
EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
POD = "10.0.1.99"

CASES: Dict[str, tuple] = {
    # name: (manifests, NodeSettings overrides)
    "flows": (FIX / "flows.yaml", {}),
    "overall": (GOLDEN / "overall.input.yaml", {"masquerade_mark": "0x4000", "random_fully": False}),
}


def settings(**overrides) -> NodeSettings:
    args = dict(node_name="test-node", node_ips=NODE_IPS, cluster_cidr="10.0.0.0/8")
    args.update(overrides)
    return NodeSettings(**args)


def case_payload(name: str) -> str:
    path, overrides = CASES[name]
    objs = [lo.obj for lo in load(str(path))]
    return render(objs, objs, settings(**overrides))


def saved(name: str) -> str:
    return (FIX / f"{name}.iptables-save.txt").read_text()


def output(report) -> str:
    """Upstream's tracePacket output: the endpoints, or the verdict when there are none
    (empty when no rule matched)."""
    if report.candidates:
        return ", ".join(c.endpoint for c in report.candidates)
    if report.verdict.reason == "no rule matched: not a Service address":
        return ""
    return report.verdict.action


def summary(report) -> tuple:
    return (tuple((c.endpoint, c.probability, c.masquerade) for c in report.candidates),
            report.verdict.action, report.verdict.reason, report.masquerade.applied,
            report.service.to_dict() if report.service else None)


def run_flows(ruleset, cases, node_ips=NODE_IPS) -> List:
    failures, reports = [], []
    for case in cases:
        if len(case) == 6:
            name, src, dst, port, want, masq = case
            proto = "tcp"
        else:
            name, src, proto, dst, port, want, masq = case
        r = explain(ruleset, src, proto, dst, port, node_ips)
        reports.append(r)
        if output(r) != want or r.masquerade.applied != masq:
            failures.append(f"{name}: got {output(r)!r} masq={r.masquerade.applied} ({r.verdict.reason}), "
                            f"want {want!r} masq={masq}")
    assert not failures, "\n".join(failures)
    return reports


# --------------------------------------------------------------------------- iptables

CASCADE = "10.0.1.1:8080, 10.0.1.2:8080, 10.0.2.3:8080"
NP = "10.0.1.4:80, 10.0.2.4:80"
FLOWS = [
    ("pod to ClusterIP: three endpoints", POD, "tcp", "172.30.1.3", 80, CASCADE, False),
    ("outside to ClusterIP is masqueraded", EXTERNAL_CLIENT, "tcp", "172.30.1.3", 80, CASCADE, True),
    ("node to ClusterIP is masqueraded", TEST_NODE_IP, "tcp", "172.30.1.3", 80, CASCADE, True),
    ("hairpin: an endpoint to its own Service", "10.0.1.2", "tcp", "172.30.1.3", 80, CASCADE, True),
    ("outside to NodePort (eTP Cluster)", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30080, NP, True),
    ("outside to NodePort on a secondary node IP", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP_ALT, 30080, NP, True),
    ("pod to NodePort (eTP Cluster)", POD, "tcp", TEST_NODE_IP, 30080, NP, True),
    ("localhost to NodePort", "127.0.0.1", "tcp", "127.0.0.1", 30080, NP, True),
    ("pod to the NodePort Service's ClusterIP", POD, "tcp", "172.30.1.4", 80, NP, False),
    ("eTP Local, no local endpoint: outside to LB", EXTERNAL_CLIENT, "tcp", "192.168.5.241", 80, "DROP", False),
    ("eTP Local, no local endpoint: outside to NodePort", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30081, "DROP",
     False),
    ("eTP Local, no local endpoint: pod to LB short-circuits", POD, "tcp", "192.168.5.241", 80, "10.0.2.5:80",
     False),
    ("eTP Local, no local endpoint: node to NodePort", TEST_NODE_IP, "tcp", TEST_NODE_IP, 30081, "10.0.2.5:80",
     True),
    ("eTP Local: outside to LB reaches the local endpoint only", EXTERNAL_CLIENT, "tcp", "192.168.5.242", 80,
     "10.0.1.6:80", False),
    ("eTP Local: outside to NodePort reaches the local endpoint only", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30083,
     "10.0.1.6:80", False),
    ("eTP Local: pod to LB reaches every endpoint", POD, "tcp", "192.168.5.242", 80, "10.0.1.6:80, 10.0.2.6:80",
     False),
    ("health check NodePort", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30084, "ACCEPT", False),
    ("no endpoints: pod to ClusterIP", POD, "tcp", "172.30.1.7", 80, "REJECT", False),
    ("no endpoints: outside to NodePort", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30085, "REJECT", False),
    ("session affinity", POD, "tcp", "172.30.1.8", 80, "10.0.1.8:80, 10.0.2.8:80", False),
    ("LB source range allows", EXTERNAL_CLIENT, "tcp", "192.168.5.243", 80, "10.0.2.9:80", True),
    ("LB source range blocks", EXTERNAL_CLIENT_BLOCKED, "tcp", "192.168.5.243", 80, "DROP", False),
    ("LB source ranges do not apply to the NodePort", EXTERNAL_CLIENT_BLOCKED, "tcp", TEST_NODE_IP, 30086,
     "10.0.2.9:80", True),
    ("UDP", POD, "udp", "172.30.1.10", 53, "10.0.1.10:53", False),
    ("TCP on the same port", POD, "tcp", "172.30.1.10", 53, "10.0.1.10:53", False),
    ("SCTP has no rule", POD, "sctp", "172.30.1.10", 53, "", False),
    ("not a Service address", POD, "tcp", "10.0.2.50", 80, "", False),
    ("a ClusterIP on another port", POD, "tcp", "172.30.1.3", 81, "", False),
]


@pytest.fixture(scope="module")
def flows_rulesets():
    return {"render": parse_ruleset(case_payload("flows")), "save": parse_ruleset(saved("flows"))}


@pytest.mark.parametrize("form", ["render", "save"])
def test_flows(flows_rulesets, form):
    rs = flows_rulesets[form]
    assert rs.source == ("kproxy-render" if form == "render" else "iptables-save")
    run_flows(rs, FLOWS)


def test_render_and_iptables_save_agree(flows_rulesets):
    """Same candidates (and probabilities), verdicts, masquerade and Service from the
    render and from the kernel's normalised copy of it."""
    for case in FLOWS:
        _, src, proto, dst, port, _, _ = case
        a = explain(flows_rulesets["render"], src, proto, dst, port, NODE_IPS)
        b = explain(flows_rulesets["save"], src, proto, dst, port, NODE_IPS)
        assert summary(a) == summary(b), case
        assert a.masquerade.reason == b.masquerade.reason, case


def test_agrees_with_the_render_tests_trace_packet(flows_rulesets):
    """kproxy.proxy.iptables.flow.trace_packet (the walker of the render's own tests)
    gives the same endpoints and masquerade for every flow."""
    from kproxy.proxy.iptables import trace_packet
    payload = case_payload("flows")
    for name, src, proto, dst, port, _, _ in FLOWS:
        t = trace_packet(payload, src, proto, dst, port, NODE_IPS)
        r = explain(flows_rulesets["render"], src, proto, dst, port, NODE_IPS)
        assert (t.output, t.masquerade) == (output(r), r.masquerade.applied), name


def test_iptables_save_fixture_is_normalised():
    text = saved("flows")
    assert "# Generated by iptables-save" in text
    assert "--probability 0.33333333349" in text and "-d 172.30.1.3/32" in text
    assert "--set-xmark 0x4000/0x4000" in text and "--rsource" in text


def test_probability_cascade(flows_rulesets):
    """Rules with 1/3, 1/2 and no probability: each endpoint gets 1/3."""
    for rs in flows_rulesets.values():
        r = explain(rs, POD, "tcp", "172.30.1.3", 80, NODE_IPS)
        assert [c.endpoint for c in r.candidates] == CASCADE.split(", ")
        for c in r.candidates:
            assert c.probability == pytest.approx(1 / 3, abs=1e-9)
        assert sum(c.probability for c in r.candidates) == pytest.approx(1.0, abs=1e-12)
        assert r.candidates[0].chains[:2] == ["PREROUTING", "KUBE-SERVICES"]
        assert r.candidates[0].chains[-1].startswith("KUBE-SEP-")
        assert r.service.port_name == "demo/three:http" and r.service.address == "cluster IP"
        assert r.verdict.action == "DNAT" and "one of 3 endpoints" in r.verdict.reason


def test_masquerade_reasons(flows_rulesets):
    rs = flows_rulesets["save"]
    r = explain(rs, EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30080, NODE_IPS)
    assert r.masquerade.applied and "externalTrafficPolicy Cluster" in r.masquerade.reason
    assert r.service.address == "node port"
    r = explain(rs, EXTERNAL_CLIENT, "tcp", "172.30.1.3", 80, NODE_IPS)
    assert "outside the cluster CIDR 10.0.0.0/8" in r.masquerade.reason
    r = explain(rs, POD, "tcp", "172.30.1.3", 80, NODE_IPS)
    assert not r.masquerade.applied and "inside the cluster CIDR" in r.masquerade.reason
    r = explain(rs, EXTERNAL_CLIENT, "tcp", "192.168.5.242", 80, NODE_IPS)
    assert not r.masquerade.applied and "Local" in r.masquerade.reason


def test_hairpin_masquerades_only_when_the_source_is_chosen(flows_rulesets):
    r = explain(flows_rulesets["render"], "10.0.1.2", "tcp", "172.30.1.3", 80, NODE_IPS)
    assert {c.endpoint: c.masquerade for c in r.candidates} == {
        "10.0.1.1:8080": False, "10.0.1.2:8080": True, "10.0.2.3:8080": False}
    assert r.masquerade.applied and r.masquerade.reason.startswith("only when 10.0.1.2:8080 is chosen: hairpin")


def test_verdict_reasons(flows_rulesets):
    rs = flows_rulesets["save"]
    cases = [
        (POD, "172.30.1.7", 80, "REJECT", "demo/empty:http has no endpoints"),
        (EXTERNAL_CLIENT, "192.168.5.241", 80, "DROP", "demo/remote-only:web has no local endpoints"),
        (EXTERNAL_CLIENT_BLOCKED, "192.168.5.243", 80, "DROP", "loadBalancerSourceRanges of demo/fw:http"),
        (POD, "10.0.2.50", 80, "ACCEPT", "no rule matched: not a Service address"),
        (EXTERNAL_CLIENT, TEST_NODE_IP, 30084, "ACCEPT", "health check node port of demo/local:web"),
    ]
    for src, dst, port, action, reason in cases:
        r = explain(rs, src, "tcp", dst, port, NODE_IPS)
        assert r.verdict.action == action and reason in r.verdict.reason, (dst, port, r.verdict)
        assert not r.candidates


def test_affinity_is_reported(flows_rulesets):
    for rs in flows_rulesets.values():
        r = explain(rs, POD, "tcp", "172.30.1.8", 80, NODE_IPS)
        assert r.affinity is not None and r.affinity.timeout_seconds == 600
        assert "the affinity entry decides for a returning client" in r.affinity.note
        assert [c.probability for c in r.candidates] == [0.5, 0.5]
        assert explain(rs, POD, "tcp", "172.30.1.3", 80, NODE_IPS).affinity is None


def test_hops_and_chains_name_the_rules(flows_rulesets):
    r = explain(flows_rulesets["save"], EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30080, NODE_IPS)
    chains = [h.chain for h in r.hops]
    assert chains[:3] == ["PREROUTING", "KUBE-SERVICES", "KUBE-NODEPORTS"]
    assert r.hops[0].verdict == "jump KUBE-SERVICES" and r.hops[0].table == "nat"
    for c in r.candidates:
        assert c.chains[2:4] == ["KUBE-NODEPORTS", "KUBE-EXT-3FI5PGKAZJQCM3EG"]
        assert c.hops[-1].verdict == "MASQUERADE" and c.hops[-1].chain == "KUBE-POSTROUTING"


def test_from_node_starts_in_output(flows_rulesets):
    r = explain(flows_rulesets["render"], TEST_NODE_IP, "tcp", "172.30.1.4", 80, NODE_IPS)
    assert r.flow.from_node and r.flow.entry == "nat OUTPUT"
    assert r.hops[0].chain == "OUTPUT"
    r = explain(flows_rulesets["render"], POD, "tcp", "172.30.1.4", 80, NODE_IPS, from_node=True)
    assert r.flow.from_node and r.hops[0].chain == "OUTPUT"


def test_overall_upstream_trace_packet():
    """upstream TestTracePacket on TestOverallIPTablesRules' rules, render and save."""
    cases = [
        ("no match", "10.0.0.2", "10.0.0.3", 80, "", False),
        ("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
        ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
        ("DROP", EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
        ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT", False),
        ("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
    ]
    a = run_flows(case_payload("overall"), cases)
    b = run_flows(saved("overall"), cases)
    assert [summary(x) for x in a] == [summary(x) for x in b]


def test_large_chain_index_gives_the_same_answer():
    """KUBE-SERVICES with many rules is indexed by destination; the answer is the one a
    plain scan gives."""
    from kproxy.explain import iptables as ipt
    text = case_payload("flows")
    rs = parse_ruleset(text)
    small = explain(rs, POD, "tcp", "172.30.1.3", 80, NODE_IPS)
    old = ipt.INDEX_MIN_RULES
    try:
        ipt.INDEX_MIN_RULES = 1
        indexed = explain(parse_ruleset(text), POD, "tcp", "172.30.1.3", 80, NODE_IPS)
        nodeport = explain(parse_ruleset(text), EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30080, NODE_IPS)
    finally:
        ipt.INDEX_MIN_RULES = old
    assert summary(small) == summary(indexed)
    assert output(nodeport) == NP


# --------------------------------------------------------------------------- nftables

NFT_NODE_IPS = [TEST_NODE_IP]


@pytest.fixture(scope="module")
def nft_rulesets():
    return {
        "script": parse_ruleset((FIX / "upstream_overall.nft").read_text()),
        "list": parse_ruleset((FIX / "upstream_overall.nft-list.txt").read_text()),
        "json": parse_ruleset((FIX / "upstream_overall.nft.json").read_text()),
    }


NFT_FLOWS = [
    ("no match", "10.0.0.2", "tcp", "10.0.0.3", 80, "", False),
    ("single endpoint", "10.0.0.2", "tcp", "172.30.0.41", 80, "10.180.0.1:80", False),
    ("multiple endpoints", "10.0.0.2", "tcp", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
    ("LOCAL, masquerade (eTP Local from the node)", TEST_NODE_IP, "tcp", "192.168.99.22", 80, "10.180.0.2:80", True),
    ("eTP Local without local endpoints: DROP", EXTERNAL_CLIENT, "tcp", "192.168.99.22", 80, "DROP", False),
    ("eTP Local NodePort without local endpoints: DROP", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 3001, "DROP", False),
    ("no endpoints: REJECT", "10.0.0.2", "tcp", "172.30.0.46", 80, "REJECT", False),
    ("ClusterIP, port with no Service: REJECT", "10.0.0.2", "tcp", "172.30.0.41", 443, "REJECT", False),
    ("unallocated ClusterIP: DROP", "10.0.0.2", "tcp", "172.30.0.50", 80, "DROP", False),
    ("UDP to a TCP-only ClusterIP: REJECT", "10.0.0.2", "udp", "172.30.0.41", 80, "REJECT", False),
    ("outside to NodePort (eTP Cluster)", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 3003, "10.180.0.3:80", True),
    ("outside to externalIP (eTP Cluster)", EXTERNAL_CLIENT, "tcp", "192.168.99.33", 80,
     "10.180.0.4:80, 10.180.0.5:80", True),
    ("outside to ClusterIP", EXTERNAL_CLIENT, "tcp", "172.30.0.41", 80, "10.180.0.1:80", True),
    ("hairpin", "10.180.0.1", "tcp", "172.30.0.41", 80, "10.180.0.1:80", True),
    ("LB source range allows", EXTERNAL_CLIENT, "tcp", "5.6.7.8", 80, "10.180.0.3:80", True),
    ("LB source range blocks", EXTERNAL_CLIENT_BLOCKED, "tcp", "5.6.7.8", 80, "DROP", False),
]


@pytest.mark.parametrize("form", ["script", "list", "json"])
def test_nft_flows(nft_rulesets, form):
    rs = nft_rulesets[form]
    assert rs.source == "nft"
    run_flows(rs, NFT_FLOWS, NFT_NODE_IPS)


def test_nft_forms_agree(nft_rulesets):
    for case in NFT_FLOWS:
        _, src, proto, dst, port, _, _ = case
        got = {form: summary(explain(rs, src, proto, dst, port, NFT_NODE_IPS)) for form, rs in nft_rulesets.items()}
        assert got["script"] == got["list"] == got["json"], case


def test_nft_details(nft_rulesets):
    rs = nft_rulesets["script"]
    r = explain(rs, "10.0.0.2", "tcp", "172.30.0.44", 80, NFT_NODE_IPS)
    assert [c.probability for c in r.candidates] == [0.5, 0.5]
    assert r.service.port_name == "ns4/svc4:p80" and r.service.address == "cluster IP"
    assert r.candidates[0].chains == ["nat-prerouting", "services", "service-LAUZTJTB-ns4/svc4/tcp/p80",
                                      "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"]
    r = explain(rs, "10.0.0.2", "tcp", "172.30.0.46", 80, NFT_NODE_IPS)
    assert r.verdict.reason == "ns6/svc6:p80 has no endpoints"
    r = explain(rs, EXTERNAL_CLIENT, "tcp", "192.168.99.22", 80, NFT_NODE_IPS)
    assert "ns2/svc2:p80 has no local endpoints" in r.verdict.reason
    r = explain(rs, EXTERNAL_CLIENT, "tcp", "5.6.7.8", 80, NFT_NODE_IPS)
    assert r.affinity is not None and r.affinity.timeout_seconds == 10800
    assert "externalTrafficPolicy Cluster" in r.masquerade.reason
    r = explain(rs, "10.180.0.1", "tcp", "172.30.0.41", 80, NFT_NODE_IPS)
    assert "hairpin" in r.masquerade.reason
    # Without node IPs the nodeport-ips set says which addresses are the node's.
    r = explain(rs, EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 3003, [])
    assert output(r) == "10.180.0.3:80" and r.flow.node_ips == [TEST_NODE_IP]


def test_nft_json_fixture_is_real_nft_output():
    data = json.loads((FIX / "upstream_overall.nft.json").read_text())
    assert data["nftables"][0].get("metainfo")
    assert (FIX / "upstream_overall.nft-list.txt").read_text().startswith("table ip kube-proxy {")


# --------------------------------------------------------------------------- API and report

def test_report_to_dict_and_text(flows_rulesets):
    r = explain(flows_rulesets["render"], POD, "tcp", "172.30.1.3", 80, NODE_IPS, node="test-node")
    d = r.to_dict()
    assert set(d) >= {"flow", "service", "hops", "candidates", "masquerade", "verdict", "source"}
    assert d["flow"] == {"src": POD, "proto": "tcp", "dst": "172.30.1.3", "dport": 80, "node": "test-node",
                         "from_node": False, "node_ips": NODE_IPS, "cluster_cidr": "10.0.0.0/8",
                         "entry": "nat PREROUTING"}
    assert d["service"] == {"namespace": "demo", "name": "three", "port": "http", "address": "cluster IP"}
    assert json.loads(json.dumps(d)) == d
    text = r.text()
    assert "demo/three:http" in text and "33.33% (1/3)" in text and "\x1b[" not in text
    assert "\x1b[" in r.text(color=True)


def test_bad_input():
    with pytest.raises(ValueError):
        parse_ruleset("hello world")
    rs = parse_ruleset(case_payload("flows"))
    with pytest.raises(ValueError):
        explain(rs, POD, "icmp", "172.30.1.3", 80, NODE_IPS)
    with pytest.raises(ValueError):
        explain(rs, POD, "tcp", "172.30.1.3", 70000, NODE_IPS)
    with pytest.raises(ValueError):
        explain(rs, "fd00::1", "tcp", "172.30.1.3", 80, NODE_IPS)


def test_unknown_matches_are_noted():
    text = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m physdev --physdev-is-bridged -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""
    r = explain(text, POD, "tcp", "10.0.2.50", 80, NODE_IPS)
    assert r.verdict.action == "DROP" and r.verdict.reason == "policy DROP of filter FORWARD"
    assert any("-m physdev" in n and "assumed not to match" in n for n in r.notes)


def _kind_like_node() -> str:
    """flows' iptables-save with what else a kind node has in nat: Docker's embedded DNS
    DNAT and kind-masq-agent (RETURN for the pod network, MASQUERADE for the rest), and a
    FORWARD policy DROP with an ACCEPT for the pod network."""
    text = saved("flows")
    text = text.replace(":FORWARD ACCEPT [0:0]", ":FORWARD DROP [0:0]")
    text = text.replace('-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible '
                        'service portals" -j KUBE-EXTERNAL-SERVICES\n',
                        '-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible '
                        'service portals" -j KUBE-EXTERNAL-SERVICES\n-A FORWARD -d 10.0.0.0/8 -j ACCEPT\n')
    nat_chains = ":DOCKER_OUTPUT - [0:0]\n:KIND-MASQ-AGENT - [0:0]\n"
    text = text.replace(":POSTROUTING ACCEPT [0:0]\n", ":POSTROUTING ACCEPT [0:0]\n" + nat_chains)
    text = text.replace(
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING\n',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING\n'
        '-A POSTROUTING -m addrtype ! --dst-type LOCAL -m comment --comment "kind-masq-agent: ensure nat '
        'POSTROUTING directs relevant traffic to the kind-masq-agent chain" -j KIND-MASQ-AGENT\n'
        '-A PREROUTING -d 172.18.0.1/32 -j DOCKER_OUTPUT\n'
        '-A DOCKER_OUTPUT -d 172.18.0.1/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.11:41017\n'
        '-A KIND-MASQ-AGENT -d 10.0.0.0/8 -m comment --comment "kind-masq-agent: local traffic is not subject '
        'to MASQUERADE" -j RETURN\n'
        '-A KIND-MASQ-AGENT -m comment --comment "kind-masq-agent: outbound traffic is subject to MASQUERADE '
        '(must be last in chain)" -j MASQUERADE\n')
    return text


def test_other_rules_on_a_real_node_are_walked_too():
    rs = parse_ruleset(_kind_like_node())
    run_flows(rs, [
        ("pod to ClusterIP: kind-masq-agent RETURNs for the pod network", POD, "tcp", "172.30.1.3", 80, CASCADE,
         False),
        ("outside to NodePort", EXTERNAL_CLIENT, "tcp", TEST_NODE_IP, 30080, NP, True),
        ("no endpoints", POD, "tcp", "172.30.1.7", 80, "REJECT", False),
    ])
    r = explain(rs, POD, "tcp", "8.8.8.8", 443, NODE_IPS)
    assert r.verdict.action == "DROP" and r.verdict.reason == "policy DROP of filter FORWARD"
    r = explain(rs, POD, "tcp", "172.18.0.1", 53, NODE_IPS)
    assert [c.endpoint for c in r.candidates] == ["127.0.0.11:41017"] and r.service is None
    assert r.candidates[0].chains == ["PREROUTING", "DOCKER_OUTPUT"]
    r = explain(rs, POD, "tcp", "10.0.2.50", 80, NODE_IPS)
    assert r.verdict.action == "ACCEPT" and not r.masquerade.applied
    assert not [n for n in r.notes if "cannot evaluate" in n]
