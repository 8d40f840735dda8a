"""Golden and packet-flow tests of the iptables render, after upstream's proxier_test.go.

Fixtures under golden/upstream/ are upstream's inputs (as manifests) and expected
outputs (already in upstream's sorted form); outputs are compared after
``sort_like_upstream``, as upstream compares them. One case (golden/stateful_app) is
compared byte for byte in emission order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, List, Optional, Set

import pytest

from kproxy.model import loads, load
from kproxy.proxy.iptables import (NodeSettings, parse_dump, render, render_payload,
                                   sort_like_upstream, trace_packet)
from kproxy.proxy.iptables import names
from kproxy.proxy.iptables.jumps import JUMP_RULES, KUBELET_JUMP_RULES, all_jump_rules
from kproxy.proxy.types import ServicePortName

GOLDEN = Path(__file__).parent / "golden"
UPSTREAM = GOLDEN / "upstream"

TEST_NODE = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPV6 = "2001:db8::1"
TEST_NODE_IPV6_ALT = "2001:db8:1::2"
TEST_NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, TEST_NODE_IPV6, TEST_NODE_IPV6_ALT]
EXTERNAL_CLIENT = "203.0.113.2"
EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"


def fake_proxier(**overrides) -> NodeSettings:
    """Upstream's NewFakeProxier: pod CIDR 10.0.0.0/8, mark 0x4000, nfacct counters
    present, no --random-fully (the fake iptables lacks it)."""
    ipv6 = overrides.get("ip_family") == "IPv6"
    args = dict(node_name=TEST_NODE, node_ips=TEST_NODE_IPS,
                cluster_cidr="fd00:10::/64" if ipv6 else "10.0.0.0/8",
                masquerade_mark="0x4000", random_fully=False, nfacct=True)
    args.update(overrides)
    return NodeSettings(**args)


def objects(text: str, validate: bool = True) -> list:
    return [lo.obj for lo in loads(text, validate=validate)]


def fixture(name: str, validate: bool = True) -> list:
    return [lo.obj for lo in load(str(UPSTREAM / name), validate=validate)]


def check_rule_jumps(payload: str) -> None:
    """Upstream's checkIPTablesRuleJumps: every jump target and every filled chain is
    declared, every jumped-to chain has rules, and no declared chain is unused."""
    builtin = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
    top = {"KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
           "KUBE-FORWARD", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"}
    for table in re.split(r"^COMMIT$", payload, flags=re.M)[:-1]:
        lines = table.strip().splitlines()
        created = {m.group(1) for m in (re.match(r"^:(\S+)", l) for l in lines) if m}
        created -= {m.group(1) for m in (re.search(r"-X (\S+)", l) for l in lines) if m}
        filled = {m.group(1) for m in (re.search(r"-A (\S+)", l) for l in lines) if m}
        jumped = {m.group(1) for m in (re.search(r"-j (\S+)", l) for l in lines) if m} - builtin
        assert not (jumped - created) and not (filled - created), (lines[0], jumped - created, filled - created)
        assert not (jumped - filled - {"KUBE-NODEPORTS"}), (lines[0], jumped - filled)
        assert not (created - jumped - top), (lines[0], created - jumped - top)


def assert_golden(payload: str, path: Path, consistency: bool = True) -> None:
    assert sort_like_upstream(payload) == path.read_text()
    if consistency:
        check_rule_jumps(payload)


def flows(payload: str, cases, node_ips=TEST_NODE_IPS) -> None:
    """Upstream's runPacketFlowTests: (name, source, [protocol,] dest, port, output, masq)."""
    failures = []
    for case in cases:
        if len(case) == 6:
            name, src, dst, port, output, masq = case
            proto = "tcp"
        else:
            name, src, proto, dst, port, output, masq = case
        got = trace_packet(payload, src, proto, dst, port, node_ips)
        if got.output != output or got.masquerade != masq:
            failures.append(f"{name}: got {got.output!r} masq={got.masquerade}, want {output!r} "
                            f"masq={masq}\n  " + "\n  ".join(got.matches))
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("spn,proto,endpoint,chain", [
    ("ns1/svc1:p80", "tcp", None, "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ("ns1/svc1:p80", "tcp", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
    ("default/kubernetes:https", "tcp", None, "KUBE-SVC-NPX46M4PTMTKRN6Y"),
    ("kube-system/kube-dns:dns", "udp", None, "KUBE-SVC-TCOU7JCQXEZGVUNU"),
    ("ns1/svc1", "tcp", None, "KUBE-SVC-AQI2S6QIMU7PVVRP"),
])
def test_chain_name_hashes_from_the_doc(spn, proto, endpoint, chain):
    if endpoint is None:
        assert names.svc_chain(spn, proto) == chain
        h = chain[len("KUBE-SVC-"):]
        assert (names.svl_chain(spn, proto), names.ext_chain(spn, proto), names.fw_chain(spn, proto)) == (
            "KUBE-SVL-" + h, "KUBE-EXT-" + h, "KUBE-FW-" + h)
    else:
        assert names.sep_chain(spn, proto, endpoint) == chain


def test_chain_names_use_lower_case_protocol_and_service_port_name_string():
    assert names.svc_chain("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert str(ServicePortName("ns1", "svc1", "p80", "TCP")) == "ns1/svc1:p80"
    assert str(ServicePortName("ns1", "svc1", "", "UDP")) == "ns1/svc1"


def test_compute_probability_like_upstream():
    expected = {1: "1.0000000000", 2: "0.5000000000", 3: "0.3333333333", 7: "0.1428571429",
                10: "0.1000000000", 100: "0.0100000000", 1000: "0.0010000000",
                10000: "0.0001000000", 100000: "0.0000100000", 100001: "0.0000099999"}
    for n, text in expected.items():
        assert names.probability(n) == text
    previous = 0.0
    for n in range(100000, 1, -1):
        value = float(names.probability(n))
        assert value > previous
        previous = value


def test_masquerade_mark_is_formatted_like_go():
    assert names.masquerade_mark(14) == "0x00004000"
    assert NodeSettings("n", masquerade_bit=10).mark == "0x00000400"


# --------------------------------------------------------------------------- goldens


def test_overall_iptables_rules():
    """upstream TestOverallIPTablesRules"""
    objs = fixture("overall.input.yaml")
    assert_golden(render(objs, objs, fake_proxier()), UPSTREAM / "overall.expected.txt")


def test_bad_ips_are_canonicalised():
    """upstream TestBadIPs"""
    objs = fixture("bad_ips.input.yaml", validate=False)
    assert_golden(render(objs, objs, fake_proxier()), UPSTREAM / "bad_ips.expected.txt")


def test_sort_like_upstream_matches_upstream_sorter():
    """upstream TestSortIPTablesRules, "basic test using each match type"."""
    assert sort_like_upstream((UPSTREAM / "sort.input.txt").read_text()) == (UPSTREAM / "sort.expected.txt").read_text()


class KernelModel:
    """The nat chains the kernel holds between restores (what iptables-save would list)."""

    def __init__(self) -> None:
        self.chains: Set[str] = set()

    def restore(self, payload: str) -> None:
        dump = parse_dump(payload)
        nat = dump.table("nat")
        self.chains |= {c.name for c in nat.chains}
        self.chains -= {c.name for c in nat.chains if c.deleted}


REPEATED_BASE = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc2, namespace: ns2}
spec: {clusterIP: 172.30.0.42, ports: [{name: p8080, port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.0.1.1]}]
ports: [{name: p80, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc2-1, namespace: ns2, labels: {kubernetes.io/service-name: svc2}}
addressType: IPv4
endpoints: [{addresses: [10.0.2.1]}]
ports: [{name: p8080, port: 8080, protocol: TCP}]
"""


def _svc(ns, name, ip, port_name, port):
    return objects(f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec: {{clusterIP: {ip}, ports: [{{name: {port_name}, port: {port}}}]}}
""")[0]


def _slice(ns, svc, port_name, port, *ips, slice_name=None):
    eps = ", ".join(f"{{addresses: [{ip}]}}" for ip in ips)
    return objects(f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {slice_name or svc + '-1'}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: {port_name}, port: {port}, protocol: TCP}}]
