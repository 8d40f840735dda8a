"""How long `kproxy trace` takes for one TCP connection, with capture on every hop.

    python bench/trace.py [--runs 10] [--nodes 3]

A cluster with a 3-replica Deployment behind a ClusterIP; a client pod on node1; the
trace is run --runs times and its wall time printed (target: under 2 s).
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: nginx}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/trace.py needs root")
    os.environ.setdefault("KPROXY_STATE_DIR", tempfile.mkdtemp(prefix="kproxy-bench-"))
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig, nodes_from_count
    from kproxy.model import loads
    from kproxy.reconciler import converge, current_view, open_store
    from kproxy.trace import live, story

    name = f"b{secrets.token_hex(3)}"
    c = Cluster.create(ClusterConfig(name=name, nodes=nodes_from_count(args.nodes)))
    try:
        store = open_store(c)
        store.apply(loads(MANIFEST))
        converge(c, store)
        c.add_pod("client", node="node1")
        services, slices = current_view(c, store)
        store.close()
        times, hops = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            report = story.build(live.run(c, services, slices, "client", "web"))
            times.append(time.perf_counter() - t)
            hops.append(len({p["hop"] for p in report["path"]}))
            assert report["verdict"]["action"] == "DNAT"
        print(f"# kproxy trace of one TCP connection, {args.nodes} nodes, capture on "
              f"{2 * args.nodes + 4} interfaces")
        print(f"runs {len(times)}: median {statistics.median(times):.3f} s, max {max(times):.3f} s, "
              f"min {min(times):.3f} s; hops with packets: {min(hops)}-{max(hops)}")
    finally:
        clean_cluster(name)


if __name__ == "__main__":
    main()
