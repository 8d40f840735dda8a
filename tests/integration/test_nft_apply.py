"""Rendered nftables payloads loaded by the real nft, in throwaway network namespaces.

Never runs nft in the machine's own namespace: every command goes through
``ip netns exec kpnft-<6 hex>`` (``kproxy.kernel.nft`` refuses the machine's own), the
namespaces are deleted afterwards, and traffic only flows between namespaces made here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy.errors import KernelError
from kproxy.kernel import nft
from kproxy.proxy.iptables.render import NodeSettings
from kproxy.proxy.nftables import Table, render, render_payload
from kproxy.proxy.nftables.ruleset import canonical_rule, parse_listing
from tests.conftest import unique
from tests.unit import test_nftables_render as unit

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("nft")), reason="needs ip and nft"),
]

GOLDEN = Path(__file__).parent.parent / "unit" / "golden_nft"
CIDRS = unit.SERVICE_CIDRS


def run(ns: str, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, **kwargs)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr}")
    return res


@pytest.fixture
def make_netns():
    made = []

    def factory() -> str:
        name = unique("kpnft-")
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return name

    try:
        yield factory
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def netns(make_netns):
    return make_netns()


def assert_kernel_matches(ns: str, model: Table, family: str = "ip") -> None:
    """What ``nft list`` and ``nft -j list`` show equals the model, rule by rule."""
    live = parse_listing(nft.list_table_text(ns, family), family)
    assert sorted(live.chains) == sorted(model.chains)
    for name, chain in model.chains.items():
        got = [(canonical_rule(r.text), r.comment) for r in live.chains[name].rules]
        want = [(canonical_rule(r.text), r.comment) for r in chain.rules]
        assert got == want, name
        assert live.chains[name].base == chain.base, name
    assert sorted(live.sets) == sorted(model.sets)
    for name, s in model.sets.items():
        ls = live.sets[name]
        assert (ls.kind, ls.props.type, ls.props.timeout, ls.props.comment) == (
            s.kind, s.props.type, s.props.timeout, s.props.comment), name
        assert {k: (e.comment, e.value) for k, e in ls.elements.items()} == \
               {k: (e.comment, e.value) for k, e in s.elements.items()}, name
    js = nft.read_table(ns, family)
    assert {c: len(x.rules) for c, x in js.chains.items()} == {c: len(x.rules) for c, x in model.chains.items()}
    for name in model.sets:
        assert {k: (e.comment, e.value) for k, e in js.elements(name).items()} == \
               {k: (e.comment, e.value) for k, e in model.elements(name).items()}, name
    assert js.empty_service_chains() == model.empty_service_chains()


@pytest.mark.parametrize("style", unit.STYLES)
def test_overall_payload_loads_and_lists_back(netns, style):
    objs = unit.overall()
    payload = render_payload(objs, objs, unit.fake_proxier(), existing=Table(), service_cidrs=CIDRS, style=style)
    nft.apply(netns, payload.text)
    model = Table.from_text(payload.text)
    unit.assert_state(model, unit.golden("overall.expected.txt"))
    assert_kernel_matches(netns, model)
    # a second full sync, knowing nothing, and one knowing the table: both load
    nft.apply(netns, render(objs, objs, unit.fake_proxier(), service_cidrs=CIDRS, style=style))
    again = render_payload(objs, objs, unit.fake_proxier(), existing=nft.read_table(netns), service_cidrs=CIDRS,
                           style=style)
    nft.apply(netns, again.text)
    assert_kernel_matches(netns, model)


@pytest.mark.parametrize("style", unit.STYLES)
def test_partial_syncs_against_the_kernel(netns, style):
    """Upstream's TestSyncProxyRulesRepeated, applied for real: after every sync the
    kernel holds what the model holds (and so what upstream expects)."""
    existing = Table()
    for step, changed, expected in unit.REPEATED:
        objs = unit.repeated_objects(step)
        payload = render_payload(objs, objs, unit.fake_proxier(), changed=changed, existing=existing,
                                 service_cidrs=CIDRS, style=style)
        assert nft.sync(netns, payload), f"step {step}: the cleanup transaction failed"
        payload.apply_to(existing)
        if expected:
            unit.assert_state(existing, unit.golden(expected))
        assert_kernel_matches(netns, existing)
        # the table read back from the kernel renders the same next step
        assert nft.read_table(netns).owned_chains("ns3/svc3") == existing.owned_chains("ns3/svc3")


def test_startup_on_a_partly_filled_table(netns):
    nft.apply(netns, (GOLDEN / "base_rules.txt").read_text() + (GOLDEN / "startup.initial.txt").read_text())
    objs = unit.objects(
        unit.svc_yaml("ns1", "svc1", "172.30.0.41", [("p80", 80, "TCP")])
        + unit.svc_yaml("ns2", "svc2", "172.30.0.42", [("p8080", 8080, "TCP")])
        + unit.svc_yaml("ns3", "svc3", "172.30.0.43", [("p80", 80, "TCP")])
        + unit.slice_yaml("ns1", "svc1", [("10.0.1.1", None), ("10.0.1.2", None)], [("p80", 80, "TCP")])
        + unit.slice_yaml("ns2", "svc2", [("10.0.2.1", None)], [("p8080", 8080, "TCP")]))
    existing = nft.read_table(netns)
    payload = render_payload(objs, objs, unit.fake_proxier(), existing=existing, service_cidrs=CIDRS)
    nft.apply(netns, payload.text)
    model = Table.from_text((GOLDEN / "base_rules.txt").read_text() + (GOLDEN / "startup.initial.txt").read_text())
    model.apply_text(payload.text)
    unit.assert_state(model, unit.golden("startup.expected.txt"))
    assert_kernel_matches(netns, model)


def test_cascade_affinity_local_policy_and_source_ranges_load(netns):
    objs = unit.objects(unit.INTERNAL_EXTERNAL) + unit.objects(unit.AFFINITY)
    objs += unit.objects(
        unit.svc_yaml("ns9", "fw", "172.30.0.49", [("p80", 80, "TCP", 3009)], "LoadBalancer",
                      '  loadBalancerSourceRanges: ["192.168.0.0/24", "203.0.113.0/25"]\n'
                      "status:\n  loadBalancer:\n    ingress: [{ip: 1.2.3.9}]\n")
        + unit.slice_yaml("ns9", "fw", [("10.180.0.9", None), ("10.180.1.9", None), ("10.180.2.9", None)],
                          [("p80", 80, "TCP")]))
    for lb in ("cascade", "vmap"):
        payload = render_payload(objs, objs, unit.fake_proxier(), existing=nft.read_table(netns), service_cidrs=CIDRS,
                                 load_balancing=lb)
        nft.apply(netns, payload.text)
        assert_kernel_matches(netns, Table.from_text(render(objs, objs, unit.fake_proxier(), service_cidrs=CIDRS,
                                                            load_balancing=lb)))


def test_ipv6_table_loads(netns):
    text = (unit.svc_yaml("ns1", "svc1", "fd00:172:30::41", [("p80", 80, "TCP", 3001)], "NodePort")
            + unit.slice_yaml("ns1", "svc1", [("fd00:10:180::1", None), ("fd00:10:180::2:1", unit.TEST_NODE)],
                              [("p80", 80, "TCP")]))
    objs = unit.objects(text)
    out = render(objs, objs, unit.fake_proxier(ip_family="IPv6"), service_cidrs="fd00:172:30::/112")
    nft.apply(netns, out)
    assert nft.table_exists(netns, "ip6") and not nft.table_exists(netns, "ip")
    assert_kernel_matches(netns, Table.from_text(out, family="ip6"), family="ip6")


def test_longest_names_load(netns):
    """63-character namespace, Service and port names: chain names cut to 240 + prefix,
    element comments cut to nft's 128."""
    ns_, svc, port = unit.LONG_NS, unit.LONG_SVC, unit.LONG_PORT
    text = (unit.svc_yaml(ns_, svc, "172.30.0.41", [(port, 443, "TCP", 3001)], "NodePort")
            + unit.slice_yaml(ns_, svc, [("10.180.0.1", None)], [(port, 443, "TCP")])
            + unit.svc_yaml(ns_, "empty", "172.30.0.42", [(port, 443, "TCP", 3002)], "NodePort"))
    objs = unit.objects(text)
    out = render(objs, objs, unit.fake_proxier(), existing=Table(), service_cidrs=CIDRS)
    nft.apply(netns, out)
    assert_kernel_matches(netns, Table.from_text(out))