""")[0]


def test_sync_proxy_rules_repeated_partial_syncs():
    """upstream TestSyncProxyRulesRepeated: a full sync, then partial syncs that write
    only the changed services' chains and delete stale ones, then a failed partial sync
    (kept out of the kernel model) and the full resync that follows it."""
    settings = fake_proxier()
    kernel = KernelModel()
    base = objects(REPEATED_BASE)
    services = {(s.namespace, s.name): s for s in base if s.kind == "Service"}
    slices = {(s.namespace, s.name): s for s in base if s.kind == "EndpointSlice"}

    def sync(step: int, changed, existing: Optional[Iterable[str]] = None) -> str:
        payload = render(services.values(), slices.values(), settings, changed=changed,
                         existing_chains=kernel.chains if existing is None else existing)
        assert_golden(payload, UPSTREAM / f"repeated.step{step}.expected.txt", consistency=changed is None)
        kernel.restore(payload)
        return payload

    sync(1, None)
    services[("ns3", "svc3")] = _svc("ns3", "svc3", "172.30.0.43", "p80", 80)
    slices[("ns3", "svc3-1")] = _slice("ns3", "svc3", "p80", 80, "10.0.3.1")
    sync(2, {"ns3/svc3"})
    del services[("ns2", "svc2")]
    sync(3, {ServicePortName("ns2", "svc2", "p8080", "TCP")})
    services[("ns4", "svc4")] = _svc("ns4", "svc4", "172.30.0.44", "p80", 80)
    sync(4, {"ns4/svc4"})
    slices[("ns4", "svc4-1")] = _slice("ns4", "svc4", "p80", 80, "10.0.4.1")
    sync(5, {"ns4/svc4"})
    slices[("ns3", "svc3-1")] = _slice("ns3", "svc3", "p80", 80, "10.0.3.2")
    sync(6, {"ns3/svc3"})
    slices[("ns3", "svc3-1")] = _slice("ns3", "svc3", "p80", 80, "10.0.3.2", "10.0.3.3")
    sync(7, {"ns3/svc3"})
    sync(8, set())

    # Step 9: deleting svc4 in a partial sync. Upstream makes the restore fail (a foreign
    # rule still jumps to svc4's endpoint chain); the payload asks to delete its chains.
    del services[("ns4", "svc4")]
    failed = render(services.values(), slices.values(), settings, changed={"ns4/svc4"},
                    existing_chains=kernel.chains)
    assert "-X KUBE-SEP-AYCN5HPXMIRJNJXU" in failed and "-X KUBE-SVC-4SW47YFZTEDKD3PK" in failed
    assert ":KUBE-SVC-X27LE4BHSL4DOUIK" not in failed        # svc3's chains are not rewritten
    # Step 10: so the next sync is a full one, and it deletes svc4's chains.
    sync(10, None)


def test_partial_sync_accepts_service_port_names_and_strings_and_keeps_capture_rules():
    objs = objects(REPEATED_BASE)
    full = render_payload(objs, objs, fake_proxier())
    partial = render_payload(objs, objs, fake_proxier(), changed=[ServicePortName("ns1", "svc1", "p80")])
    assert not partial.full_sync and full.full_sync
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in partial.nat_chains
    assert ":KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]" not in partial.nat_chains
    # the unchanged service is still captured in KUBE-SERVICES, and still counted active
    assert any("ns2/svc2:p8080 cluster IP" in r and r.startswith("-A KUBE-SERVICES") for r in partial.nat_rules)
    assert partial.active_nat_chains == full.active_nat_chains
    assert partial.filter_rules == full.filter_rules


def test_stale_chain_cleanup_ignores_foreign_chains():
    objs = objects(REPEATED_BASE)
    existing = {"KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-MARK-DROP",
                "MY-CHAIN", "KUBE-XLB-CCCCCCCCCCCCCCCC", "KUBE-SVC-XPGD46QRK7WJZT7O"}
    payload = render_payload(objs, objs, fake_proxier(), existing_chains=existing)
    assert payload.deleted_chains == ["KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-SVC-AAAAAAAAAAAAAAAA"]
    assert payload.nat_rules[-3:-1] == ["-X KUBE-SEP-BBBBBBBBBBBBBBBB", "-X KUBE-SVC-AAAAAAAAAAAAAAAA"]
    assert payload.nat_rules[-1].startswith("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports")


def _large_slice(ns, svc, port_name, port, prefix, count):
    eps = ", ".join(f"{{addresses: [{prefix}.{i % 256}.{i // 256}]}}" for i in range(count))
    return objects(f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: {port_name}, port: {port}, protocol: TCP}}]
""")[0]


def _count_endpoints(payload: str, match: str):
    matched, endpoints, comments = "", 0, 0
    for line in payload.splitlines():
        if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line:
            endpoints += 1
            comments += "--comment" in line
            if match in line:
                matched = line
    return matched, endpoints, comments


