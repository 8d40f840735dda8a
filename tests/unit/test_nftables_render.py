"""Golden and packet-flow tests of the nftables render, after upstream's
pkg/proxy/nftables/proxier_test.go.

Upstream compares the state its fake nftables holds after a sync (``nft.Dump()``),
sorted by ``sortNFTablesTransaction``. Here the rendered text is parsed and applied to
``kproxy.proxy.nftables.Table`` (which refuses what the kernel refuses), dumped in the
same format and compared after ``sort_like_upstream``. Both text styles ("blocks", the
default, and knftables' "rules") must give the same table.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Optional

import pytest

from kproxy.model import load, loads
from kproxy.proxy.iptables.render import NodeSettings
from kproxy.proxy.nftables import (NftError, Table, parse_statements, render, render_payload, sort_like_upstream,
                                   trace_packet)
from kproxy.proxy.nftables import names
from kproxy.proxy.nftables.ruleset import canonical_rule, format_statements, parse_listing
from kproxy.proxy.types import ServicePortName

GOLDEN = Path(__file__).parent / "golden_nft"

TEST_NODE = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPV6 = "2001:db8::1"
TEST_NODE_IPV6_ALT = "2001:db8:1::2"
TEST_NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, TEST_NODE_IPV6, TEST_NODE_IPV6_ALT]
EXTERNAL_CLIENT = "203.0.113.2"
EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
SERVICE_CIDRS = "172.30.0.0/16"
STYLES = ["blocks", "rules"]


def fake_proxier(**overrides) -> NodeSettings:
    """Upstream's NewFakeProxier: pod CIDR 10.0.0.0/8, mark 0x4000, NodePorts on the
    primary node IP."""
    ipv6 = overrides.get("ip_family") == "IPv6"
    args = dict(node_name=TEST_NODE, node_ips=TEST_NODE_IPS,
                cluster_cidr="fd00:10::/64" if ipv6 else "10.0.0.0/8", masquerade_mark="0x4000")
    args.update(overrides)
    return NodeSettings(**args)


def objects(text: str) -> list:
    return [lo.obj for lo in loads(text)]


def svc_yaml(ns, name, ip, ports, type_="ClusterIP", extra="") -> str:
    port_list = ", ".join(
        "{" + f"name: {p[0]}, port: {p[1]}, protocol: {p[2]}" + (f", nodePort: {p[3]}" if len(p) > 3 else "") + "}"
        for p in ports)
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  type: {type_}\n  clusterIP: {ip}\n  ports: [{port_list}]\n{extra}---\n")


def slice_yaml(ns, name, endpoints, ports, slice_name=None) -> str:
    eps = "".join(f"- addresses: [{ip}]\n" + (f"  nodeName: {node}\n" if node else "") for ip, node in endpoints)
    port_list = ", ".join("{" + f"name: {p[0]}, port: {p[1]}, protocol: {p[2]}" + "}" for p in ports)
    return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: {slice_name or name + '-1'}, namespace: {ns}, "
            f"labels: {{kubernetes.io/service-name: {name}}}}}\n"
            f"addressType: {'IPv6' if ':' in (endpoints[0][0] if endpoints else '') else 'IPv4'}\n"
            + (f"endpoints:\n{eps}" if eps else "endpoints: []\n") + f"ports: [{port_list}]\n---\n")


def golden(*files: str) -> str:
    return sort_like_upstream("".join((GOLDEN / f).read_text() for f in ("base_rules.txt",) + files))


def assert_state(table: Table, expected: str) -> None:
    got = sort_like_upstream(table.dump())
    if got != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(), "expected", "got",
                                              lineterm=""))
        raise AssertionError("tables do not match:\n" + diff)


def synced(objs: list, settings: Optional[NodeSettings] = None, style: str = "blocks", **kwargs) -> Table:
    text = render(objs, objs, settings or fake_proxier(), service_cidrs=kwargs.pop("service_cidrs", SERVICE_CIDRS),
                  style=style, **kwargs)
    return Table.from_text(text)


def flows(table: Table, cases, node_ips=TEST_NODE_IPS) -> None:
    """Upstream's runPacketFlowTests: (name, source, [protocol,] dest, port, output, masq)."""
    failures = []
    for case in cases:
        if len(case) == 6:
            name, src, dst, port, output, masq = case
            proto = "tcp"
        else:
            name, src, proto, dst, port, output, masq = case
        got = trace_packet(table, src, proto, dst, port, node_ips)
        assert not got.unmatched, f"{name}: rules the walker cannot read: {got.unmatched}"
        if got.output != output or got.masquerade != masq:
            failures.append(f"{name}: got {got.output!r} masq={got.masquerade}, want {output!r} masq={masq}\n  "
                            + "\n  ".join(got.matches))
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- names


def test_chain_names_from_the_doc():
    base = names.service_port_chain_base("ns1", "svc1", "TCP", "p80")
    assert names.SERVICE_PREFIX + base == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    ep = names.endpoint_chain_base("ns1", "svc1", "tcp", "p80", "10.180.0.1", 80)
    assert names.ENDPOINT_PREFIX + ep == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


LONG_NS = "very-long-namespace-name-abcdefghijklmnopqrstuvwxyz0123456789xx"
LONG_SVC = "very-long-service-name-why-would-you-even-do-this-i-mean-really"
LONG_PORT = "port-443-providing-the-hypertext-transmission-protocol-with-tls"


@pytest.mark.parametrize("ns,svc,proto,port,expected", [
    ("testing", "service", "tcp", "http", "P4ZYZVCF-testing/service/tcp/http"),
    ("testing", "service", "tcp", "https", "LZBRENCP-testing/service/tcp/https"),
    (LONG_NS, LONG_SVC, "sctp", LONG_PORT, f"KR6NACJP-{LONG_NS}/{LONG_SVC}/sctp/{LONG_PORT}"),
])
def test_service_port_chain_name_base(ns, svc, proto, port, expected):
    """Upstream's Test_servicePortChainNameBase."""
    assert names.service_port_chain_base(ns, svc, proto, port) == expected


