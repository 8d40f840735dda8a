"""`kproxy demo` (and so `make demo`): a guided tour on throwaway clusters.

Part 1 brings up a two-node cluster, puts a pod on each node, has one talk to the other
across nodes and shows that the receiver sees the sender's own pod IP (no NAT between
pods).  Part 2 rebuilds the course slide that named the TRAP (examples/trap): Service
my-svc at 172.11.240.5, its pod at 10.0.5.6, the node's eth0 at 192.168.5.11, and traces
a request to my-svc.  Each cluster is removed and the machine proven as it was.
"""
from __future__ import annotations

import os

import secrets
import subprocess
import sys
from typing import Callable

PEER_SERVER = (
    "import socket\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen(8); print('ready', flush=True)\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(('hello from the server pod; you are %s:%d\\n' % a).encode()); c.close()\n"
)
CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1], 8080), timeout=3); print(c.recv(200).decode().strip())\n"
)


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "trap")


def run_demo(echo: Callable[[str], None] = print, network_mode: str = "vxlan") -> int:
    first = pods_across_nodes(echo, network_mode)
    echo("")
    second = trap(echo)
    return first or second


def trap(echo: Callable[[str], None] = print, example: str = EXAMPLE) -> int:
    """The slide: apply examples/trap on a one-node cluster and trace client -> my-svc."""
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster, require_root
    from kproxy.config import ClusterConfig
    from kproxy.model import load
    from kproxy.reconciler import converge, current_view, open_store
    from kproxy.trace import live, story

    require_root()
    name = f"trap{secrets.token_hex(2)}"
    echo(f"== the TRAP, as on the course slide: cluster {name!r}")
    cluster = Cluster.create(ClusterConfig(name=name, nodes=["node1"], pod_cidr="10.0.5.0/24",
                                           service_cidr="172.11.240.0/20", first_pod_host=6))
    status = 1
    try:
        store = open_store(cluster)
        for line in store.apply(load(example)).lines():
            echo(f"   {line}")
        converge(cluster, store)
        client = cluster.add_pod("client", node="node1")
        pod = cluster.pod("my-pod")
        echo(f"   node1 eth0 {cluster.node('node1').ip}; my-pod {pod.ip}; client {client.ip}")
        services, slices = current_view(cluster, store)
        store.close()
        echo("== kproxy trace client my-svc --http")
        report = story.build(live.run(cluster, services, slices, "client", "my-svc", http=True))
        echo(story.text(report, color=sys.stdout.isatty()))
        echo("== the same path as a Mermaid diagram (kproxy trace ... -o mermaid)")
        echo(report["diagram"])
        if report["trap"] == {"before": "172.11.240.5:80", "after": f"{pod.ip}:80"}:
            status = 0
    finally:
        report_clean = clean_cluster(name)
        echo("== " + report_clean.summary().replace("\n", "\n   "))
    return status if report_clean.ok else 1


def pods_across_nodes(echo: Callable[[str], None] = print, network_mode: str = "vxlan") -> int:
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster, require_root
    from kproxy.config import ClusterConfig

    require_root()
    name = f"demo{secrets.token_hex(2)}"
    echo(f"== kproxy demo: cluster {name!r}, 2 nodes, {network_mode} networking")
    cluster = Cluster.create(ClusterConfig(name=name, nodes=["node1", "node2"], network_mode=network_mode))
    status = 1
    try:
        for n in cluster.nodes:
            echo(f"   node {n.name}: eth0 {n.ip}, pods in {n.pod_cidr} (netns {n.netns})")
        client, server = cluster.add_pods([("client", "default", "node1"), ("server", "default", "node2")])
        for p in (client, server):
            echo(f"   pod {p.name} on {p.node}: {p.ip} (netns {p.netns})")
        proc = cluster.start_process(server, [sys.executable, "-c", PEER_SERVER], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()
        route = cluster.exec_in(cluster.node("node1").netns, ["ip", "route", "get", server.ip],
                                capture_output=True, text=True).stdout.strip()
        echo(f"== node1's route to the server pod: {route}")
        res = cluster.exec(client, [sys.executable, "-c", CLIENT, server.ip], capture_output=True, text=True,
                           timeout=10)
        echo(f"== client ({client.ip}) -> server ({server.ip}:8080): {res.stdout.strip() or res.stderr.strip()}")
        if res.returncode == 0 and client.ip in res.stdout:
            echo("   the server saw the client's own pod IP: pod-to-pod traffic is not NATed")
            status = 0
        else:
            echo("   unexpected answer")
    finally:
        report = clean_cluster(name)
        echo("== " + report.summary().replace("\n", "\n   "))
    return status if report.ok else 1