def test_large_cluster_mode_drops_comments():
    """upstream TestSyncProxyRulesLargeClusterMode"""
    settings = fake_proxier(masquerade_all=True)
    services = [_svc("ns1", "svc1", "172.30.0.41", "p80", 80),
                _svc("ns2", "svc2", "172.30.0.42", "p8080", 8080),
                _svc("ns3", "svc3", "172.30.0.43", "p8081", 8081)]
    half = names.LARGE_CLUSTER_ENDPOINTS_THRESHOLD // 2 - 1
    slices = [_large_slice("ns1", "svc1", "p80", 80, "10.0", half),
              _large_slice("ns2", "svc2", "p8080", 8080, "10.1", half)]
    kernel = KernelModel()

    out = render_payload(services, slices, settings, existing_chains=kernel.chains)
    kernel.restore(out.text)
    first, n, comments = _count_endpoints(out.text, "10.0.0.0")
    assert first == ("-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp "
                     "-j DNAT --to-destination 10.0.0.0:80")
    assert n == 2 * half and comments == n and not out.large_cluster_mode

    slices.append(_slice("ns3", "svc3", "p8081", 8081, "203.0.113.4", "203.0.113.8", "203.0.113.12"))
    out = render_payload(services, slices, settings, changed={"ns3/svc3"}, existing_chains=kernel.chains)
    kernel.restore(out.text)
    first, n, comments = _count_endpoints(out.text, "203.0.113.4")
    assert first == "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
    assert (n, comments) == (3, 0) and out.large_cluster_mode
    assert '--comment "ns3/svc3:p8081 -> ' not in out.text        # dispatch comments dropped too

    out = render_payload(services, slices, settings, existing_chains=kernel.chains)
    first, n, comments = _count_endpoints(out.text, "10.0.0.0")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert (n, comments) == (2 * half + 3, 0)
    # capture rules keep their comments in large-cluster mode
    assert '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP"' in out.text

    services.append(_svc("ns4", "svc4", "172.30.0.44", "p8082", 8082))
    slices.append(_slice("ns4", "svc4", "p8082", 8082, "10.4.0.1"))
    out = render_payload(services, slices, settings, changed={"ns4/svc4"}, existing_chains=kernel.chains)
    kernel.restore(out.text)
    svc4, n, _ = _count_endpoints(out.text, "10.4.0.1")
    assert svc4 == "-A KUBE-SEP-SU5STNODRYEWJAUF -m tcp -p tcp -j DNAT --to-destination 10.4.0.1:8082"
    assert n == 1

    # Deleting svc4: within the stale-scan period kube-proxy does not look for stale
    # chains (existing_chains=None here) ...
    services.pop()
    out = render_payload(services, slices, settings, changed={"ns4/svc4"})
    assert _count_endpoints(out.text, "10.4.0.1")[:2] == ("", 0) and "-X " not in out.text
    # ... and the next scan deletes them.
    out = render_payload(services, slices, settings, changed={"ns4/svc4"}, existing_chains=kernel.chains)
    assert "-X KUBE-SVC-EBDQOQU5SJFXRIL3" in out.text and "-X KUBE-SEP-SU5STNODRYEWJAUF" in out.text


def test_stateful_app_exact_emission_order():
    """The seed's Stateful-app on one node, byte for byte in upstream's emission order
    (KUBE-FIREWALL, per-service blocks, -X, the final KUBE-SERVICES jump, KUBE-FORWARD)."""
    from kproxy.render import render_manifests

    seed = Path("/work/shared/seed-exercise/sesiones/Sesion4-Kubernetes/Stateful-app")
    if not seed.is_dir():
        pytest.skip("seed exercise not available")
    assert render_manifests(str(seed)) == (GOLDEN / "stateful_app.iptables.txt").read_text()


# --------------------------------------------------------------------------- fixed rules


def test_masquerade_rule_random_fully():
    """upstream TestMasqueradeRule"""
    for random_fully in (False, True):
        out = render_payload([], [], fake_proxier(random_fully=random_fully))
        rules = [r for r in out.nat_rules if r.startswith("-A KUBE-POSTROUTING")]
        assert rules == [
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
            + (" --random-fully" if random_fully else ""),
        ]


