"""Rendered payloads loaded by the real iptables-restore, in a throwaway network namespace.

Never runs iptables in the machine's own namespace: every command goes through
``ip netns exec kpipt-<6 hex>``, and the namespace is deleted afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from kproxy.model import load, loads
from kproxy.proxy.iptables import NodeSettings, parse_dump, render, render_payload
from kproxy.proxy.iptables.jumps import all_jump_rules

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a network namespace"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("iptables-restore")),
                       reason="needs ip and iptables-restore"),
]

GOLDEN = Path(__file__).parent.parent / "unit" / "golden" / "upstream"
from tests.conftest import SEED as _SEED  # noqa: E402

SEED = _SEED / "Sesion4-Kubernetes" / "Stateful-app"

# Upstream's fake proxier, minus the nfacct matches (a restore naming a missing nfacct
# object fails) and with --random-fully (iptables >= 1.6.2 has it).
SETTINGS = NodeSettings("test-node", ["192.168.0.2", "192.168.1.2", "192.168.99.11"],
                        cluster_cidr="10.0.0.0/8", masquerade_mark="0x4000")


@pytest.fixture
def netns():
    name = f"kpipt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns: str, *argv: str, stdin: str = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr}")
    return res


def restore(ns: str, payload: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(ns, "iptables-restore", "--noflush", "--counters", stdin=payload, check=check)


def saved(ns: str, table: str):
    return parse_dump(run(ns, "iptables-save", "-t", table).stdout).table(table)


def kube_chains(ns: str) -> Dict[str, List[str]]:
    nat = saved(ns, "nat")
    return {c.name: [r.raw for r in c.rules] for c in nat.chains if c.name.startswith("KUBE-")}


def test_overall_payload_loads_and_iptables_save_shows_every_chain(netns):
    objs = [lo.obj for lo in load(str(GOLDEN / "overall.input.yaml"))]
    payload = render(objs, objs, SETTINGS)
    restore(netns, payload)
    wanted = parse_dump(payload)
    for table in ("filter", "nat"):
        got = saved(netns, table)
        for chain in wanted.table(table).chains:
            live = got.chain(chain.name)
            assert live is not None, f"{table} {chain.name} missing"
            assert len(live.rules) == len(chain.rules), (table, chain.name, [r.raw for r in live.rules])
    nat = run(netns, "iptables-save", "-t", "nat").stdout
    # iptables-save's normalisations (kube-proxy-iptables.md section 10)
    assert "--probability 0.50000000000" in nat
    assert "-m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-I77PXRDZVX7PMWMN --mask 255.255.255.255 --rsource" in nat
    assert "-d 1.2.3.4/32" in nat and "-j MASQUERADE --random-fully" in nat
    assert "--set-xmark 0x4000/0x4000" in nat
    filt = run(netns, "iptables-save", "-t", "filter").stdout
    assert "-j REJECT --reject-with icmp-port-unreachable" in filt
    assert '-A KUBE-PROXY-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp --dport 80 -j DROP' in filt


def test_jump_rules_ensure_like_kube_proxy(netns):
    restore(netns, render([], [], SETTINGS))
    for _ in range(2):                               # a second full sync adds nothing
        for jump in all_jump_rules():
            if run(netns, "iptables", *jump.check_argv(), check=False).returncode != 0:
                run(netns, "iptables", *jump.insert_argv())
    filt = saved(netns, "filter")
    targets = lambda chain: [r.jump.value for r in filt.chain(chain).rules]
    assert targets("INPUT") == ["KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"]
    assert targets("FORWARD") == ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"]
    assert targets("OUTPUT") == ["KUBE-FIREWALL", "KUBE-PROXY-FIREWALL", "KUBE-SERVICES"]
    nat = saved(netns, "nat")
    assert [r.jump.value for r in nat.chain("PREROUTING").rules] == ["KUBE-SERVICES"]
    assert [r.jump.value for r in nat.chain("POSTROUTING").rules] == ["KUBE-POSTROUTING"]
    for jump in all_jump_rules():                     # and CleanupLeftovers-style removal
        run(netns, "iptables", *jump.delete_argv())
    assert saved(netns, "filter").chain("INPUT").rules == []


BASE = """
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec: {clusterIP: 172.30.0.41, ports: [{name: p80, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc3, namespace: ns3}
spec: {clusterIP: 172.30.0.43, ports: [{name: p80, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc4, namespace: ns4}
spec: {clusterIP: 172.30.0.44, ports: [{name: p80, port: 80}]}
"""


def _slice(ns, svc, *ips):
    eps = ", ".join(f"{{addresses: [{ip}]}}" for ip in ips)
    return loads(f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: IPv4
endpoints: [{eps}]
ports: [{{name: p80, port: 80, protocol: TCP}}]
""")[0].obj


def test_partial_syncs_and_stale_chains_in_the_kernel(netns):
    """upstream TestSyncProxyRulesRepeated, steps 6-10, against real iptables: partial
    payloads leave unchanged chains alone, stale chains are deleted, and a partial
    restore that would delete a chain still referenced fails atomically, after which a
    full sync succeeds."""
    services = {s.name: s for s in (lo.obj for lo in loads(BASE))}
    slices = {"svc1": _slice("ns1", "svc1", "10.0.1.1"), "svc3": _slice("ns3", "svc3", "10.0.3.1"),
              "svc4": _slice("ns4", "svc4", "10.0.4.1")}

    def sync(changed=None, check=True):
        existing = set(kube_chains(netns))
        out = render_payload(services.values(), slices.values(), SETTINGS, changed=changed,
                             existing_chains=existing)
        res = restore(netns, out.text, check=check)
        return out, res

    full, _ = sync()
    live = kube_chains(netns)
    assert {c for c in live if c.startswith(("KUBE-SVC-", "KUBE-SEP-"))} == full.active_nat_chains
    svc1_rules = live["KUBE-SVC-XPGD46QRK7WJZT7O"]

    slices["svc3"] = _slice("ns3", "svc3", "10.0.3.2", "10.0.3.3")        # endpoints change
    out, _ = sync({"ns3/svc3"})
    assert out.deleted_chains == ["KUBE-SEP-BSWRHOQ77KEXZLNL"]
    live = kube_chains(netns)
    assert "KUBE-SEP-BSWRHOQ77KEXZLNL" not in live
    assert live["KUBE-SVC-XPGD46QRK7WJZT7O"] == svc1_rules                # untouched by the partial sync
    assert any("--probability 0.50000000000" in r for r in live["KUBE-SVC-X27LE4BHSL4DOUIK"])

    # A foreign rule jumps from svc3's chain to svc4's endpoint; then svc4 goes away.
    run(netns, "iptables", "-t", "nat", "-A", "KUBE-SVC-X27LE4BHSL4DOUIK", "-j", "KUBE-SEP-AYCN5HPXMIRJNJXU")
    del services["svc4"], slices["svc4"]
    before = kube_chains(netns)
    out, res = sync({"ns4/svc4"}, check=False)
    assert res.returncode != 0 and "-X KUBE-SEP-AYCN5HPXMIRJNJXU" in out.text
    assert kube_chains(netns) == before                                   # nothing applied
    out, _ = sync(None)                                                   # the full resync
    live = kube_chains(netns)
    assert "KUBE-SEP-AYCN5HPXMIRJNJXU" not in live and "KUBE-SVC-4SW47YFZTEDKD3PK" not in live
    assert sorted(out.deleted_chains) == ["KUBE-SEP-AYCN5HPXMIRJNJXU", "KUBE-SVC-4SW47YFZTEDKD3PK"]
    assert not any("KUBE-SEP-AYCN5HPXMIRJNJXU" in r for r in live["KUBE-SVC-X27LE4BHSL4DOUIK"])


@pytest.mark.skipif(not SEED.is_dir(), reason="seed exercise not available")
def test_seed_stateful_app_payload_loads(netns):
    from kproxy.render import render_manifests

    payload = render_manifests(str(SEED), lb_pool="192.168.5.200/29")
    restore(netns, payload)
    live = kube_chains(netns)
    svc = [c for c in live if c.startswith("KUBE-SVC-")]
    assert len(svc) == 1 and len([c for c in live if c.startswith("KUBE-SEP-")]) == 4
    probabilities = [r.split("--probability ")[1].split()[0] for r in live[svc[0]] if "--probability" in r]
    assert probabilities == ["0.25000000000", "0.33333333349", "0.50000000000"]
    assert any("-d 192.168.5.201/32" in r for r in live["KUBE-SERVICES"])   # the LB IP from the pool


def _large_cluster_objects():
    """A Service with more endpoints than upstream's large-cluster threshold (no comments)."""
    eps = "\n".join(f"  - addresses: [10.1.{i // 250}.{i % 250 + 1}]" for i in range(1001))
    return [lo.obj for lo in loads(f"""
apiVersion: v1
kind: Service
metadata: {{name: big, namespace: ns1}}
spec: {{clusterIP: 172.30.0.50, ports: [{{name: p80, port: 80, protocol: TCP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: big-1, namespace: ns1, labels: {{kubernetes.io/service-name: big}}}}
addressType: IPv4
ports: [{{name: p80, port: 80, protocol: TCP}}]
endpoints:
{eps}
""")]


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_iptables_save_reads_back_to_the_payload_in_canonical_form(netns, flavour):
    """What the drift check relies on: for each payload, the canonical form of what the
    kernel holds equals the canonical form of what was written, chain by chain."""
    from kproxy.proxy.iptables.canon import canonical_rules
    from kproxy.render import render_manifests

    if not shutil.which(f"iptables-{flavour}-restore"):
        pytest.skip(f"no iptables-{flavour}-restore")
    overall = [lo.obj for lo in load(str(GOLDEN / "overall.input.yaml"))]
    large = _large_cluster_objects()
    payloads = {
        "overall": render(overall, overall, SETTINGS),
        "overall without --random-fully": render(overall, overall, NodeSettings(
            "test-node", ["192.168.0.2"], cluster_cidr="10.0.0.0/8", random_fully=False)),
        "stateful-app": render_manifests(str(SEED), lb_pool="192.168.5.200/29"),
        "large cluster": render(large, large, SETTINGS),
    }
    for what, payload in payloads.items():
        for table in ("nat", "filter"):       # each payload on its own: flush what the last left
            run(netns, f"iptables-{flavour}", "-t", table, "-F")
            run(netns, f"iptables-{flavour}", "-t", table, "-X")
        run(netns, f"iptables-{flavour}-restore", "--noflush", stdin=payload)
        held = "".join(run(netns, f"iptables-{flavour}-save", "-t", t).stdout for t in ("nat", "filter"))
        want, have = canonical_rules(payload), canonical_rules(held)
        assert want and set(want) == set(have), (what, set(want) ^ set(have))
        differ = [key for key in want if want[key] != have[key]]
        assert not differ, (what, differ[:3], [(want[k][:2], have[k][:2]) for k in differ[:1]])
