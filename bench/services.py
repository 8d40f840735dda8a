"""kube-proxy iptables-mode sync cost, and Service-to-first-connection latency.

    python bench/services.py [--counts 1000 5000 10000] [--latency 100]

1. Full render+apply of N Services with 2 endpoints each on one node (a throwaway
   namespace), beside a bare `iptables-restore` of the same payload into a fresh
   namespace (the limit).  Target: ratio <= 1.3 and under 3 s at 10,000.
2. One Service's endpoints changing when N exist: a partial render of that Service
   plus the restore of that payload.  Target: under 50 ms at 10,000.
3. On a 2-node cluster: `apply` of a new Service -> first successful connection from a
   pod, p50/p99 over --latency Services.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni import netns  # noqa: E402
from kproxy.model import objects as o  # noqa: E402
from kproxy.proxy.iptables.render import NodeSettings, render  # noqa: E402

SETTINGS = NodeSettings(node_name="node1", node_ips=["192.168.5.11"], cluster_cidr="10.244.0.0/16")


def synthetic(n: int, generation: int = 0):
    services, slices = [], []
    for i in range(n):
        name = f"svc-{i}"
        ip = str(ipaddress.ip_address("10.96.0.0") + i + 1)     # distinct ClusterIPs from 10.96.0.1
        services.append(o.Service(metadata=o.ObjectMeta(name=name, namespace="bench"), type="ClusterIP",
                                  cluster_ip=ip, cluster_ips=[ip], selector={"app": name},
                                  ports=[o.ServicePort(name="http", protocol="TCP", port=80, target_port=8080)]))
        eps = [o.Endpoint(addresses=[f"10.244.{(2 * i + k) // 250 % 256}.{(2 * i + k) % 250 + 2 + generation}"],
                          conditions=o.EndpointConditions(ready=True, serving=True, terminating=False),
                          node_name="node1") for k in range(2)]
        slices.append(o.EndpointSlice(metadata=o.ObjectMeta(name=f"{name}-x", namespace="bench",
                                                            labels={o.SERVICE_NAME_LABEL: name}),
                                      address_type="IPv4", endpoints=eps,
                                      ports=[o.EndpointPort(port=8080, name="http", protocol="TCP")]))
    return services, slices


def restore(ns: str, payload: str, flavour: str) -> float:
    t = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, f"iptables-{flavour}-restore", "-w", "5", "--noflush", "--counters"],
                   input=payload, text=True, check=True)
    return time.perf_counter() - t


def sync_figures(n: int, flavour: str) -> dict:
    services, slices = synthetic(n)
    a, b = f"kpb{secrets.token_hex(3)}", f"kpb{secrets.token_hex(3)}"
    netns.create(a)
    netns.create(b)
    try:
        t = time.perf_counter()
        payload = render(services, slices, SETTINGS)
        t_render = time.perf_counter() - t
        t_apply = restore(a, payload, flavour)
        t_bare = restore(b, payload, flavour)
        # a steady-state full resync into the populated namespace
        t = time.perf_counter()
        restore(a, render(services, slices, SETTINGS), flavour)
        t_resync = time.perf_counter() - t
        # one Service's endpoints change: partial render + restore
        changed_svcs, changed_slices = synthetic(1, generation=100)
        slices2 = list(slices)
        slices2[0] = changed_slices[0]
        t = time.perf_counter()
        partial = render(services, slices2, SETTINGS, changed={"bench/svc-0"})
        t_prender = time.perf_counter() - t
        t_papply = restore(a, partial, flavour)
        return {"n": n, "render": t_render, "apply": t_apply, "bare": t_bare, "resync": t_resync,
                "ratio": (t_render + t_apply) / t_bare, "partial": t_prender + t_papply,
                "partial_lines": partial.count("\n"), "lines": payload.count("\n")}
    finally:
        netns.delete(a)
        netns.delete(b)


def latency_figures(count: int) -> list:
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig
    from kproxy.model import loads
    from kproxy.reconciler import converge, open_store

    os.environ.setdefault("KPROXY_STATE_DIR", tempfile.mkdtemp(prefix="kproxy-bench-"))
    name = f"b{secrets.token_hex(3)}"
    c = Cluster.create(ClusterConfig(name=name, nodes=["node1", "node2"]))
    try:
        store = open_store(c)
        store.apply(loads("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: nginx}]}
"""))
        converge(c, store)
        client = c.add_pod("client", node="node1")
        out = []
        for i in range(count):
            doc = (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\n"
                   f"spec: {{selector: {{app: web}}, ports: [{{port: {1000 + i}, targetPort: 80}}]}}\n")
            t = time.perf_counter()
            store.apply(loads(doc))
            converge(c, store)
            vip = next(s.cluster_ip for s in store.objects()["Service"] if s.name == f"s{i}")
            res = c.exec(client, [sys.executable, "-c",
                                  "import socket,sys,time\n"
                                  "while True:\n"
                                  "    try:\n"
                                  "        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close(); break\n"
                                  "    except OSError: time.sleep(0.005)\n", vip, str(1000 + i)],
                         timeout=30)
            assert res.returncode == 0
            out.append(time.perf_counter() - t)
        store.close()
        return out
    finally:
        clean_cluster(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--latency", type=int, default=100, help="Services for the apply->connect figure (0: skip)")
    ap.add_argument("--flavour", nargs="+", default=["nft", "legacy"], choices=["nft", "legacy"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/services.py needs root")
    print("# iptables mode, one node, 2 endpoints per Service; ratio = (render + apply) / bare restore")
    print(f"{'flavour':>7} {'services':>8} {'lines':>7} {'render s':>9} {'apply s':>8} {'bare s':>7} {'ratio':>6} "
          f"{'resync s':>9} {'1-svc change ms':>16}")
    for flavour in args.flavour:
        for n in args.counts:
            r = sync_figures(n, flavour)
            print(f"{flavour:>7} {r['n']:>8} {r['lines']:>7} {r['render']:>9.3f} {r['apply']:>8.3f} "
                  f"{r['bare']:>7.3f} {r['ratio']:>6.2f} {r['resync']:>9.3f} {r['partial'] * 1000:>16.1f}")
    if args.latency:
        lat = latency_figures(args.latency)
        q = statistics.quantiles(lat, n=100)
        print(f"apply -> first connection over {len(lat)} Services: p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"p99 {q[98] * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