@pytest.mark.parametrize("nfacct,liberal,drop", [
    (False, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
    (True, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"),
    (False, True, None),
])
def test_drop_invalid_rule(nfacct, liberal, drop):
    """upstream TestDropInvalidRule"""
    out = render_payload([], [], fake_proxier(nfacct=nfacct, conntrack_tcp_be_liberal=liberal))
    forward = [r for r in out.filter_rules if r.startswith("-A KUBE-FORWARD")]
    assert forward == ([drop] if drop else []) + [
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
    ]


def test_default_settings_write_kube_proxy_mark_and_random_fully_without_nfacct():
    text = render([], [], NodeSettings("node-1", ["192.168.5.11"], cluster_cidr="10.244.0.0/16"))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000" in text
    assert "-j MASQUERADE --random-fully" in text
    assert "nfacct" not in text


def test_empty_payload_layout():
    text = render([], [], fake_proxier(nfacct=False))
    assert text == "\n".join([
        "*filter",
        ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]", ":KUBE-FORWARD - [0:0]",
        ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-FIREWALL - [0:0]",
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP',
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
        "COMMIT",
        "*nat",
        ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        "COMMIT", ""])


def test_jump_rules_as_data():
    rows = [(j.table, j.chain, j.target) for j in JUMP_RULES]
    assert rows[0] == ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES")
    assert rows[-1] == ("nat", "POSTROUTING", "KUBE-POSTROUTING")
    assert len(JUMP_RULES) == 12 and len(all_jump_rules()) == 14
    assert JUMP_RULES[0].check_argv() == [
        "-t", "filter", "-C", "INPUT", "-m", "conntrack", "--ctstate", "NEW", "-m", "comment",
        "--comment", "kubernetes externally-visible service portals", "-j", "KUBE-EXTERNAL-SERVICES"]
    assert JUMP_RULES[2].insert_argv() == [
        "-t", "filter", "-I", "INPUT", "-m", "comment", "--comment",
        "kubernetes health check service ports", "-j", "KUBE-NODEPORTS"]
    assert KUBELET_JUMP_RULES[0].args() == ["-j", "KUBE-FIREWALL"]
    # prepending in table order leaves filter INPUT reading top-down like a fresh node
    chain: List[str] = []
    for j in all_jump_rules():
        if (j.table, j.chain) == ("filter", "INPUT"):
            chain.insert(0, j.target)
    assert chain == ["KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"]


# --------------------------------------------------------------------------- per-service shapes


TWO_PORTS = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  clusterIP: 172.30.0.41
  ports: [{name: p80, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: ENDPOINTS
ports: [{name: p80, port: 80, protocol: TCP}]
"""


def _dispatch(payload: str, chain: str = "KUBE-SVC-XPGD46QRK7WJZT7O") -> List[str]:
    return [l for l in payload.splitlines() if l.startswith(f"-A {chain} ") and "KUBE-SEP-" in l]


@pytest.mark.parametrize("count,probabilities", [
    (2, ["0.5000000000"]),
    (3, ["0.3333333333", "0.5000000000"]),
    (7, ["0.1428571429", "0.1666666667", "0.2000000000", "0.2500000000", "0.3333333333", "0.5000000000"]),
])
def test_probability_cascade(count, probabilities):
    eps = "[" + ", ".join(f"{{addresses: [10.180.0.{i + 1}]}}" for i in range(count)) + "]"
    objs = objects(TWO_PORTS.replace("ENDPOINTS", eps))
    rules = _dispatch(render(objs, objs, fake_proxier()))
    assert [re.search(r"--probability (\S+)", r).group(1) for r in rules[:-1]] == probabilities
    assert "statistic" not in rules[-1] and len(rules) == count
    assert [re.search(r"-> (\S+)\"", r).group(1) for r in rules] == [f"10.180.0.{i + 1}:80" for i in range(count)]


def test_endpoint_order_is_by_string_not_by_address():
    eps = "[{addresses: [10.180.0.1]}, {addresses: [10.180.0.11]}, {addresses: [10.180.0.2]}]"
    objs = objects(TWO_PORTS.replace("ENDPOINTS", eps))
    rules = _dispatch(render(objs, objs, fake_proxier()))
    assert [re.search(r"-> (\S+)\"", r).group(1) for r in rules] == [
        "10.180.0.11:80", "10.180.0.1:80", "10.180.0.2:80"]


def test_affinity_rules_come_first_and_set_on_dnat():
    eps = "[{addresses: [10.180.0.1]}, {addresses: [10.180.0.2]}]"
    text = TWO_PORTS.replace("ENDPOINTS", eps).replace(
        "ports: [{name: p80, port: 80}]",
        "ports: [{name: p80, port: 80}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}", 1)
    objs = objects(text)
    payload = render(objs, objs, fake_proxier())
    rules = _dispatch(payload)
    sep1 = names.sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80")
    sep2 = names.sep_chain("ns1/svc1:p80", "tcp", "10.180.0.2:80")
    assert rules == [
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name {sep1} --rcheck --seconds 300 --reap -j {sep1}',
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m recent --name {sep2} --rcheck --seconds 300 --reap -j {sep2}',
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j {sep1}',
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j {sep2}',
    ]
    assert (f"-A {sep1} -m comment --comment ns1/svc1:p80 -m recent --name {sep1} --set -m tcp -p tcp "
            f"-j DNAT --to-destination 10.180.0.1:80") in payload


def test_affinity_default_timeout_is_10800():
    text = TWO_PORTS.replace("ENDPOINTS", "[{addresses: [10.180.0.1]}]").replace(
        "ports: [{name: p80, port: 80}]", "ports: [{name: p80, port: 80}]\n  sessionAffinity: ClientIP", 1)
    objs = objects(text)
    assert "--rcheck --seconds 10800 --reap" in render(objs, objs, fake_proxier())


def test_hairpin_rule_and_flow():
    objs = objects(TWO_PORTS.replace("ENDPOINTS", "[{addresses: [10.180.0.1]}]"))
    payload = render(objs, objs, fake_proxier())
    assert "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ" in payload
    flows(payload, [
        ("pod to itself via the service is masqueraded", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("other pod is not", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
    ])


def test_no_local_detector_and_masquerade_all_change_the_internal_masquerade_rule():
    objs = objects(TWO_PORTS.replace("ENDPOINTS", "[{addresses: [10.180.0.1]}]"))
    head = '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80'
    assert f"{head} ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ" in render(objs, objs, fake_proxier())
    assert f"{head} -j KUBE-MARK-MASQ" in render(objs, objs, fake_proxier(masquerade_all=True))
    assert head not in render(objs, objs, fake_proxier(cluster_cidr=None))
    assert f"{head} ! -i cni0 -j KUBE-MARK-MASQ" in render(objs, objs, fake_proxier(local_bridge="cni0"))
    assert f"{head} ! -i veth+ -j KUBE-MARK-MASQ" in render(objs, objs, fake_proxier(local_interface_prefix="veth"))


def test_headless_and_external_name_services_get_no_rules():
    objs = objects("""
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: ns1}
spec: {clusterIP: None, ports: [{port: 3306}], selector: {app: db}}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: ns1}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: headless-1, namespace: ns1, labels: {kubernetes.io/service-name: headless}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.9]}]
ports: [{name: "", port: 3306, protocol: TCP}]
""")
    assert render(objs, objs, fake_proxier()) == render([], [], fake_proxier())


def test_unnamed_port_and_udp():
    objs = objects("""
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
ports: [{name: "", port: 53, protocol: UDP}]
""")
    payload = render(objs, objs, fake_proxier())
    chain = names.svc_chain("kube-system/dns", "udp")
    assert (f'-A KUBE-SERVICES -m comment --comment "kube-system/dns cluster IP" -m udp -p udp '
            f"-d 10.96.0.10 --dport 53 -j {chain}") in payload
    flows(payload, [("udp", "10.0.0.2", "udp", "10.96.0.10", 53, "10.244.0.5:53", False),
                    ("tcp does not match", "10.0.0.2", "tcp", "10.96.0.10", 53, "", False)])


# --------------------------------------------------------------------------- packet flows


def test_trace_packet_static_rules():
    """upstream TestTracePacket, against the rules of TestOverallIPTablesRules."""
    objs = fixture("overall.input.yaml")
    payload = render(objs, objs, fake_proxier())
    flows(payload, [
        ("no match", "10.0.0.2", "10.0.0.3", 80, "", False),
        ("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
        ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
        ("DROP", EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
        ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT", False),
        ("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
    ])


def test_no_endpoints_reject():
    """upstream TestNoEndpointsReject"""
    objs = objects("""
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.41
  externalIPs: [192.168.99.11]
  ports: [{name: p80, port: 80, nodePort: 3001}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
""")
    payload = render(objs, [], fake_proxier())
    check_rule_jumps(payload)
    flows(payload, [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT", False),
        ("external to external IP with no endpoints", EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
        ("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT", False),
        ("external to NodePort with no endpoints", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "REJECT", False),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", False),
        ("external to LoadBalancer IP with no endpoints", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])
    assert ('-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype '
            "--dst-type LOCAL -m tcp -p tcp --dport 3001 -j REJECT") in payload


def test_cluster_ip_general():
    """upstream TestClusterIPGeneral"""
    objs = objects("""
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec: {clusterIP: 172.30.0.41, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc2, namespace: ns2}
spec:
  clusterIP: 172.30.0.42
  ports:
  - {name: http, port: 80, protocol: TCP}
  - {name: https, port: 443, protocol: TCP, targetPort: 8443}
  - {name: dns-udp, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
  - {name: dns-sctp, port: 53, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1], nodeName: test-node}]
ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc2-1, namespace: ns2, labels: {kubernetes.io/service-name: svc2}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1], nodeName: test-node}, {addresses: [10.180.2.1], nodeName: node2}]
ports:
- {name: http, port: 80, protocol: TCP}
- {name: https, port: 8443, protocol: TCP}
- {name: dns-udp, port: 53, protocol: UDP}
- {name: dns-tcp, port: 5353, protocol: TCP}
- {name: dns-sctp, port: 53, protocol: SCTP}
""")
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    flows(payload, [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP on shared port", "10.180.0.2", "tcp", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", False),
        ("UDP on shared port", "10.180.0.2", "udp", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False),
        ("SCTP on shared port", "10.180.0.2", "sctp", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "udp", "172.30.0.42", 80, "", False),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "", False),
    ])


LOAD_BALANCER = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.41
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]
  loadBalancerSourceRanges: [192.168.0.0/24, " 203.0.113.0/25"]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1]}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""


def test_load_balancer_source_ranges():
    """upstream TestLoadBalancer"""
    objs = objects(LOAD_BALANCER)
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    ep = "10.180.0.1:80"
    flows(payload, [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, ep, False),
        ("external to nodePort", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, ep, True),
        ("nodePort bypasses LoadBalancerSourceRanges", EXTERNAL_CLIENT_BLOCKED, TEST_NODE_IP, 3001, ep, True),
        ("accepted external to LB1", EXTERNAL_CLIENT, "1.2.3.4", 80, ep, True),
        ("accepted external to LB2", EXTERNAL_CLIENT, "5.6.7.8", 80, ep, True),
        ("blocked external to LB1", EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
        ("blocked external to LB2", EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP", False),
        ("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP", False),
        ("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP", False),
        ("node to LB1 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "1.2.3.4", 80, ep, True),
        ("node to LB2 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "5.6.7.8", 80, ep, True),
        ("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, ep, True),
        ("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, ep, True),
    ])
    fw = "KUBE-FW-XPGD46QRK7WJZT7O"
    assert [l for l in payload.splitlines() if l.startswith(f"-A {fw} ")] == [
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 192.168.0.0/24 -j KUBE-EXT-XPGD46QRK7WJZT7O',
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O',
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 1.2.3.4 -j KUBE-EXT-XPGD46QRK7WJZT7O',
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 5.6.7.8 -j KUBE-EXT-XPGD46QRK7WJZT7O',
        f'-A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"',
    ]


NODEPORT_V4 = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec: {type: NodePort, clusterIP: 172.30.0.41, ports: [{name: p80, port: 80, nodePort: 3001}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1]}, {addresses: [10.180.2.1], nodeName: test-node}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""
NODEPORT_V6 = (NODEPORT_V4.replace("172.30.0.41", '"fd00:172:30::41"').replace("IPv4", "IPv6")
               .replace("[10.180.0.1]", '["fd00:10:180::1"]').replace("[10.180.2.1]", '["fd00:10:180::2:1"]'))


@pytest.mark.parametrize("family,localhost,addresses,allow_alt,expect_firewall", [
    ("IPv4", True, None, True, True),
    ("IPv4", False, None, True, False),
    ("IPv4", False, ["192.168.0.0/24", "127.0.0.1/32"], False, False),
    ("IPv4", False, ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"], True, False),
    ("IPv6", True, None, True, False),
    ("IPv6", False, None, True, False),
    ("IPv6", False, ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"], False, False),
])
def test_node_ports(family, localhost, addresses, allow_alt, expect_firewall):
    """upstream TestNodePorts"""
    settings = fake_proxier(ip_family=family, localhost_nodeports=localhost, nodeport_addresses=addresses)
    objs = objects(NODEPORT_V4 if family == "IPv4" else NODEPORT_V6)
    payload = render(objs, objs, settings)
    check_rule_jumps(payload)
    if family == "IPv4":
        pod, external, node, alt, lo = "10.0.0.2", EXTERNAL_CLIENT, TEST_NODE_IP, TEST_NODE_IP_ALT, "127.0.0.1"
        output = "10.180.0.1:80, 10.180.2.1:80"
    else:
        pod, external, node, alt, lo = "fd00:10::2", "2600:5200::1", TEST_NODE_IPV6, TEST_NODE_IPV6_ALT, "::1"
        output = "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80"
    cases = [("pod to cluster IP", pod, "fd00:172:30::41" if family == "IPv6" else "172.30.0.41", 80, output, False),
             ("external to nodePort", external, node, 3001, output, True),
             ("node to nodePort", node, node, 3001, output, True)]
    if family == "IPv4" and localhost:
        cases.append(("localhost to nodePort gets masqueraded", lo, lo, 3001, output, True))
    else:
        cases.append(("localhost to nodePort is ignored", lo, lo, 3001, "", False))
    if allow_alt:
        cases.append(("external to nodePort on secondary IP", external, alt, 3001, output, True))
    else:
        cases.append(("secondary nodeIP ignores NodePorts", external, alt, 3001, "", False))
    flows(payload, cases)
    firewall = parse_dump(payload).chain("filter", "KUBE-FIREWALL")
    rules = [r.raw for r in firewall.rules] if firewall else []
    assert rules == ([
        '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP'
    ] if expect_firewall else [])


def test_nodeport_addresses_write_one_jump_per_matching_node_ip():
    settings = fake_proxier(localhost_nodeports=False,
                            nodeport_addresses=["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"])
    jumps = [r for r in render([], [], settings).splitlines() if r.endswith("-j KUBE-NODEPORTS")]
    comment = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
    assert jumps == [f"-A KUBE-SERVICES -m comment --comment {comment} -d 192.168.0.2 -j KUBE-NODEPORTS",
                     f"-A KUBE-SERVICES -m comment --comment {comment} -d 192.168.1.2 -j KUBE-NODEPORTS"]
    off = [r for r in render([], [], fake_proxier(localhost_nodeports=False)).splitlines()
           if r.endswith("-j KUBE-NODEPORTS")]
    assert off == [f"-A KUBE-SERVICES -m comment --comment {comment} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"]
    v6 = [r for r in render([], [], fake_proxier(ip_family="IPv6")).splitlines() if r.endswith("-j KUBE-NODEPORTS")]
    assert v6 == [f"-A KUBE-SERVICES -m comment --comment {comment} -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS"]


def test_health_check_node_port():
    """upstream TestHealthCheckNodePort"""
    objs = objects("""
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.42
  externalTrafficPolicy: Local
  healthCheckNodePort: 30000
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]
""")
    settings = fake_proxier(nodeport_addresses=["127.0.0.0/8"])
    payload = render(objs, [], settings)
    flows(payload, [("firewall accepts HealthCheckNodePort", "1.2.3.4", TEST_NODE_IP, 30000, "ACCEPT", False)])
    assert '-d 127.0.0.1 -j KUBE-NODEPORTS' in payload
    flows(render([], [], settings), [("HealthCheckNodePort no longer has any rule", "1.2.3.4", TEST_NODE_IP, 30000, "", False)])


ETP = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  externalTrafficPolicy: POLICY
  clusterIP: 172.30.0.41
  externalIPs: [192.168.99.11]
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001, targetPort: 80}]
  HEALTH
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}
addressType: IPv4
endpoints: [{addresses: [10.180.0.1]}, {addresses: [10.180.2.1], nodeName: test-node}]
ports: [{name: p80, port: 80, protocol: TCP}]
"""