@pytest.mark.parametrize("ns,svc,proto,port,endpoint,expected", [
    ("testing", "service", "tcp", "http", "10.180.0.1:80", "JO2XBXZR-testing/service/tcp/http__10.180.0.1/80"),
    ("testing", "service", "tcp", "http", "10.180.0.2:80", "5S6H3H22-testing/service/tcp/http__10.180.0.2/80"),
    ("testing", "service", "tcp", "http", "[fd80:abcd:12::a1b2:c3d4:e5f6:9999]:80",
     "U7E2ET36-testing/service/tcp/http__fd80.abcd.12..a1b2.c3d4.e5f6.9999/80"),
    (LONG_NS, LONG_SVC, "sctp", LONG_PORT, "[1234:5678:9abc:def0::abc:1234]:443",
     f"5YS7AFEA-{LONG_NS}/{LONG_SVC}/sctp/{LONG_PORT}__1234.5678.9abc.def0..abc.1234/443"),
    (LONG_NS, LONG_SVC, "sctp", LONG_PORT, "[1234:5678:9abc:def0::abcd:1234:5678]:443",
     f"CI6C53Q3-{LONG_NS}/{LONG_SVC}/sctp/{LONG_PORT}__1234.5678.9abc.def0..abcd.1234..."),
    (LONG_NS, LONG_SVC, "sctp", LONG_PORT, "[1234:5678:9abc:def0::abcd:1234:8765]:443",
     f"2FLXFK6X-{LONG_NS}/{LONG_SVC}/sctp/{LONG_PORT}__1234.5678.9abc.def0..abcd.1234..."),
])
def test_endpoint_chain_name_base(ns, svc, proto, port, endpoint, expected):
    """Upstream's Test_servicePortEndpointChainNameBase, truncation included."""
    ip, ep_port = names.split_host_port(endpoint)
    assert names.endpoint_chain_base(ns, svc, proto, port, ip, ep_port) == expected


def test_truncated_names_stay_within_the_kernel_limit_and_keep_their_owner():
    base = names.endpoint_chain_base(LONG_NS, LONG_SVC, "sctp", LONG_PORT, "1234:5678:9abc:def0::abcd:1234:5678", 443)
    assert len(base) == names.CHAIN_NAME_BASE_LENGTH_MAX == 240 and base.endswith("...")
    for prefix in names.PER_SERVICE_PREFIXES:
        assert len(prefix + base) < names.NAME_LENGTH_MAX
        assert names.owner(prefix + base) == f"{LONG_NS}/{LONG_SVC}"
    assert names.owner("services") is None and names.owner("mark-for-masquerade") is None
    assert names.owner_of_verdict("goto external-42NFTM6N-ns2/svc2/tcp/p80") == "ns2/svc2"
    assert names.owner_of_comment("ns6/svc6:p80") == "ns6/svc6"


def test_truncated_endpoint_chains_render_and_load():
    # IPs are canonical in the render (Go's net.IP.String: a lone zero group is not "::")
    ep1, ep2 = "1234:5678:9abc:def0:0:abcd:1234:5678", "1234:5678:9abc:def0:0:abcd:1234:8765"
    text = (svc_yaml(LONG_NS, LONG_SVC, "fd00:172:30::41", [(LONG_PORT, 443, "SCTP")])
            + slice_yaml(LONG_NS, LONG_SVC, [(ep1, None), (ep2, None)], [(LONG_PORT, 443, "SCTP")]))
    table = Table.from_text(render(objects(text), objects(text), fake_proxier(ip_family="IPv6")), family="ip6")
    chains = sorted(c for c in table.chains if c.startswith("endpoint-"))
    want = sorted("endpoint-" + names.endpoint_chain_base(LONG_NS, LONG_SVC, "sctp", LONG_PORT, ip, 443)
                  for ip in (ep1, ep2))
    assert chains == want and len(set(chains)) == 2
    assert all(c.endswith("__1234.5678.9abc.def0.0.abcd.123...") for c in chains)
    assert all(len(c) < names.NAME_LENGTH_MAX for c in table.chains)
    flows(table, [("pod to long service", "fd00:10::2", "sctp", "fd00:172:30::41", 443,
                   f"[{ep1}]:443, [{ep2}]:443", False)])


def test_long_service_port_names_are_cut_to_nfts_comment_limit():
    text = (svc_yaml(LONG_NS, LONG_SVC, "172.30.0.41", [(LONG_PORT, 443, "TCP")])
            + svc_yaml(LONG_NS, "short", "172.30.0.42", [(LONG_PORT, 443, "TCP")]))
    table = synced(objects(text))
    comments = {e.comment for e in table.elements(names.NO_ENDPOINT_SERVICES).values()}
    assert comments == {f"{LONG_NS}/{LONG_SVC}:"[:128], f"{LONG_NS}/short:{LONG_PORT}"[:128]}
    assert table.owned_elements(f"{LONG_NS}/{LONG_SVC}") == {names.NO_ENDPOINT_SERVICES: {"172.30.0.41 . tcp . 443"}}


# --------------------------------------------------------------------------- upstream's sort


def test_sort_like_upstream_matches_upstreams_sort():
    """Upstream's Test_sortNFTablesTransaction and Test_diffNFTablesTransaction."""
    inp = (GOLDEN / "sort.input.txt").read_text()
    expected = (GOLDEN / "sort.expected.txt").read_text().strip()
    assert sort_like_upstream(inp) == expected
    assert sort_like_upstream(inp) == sort_like_upstream(expected)
    assert sort_like_upstream(inp) != sort_like_upstream("\n".join(expected.split("\n")[2:]))


# --------------------------------------------------------------------------- TestOverallNFTablesRules


def overall() -> list:
    return [lo.obj for lo in load(str(GOLDEN / "overall.input.yaml"))]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("existing", ["unknown", "empty"])
def test_overall_nftables_rules(style, existing):
    objs = overall()
    table = synced(objs, style=style, existing=None if existing == "unknown" else Table())
    assert_state(table, golden("overall.expected.txt"))


@pytest.mark.parametrize("style", STYLES)
def test_overall_resync_on_top_of_itself_changes_nothing(style):
    objs = overall()
    table = synced(objs, style=style)
    payload = render_payload(objs, objs, fake_proxier(), existing=table, service_cidrs=SERVICE_CIDRS, style=style)
    # nothing to add or delete among the elements, and no per-service chain goes stale
    assert not [s for s in payload.statements if s[0] == "element" and s[2] != names.NODEPORT_IPS]
    assert not payload.flushed_stale_chains and not payload.deleted_stale_chains and not payload.cleanup
    table.apply_text(payload.text)
    assert_state(table, golden("overall.expected.txt"))


def test_payload_statements_and_text_agree():
    objs = overall()
    for style in STYLES:
        payload = render_payload(objs, objs, fake_proxier(), existing=Table(), service_cidrs=SERVICE_CIDRS, style=style)
        by_statements = payload.apply_to(Table())
        by_text = Table.from_text(payload.text)
        assert by_statements.dump() == by_text.dump()
        _, _, reparsed = parse_statements(format_statements("ip", payload.statements, style="rules"))
        assert Table().apply(reparsed).dump() == by_text.dump()


def test_blocks_style_writes_no_add_rule_or_add_element_lines():
    """nft needs its whole chain cache for ``add rule``/``add element``; the blocks
    style avoids both (see the render module's docstring)."""
    objs = overall()
    text = render(objs, objs, fake_proxier(), existing=Table(), service_cidrs=SERVICE_CIDRS)
    assert not re.search(r"^add (rule|element) ", text, re.M)
    assert "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 {\n\tip daddr 172.30.0.41" in text
    rules_text = render(objs, objs, fake_proxier(), existing=Table(), service_cidrs=SERVICE_CIDRS, style="rules")
    assert ("add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap "
            "{ 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }") in rules_text


