"""kube-proxy's modes side by side: control-plane sync cost and data-plane connect latency.

    python bench/modes.py [--counts 1000 10000] [--connects 2000]

Control plane, per mode, for N Services with 2 endpoints each on one node: a full sync
(render + apply) and a one-Service change (partial render + apply).
Data plane, per mode, with N Services programmed: TCP connect latency (p50/p99) from the
node to the first and the last Service's ClusterIP, beside a direct connect to the pod
IP (the limit).  iptables walks KUBE-SERVICES linearly, nftables looks up a verdict map.
Expected shape: iptables grows with N; nftables stays near direct (target: within 1.2x
at 10,000).  IPVS needs a kernel with IP_VS (`make test-vm`); it is skipped here otherwise.
"""
from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from services import synthetic  # noqa: E402

from cni import netns  # noqa: E402
from kproxy.kernel import links  # noqa: E402
from kproxy.proxy.iptables.render import NodeSettings  # noqa: E402

POD_IP = "10.244.0.2"
NODE_SETTINGS = NodeSettings(node_name="node1", node_ips=["192.168.5.11"], cluster_cidr="10.244.0.0/16")
CONNECT = r"""
import socket, sys, time
out = []
for target in sys.argv[2:]:
    ip, port = target.rsplit(":", 1)
    lat = []
    for _ in range(int(sys.argv[1])):
        t = time.perf_counter_ns()
        s = socket.create_connection((ip, int(port)), timeout=2); s.close()
        lat.append((time.perf_counter_ns() - t) / 1000)
    lat.sort()
    out.append("%s %.1f %.1f" % (ip, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]))
print("\n".join(out))
"""


def lab():
    """A node namespace and a pod namespace joined by a veth; a listener on the pod."""
    node, pod = f"kpm{secrets.token_hex(3)}", f"kpm{secrets.token_hex(3)}"
    netns.create(node)
    netns.create(pod)
    with links.socket_in(node) as s:
        links.set_up(s, "lo")
        links.add_veth(s, "veth0", "eth0", pod)
        links.add_address(s, "veth0", "10.244.0.1/24")
        links.set_up(s, "veth0")
        links.add_address(s, "lo", "192.168.5.11/32")
        links.add_route(s, "10.96.0.0/12", dev="veth0")
    with links.socket_in(pod) as s:
        links.set_up(s, "lo")
        links.add_address(s, "eth0", f"{POD_IP}/24")
        links.set_up(s, "eth0")
        links.add_route(s, "0.0.0.0/0", gateway="10.244.0.1")
    server = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c",
                               "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                               "s.bind(('0.0.0.0', 8080)); s.listen(4096)\n"
                               "while True: s.accept()[0].close()"])
    return node, pod, server


def programme(mode: str, node: str, services, slices, changed=None, existing=None):
    from kproxy.kernel import iptables, nft
    from kproxy.proxy import nftables
    from kproxy.proxy.iptables.render import render
    if mode.startswith("iptables"):
        from kproxy.proxy.iptables.jumps import all_jump_rules
        flavour = mode.split("-")[1]
        iptables.restore(node, render(services, slices, NODE_SETTINGS, changed=changed), flavour)
        if changed is None:
            iptables.ensure_jumps(node, all_jump_rules(), flavour)
        return None
    payload = nftables.render_payload(services, slices, NODE_SETTINGS, changed=changed, existing=existing,
                                      service_cidrs="10.96.0.0/12")
    ok = nft.sync(node, payload)
    from kproxy.proxy.nftables.ruleset import Table
    return payload.apply_to(existing or Table("ip", "kube-proxy"), cleanup=ok)


def endpoints_to_pod(slices):
    for sl in slices:
        for ep in sl.endpoints:
            ep.addresses = [POD_IP]
        for p in sl.ports:
            p.port = 8080


def run(mode: str, n: int, connects: int) -> str:
    services, slices = synthetic(n)
    endpoints_to_pod(slices)
    node, pod, server = lab()
    try:
        t = time.perf_counter()
        table = programme(mode, node, services, slices)
        full = time.perf_counter() - t
        _, changed_slices = synthetic(1, generation=1)
        endpoints_to_pod(changed_slices)
        slices2 = list(slices)
        slices2[0] = changed_slices[0]
        t = time.perf_counter()
        programme(mode, node, services, slices2, changed={"bench/svc-0"}, existing=table)
        change = time.perf_counter() - t
        first, last = services[0].cluster_ip, services[-1].cluster_ip
        res = subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", CONNECT, str(connects),
                              f"{POD_IP}:8080", f"{first}:80", f"{last}:80"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{mode}: the connect probe failed: {res.stderr.strip()[-300:]}")
        lat = {ip: (float(a), float(b)) for ip, a, b in (ln.split() for ln in res.stdout.splitlines())}
        d, f, l_ = lat[POD_IP], lat[first], lat[last]
        return (f"{mode:>15} {n:>6} {full:>7.2f} {change * 1000:>9.1f}   "
                f"{d[0]:>6.0f}/{d[1]:<6.0f} {f[0]:>6.0f}/{f[1]:<6.0f} {l_[0]:>6.0f}/{l_[1]:<6.0f} {l_[0] / d[0]:>5.2f}")
    finally:
        server.kill()
        server.wait()
        netns.delete(node)
        netns.delete(pod)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--connects", type=int, default=2000)
    ap.add_argument("--modes", nargs="+", default=["iptables-legacy", "iptables-nft", "nftables"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/modes.py needs root")
    print("# one node, 2 endpoints per Service; latency in microseconds p50/p99, connect() from the node")
    print(f"{'mode':>15} {'svcs':>6} {'full s':>7} {'1-svc ms':>9}   {'direct':>13} {'first svc':>13} "
          f"{'last svc':>13} {'last/direct':>5}")
    for mode in args.modes:
        for n in args.counts:
            if mode == "iptables-nft" and n > 5000:
                print(f"{mode:>15} {n:>6}  skipped: iptables-nft-restore takes minutes at this size here")
                continue
            print(run(mode, n, args.connects), flush=True)
    from kproxy.kernel import ipvs
    ok, reason = ipvs.available()
    if not ok:
        print(f"ipvs: skipped: {reason}")


if __name__ == "__main__":
    main()
