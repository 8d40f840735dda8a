"""Switching kube-proxy's mode on a running cluster, and the rules of each mode side by side."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import SEED, kproxy_cli
from tests.integration.test_services import Lab, deployment, probe, service

pytestmark = pytest.mark.root

# Connect to ip:port every 20 ms until killed; print one line per attempt: ok or the error.
PROBER = """
import socket, sys, time
while True:
    t = time.monotonic()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close(); print("ok", t, flush=True)
    except OSError as e:
        print("fail", t, type(e).__name__, flush=True)
    time.sleep(0.02)
"""


@pytest.fixture
def lab(make_cluster, tmp_path):
    c = make_cluster(nodes=2, backend="iptables")
    lab = Lab(c, tmp_path)
    yield lab
    lab.store.close()


def kube_leftovers(lab, node="node1"):
    ns = lab.c.node(node).netns
    ipt = "".join(lab.c.exec_in(ns, ["iptables-save", "-t", t], capture_output=True, text=True).stdout
                  for t in ("nat", "filter"))
    nft = lab.c.exec_in(ns, ["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [ln for ln in ipt.splitlines() if "KUBE-" in ln], "kube-proxy" in nft


def test_switch_modes_on_a_running_cluster(lab):
    env = {"KPROXY_CLUSTER": lab.c.name}
    lab.apply(deployment("web", 2) + service("web", 80, type_="NodePort"))
    ips = {p.name: p.ip for p in lab.c.pods.values()}
    vip = lab.svc("web").cluster_ip
    prober = lab.c.start_process(lab.client, [sys.executable, "-c", PROBER, vip, "80"], stdout=subprocess.PIPE,
                                 text=True)
    try:
        time.sleep(0.3)
        out = kproxy_cli("proxy-mode", "set", "nftables", env=env, check=True).stdout
        assert "switched from iptables to nftables mode on 2 nodes" in out and "ms" in out
        time.sleep(1.0)
    finally:
        prober.terminate()
        lines = prober.communicate(timeout=5)[0].splitlines()
    assert kproxy_cli("proxy-mode", "get", env=env, check=True).stdout.strip() == "nftables"
    ipt, has_nft = kube_leftovers(lab)
    assert ipt == [] and has_nft, "the iptables mode's rules are gone, the nftables table is there"
    # traffic works again, from a pod and from outside; pods kept their addresses
    lab.c = type(lab.c).open(lab.c.name)
    assert {p.name: p.ip for p in lab.c.pods.values()} == ips
    assert not probe(lab.c, lab.client.netns, vip, 80, n=10)["errors"]
    assert not probe(lab.c, lab.c.external_ns, lab.c.nodes[1].ip, lab.svc("web").ports[0].node_port)["errors"]
    # the client connected before the switch, and every attempt after it succeeds; the
    # failures (if any) are the window `proxy-mode set` reported, printed, not timed here
    first_ok = next(i for i, ln in enumerate(lines) if ln.startswith("ok"))
    last_fail = max((i for i, ln in enumerate(lines) if ln.startswith("fail")), default=-1)
    assert first_ok == 0, lines[:3]
    assert last_fail < len(lines) - 5, f"connections still failing after the switch: {lines[-8:]}"
    print(f"{sum(ln.startswith('fail') for ln in lines)} of {len(lines)} connections failed during the switch")
    # and back
    kproxy_cli("proxy-mode", "set", "iptables", env=env, check=True)
    ipt, has_nft = kube_leftovers(lab)
    assert ipt and not has_nft
    assert not probe(lab.c, lab.client.netns, vip, 80, n=10)["errors"]


def test_ipvs_mode_is_refused_clearly_where_the_kernel_lacks_it(lab, state_dir):
    from kproxy.kernel import ipvs
    if ipvs.available()[0]:
        pytest.skip("this kernel has IP_VS: the refusal cannot be shown here")
    env = {"KPROXY_CLUSTER": lab.c.name}
    lab.apply(deployment("web", 1) + service("web", 80))
    res = kproxy_cli("proxy-mode", "set", "ipvs", env=env)
    assert res.returncode == 1 and "IPVS mode cannot run here" in res.stderr and "IP_VS" in res.stderr
    assert kproxy_cli("proxy-mode", "get", env=env, check=True).stdout.strip() == "iptables"
    assert not probe(lab.c, lab.client.netns, lab.svc("web").cluster_ip, 80)["errors"], "nothing was changed"
    up = kproxy_cli("up", "--backend", "ipvs", env={"KPROXY_CLUSTER": lab.c.name + "x"})
    assert up.returncode == 1 and "IP_VS" in up.stderr
    assert json.loads(kproxy_cli("get", "nodes", "-o", "json", env=env, check=True).stdout)["items"]


def test_rules_side_by_side(lab):
    env = {"KPROXY_CLUSTER": lab.c.name}
    kproxy_cli("apply", "-f", str(SEED / "Sesion4-Kubernetes" / "Stateful-app"), env=env, check=True)
    out = kproxy_cli("rules", "wordpress", env=env, check=True).stdout
    assert out.startswith("Service default/wordpress (LoadBalancer")
    assert "== port 8080/TCP" in out and out.count("== endpoint ") == 4
    for mode in ("[iptables]", "[nftables]", "[ipvs]"):
        assert mode in out
    assert "-j DNAT --to-destination" in out and "dnat to" in out and " -r " in out
    two = kproxy_cli("rules", "wordpress", "--backend", "iptables", "--backend", "nftables", env=env,
                     check=True).stdout
    assert "[ipvs]" not in two
    headless = kproxy_cli("rules", "wordpress-mysql", env=env, check=True).stdout
    assert "no rules in any mode" in headless