def test_external_traffic_policy_local():
    """upstream TestExternalTrafficPolicyLocal (eTP Local with a local endpoint)"""
    objs = objects(ETP.replace("POLICY", "Local").replace("HEALTH", "healthCheckNodePort: 30000"))
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    flows(payload, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, both, False),
        ("external to external IP hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, "192.168.99.11", 80, local, False),
        ("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("external to LB IP hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
        ("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, False),
        ("external to NodePort hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, local, False),
    ])
    svl = "KUBE-SVL-XPGD46QRK7WJZT7O"
    assert f"-A KUBE-EXT-XPGD46QRK7WJZT7O -j {svl}" in payload
    assert f'-A {svl} -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j KUBE-SEP-' in payload
    assert '"ns1/svc1:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT' in payload


def test_external_traffic_policy_local_without_local_endpoints():
    """eTP Local, no endpoint on this node: EXT keeps the short-circuit rules but has no
    final jump, and filter DROPs external destinations (as svc2 of the overall test)."""
    text = ETP.replace("POLICY", "Local").replace("HEALTH", "healthCheckNodePort: 30000").replace(
        ", nodeName: test-node", ", nodeName: other-node")
    objs = objects(text)
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    assert "KUBE-SVL-" not in payload
    assert "-A KUBE-EXT-XPGD46QRK7WJZT7O -j " not in payload
    for dest in ("-d 192.168.99.11 --dport 80", "-d 1.2.3.4 --dport 80", "-m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001"):
        assert '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints"' in payload
        assert any(dest in l and l.endswith("-j DROP") for l in payload.splitlines()), dest
    both = "10.180.0.1:80, 10.180.2.1:80"
    flows(payload, [
        ("pod to LB still short-circuits", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("node to NodePort still works", TEST_NODE_IP, TEST_NODE_IP, 3001, both, True),
        ("external to LB is dropped", EXTERNAL_CLIENT, "1.2.3.4", 80, "DROP", False),
        ("external to NodePort is dropped", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "DROP", False),
    ])


def test_external_traffic_policy_cluster():
    """upstream TestExternalTrafficPolicyCluster"""
    objs = objects(ETP.replace("POLICY", "Cluster").replace("HEALTH", ""))
    payload = render(objs, objs, fake_proxier())
    both = "10.180.0.1:80, 10.180.2.1:80"
    flows(payload, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", "192.168.99.11", 80, both, True),
        ("external to external IP hits both endpoints, masqueraded", EXTERNAL_CLIENT, "192.168.99.11", 80, both, True),
        ("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", "1.2.3.4", 80, both, True),
        ("external to LB IP hits both endpoints, masqueraded", EXTERNAL_CLIENT, "1.2.3.4", 80, both, True),
        ("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, True),
        ("external to NodePort hits both endpoints, masqueraded", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
    ])
    assert "health check" not in payload


def _itp(policy: str, endpoints) -> list:
    eps = ", ".join(f"{{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {node}}}" for ip, node in endpoints)
    return objects(f"""
apiVersion: v1
kind: Service
metadata: {{name: svc1, namespace: ns1}}
spec: {{clusterIP: 172.30.1.1, selector: {{foo: bar}}, internalTrafficPolicy: {policy}, ports: [{{port: 80, protocol: TCP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc1-1, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: "", port: 80, protocol: TCP}}]
""")


@pytest.mark.parametrize("policy,endpoints,output", [
    ("Cluster", [("10.0.1.1", TEST_NODE), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")],
     "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
    ("Local", [("10.0.1.1", TEST_NODE), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")], "10.0.1.1:80"),
    ("Local", [("10.0.1.1", TEST_NODE), ("10.0.1.2", TEST_NODE), ("10.0.1.3", "node2")], "10.0.1.1:80, 10.0.1.2:80"),
    ("Local", [("10.0.1.1", "node0"), ("10.0.1.2", "node1"), ("10.0.1.3", "node2")], "DROP"),
])
def test_internal_traffic_policy(policy, endpoints, output):
    """upstream TestInternalTrafficPolicy"""
    objs = _itp(policy, endpoints)
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    flows(payload, [("pod to ClusterIP", "10.0.0.2", "172.30.1.1", 80, output, False)])
    if output == "DROP":
        assert '-A KUBE-SERVICES -m comment --comment "ns1/svc1 has no local endpoints" -m tcp -p tcp -d 172.30.1.1 --dport 80 -j DROP' in payload
        assert "KUBE-SVC-" not in payload and "KUBE-SVL-" not in payload
    elif policy == "Local":
        assert "KUBE-SVC-" not in payload and "-j KUBE-SVL-" in payload
    flows(render(objs, [], fake_proxier()), [("endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT", False)])


def _terminating_case(etp: str, endpoints) -> list:
    eps = ", ".join(
        f"{{addresses: [{ip}], nodeName: {node}, conditions: {{ready: {str(r).lower()}, serving: {str(s).lower()}, terminating: {str(t).lower()}}}}}"
        for ip, node, r, s, t in endpoints)
    health = "healthCheckNodePort: 30000" if etp == "Local" else ""
    return objects(f"""
apiVersion: v1
kind: Service
metadata: {{name: svc1, namespace: ns1}}
spec:
  clusterIP: 172.30.1.1
  type: LoadBalancer
  externalTrafficPolicy: {etp}
  ports: [{{port: 80, protocol: TCP, targetPort: 80}}]
  {health}
status: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc1-1, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: "", port: 80, protocol: TCP}}]
""", validate=False)


T, F = True, False
TERMINATING_LOCAL = [
    ("ready endpoints exist",
     [("10.0.1.1", TEST_NODE, T, T, F), ("10.0.1.2", TEST_NODE, T, T, F), ("10.0.1.3", TEST_NODE, F, T, T),
      ("10.0.1.4", TEST_NODE, F, F, T), ("10.0.1.5", "node-1", T, T, F)],
     ("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", False), ("10.0.1.1:80, 10.0.1.2:80", False)),
    ("only terminating endpoints exist",
     [("10.0.1.2", TEST_NODE, F, T, T), ("10.0.1.3", TEST_NODE, F, T, T), ("10.0.1.4", TEST_NODE, F, F, T),
      ("10.0.1.5", "node-1", T, T, F)],
     ("10.0.1.5:80", False), ("10.0.1.2:80, 10.0.1.3:80", False)),
    ("terminating endpoints on remote node",
     [("10.0.1.5", "node-1", F, T, T)],
     ("10.0.1.5:80", False), ("DROP", False)),
    ("no usable endpoints on any node",
     [("10.0.1.5", TEST_NODE, F, F, T), ("10.0.1.5", "node-1", F, F, T)],
     ("REJECT", False), ("REJECT", False)),
]
TERMINATING_CLUSTER = [
    ("ready endpoints exist",
     [("10.0.1.1", TEST_NODE, T, T, F), ("10.0.1.2", TEST_NODE, T, T, F), ("10.0.1.3", "another-node", F, T, T),
      ("10.0.1.4", "another-node", F, F, T), ("10.0.1.5", "another-node", T, T, F)],
     ("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", False), ("10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", True)),
    ("only terminating endpoints exist",
     [("10.0.1.2", TEST_NODE, F, T, T), ("10.0.1.3", TEST_NODE, F, T, T), ("10.0.1.4", "another-node", F, F, T),
      ("10.0.1.5", "another-node", F, T, T)],
     ("10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", False), ("10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", True)),
    ("terminating endpoints on remote node",
     [("10.0.1.5", "node-1", F, T, T)],
     ("10.0.1.5:80", False), ("10.0.1.5:80", True)),
    ("no usable endpoints on any node",
     [("10.0.1.5", TEST_NODE, F, F, T), ("10.0.1.5", "node-1", F, F, T)],
     ("REJECT", False), ("REJECT", False)),
]


@pytest.mark.parametrize("etp,name,endpoints,to_cluster,to_lb",
                         [("Local",) + c for c in TERMINATING_LOCAL] + [("Cluster",) + c for c in TERMINATING_CLUSTER],
                         ids=[f"Local-{c[0]}" for c in TERMINATING_LOCAL] + [f"Cluster-{c[0]}" for c in TERMINATING_CLUSTER])
def test_terminating_endpoints(etp, name, endpoints, to_cluster, to_lb):
    """upstream TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster"""
    objs = _terminating_case(etp, endpoints)
    payload = render(objs, objs, fake_proxier())
    check_rule_jumps(payload)
    flows(payload, [("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80) + to_cluster,
                    ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80) + to_lb])
    flows(render(objs, [], fake_proxier()), [
        ("pod to clusterIP after endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT", False),
        ("external to LB after endpoints deleted", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False)])


MASQUERADE_SETUP = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.41
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3001}]
status: {loadBalancer: {ingress: [{ip: 1.2.3.4}]}}
---
apiVersion: v1
kind: Service
metadata: {name: svc2, namespace: ns2}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.42
  externalTrafficPolicy: Local
  healthCheckNodePort: 30002
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3002}]
status: {loadBalancer: {ingress: [{ip: 5.6.7.8}]}}
---
apiVersion: v1
kind: Service
metadata: {name: svc3, namespace: ns3}
spec:
  type: LoadBalancer
  clusterIP: 172.30.0.43
  internalTrafficPolicy: Local
  ports: [{name: p80, port: 80, protocol: TCP, nodePort: 3003}]
status: {loadBalancer: {ingress: [{ip: 9.10.11.12}]}}
""" + "".join(f"""---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc{i}-1, namespace: ns{i}, labels: {{kubernetes.io/service-name: svc{i}}}}}
addressType: IPv4
endpoints: [{{addresses: [10.180.0.{i}], nodeName: test-node}}, {{addresses: [10.180.1.{i}], nodeName: remote}}]
ports: [{{name: p80, port: 80, protocol: TCP}}]
""" for i in (1, 2, 3))

MASQUERADE_FLOWS = [
    ("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", False),
    ("pod to NodePort", "10.0.0.2", TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to LB", "10.0.0.2", "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to ClusterIP", TEST_NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to NodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort", "127.0.0.1", "127.0.0.1", 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to LB", TEST_NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to ClusterIP", EXTERNAL_CLIENT, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to NodePort", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to ClusterIP with eTP:Local", "10.0.0.2", "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to NodePort with eTP:Local", "10.0.0.2", TEST_NODE_IP, 3002, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to LB with eTP:Local", "10.0.0.2", "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("node to ClusterIP with eTP:Local", TEST_NODE_IP, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to NodePort with eTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("localhost to NodePort with eTP:Local", "127.0.0.1", "127.0.0.1", 3002, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to LB with eTP:Local", TEST_NODE_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to ClusterIP with eTP:Local", EXTERNAL_CLIENT, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to NodePort with eTP:Local", EXTERNAL_CLIENT, TEST_NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", "10.0.0.2", "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", "10.0.0.2", TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("pod to LB with iTP:Local", "10.0.0.2", "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to ClusterIP with iTP:Local", TEST_NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("localhost to NodePort with iTP:Local", "127.0.0.1", "127.0.0.1", 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to LB with iTP:Local", TEST_NODE_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to ClusterIP with iTP:Local", EXTERNAL_CLIENT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", EXTERNAL_CLIENT, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to LB with iTP:Local", EXTERNAL_CLIENT, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
]


@pytest.mark.parametrize("masquerade_all,detector,overrides", [
    (False, True, {}),
    (False, False, {
        "node to ClusterIP": (None, False), "node to ClusterIP with eTP:Local": (None, False),
        "node to ClusterIP with iTP:Local": (None, False), "external to ClusterIP": (None, False),
        "external to ClusterIP with eTP:Local": (None, False), "external to ClusterIP with iTP:Local": (None, False),
        "pod to NodePort with eTP:Local": ("10.180.0.2:80", None), "pod to LB with eTP:Local": ("10.180.0.2:80", None)}),
    (True, True, {"pod to ClusterIP": (None, True), "pod to ClusterIP with eTP:Local": (None, True),
                  "pod to ClusterIP with iTP:Local": (None, True)}),
    (True, False, {"pod to ClusterIP": (None, True), "pod to ClusterIP with eTP:Local": (None, True),
                   "pod to ClusterIP with iTP:Local": (None, True),
                   "pod to NodePort with eTP:Local": ("10.180.0.2:80", None),
                   "pod to LB with eTP:Local": ("10.180.0.2:80", None)}),
], ids=["base", "no LocalTrafficDetector", "masqueradeAll", "masqueradeAll, no LocalTrafficDetector"])
def test_internal_external_masquerade(masquerade_all, detector, overrides):
    """upstream TestInternalExternalMasquerade"""
    settings = fake_proxier(masquerade_all=masquerade_all, cluster_cidr="10.0.0.0/8" if detector else None)
    objs = objects(MASQUERADE_SETUP)
    payload = render(objs, objs, settings)
    check_rule_jumps(payload)
    cases = []
    for name, src, dst, port, output, masq in MASQUERADE_FLOWS:
        if name in overrides:
            o_output, o_masq = overrides[name]
            output = output if o_output is None else o_output
            masq = masq if o_masq is None else o_masq
        cases.append((name, src, dst, port, output, masq))
    flows(payload, cases)


@pytest.mark.parametrize("mode,expected", [("Proxy", False), ("VIP", True), (None, True)])
def test_load_balancer_ingress_ip_mode(mode, expected):
    """upstream TestLoadBalancerIngressRouteTypeProxy"""
    ip_mode = f", ipMode: {mode}" if mode else ""
    objs = objects(f"""
apiVersion: v1
kind: Service
metadata: {{name: svc1, namespace: ns1}}
spec: {{type: LoadBalancer, clusterIP: 10.20.30.41, ports: [{{name: p80, port: 80, nodePort: 3001}}]}}
status: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4{ip_mode}}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc1-1, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
endpoints: [{{addresses: [10.180.0.1]}}]
ports: [{{name: p80, port: 80, protocol: TCP}}]
""")
    services = parse_dump(render(objs, objs, fake_proxier())).chain("nat", "KUBE-SERVICES")
    assert any(r.destination and r.destination.value == "1.2.3.4" for r in services.rules) is expected


def test_emission_order_of_the_payload_sections():
    """kube-proxy-iptables.md section 2: chain lines, then POSTROUTING, MARK-MASQ and
    KUBE-FIREWALL rules, the per-service blocks, -X lines, the final KUBE-NODEPORTS
    jump and the KUBE-FORWARD rules; stale chains' chain lines come last."""
    objs = fixture("overall.input.yaml")
    out = render_payload(objs, objs, fake_proxier(), existing_chains={"KUBE-SVC-ZZZZZZZZZZZZZZZZ"})
    assert out.filter_chains == [":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
                                 ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                                 ":KUBE-PROXY-FIREWALL - [0:0]", ":KUBE-FIREWALL - [0:0]"]
    assert out.nat_chains[:4] == [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                                  ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    assert out.nat_chains[-1] == ":KUBE-SVC-ZZZZZZZZZZZZZZZZ - [0:0]"
    assert out.filter_rules[0].startswith("-A KUBE-FIREWALL ")
    assert [r.split()[1] for r in out.filter_rules[-3:]] == ["KUBE-FORWARD"] * 3
    assert [r.split()[1] for r in out.nat_rules[:4]] == ["KUBE-POSTROUTING"] * 3 + ["KUBE-MARK-MASQ"]
    assert out.nat_rules[-2:] == [
        "-X KUBE-SVC-ZZZZZZZZZZZZZZZZ",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
        'rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS']
    # per-service blocks are contiguous and sorted by ServicePortName
    owners = [re.search(r"(ns\d)/svc", r).group(1) for r in out.nat_rules[4:-2] if re.search(r"ns\d/svc", r)]
    assert owners == sorted(owners)
    block = [r for r in out.nat_rules if "ns4/svc4" in r or "4SW47YFZTEDKD3PK" in r or
             "UKSFD7AGPMPPLUHC" in r or "C6EBXVWJJZMIWKLZ" in r]
    assert [r.split()[1][:9] for r in block] == [
        "KUBE-SERV", "KUBE-SERV", "KUBE-SVC-", "KUBE-EXT-", "KUBE-EXT-", "KUBE-SVC-", "KUBE-SVC-",
        "KUBE-SEP-", "KUBE-SEP-", "KUBE-SEP-", "KUBE-SEP-"]


MANIFESTS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: remote, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: web, image: nginx, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: fixed}
spec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 81, targetPort: 8080}]}
"""


def test_render_manifests_allocates_and_builds_endpoints(tmp_path):
    from kproxy.render import render_manifests, resolve_manifests

    path = tmp_path / "app.yaml"
    path.write_text(MANIFESTS)
    resolved = resolve_manifests(str(path), lb_pool="192.168.5.240/30")
    web = resolved.services[0]
    assert (web.cluster_ip, web.ports[0].node_port, web.health_check_node_port) == ("10.96.0.2", 30000, 30001)
    assert web.load_balancer_ingress[0].ip == "192.168.5.241"
    assert resolved.services[1].cluster_ip == "10.96.0.50"
    assert resolved.node_cidrs == {"node-1": "10.244.0.0/24", "node-2": "10.244.1.0/24"}
    pods = {p.name: (p.pod_ip, p.node_name) for p in resolved.pods}
    assert pods["remote"] == ("10.244.1.2", "node-2")
    local = sorted(ip for name, (ip, node) in pods.items() if node == "node-1")
    assert local == ["10.244.0.2", "10.244.0.3"] and all(n.startswith("web-") for n in pods if n != "remote")

    payload = render_manifests(str(path), lb_pool="192.168.5.240/30", node_ip="192.168.5.11")
    assert payload == render_manifests(str(path), "iptables", "node-1", "192.168.5.11", "10.244.0.0/16",
                                       "10.96.0.0/12", "30000-32767", "192.168.5.240/30", True)
    check_rule_jumps(payload)
    every = "10.244.0.2:8080, 10.244.0.3:8080, 10.244.1.2:8080"
    flows(payload, [
        ("pod to ClusterIP reaches every pod", "10.244.0.9", "10.96.0.2", 80, every, False),
        ("outside to LB reaches this node's pods only (eTP Local)", "203.0.113.9", "192.168.5.241", 80,
         "10.244.0.2:8080, 10.244.0.3:8080", False),
        ("outside to NodePort likewise", "203.0.113.9", "192.168.5.11", 30000, "10.244.0.2:8080, 10.244.0.3:8080", False),
        ("health check NodePort accepted", "203.0.113.9", "192.168.5.11", 30001, "ACCEPT", False),
        ("numeric targetPort", "10.244.0.9", "10.96.0.50", 81, every, False),
    ], node_ips=["192.168.5.11"])
    # Rendered for node-2, node-2 is the one node every unplaced Pod lands on: all local.
    other_node = render_manifests(str(path), node_name="node-2", node_ip="192.168.5.12", lb_pool="192.168.5.240/30")
    flows(other_node, [("on node-2 every pod is local", "203.0.113.9", "192.168.5.241", 80,
                        "10.244.0.2:8080, 10.244.0.3:8080, 10.244.0.4:8080", False)], node_ips=["192.168.5.12"])


def test_render_manifests_errors_name_the_service_and_field(tmp_path):
    from kproxy.alloc import AllocationError
    from kproxy.render import render_manifests

    path = tmp_path / "two.yaml"
    path.write_text(MANIFESTS + """---
