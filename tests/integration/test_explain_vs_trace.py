"""The offline walk and the kernel must agree.

Random Service/endpoint layouts and flows (ClusterIP, NodePort, externalTrafficPolicy,
affinity, no endpoints, hairpin) on one live cluster: for each flow `explain` walks the
entry node's rules offline and a live `trace` sends the packet; the endpoint the kernel
chose must be among explain's candidates, and the verdict and the masquerade decision
must be the same.
"""
from __future__ import annotations

import os
import random

import pytest

from kproxy.explain import explain
from kproxy.reconciler import current_view
from kproxy.trace import live, story
from tests.integration.test_services import BACKENDS, Lab, deployment, service

pytestmark = pytest.mark.root
SEED = int(os.environ.get("KPROXY_FLOW_SEED", "20261129"))
FLOWS = int(os.environ.get("KPROXY_FLOWS", "14"))


def layout(rng: random.Random) -> str:
    docs = []
    for i in range(4):
        name = f"s{i}"
        replicas = rng.choice([0, 1, 2, 3])
        kind = rng.choice(["ClusterIP", "NodePort", "NodePort"])
        extra = []
        if kind == "NodePort" and rng.random() < 0.5:
            extra.append("  externalTrafficPolicy: Local")
        if rng.random() < 0.25:
            extra.append("  sessionAffinity: ClientIP")
        if replicas:
            docs.append(deployment(name, replicas) + "\n---")
        docs.append(service(name, 80 + i, 80, type_=kind, extra="\n".join(extra)))
    return "\n".join(docs)


@pytest.fixture(params=BACKENDS)
def lab(request, make_cluster, tmp_path):
    c = make_cluster(nodes=3, backend=request.param)
    lab = Lab(c, tmp_path)
    yield lab
    lab.store.close()


def test_explain_and_live_trace_agree(lab):
    rng = random.Random(SEED)
    lab.apply(layout(rng))
    services, slices = current_view(lab.c, lab.store)
    services = [s for s in services if s.namespace == "default"]      # the layout's, not kube-dns
    pods = [p for p in lab.c.pods.values() if p.name != "client" and p.namespace == "default"]
    checked = []
    for i in range(FLOWS):
        svc = rng.choice(services)
        port = svc.ports[0]
        roll = rng.random()
        if svc.type == "NodePort" and roll < 0.5:
            node = rng.choice(lab.c.nodes)
            src, dst = "external", f"node/{node.name}:{port.node_port}"
        elif roll < 0.7 and pods:
            pod = rng.choice([p for p in pods if p.name.startswith(svc.name + "-")] or pods)   # hairpin often
            src, dst = pod.name, svc.name
        else:
            src, dst = "client", svc.name
        t = live.run(lab.c, services, slices, src, dst, timeout=1.0)
        live_report = story.build(t)
        offline = explain(t.rules, t.source.ip, "tcp", t.target.ip, t.target.port,
                          node_ips=[lab.c.node(t.entry_node).ip], cluster_cidr=lab.c.config.pod_cidr).to_dict()
        where = (f"{lab.backend} flow {i}: {src} -> {dst} ({svc.name}, {svc.type}, "
                 f"eTP {svc.external_traffic_policy})")
        action = offline["verdict"]["action"]
        got = live_report["verdict"]["action"]
        assert got == action, f"{where}: explain says {action}, the kernel did {got}: {live_report['verdict']}"
        if action == "DNAT":
            chosen = live_report["trap"]["after"]
            cands = {c["endpoint"]: c for c in offline["candidates"]}
            assert chosen in cands, f"{where}: kernel chose {chosen}, explain offered {sorted(cands)}"
            expected_masq = cands[chosen]["masquerade"]
            ct = next(c for c in live_report["conntrack"]
                      if c["node"] == t.entry_node and c["original"]["sport"] == live_report["flow"]["sport"])
            assert ct["snat"] == expected_masq, f"{where}: masquerade explain={expected_masq} kernel={ct['snat']}"
        checked.append((where, action))
    actions = {a for _, a in checked}
    assert "DNAT" in actions and len(checked) == FLOWS, checked