def test_delete_table_and_refusals(netns):
    assert nft.delete_table(netns) is False
    assert nft.read_table(netns).exists is False
    objs = unit.overall()
    nft.apply(netns, render(objs, objs, unit.fake_proxier()))
    assert nft.table_exists(netns)
    assert nft.delete_table(netns) is True
    assert not nft.table_exists(netns) and nft.list_table(netns) is None
    with pytest.raises(KernelError):
        nft.apply(netns, "add rule ip kube-proxy nowhere drop\n")
    # the machine's own namespace (the one this process runs in) is refused before
    # anything runs; the commands tried are harmless ones in case the check ever failed
    own = "/proc/self/ns/net"
    for call in (lambda: nft.apply(own, "list tables\n"), lambda: nft.read_table(own),
                 lambda: nft.list_table_text(own)):
        with pytest.raises(KernelError, match="own network namespace"):
            call()


SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16); print("listening", flush=True)
while True:
    c, peer = s.accept(); c.sendall(f"hello {peer[0]}\n".encode()); c.close()
"""

CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode().strip())
except ConnectionRefusedError:
    print("refused")
except (socket.timeout, TimeoutError):
    print("timeout")
"""


def test_traffic_through_a_cluster_ip_and_a_node_port(make_netns):
    """A node namespace with kube-proxy's rules and a pod namespace behind a veth: a
    ClusterIP and a NodePort reach the pod's listener; a Service without endpoints and
    an unknown port of a ClusterIP are rejected; an unallocated ClusterIP is dropped."""
    node, pod = make_netns(), make_netns()
    veth_node, veth_pod = f"kn{node[-6:]}", f"kp{node[-6:]}"
    subprocess.run(["ip", "link", "add", veth_node, "netns", node, "type", "veth", "peer", "name", veth_pod,
                    "netns", pod], check=True)
    run(node, "ip", "addr", "add", "10.244.0.1/24", "dev", veth_node)
    run(node, "ip", "link", "set", veth_node, "up")
    run(node, "ip", "link", "set", "lo", "up")
    run(node, "ip", "route", "add", "10.96.0.0/12", "dev", veth_node)
    run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    run(pod, "ip", "addr", "add", "10.244.0.2/24", "dev", veth_pod)
    run(pod, "ip", "link", "set", veth_pod, "up")
    run(pod, "ip", "link", "set", "lo", "up")
    run(pod, "ip", "route", "add", "default", "via", "10.244.0.1")

    objs = unit.objects(
        unit.svc_yaml("default", "web", "10.96.0.10", [("http", 80, "TCP", 30080)], "NodePort")
        + unit.slice_yaml("default", "web", [("10.244.0.2", "node1")], [("http", 8080, "TCP")])
        + unit.svc_yaml("default", "empty", "10.96.0.11", [("http", 80, "TCP")]))
    settings = NodeSettings(node_name="node1", node_ips=["10.244.0.1"], cluster_cidr="10.244.0.0/16")
    nft.apply(node, render(objs, objs, settings, existing=Table(), service_cidrs="10.96.0.0/12"))

    server = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c", SERVER, "10.244.0.2", "8080"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"

        def connect(ns, ip, port, timeout=2.0):
            return run(ns, sys.executable, "-c", CLIENT, ip, str(port), str(timeout)).stdout.strip()

        # from the node: DNAT in nat-output, and masqueraded (the node is not a pod)
        assert connect(node, "10.96.0.10", 80) == "hello 10.244.0.1"
        # from the pod to its own Service: hairpin, masqueraded to the node's address
        assert connect(pod, "10.96.0.10", 80) == "hello 10.244.0.1"
        # NodePort on the node's primary IP, from the pod
        assert connect(pod, "10.244.0.1", 30080) == "hello 10.244.0.1"
        assert connect(node, "10.96.0.11", 80) == "refused"          # no endpoints: reject-chain
        assert connect(node, "10.96.0.10", 81) == "refused"          # unknown port of a ClusterIP
        assert connect(node, "10.96.0.99", 80, timeout=0.5) == "timeout"   # unallocated: dropped
        live = nft.read_table(node)
        assert "10.96.0.10" in live.elements("cluster-ips")
    finally:
        server.kill()
        server.wait()
