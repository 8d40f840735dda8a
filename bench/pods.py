"""Pod creation and teardown speed, and kproxy's memory with many pods up.

    python bench/pods.py [--pods 100 500] [--nodes 4] [--mode host-gw] [--no-baseline]

For each count: pods/s through kproxy (netlink, CNI protocol in process), the time
`down` takes (namespaces removed, and the whole of down with its verification),
and the resident size of this process with the pods up.  The baseline creates the
same pods the way a shell script would, one `ip` process per step, for comparison.
Targets (issue 2): >= 150 pods/s, teardown of 500 pods under 2 s.
"""
from __future__ import annotations

import argparse
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_kproxy(count: int, nodes: int, mode: str) -> dict:
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig, nodes_from_count

    name = f"b{secrets.token_hex(3)}"
    cluster = Cluster.create(ClusterConfig(name=name, nodes=nodes_from_count(nodes), network_mode=mode))
    try:
        specs = [(f"pod-{i}", "default", None, {"app": "bench"}) for i in range(count)]
        t0 = time.perf_counter()
        cluster.add_pods(specs)
        created = time.perf_counter() - t0
        rss = rss_mib()
        # a sample of pods really work: one ping across nodes
        a, b = cluster.pod("pod-0"), cluster.pod("pod-1")
        ok = cluster.exec(a, ["ping", "-c", "1", "-W", "1", b.ip], capture_output=True).returncode == 0
    finally:
        t1 = time.perf_counter()
        cluster.journal.close()
        report = clean_cluster(name)
        teardown = time.perf_counter() - t1
    return {"pods": count, "create_s": created, "pods_per_s": count / created, "rss_mib": rss,
            "teardown_s": teardown, "cross_node_ping": ok, "clean_ok": report.ok}


def bench_ip_baseline(count: int) -> float:
    """One `ip` process per step: netns add, veth add, move, address, up, route."""
    tag = f"bb{secrets.token_hex(2)}"
    host = f"{tag}-host"
    subprocess.run(["ip", "netns", "add", host], check=True)
    subprocess.run(["ip", "-n", host, "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", host, "addr", "add", "10.250.0.1/16", "dev", "br0"], check=True)
    subprocess.run(["ip", "-n", host, "link", "set", "br0", "up"], check=True)
    made = []
    try:
        t0 = time.perf_counter()
        for i in range(count):
            pod = f"{tag}-p{i}"
            veth = f"v{tag}{i}"
            made.append(pod)
            steps = [
                ["ip", "netns", "add", pod],
                ["ip", "-n", host, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod],
                ["ip", "-n", host, "link", "set", veth, "master", "br0", "up"],
                ["ip", "-n", pod, "addr", "add", f"10.250.{(i + 2) // 256}.{(i + 2) % 256}/16", "dev", "eth0"],
                ["ip", "-n", pod, "link", "set", "eth0", "up"],
                ["ip", "-n", pod, "link", "set", "lo", "up"],
                ["ip", "-n", pod, "route", "add", "default", "via", "10.250.0.1"],
            ]
            for s in steps:
                subprocess.run(s, check=True)
        return count / (time.perf_counter() - t0)
    finally:
        for pod in made:
            subprocess.run(["ip", "netns", "del", pod])
        subprocess.run(["ip", "netns", "del", host])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--mode", default="host-gw", choices=["host-gw", "vxlan"])
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/pods.py needs root")
    os.environ.setdefault("KPROXY_STATE_DIR", tempfile.mkdtemp(prefix="kproxy-bench-"))
    print(f"# pods over {args.nodes} nodes, {args.mode}, {os.cpu_count()} CPUs")
    print(f"{'pods':>6} {'create s':>9} {'pods/s':>8} {'teardown s':>11} {'RSS MiB':>8}  check")
    for n in args.pods:
        r = bench_kproxy(n, args.nodes, args.mode)
        print(f"{r['pods']:>6} {r['create_s']:>9.3f} {r['pods_per_s']:>8.1f} {r['teardown_s']:>11.3f} "
              f"{r['rss_mib']:>8.1f}  ping={'ok' if r['cross_node_ping'] else 'FAIL'} "
              f"clean={'ok' if r['clean_ok'] else 'FAIL'}")
    if not args.no_baseline:
        rate = bench_ip_baseline(100)
        print(f"baseline: one `ip` process per step, 100 pods: {rate:.1f} pods/s")
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