def test_without_service_cidrs_the_drop_rule_is_left_out():
    objs = overall()
    text = render(objs, objs, fake_proxier(), style="rules")
    assert "Drop traffic to unallocated ClusterIPs" not in text
    assert "Reject traffic to invalid ports of ClusterIPs" in text
    two = render(objs, objs, fake_proxier(), style="rules", service_cidrs=["172.30.0.0/16", "fd00::/108", "10.96.0.0/12"])
    assert 'ip daddr { 172.30.0.0/16,10.96.0.0/12 } drop comment "Drop traffic to unallocated ClusterIPs"' in two


def test_overall_flows():
    table = synced(overall())
    flows(table, [
        ("pod to svc1", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin svc1", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("external to svc2 LB, no local endpoint", EXTERNAL_CLIENT, "1.2.3.4", 80, "DROP", False),
        ("pod to svc2 LB, short-circuited", "10.0.0.2", "1.2.3.4", 80, "10.180.0.2:80", False),
        ("external to svc3 NodePort", EXTERNAL_CLIENT, TEST_NODE_IP, 3003, "10.180.0.3:80", True),
        ("external to svc4 external IP", EXTERNAL_CLIENT, "192.168.99.33", 80, "10.180.0.4:80, 10.180.0.5:80", True),
        ("allowed external to svc5 LB", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.3:80", True),
        ("blocked external to svc5 LB", EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP", False),
        ("pod to svc6 without endpoints", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
        ("pod to a port svc1 does not have", "10.0.0.2", "172.30.0.41", 8080, "REJECT", False),
        ("pod to an unallocated ClusterIP", "10.0.0.2", "172.30.0.99", 80, "DROP", False),
    ])


# --------------------------------------------------------------------------- flow tests


def test_no_endpoints_reject():
    """Upstream's TestNoEndpointsReject."""
    text = svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                    "  externalIPs: [192.168.99.11]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
    table = synced(objects(text))
    flows(table, [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT", False),
        ("external to external IP with no endpoints", EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
        ("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT", False),
        ("external to NodePort with no endpoints", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "REJECT", False),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", False),
        ("external to LoadBalancer IP with no endpoints", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])
    assert table.elements(names.NO_ENDPOINT_NODEPORTS)["tcp . 3001"].value == "goto reject-chain"
    assert table.elements(names.NO_ENDPOINT_SERVICES)["172.30.0.41 . tcp . 80"].comment == "ns1/svc1:p80"
    assert not [c for c in table.chains if names.is_service_chain(c)]


def test_cluster_ip_general():
    """Upstream's TestClusterIPGeneral."""
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("http", 80, "TCP")])
            + "apiVersion: v1\nkind: Service\nmetadata: {name: svc2, namespace: ns2}\nspec:\n  clusterIP: 172.30.0.42\n"
              "  ports:\n  - {name: http, port: 80, protocol: TCP}\n"
              "  - {name: https, port: 443, protocol: TCP, targetPort: 8443}\n"
              "  - {name: dns-udp, port: 53, protocol: UDP}\n"
              "  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}\n"
              "  - {name: dns-sctp, port: 53, protocol: SCTP}\n---\n"
            + slice_yaml("ns1", "svc1", [("10.180.0.1", TEST_NODE)], [("http", 80, "TCP")])
            + slice_yaml("ns2", "svc2", [("10.180.0.1", TEST_NODE), ("10.180.2.1", "node2")],
                         [("http", 80, "TCP"), ("https", 8443, "TCP"), ("dns-udp", 53, "UDP"),
                          ("dns-tcp", 5353, "TCP"), ("dns-sctp", 53, "SCTP")]))
    table = synced(objects(text))
    flows(table, [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP on a shared port", "10.180.0.2", "tcp", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", False),
        ("UDP on a shared port", "10.180.0.2", "udp", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False),
        ("SCTP on a shared port", "10.180.0.2", "sctp", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "udp", "172.30.0.42", 80, "REJECT", False),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "REJECT", False),
        ("packet to unallocated cluster ip", "10.180.0.2", "172.30.0.50", 80, "DROP", False),
    ])


def test_load_balancer_source_ranges():
    """Upstream's TestLoadBalancer: the node IP is in a source range, so the LB IPs
    are allowed as sources too."""
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                     '  loadBalancerSourceRanges: ["192.168.0.0/24", " 203.0.113.0/25"]\n'
                     "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8}]\n")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", None)], [("p80", 80, "TCP")]))
    table = synced(objects(text))
    fw = "firewall-" + names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    assert [r.text for r in table.chains[fw].rules] == [
        "ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop"]
    ep = "10.180.0.1:80"
    flows(table, [
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


def test_load_balancer_source_ranges_without_endpoints_still_filter():
    """nftables mode keeps the firewall chain (and the firewall-ips element) even with
    no endpoints: blocked sources are dropped before the REJECT."""
    text = svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                    '  loadBalancerSourceRanges: ["203.0.113.0/25"]\n'
                    "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
    table = synced(objects(text))
    flows(table, [
        ("blocked external", EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
        ("allowed external", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


@pytest.mark.parametrize("family,nodeport_addresses,allow_alt", [
    ("IPv4", None, False),
    ("IPv4", ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"], True),
    ("IPv6", None, False),
    ("IPv6", ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64", "2001:db8:1::2/128"], True),
])
def test_node_ports(family, nodeport_addresses, allow_alt):
    """Upstream's TestNodePorts."""
    v4 = family == "IPv4"
    svc_ip, ep1, ep2 = ("172.30.0.41", "10.180.0.1", "10.180.2.1") if v4 else \
        ("fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1")
    node_ip, pod, client, alt = (TEST_NODE_IP, "10.0.0.2", EXTERNAL_CLIENT, TEST_NODE_IP_ALT) if v4 else \
        (TEST_NODE_IPV6, "fd00:10::2", "2600:5200::1", TEST_NODE_IPV6_ALT)
    text = (svc_yaml("ns1", "svc1", svc_ip, [("p80", 80, "TCP", 3001)], "NodePort")
            + slice_yaml("ns1", "svc1", [(ep1, None), (ep2, TEST_NODE)], [("p80", 80, "TCP")]))
    settings = fake_proxier(ip_family=family, nodeport_addresses=nodeport_addresses)
    table = Table.from_text(render(objects(text), objects(text), settings, service_cidrs="fd00:172:30::/112"),
                            family="ip" if v4 else "ip6")
    fmt = (lambda ip: f"{ip}:80") if v4 else (lambda ip: f"[{ip}]:80")
    output = f"{fmt(ep1)}, {fmt(ep2)}"
    cases = [
        ("pod to cluster IP", pod, svc_ip, 80, output, False),
        ("external to nodePort", client, node_ip, 3001, output, True),
        ("node to nodePort", node_ip, node_ip, 3001, output, True),
    ]
    if allow_alt:
        cases.append(("external to nodePort on secondary IP", client, alt, 3001, output, True))
    else:
        cases.append(("secondary nodeIP ignores NodePorts", client, alt, 3001, "", False))
    flows(table, cases)


def test_node_ports_on_all_addresses():
    """nodeport-addresses 0.0.0.0/0 (upstream's MatchAll): no nodeport-ips set, and
    NodePorts are caught by ``fib daddr type local`` except on localhost."""
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "NodePort")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", None)], [("p80", 80, "TCP")]))
    table = synced(objects(text), fake_proxier(nodeport_addresses=["0.0.0.0/0"]))
    assert names.NODEPORT_IPS not in table.sets
    assert [r.text for r in table.chains[names.SERVICES].rules][1] == (
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports")
    flows(table, [("external to alt node IP", EXTERNAL_CLIENT, TEST_NODE_IP_ALT, 3001, "10.180.0.1:80", True)])


def test_external_traffic_policy_local():
    """Upstream's TestExternalTrafficPolicyLocal."""
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                     "  externalTrafficPolicy: Local\n  externalIPs: [192.168.99.11]\n  healthCheckNodePort: 30000\n"
                     "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", None), ("10.180.2.1", TEST_NODE)], [("p80", 80, "TCP")]))
    table = synced(objects(text))
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    flows(table, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, both, False),
        ("external to external IP hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, "192.168.99.11", 80,
         local, False),
        ("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("external to LB IP hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
        ("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, False),
        ("external to NodePort hits only local endpoint, unmasqueraded", EXTERNAL_CLIENT, TEST_NODE_IP, 3001,
         local, False),
    ])
    base = names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    assert [(r.text, r.comment) for r in table.chains["external-" + base].rules] == [
        (f"ip saddr 10.0.0.0/8 goto service-{base}", "short-circuit pod traffic"),
        ("fib saddr type local jump mark-for-masquerade", "masquerade local traffic"),
        (f"fib saddr type local goto service-{base}", "short-circuit local traffic"),
        (f"goto local-{base}", None),
    ]


def test_external_traffic_policy_local_without_local_endpoints_drops():
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                     "  externalTrafficPolicy: Local\nstatus:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", "other-node")], [("p80", 80, "TCP")]))
    table = synced(objects(text))
    assert table.elements(names.NO_ENDPOINT_NODEPORTS)["tcp . 3001"].value == "drop"
    assert table.elements(names.NO_ENDPOINT_SERVICES)["1.2.3.4 . tcp . 80"].value == "drop"
    flows(table, [
        ("external to NodePort", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "DROP", False),
        ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, "DROP", False),
        ("pod to LB is short-circuited", "10.0.0.2", "1.2.3.4", 80, "10.180.0.1:80", False),
        ("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
    ])


