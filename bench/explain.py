"""How long `kproxy explain` takes on a big iptables ruleset (no root needed).

    python bench/explain.py [--counts 1000 10000] [--queries 200]

For N synthetic Services (3 endpoints each, every 5th also a NodePort) the ruleset is
rendered with kproxy's iptables render, then:

* cold: ``explain(text, ...)`` from the text (parse + walk), to the last Service's
  ClusterIP -- the figure the target is about: under 1 s at 10,000 Services;
* warm: the walk alone on the parsed ruleset (parse once, explain many), averaged over
  --queries random ClusterIPs, plus a NodePort and an address that is no Service.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kproxy.explain import explain, parse_ruleset  # noqa: E402
from kproxy.model import objects as o  # noqa: E402
from kproxy.proxy.iptables.render import NodeSettings, render  # noqa: E402

NODE_IP = "192.168.5.11"
SETTINGS = NodeSettings(node_name="node1", node_ips=[NODE_IP], cluster_cidr="10.244.0.0/16")
POD = "10.244.200.7"


def cluster_ip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256 or 1}"


def synthetic(n: int):
    services, slices = [], []
    for i in range(n):
        name = f"svc-{i}"
        ip = cluster_ip(i)
        node_port = 30000 + i // 5 if i % 5 == 0 else None
        services.append(o.Service(metadata=o.ObjectMeta(name=name, namespace="bench"),
                                  type="NodePort" if node_port else "ClusterIP", cluster_ip=ip, cluster_ips=[ip],
                                  selector={"app": name},
                                  ports=[o.ServicePort(name="http", protocol="TCP", port=80, target_port=8080,
                                                       node_port=node_port)]))
        eps = [o.Endpoint(addresses=[f"10.244.{(3 * i + k) // 250 % 256}.{(3 * i + k) % 250 + 2}"],
                          conditions=o.EndpointConditions(ready=True, serving=True, terminating=False),
                          node_name="node1") for k in range(3)]
        slices.append(o.EndpointSlice(metadata=o.ObjectMeta(name=f"{name}-x", namespace="bench",
                                                            labels={o.SERVICE_NAME_LABEL: name}),
                                      address_type="IPv4", endpoints=eps,
                                      ports=[o.EndpointPort(port=8080, name="http", protocol="TCP")]))
    return services, slices


def figures(n: int, queries: int) -> dict:
    services, slices = synthetic(n)
    t = time.perf_counter()
    text = render(services, slices, SETTINGS)
    t_render = time.perf_counter() - t
    rules = sum(1 for line in text.splitlines() if line.startswith("-A "))

    last = cluster_ip(n - 1)
    t = time.perf_counter()
    report = explain(text, POD, "tcp", last, 80, [NODE_IP])
    t_cold = time.perf_counter() - t
    assert len(report.candidates) == 3, report.text()

    t = time.perf_counter()
    rs = parse_ruleset(text)
    t_parse = time.perf_counter() - t
    explain(rs, POD, "tcp", last, 80, [NODE_IP])                # the first walk builds the index
    rng = random.Random(1)
    times = []
    for _ in range(queries):
        ip = cluster_ip(rng.randrange(n))
        t = time.perf_counter()
        r = explain(rs, POD, "tcp", ip, 80, [NODE_IP])
        times.append(time.perf_counter() - t)
        assert len(r.candidates) == 3
    t = time.perf_counter()
    r = explain(rs, "203.0.113.9", "tcp", NODE_IP, 30000 + (n - 1) // 5, [NODE_IP])
    t_nodeport = time.perf_counter() - t
    assert len(r.candidates) == 3 and r.masquerade.applied
    t = time.perf_counter()
    r = explain(rs, POD, "tcp", "10.244.9.9", 80, [NODE_IP])
    t_none = time.perf_counter() - t
    assert r.verdict.reason == "no rule matched: not a Service address"
    return {"services": n, "rules": rules, "render_s": t_render, "cold_s": t_cold, "parse_s": t_parse,
            "walk_ms_median": statistics.median(times) * 1000, "walk_ms_max": max(times) * 1000,
            "nodeport_ms": t_nodeport * 1000, "no_service_ms": t_none * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    print(f"{'services':>8} {'rules':>7} {'render':>8} {'explain(text)':>14} {'parse':>7} "
          f"{'walk p50':>9} {'walk max':>9} {'nodeport':>9} {'no svc':>8}")
    ok = True
    for n in args.counts:
        f = figures(n, args.queries)
        print(f"{f['services']:>8} {f['rules']:>7} {f['render_s']:>7.2f}s {f['cold_s']:>13.3f}s {f['parse_s']:>6.3f}s "
              f"{f['walk_ms_median']:>7.2f}ms {f['walk_ms_max']:>7.2f}ms {f['nodeport_ms']:>7.2f}ms "
              f"{f['no_service_ms']:>6.2f}ms")
        if n >= 10000 and f["cold_s"] >= 1.0:
            ok = False
    print("target: explain(text) of a 10,000-Service ruleset under 1 s:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