apiVersion: v1
kind: Service
metadata: {name: clash}
spec: {clusterIP: 10.96.0.50, ports: [{port: 1}]}
---
apiVersion: v1
kind: Service
metadata: {name: np}
spec: {type: NodePort, ports: [{port: 1, nodePort: 3001}]}
""")
    with pytest.raises(AllocationError) as exc:
        render_manifests(str(path))
    assert (exc.value.owner, exc.value.field) == ("default/clash", "spec.clusterIP")
    path.write_text(MANIFESTS.replace("clusterIP: 10.96.0.50, ", "") + """---
apiVersion: v1
kind: Service
metadata: {name: np}
spec: {type: NodePort, ports: [{port: 1, nodePort: 3001}]}
""")
    with pytest.raises(AllocationError) as exc:
        render_manifests(str(path))
    assert (exc.value.owner, exc.value.field) == ("default/np", "spec.ports[0].nodePort")
    assert "30000-32767" in str(exc.value)
    with pytest.raises(ValueError, match="backend"):
        path.write_text(MANIFESTS)
        render_manifests(str(path), backend="no-such-backend")


def test_render_manifests_later_objects_replace_earlier_ones(tmp_path):
    """Applying two folders with the same names (seed README 2.4): last apply wins, and
    the ClusterIP stays the one first allocated."""
    from kproxy.render import resolve_manifests

    (tmp_path / "a.yaml").write_text(_one_port_service(8080))
    (tmp_path / "b.yaml").write_text(_one_port_service(80))
    resolved = resolve_manifests([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")])
    (svc,) = resolved.services
    assert svc.ports[0].port == 80 and svc.cluster_ip == "10.96.0.2"


def _one_port_service(port: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: wordpress}}
spec: {{type: LoadBalancer, selector: {{app: wordpress}}, ports: [{{port: {port}, targetPort: 80}}]}}
"""