def test_external_traffic_policy_cluster():
    """Upstream's TestExternalTrafficPolicyCluster."""
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
                     "  externalTrafficPolicy: Cluster\n  externalIPs: [192.168.99.11]\n"
                     "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", None), ("10.180.2.1", TEST_NODE)], [("p80", 80, "TCP")]))
    table = synced(objects(text))
    both = "10.180.0.1:80, 10.180.2.1:80"
    flows(table, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", "192.168.99.11", 80, both, True),
        ("external to external IP hits both endpoints, masqueraded", EXTERNAL_CLIENT, "192.168.99.11", 80, both, True),
        ("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", "1.2.3.4", 80, both, True),
        ("external to LB IP hits both endpoints, masqueraded", EXTERNAL_CLIENT, "1.2.3.4", 80, both, True),
        ("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, True),
        ("external to NodePort hits both endpoints, masqueraded", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
    ])


# (upstream also gives svc1 and svc3 health-check NodePorts, which the API refuses
# without eTP Local and kube-proxy ignores)
INTERNAL_EXTERNAL = (
    svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "LoadBalancer",
             "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")
    + svc_yaml("ns2", "svc2", "172.30.0.42", [("p80", 80, "TCP", 3002)], "LoadBalancer",
               "  healthCheckNodePort: 30002\n  externalTrafficPolicy: Local\n"
               "status:\n  loadBalancer:\n    ingress: [{ip: 5.6.7.8}]\n")
    + svc_yaml("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP", 3003)], "LoadBalancer",
               "  internalTrafficPolicy: Local\n"
               "status:\n  loadBalancer:\n    ingress: [{ip: 9.10.11.12}]\n")
    + slice_yaml("ns1", "svc1", [("10.180.0.1", TEST_NODE), ("10.180.1.1", "remote")], [("p80", 80, "TCP")])
    + slice_yaml("ns2", "svc2", [("10.180.0.2", TEST_NODE), ("10.180.1.2", "remote")], [("p80", 80, "TCP")])
    + slice_yaml("ns3", "svc3", [("10.180.0.3", TEST_NODE), ("10.180.1.3", "remote")], [("p80", 80, "TCP")]))

