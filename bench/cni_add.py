"""Latency of one in-process CNI ADD and DEL (kproxy-bridge + kproxy-host-local).

    python bench/cni_add.py [--pods 300] [--ipam-only 300]

Everything happens in throwaway namespaces made here (``kpbench-<hex>-...``): one
playing the node (the host namespace, with the bridge) and one per pod.  Each ADD
and each DEL is timed around `cni.invoke.call` in this process, the way
`kproxy.cluster.Cluster._attach` calls it; creating the pod namespaces is not
counted.  Prints p50/p90/p99/max in milliseconds, and the host-local IPAM step on
its own (ADD then DEL of one address, against the same on-disk store).
Target (issue: pod creation speed): ADD p50 <= 4 ms on a 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cni import invoke, netns  # noqa: E402
from cni import skel  # noqa: E402


def percentiles(samples: list[float]) -> str:
    s = sorted(samples)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000

    return (f"n={len(s):<4d} p50 {pick(0.50):6.2f}  p90 {pick(0.90):6.2f}  p99 {pick(0.99):6.2f}  "
            f"max {s[-1] * 1000:6.2f}  mean {statistics.fmean(s) * 1000:6.2f} ms")


def config(data_dir: str) -> dict:
    """What kproxy.cluster.Cluster.cni_config gives a node."""
    return {
        "cniVersion": "1.0.0", "name": "kpbench", "type": "kproxy-bridge", "bridge": "cni0",
        "isGateway": True, "hairpinMode": True, "mtu": 1450,
        "ipam": {"type": "kproxy-host-local", "ranges": [[{"subnet": "10.78.0.0/16", "gateway": "10.78.0.1"}]],
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir},
    }


def bench_add_del(count: int, tag: str, data_dir: str) -> tuple[list[float], list[float]]:
    host = f"{tag}-host"
    pods = [f"{tag}-p{i}" for i in range(count + 1)]
    made: list[str] = []
    conf = config(data_dir)
    adds: list[float] = []
    dels: list[float] = []
    try:
        netns.create(host)
        made.append(host)
        for p in pods:
            netns.create(p)
            made.append(p)
        # the first ADD makes the bridge and its gateway address: not a steady-state figure
        invoke.call("ADD", conf, container_id="warmup", netns=pods[0], host_netns=host)
        for i, p in enumerate(pods[1:]):
            t0 = time.perf_counter()
            invoke.call("ADD", conf, container_id=f"c{i}", netns=p, host_netns=host)
            adds.append(time.perf_counter() - t0)
        for i, p in enumerate(pods[1:]):
            t0 = time.perf_counter()
            invoke.call("DEL", conf, container_id=f"c{i}", netns=p, host_netns=host)
            dels.append(time.perf_counter() - t0)
        invoke.call("DEL", conf, container_id="warmup", netns=pods[0], host_netns=host)
    finally:
        for name in reversed(made):
            netns.delete(name)
    return adds, dels


def bench_ipam(count: int, data_dir: str) -> tuple[list[float], list[float]]:
    """host-local alone, in process, as the bridge delegates to it."""
    from cni.ipam import host_local
    conf = config(data_dir)
    conf["name"] = "kpbench-ipam"
    stdin = __import__("json").dumps(conf).encode()
    base = {"CNI_IFNAME": "eth0", "CNI_NETNS": "/nonexistent", "CNI_PATH": "/nonexistent", "CNI_ARGS": ""}
    adds, dels = [], []
    for cmd, out in (("ADD", adds), ("DEL", dels)):
        for i in range(count):
            env = {**base, "CNI_COMMAND": cmd, "CNI_CONTAINERID": f"ipam{i}"}
            t0 = time.perf_counter()
            code, stdout, _ = skel.run(host_local.PLUGIN, env, stdin, in_process=True)
            out.append(time.perf_counter() - t0)
            if code != 0:
                raise SystemExit(f"IPAM {cmd} failed: {stdout.decode()}")
    return adds, dels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=300)
    ap.add_argument("--ipam-only", type=int, default=300, metavar="N", help="IPAM ADD/DEL samples (0: skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cni_add.py needs root (it makes network namespaces)")
    tag = f"kpbench-{secrets.token_hex(3)}"
    data_dir = tempfile.mkdtemp(prefix="kproxy-cni-bench-")
    try:
        print(f"# in-process CNI, one host namespace, {args.pods} pods, {os.cpu_count()} CPUs")
        adds, dels = bench_add_del(args.pods, tag, data_dir)
        print(f"ADD       {percentiles(adds)}")
        print(f"DEL       {percentiles(dels)}")
        if args.ipam_only:
            ipam_adds, ipam_dels = bench_ipam(args.ipam_only, data_dir)
            print(f"IPAM ADD  {percentiles(ipam_adds)}")
            print(f"IPAM DEL  {percentiles(ipam_dels)}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    left = [n for n in netns.list_names() if n.startswith(tag)]
    if left:
        sys.exit(f"namespaces left behind: {left}")


if __name__ == "__main__":
    main()