IE_FLOWS = [
    ("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", False),
    ("pod to NodePort", "10.0.0.2", TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to LB", "10.0.0.2", "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to ClusterIP", TEST_NODE_IP, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to NodePort", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to LB", TEST_NODE_IP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to ClusterIP", EXTERNAL_CLIENT, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to NodePort", EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", True),
    ("pod to ClusterIP with eTP:Local", "10.0.0.2", "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to NodePort with eTP:Local", "10.0.0.2", TEST_NODE_IP, 3002, "10.180.0.2:80, 10.180.1.2:80", False),
    ("pod to LB with eTP:Local", "10.0.0.2", "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", False),
    ("node to ClusterIP with eTP:Local", TEST_NODE_IP, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("node to NodePort with eTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3001, "10.180.0.1:80, 10.180.1.1:80", True),
    ("node to LB with eTP:Local", TEST_NODE_IP, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to ClusterIP with eTP:Local", EXTERNAL_CLIENT, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", True),
    ("external to NodePort with eTP:Local", EXTERNAL_CLIENT, TEST_NODE_IP, 3002, "10.180.0.2:80", False),
    ("external to LB with eTP:Local", EXTERNAL_CLIENT, "5.6.7.8", 80, "10.180.0.2:80", False),
    ("pod to ClusterIP with iTP:Local", "10.0.0.2", "172.30.0.43", 80, "10.180.0.3:80", False),
    ("pod to NodePort with iTP:Local", "10.0.0.2", TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("pod to LB with iTP:Local", "10.0.0.2", "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to ClusterIP with iTP:Local", TEST_NODE_IP, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("node to NodePort with iTP:Local", TEST_NODE_IP, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("node to LB with iTP:Local", TEST_NODE_IP, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to ClusterIP with iTP:Local", EXTERNAL_CLIENT, "172.30.0.43", 80, "10.180.0.3:80", True),
    ("external to NodePort with iTP:Local", EXTERNAL_CLIENT, TEST_NODE_IP, 3003, "10.180.0.3:80, 10.180.1.3:80", True),
    ("external to LB with iTP:Local", EXTERNAL_CLIENT, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", True),
]


@pytest.mark.parametrize("case,settings,overrides", [
    ("base", {}, {}),
    ("no LocalTrafficDetector", {"cluster_cidr": None}, {
        "node to ClusterIP": (None, False), "node to ClusterIP with eTP:Local": (None, False),
        "node to ClusterIP with iTP:Local": (None, False), "external to ClusterIP": (None, False),
        "external to ClusterIP with eTP:Local": (None, False), "external to ClusterIP with iTP:Local": (None, False),
        "pod to NodePort with eTP:Local": ("10.180.0.2:80", None), "pod to LB with eTP:Local": ("10.180.0.2:80", None),
    }),
    ("masqueradeAll", {"masquerade_all": True}, {
        "pod to ClusterIP": (None, True), "pod to ClusterIP with eTP:Local": (None, True),
        "pod to ClusterIP with iTP:Local": (None, True),
    }),
    ("masqueradeAll, no LocalTrafficDetector", {"masquerade_all": True, "cluster_cidr": None}, {
        "pod to ClusterIP": (None, True), "pod to ClusterIP with eTP:Local": (None, True),
        "pod to ClusterIP with iTP:Local": (None, True),
        "pod to NodePort with eTP:Local": ("10.180.0.2:80", None), "pod to LB with eTP:Local": ("10.180.0.2:80", None),
    }),
])
def test_internal_external_masquerade(case, settings, overrides):
    """Upstream's TestInternalExternalMasquerade, its four variants."""
    table = synced(objects(INTERNAL_EXTERNAL), fake_proxier(**settings))
    cases = []
    for name, src, dst, port, output, masq in IE_FLOWS:
        if name in overrides:
            new_out, new_masq = overrides[name]
            output = output if new_out is None else new_out
            masq = masq if new_masq is None else new_masq
        cases.append((name, src, dst, port, output, masq))
    assert set(overrides) <= {c[0] for c in IE_FLOWS}
    flows(table, cases)


def terminating_service(policy: str) -> list:
    return objects("apiVersion: v1\nkind: Service\nmetadata: {name: svc1, namespace: ns1}\n"
                   "spec:\n  type: LoadBalancer\n  clusterIP: 172.30.1.1\n"
                   f"  externalTrafficPolicy: {policy}\n"
                   + ("  healthCheckNodePort: 30000\n" if policy == "Local" else "") +
                   "  ports: [{name: '', port: 80, protocol: TCP, targetPort: 80}]\n"
                   "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.4}]\n")


def terminating_slice(endpoints) -> str:
    eps = "".join(f"- addresses: [{ip}]\n  nodeName: {node}\n"
                  f"  conditions: {{ready: {str(r).lower()}, serving: {str(s).lower()}, terminating: {str(t).lower()}}}\n"
                  for ip, node, r, s, t in endpoints)
    return ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            "metadata: {name: svc1-1, namespace: ns1, labels: {kubernetes.io/service-name: svc1}}\n"
            f"addressType: IPv4\nendpoints:\n{eps}ports: [{{name: '', port: 80, protocol: TCP}}]\n")


@pytest.mark.parametrize("endpoints,pod_out,ext_out,ext_masq", [
    ([("10.0.1.1", TEST_NODE, True, True, False), ("10.0.1.2", TEST_NODE, True, True, False),
      ("10.0.1.3", "another-node", False, True, True), ("10.0.1.4", "another-node", False, False, True),
      ("10.0.1.5", "another-node", True, True, False)],
     "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", True),
    ([("10.0.1.2", TEST_NODE, False, True, True), ("10.0.1.3", TEST_NODE, False, True, True),
      ("10.0.1.4", "another-node", False, False, True), ("10.0.1.5", "another-node", False, True, True)],
     "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", True),
    ([("10.0.1.5", "node-1", False, True, True)], "10.0.1.5:80", "10.0.1.5:80", True),
    ([("10.0.1.5", TEST_NODE, False, False, True), ("10.0.1.5", "node-1", False, False, True)],
     "REJECT", "REJECT", False),
])
def test_terminating_endpoints_traffic_policy_cluster(endpoints, pod_out, ext_out, ext_masq):
    """Upstream's TestTerminatingEndpointsTrafficPolicyCluster, then the endpoints deleted."""
    svc = terminating_service("Cluster")
    table = synced(svc + objects(terminating_slice(endpoints)))
    flows(table, [
        ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, pod_out, False),
        ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, ext_out, ext_masq),
    ])
    payload = render_payload(svc, [], fake_proxier(), changed={"ns1/svc1"}, existing=table)
    table.apply_text(payload.text)
    flows(table, [
        ("pod to clusterIP after endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT", False),
        ("external to LB after endpoints deleted", EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


@pytest.mark.parametrize("endpoints,pod_out,ext_out", [
    ([("10.0.1.5", "node-1", False, True, True)], "10.0.1.5:80", "DROP"),
    ([("10.0.1.5", TEST_NODE, False, False, True), ("10.0.1.5", "node-1", False, False, True)], "REJECT", "REJECT"),
])
def test_terminating_endpoints_traffic_policy_local(endpoints, pod_out, ext_out):
    """Two of upstream's TestTerminatingEndpointsTrafficPolicyLocal cases."""
    svc = terminating_service("Local")
    table = synced(svc + objects(terminating_slice(endpoints)))
    flows(table, [
        ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, pod_out, False),
        ("external to LB", EXTERNAL_CLIENT, "1.2.3.4", 80, ext_out, False),
    ])


# --------------------------------------------------------------------------- affinity


AFFINITY = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")], "ClusterIP",
                     "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n")
            + slice_yaml("ns1", "svc1", [("10.180.0.1", None), ("10.180.0.2", None)], [("p80", 80, "TCP")]))


@pytest.mark.parametrize("lb", ["vmap", "cascade"])
def test_session_affinity(lb):
    table = synced(objects(AFFINITY), load_balancing=lb)
    base = names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    ep = [names.endpoint_chain_base("ns1", "svc1", "tcp", "p80", f"10.180.0.{i}", 80) for i in (1, 2)]
    for b in ep:
        s = table.sets["affinity-" + b]
        assert (s.props.type, s.props.flags, s.props.timeout) == ("ipv4_addr", ("dynamic", "timeout"), 300)
        assert [r.text for r in table.chains["endpoint-" + b].rules] == [
            f"ip saddr {b.split('__')[1].split('/')[0]} jump mark-for-masquerade",
            f"update @affinity-{b} {{ ip saddr }}",
            f"meta l4proto tcp dnat to {b.split('__')[1].replace('/', ':')}"]
    rules = [r.text for r in table.chains["service-" + base].rules]
    assert rules[:3] == ["ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
                         f"ip saddr @affinity-{ep[0]} goto endpoint-{ep[0]}",
                         f"ip saddr @affinity-{ep[1]} goto endpoint-{ep[1]}"]
    flows(table, [("pod to affinity service", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.0.2:80", False)])


def test_affinity_turned_off_deletes_the_sets_in_a_partial_sync():
    table = synced(objects(AFFINITY))
    assert len([s for s in table.sets if s.startswith("affinity-")]) == 2
    plain = objects(AFFINITY.replace("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}\n", ""))
    payload = render_payload(plain, plain, fake_proxier(), changed={"ns1/svc1"}, existing=table)
    assert len(payload.deleted_affinity_sets) == 2
    table.apply_text(payload.text)
    assert not [s for s in table.sets if s.startswith("affinity-")]


# --------------------------------------------------------------------------- large clusters


def test_cascade_load_balancing_picks_each_endpoint_with_equal_probability():
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")])
            + slice_yaml("ns1", "svc1", [(f"10.180.0.{i}", None) for i in range(1, 5)], [("p80", 80, "TCP")]))
    table = synced(objects(text), load_balancing="cascade")
    base = names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    rules = [r.text for r in table.chains["service-" + base].rules][1:]
    assert [re.sub(r"\s*goto .*", "", r) for r in rules] == [
        "numgen random mod 4 == 0", "numgen random mod 3 == 0", "numgen random mod 2 == 0", ""]
    # P(i) = 1/(n-i) * prod(1 - 1/(n-j)) = 1/n for every i
    n_, left, probs = 4, 1.0, []
    for i in range(n_):
        p = left / (n_ - i)
        probs.append(p)
        left -= p
    assert all(abs(p - 0.25) < 1e-12 for p in probs)
    flows(table, [("pod to svc", "10.0.0.2", "172.30.0.41", 80,
                   "10.180.0.1:80, 10.180.0.2:80, 10.180.0.3:80, 10.180.0.4:80", False)])


def test_auto_load_balancing_switches_to_the_cascade_above_1000_endpoints():
    def build(n):
        text = ""
        for i in range(n):
            text += (svc_yaml("ns", f"s{i}", f"172.30.{i // 250}.{i % 250 + 1}", [("p", 80, "TCP")])
                     + slice_yaml("ns", f"s{i}", [(f"10.1.{i // 125}.{2 * (i % 125) + 1}", None),
                                                  (f"10.1.{i // 125}.{2 * (i % 125) + 2}", None)], [("p", 80, "TCP")]))
        return objects(text)
    small, large = build(500), build(501)       # 1000 and 1002 endpoints
    p_small = render_payload(small, small, fake_proxier(), existing=Table())
    p_large = render_payload(large, large, fake_proxier(), existing=Table())
    assert not p_small.large_cluster_mode and "vmap {" in p_small.text
    assert p_large.large_cluster_mode and "numgen random mod 2 == 0 goto" in p_large.text
    assert "numgen random mod 2 vmap" not in p_large.text
    # a partial sync follows what the table holds
    table = p_large.apply_to(Table())
    partial = render_payload(large, large, fake_proxier(), changed={"ns/s0"}, existing=table)
    assert partial.large_cluster_mode


# --------------------------------------------------------------------------- partial syncs


def repeated_objects(step: int) -> list:
    """The Services and EndpointSlices of upstream's TestSyncProxyRulesRepeated at each step."""
    text = svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")])
    text += slice_yaml("ns1", "svc1", [("10.0.1.1", None)], [("p80", 80, "TCP")])
    if step < 3:
        text += svc_yaml("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")])
        text += slice_yaml("ns2", "svc2", [("10.0.2.1", None)], [("p8080", 8080, "TCP")])
    if step >= 2:
        text += svc_yaml("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP")])
        eps3 = {2: ["10.0.3.1"], 3: ["10.0.3.1"], 4: ["10.0.3.1"], 5: ["10.0.3.1"], 6: ["10.0.3.1"],
                7: ["10.0.3.2"], 8: ["10.0.3.2", "10.0.3.3"], 9: [], 10: ["10.0.3.2", "10.0.3.3"],
                11: [], 12: ["10.0.3.2", "10.0.3.3"], 13: ["10.0.3.2", "10.0.3.3"]}[step]
        text += slice_yaml("ns3", "svc3", [(ip, None) for ip in eps3], [("p80", 80, "TCP")])
    if step >= 5:
        text += svc_yaml("ns4", "svc4", "172.30.0.44", [("p80", 80, "TCP")])
    if step >= 6:
        text += slice_yaml("ns4", "svc4", [("10.0.4.1", None)], [("p80", 80, "TCP")])
    return objects(text)


# step -> (Services changed since the previous sync, expected golden file)
REPEATED = [
    (1, None, "repeated.step1.txt"),
    (2, {"ns3/svc3"}, "repeated.step2.txt"),
    (3, {"ns2/svc2"}, "repeated.step3.txt"),
    (4, set(), "repeated.step4.txt"),
    (5, {"ns4/svc4"}, "repeated.step5.txt"),
    (6, {"ns4/svc4"}, "repeated.step6.txt"),
    (7, {"ns3/svc3"}, "repeated.step7.txt"),
    (8, {"ns3/svc3"}, "repeated.step8.txt"),
    (9, {"ns3/svc3"}, "repeated.step9.txt"),
    (10, {"ns3/svc3"}, "repeated.step10.txt"),
    (11, {"ns3/svc3"}, None),                  # emptied again ...
    (12, {ServicePortName("ns3", "svc3", "p80")}, "repeated.step10.txt"),   # ... and restored
    (13, set(), "repeated.step10.txt"),        # no change
]


@pytest.mark.parametrize("style", STYLES)
def test_sync_proxy_rules_repeated(style):
    """Upstream's TestSyncProxyRulesRepeated: a full sync, then partial syncs of the
    changed Services only, each applied on top of the table the previous left."""
    table = Table()
    for step, changed, expected in REPEATED:
        objs = repeated_objects(step)
        payload = render_payload(objs, objs, fake_proxier(), changed=changed, existing=table,
                                 service_cidrs=SERVICE_CIDRS, style=style)
        if changed is not None:
            assert not [s for s in payload.statements if s[0] in ("rule", "rules") and not names.is_service_chain(s[2])], \
                f"step {step}: a partial sync must not rewrite the fixed chains"
        table.apply_text(payload.text)
        if expected:
            assert_state(table, golden(expected))
        if step == 13:
            assert not payload.statements and not payload.cleanup, f"no change, nothing to do: {payload.text}"


def test_partial_sync_only_touches_the_changed_service():
    objs = repeated_objects(8)
    table = Table.from_text(render(objs, objs, fake_proxier(), existing=Table(), service_cidrs=SERVICE_CIDRS))
    objs9 = repeated_objects(9)
    payload = render_payload(objs9, objs9, fake_proxier(), changed={"ns3/svc3"}, existing=table)
    touched = {names.owner(s[2]) for s in payload.statements if s[0] in ("chain", "rule", "rules")}
    assert touched == {"ns3/svc3"}
    # svc3 lost its endpoints: its service-ips element goes, a no-endpoint element comes
    assert ("element", "delete", "service-ips", ["172.30.0.43 . tcp . 80"]) in payload.statements
    adds = [s for s in payload.statements if s[0] == "element" and s[1] == "add"]
    assert [(s[2], s[3]) for s in adds] == [
        ("no-endpoint-services", [("172.30.0.43 . tcp . 80", "ns3/svc3:p80", "goto reject-chain")])]
    assert sorted(payload.flushed_stale_chains) == sorted(table.owned_chains("ns3/svc3"))


def test_partial_sync_replaces_an_element_whose_verdict_changes():
    """ensureElem: an existing key with another value is deleted and added again."""
    svc = svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")], "ClusterIP", "{itp}")
    eps = slice_yaml("ns1", "svc1", [("10.180.0.1", TEST_NODE), ("10.180.0.2", "other")], [("p80", 80, "TCP")])
    cluster = objects(svc.replace("{itp}", "") + eps)
    local = objects(svc.replace("{itp}", "  internalTrafficPolicy: Local\n") + eps)
    table = synced(cluster)
    payload = render_payload(local, local, fake_proxier(), changed={"ns1/svc1"}, existing=table)
    key = "172.30.0.41 . tcp . 80"
    assert ("element", "delete", "service-ips", [key]) in payload.statements
    table.apply_text(payload.text)
    base = names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    assert table.elements("service-ips")[key].value == f"goto local-{base}"
    flows(table, [("pod to iTP Local ClusterIP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False)])


def test_partial_sync_of_a_deleted_service_removes_its_cluster_ip_and_chains():
    objs = overall()
    table = synced(objs)
    rest = [x for x in objs if getattr(x, "namespaced_name", None) != "ns4/svc4"
            and getattr(x, "service_name", None) != "svc4"]
    payload = render_payload(rest, rest, fake_proxier(), changed={"ns4/svc4"}, existing=table)
    table.apply_text(payload.text)
    assert "172.30.0.44" not in table.elements("cluster-ips")
    assert not any(k.startswith("192.168.99.33 ") for k in table.elements("service-ips"))
    assert all(not table.chains[c].rules for c in table.owned_chains("ns4/svc4"))
    # the next sync deletes the flushed chains, in its cleanup transaction
    later = render_payload(rest, rest, fake_proxier(), changed=set(), existing=table)
    assert sorted(later.deleted_stale_chains) == sorted(table.owned_chains("ns4/svc4"))
    assert later.cleanup and not later.statements
    table.apply_text(later.cleanup_text)
    assert not table.owned_chains("ns4/svc4")


def test_partial_sync_without_existing_can_only_add():
    objs = overall()
    payload = render_payload(objs, objs, fake_proxier(), changed={"ns1/svc1"})
    assert not [s for s in payload.statements if s[1] == "delete"]
    assert {s[2] for s in payload.statements if s[0] == "chain" and s[1] == "flush"} == {
        "service-ULMVA6XW-ns1/svc1/tcp/p80", "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"}
    table = synced(objs)
    table.apply_text(payload.text)
    assert_state(table, golden("overall.expected.txt"))


def test_partial_sync_of_a_missing_table_is_a_full_sync():
    objs = overall()
    payload = render_payload(objs, objs, fake_proxier(), changed={"ns1/svc1"}, existing=Table(),
                             service_cidrs=SERVICE_CIDRS)
    assert payload.full_sync
    assert_state(Table.from_text(payload.text), golden("overall.expected.txt"))


def test_sync_proxy_rules_startup():
    """Upstream's TestSyncProxyRulesStartup: the first full sync on top of a table that
    already holds part of the desired state."""
    table = Table.from_text((GOLDEN / "base_rules.txt").read_text() + (GOLDEN / "startup.initial.txt").read_text())
    text = (svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")])
            + svc_yaml("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")])
            + svc_yaml("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP")])
            + slice_yaml("ns1", "svc1", [("10.0.1.1", None), ("10.0.1.2", None)], [("p80", 80, "TCP")])
            + slice_yaml("ns2", "svc2", [("10.0.2.1", None)], [("p8080", 8080, "TCP")]))
    objs = objects(text)
    for style in STYLES:
        t = table.copy()
        payload = render_payload(objs, objs, fake_proxier(), existing=t, service_cidrs=SERVICE_CIDRS, style=style)
        added = [k for s in payload.statements if s[0] == "element" and s[1] == "add" and s[2] != names.NODEPORT_IPS
                 for k, _, _ in s[3]]
        assert sorted(added) == ["172.30.0.43", "172.30.0.43 . tcp . 80"]      # only what is missing
        t.apply_text(payload.text)
        assert_state(t, golden("startup.expected.txt"))


# --------------------------------------------------------------------------- the model


def test_table_refuses_what_the_kernel_refuses():
    t = Table.from_text("add table ip kube-proxy\nadd chain ip kube-proxy a\nadd chain ip kube-proxy b\n"
                        "add rule ip kube-proxy a goto b\n"
                        "add map ip kube-proxy m { type ipv4_addr : verdict ; }\n"
                        "add element ip kube-proxy m { 1.2.3.4 : goto b }\n")
    for bad in ("delete chain ip kube-proxy a",                       # has rules
                "delete chain ip kube-proxy b",                       # referenced
                "add rule ip kube-proxy a goto zzz",                  # missing chain
                "add rule ip kube-proxy a ip saddr @nope drop",       # missing set
                "add element ip kube-proxy m { 1.2.3.4 : goto a }",   # same key, other value
                "delete element ip kube-proxy m { 9.9.9.9 }"):        # missing element
        with pytest.raises(NftError):
            t.copy().apply_text(bad)
    t.apply_text("add element ip kube-proxy m { 1.2.3.4 : goto b }")   # same value: fine
    t.apply_text("flush chain ip kube-proxy a\ndelete element ip kube-proxy m { 1.2.3.4 }\ndelete chain ip kube-proxy b")
    assert "b" not in t.chains


def test_table_from_nft_json():
    data = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
        {"set": {"family": "ip", "name": "cluster-ips", "table": "kube-proxy", "type": "ipv4_addr",
                 "comment": "Active ClusterIPs", "elem": ["172.30.0.41", "172.30.0.46"]}},
        {"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy",
                 "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
                 "elem": [[{"concat": ["172.30.0.41", "tcp", 80]},
                           {"goto": {"target": "service-ULMVA6XW-ns1/svc1/tcp/p80"}}]]}},
        {"map": {"family": "ip", "name": "no-endpoint-services", "table": "kube-proxy",
                 "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
                 "elem": [[{"elem": {"val": {"concat": ["172.30.0.46", "tcp", 80]}, "comment": "ns6/svc6:p80"}},
                           {"goto": {"target": "reject-chain"}}]]}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting", "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "reject-chain"}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "service-ULMVA6XW-ns1/svc1/tcp/p80"}},
        {"chain": {"family": "ip", "table": "kube-proxy", "name": "endpoint-GONE-ns1/svc1/tcp/p80__10.1.1.1/80"}},
        {"rule": {"family": "ip", "table": "kube-proxy", "chain": "service-ULMVA6XW-ns1/svc1/tcp/p80",
                  "expr": [{"vmap": {"key": {"numgen": {"mode": "random", "mod": 1}},
                                     "data": {"set": [[0, {"goto": {"target": "reject-chain"}}]]}}}]}},
    ]}
    t = Table.from_json(data)
    assert t.exists and t.chains["nat-prerouting"].base == ("nat", "prerouting", -100)
    assert t.elements("service-ips")["172.30.0.41 . tcp . 80"].value == "goto service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert t.elements("no-endpoint-services")["172.30.0.46 . tcp . 80"].comment == "ns6/svc6:p80"
    assert t.owned_elements("ns6/svc6") == {"no-endpoint-services": {"172.30.0.46 . tcp . 80"}}
    assert t.is_referenced("reject-chain") and t.is_referenced("service-ULMVA6XW-ns1/svc1/tcp/p80")
    assert t.empty_service_chains() == {"endpoint-GONE-ns1/svc1/tcp/p80__10.1.1.1/80"}
    assert t.chain_rule_count("service-ULMVA6XW-ns1/svc1/tcp/p80") == 1


def test_parse_listing_and_canonical_rules():
    listing = """table ip kube-proxy {
\tcomment "rules for kube-proxy"
\tset affinity-X {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 3h
\t}

\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
\t\telements = { 1.2.3.4 . tcp . 80 : goto a,
\t\t\t     172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto a }
\t}

\tchain nat-prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump a
\t}

\tchain a {
\t\tmeta mark & 0x00004000 == 0x00000000 return
\t\tip daddr 172.30.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"
\t\tnumgen random mod 2 vmap { 0 : goto a, 1 : goto a }
\t}
}
"""
    t = parse_listing(listing)
    assert t.comment == "rules for kube-proxy"
    assert t.sets["affinity-X"].props.timeout == 10800 and t.sets["affinity-X"].props.flags == ("dynamic", "timeout")
    assert t.chains["nat-prerouting"].base == ("nat", "prerouting", -100)
    assert t.elements("service-ips")["172.30.0.46 . tcp . 80"].comment == "ns6/svc6:p80"
    got = [(r.text, r.comment) for r in t.chains["a"].rules]
    assert got[1] == ("ip daddr 172.30.0.0/16 drop", "Drop traffic to unallocated ClusterIPs")
    assert canonical_rule("mark and 0x4000 == 0 return") == got[0][0]
    assert canonical_rule("ip daddr { 172.30.0.0/16 } drop") == got[1][0]
    assert canonical_rule("numgen random mod 2 vmap { 0 : goto a , 1 : goto a }") == got[2][0]
    assert canonical_rule("numgen random mod 3 == 0 goto b") == "numgen random mod 3 0 goto b"
    assert canonical_rule("iif cni0 goto b") == 'iif "cni0" goto b'


def test_local_detectors_by_interface():
    svc = objects(svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP", 3001)], "NodePort",
                           "  externalTrafficPolicy: Local\n")
                  + slice_yaml("ns1", "svc1", [("10.180.0.1", TEST_NODE)], [("p80", 80, "TCP")]))
    base = names.service_port_chain_base("ns1", "svc1", "tcp", "p80")
    bridge = synced(svc, fake_proxier(cluster_cidr=None, local_bridge="cni0"))
    assert bridge.chains["service-" + base].rules[0].text == "ip daddr 172.30.0.41 iif != cni0 jump mark-for-masquerade"
    assert bridge.chains["external-" + base].rules[0].text == f"iif cni0 goto service-{base}"
    flows(bridge, [("from the bridge", "10.9.9.9", TEST_NODE_IP, 3001, "10.180.0.1:80", False)])
    prefix = synced(svc, fake_proxier(cluster_cidr=None, local_interface_prefix="veth"))
    assert prefix.chains["external-" + base].rules[0].text == f'iifname "veth*" goto service-{base}'


def test_ipv6_render():
    text = (svc_yaml("ns1", "svc1", "fd00:172:30::41", [("p80", 80, "TCP")])
            + slice_yaml("ns1", "svc1", [("fd00:10:180::1", None)], [("p80", 80, "TCP")]))
    out = render(objects(text), objects(text), fake_proxier(ip_family="IPv6"), service_cidrs="fd00:172:30::/112")
    assert out.startswith('add table ip6 kube-proxy { comment "rules for kube-proxy" ; }')
    assert "ip6 daddr { fd00:172:30::/112 } drop" in out and "type ipv6_addr ;" in out
    assert "meta l4proto tcp dnat to [fd00:10:180::1]:80" in out
    assert "endpoint-" + names.endpoint_chain_base("ns1", "svc1", "tcp", "p80", "fd00:10:180::1", 80) in out
    table = Table.from_text(out, family="ip6")
    flows(table, [("pod to v6 svc", "fd00:10::2", "fd00:172:30::41", 80, "[fd00:10:180::1]:80", False)])


def test_render_manifests_finds_the_nftables_backend():
    from kproxy.render import render_manifests
    text = render_manifests(str(GOLDEN / "overall.input.yaml"), backend="nftables", node_name=TEST_NODE,
                            node_ip=TEST_NODE_IP, cluster_cidr="10.0.0.0/8", service_cidr="172.30.0.0/16",
                            node_port_range="3000-30000")
    table = Table.from_text(text)
    assert "service-ULMVA6XW-ns1/svc1/tcp/p80" in table.chains
    assert table.elements("nodeport-ips") and "192.168.0.2" in table.elements("nodeport-ips")


def test_bad_arguments():
    with pytest.raises(ValueError):
        render([], [], fake_proxier(), load_balancing="roundrobin")
    with pytest.raises(ValueError):
        render([], [], fake_proxier(), style="json")
