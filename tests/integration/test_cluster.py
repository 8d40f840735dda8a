"""Nodes and pods in real namespaces: reachability, addresses kept end to end, cleanup."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cni import netns
from kproxy import snapshot
from kproxy.errors import ConfigError, NotFound
from tests.conftest import kproxy_cli, unique

pytestmark = pytest.mark.root

# A one-connection-at-a-time TCP server that tells each client the address it saw.
PEER_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(16)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(('peer=%s\\n' % a[0]).encode()); c.close()\n"
)
PEER_CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "print(c.recv(100).decode().strip())\n"
)


def start_peer_server(cluster, pod, port=8080):
    proc = cluster.start_process(pod, [sys.executable, "-c", PEER_SERVER, str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def seen_by_server(cluster, client_ns, server_ip, port=8080) -> str:
    res = cluster.exec_in(client_ns, [sys.executable, "-c", PEER_CLIENT, server_ip, str(port)],
                          capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("mode", ["host-gw", "vxlan"])
def test_pod_to_pod_same_node_and_across_nodes_keeps_source(make_cluster, mode):
    c = make_cluster(nodes=3, network_mode=mode)
    a, b, far = c.add_pods([("a", "default", "node1"), ("b", "default", "node1"), ("far", "default", "node3")])
    assert a.ip != b.ip and a.node == b.node == "node1" and far.node == "node3"
    for server in (b, far):
        start_peer_server(c, server)
        assert seen_by_server(c, a.netns, server.ip) == f"peer={a.ip}", f"{mode}: NAT between pods"
    # and back the other way, across nodes
    start_peer_server(c, a, port=9090)
    assert seen_by_server(c, far.netns, a.ip, port=9090) == f"peer={far.ip}"


def test_vxlan_mode_really_encapsulates(make_cluster):
    c = make_cluster(nodes=2, network_mode="vxlan")
    a, b = c.add_pods([("a", "default", "node1"), ("b", "default", "node2")])
    # node1 routes node2's pod CIDR through the VTEP, not straight over eth0
    route = c.exec_in(c.node("node1").netns, ["ip", "route", "get", b.ip], capture_output=True, text=True).stdout
    assert "dev flannel.1" in route
    cap = subprocess.Popen(["ip", "netns", "exec", c.node("node2").netns, "tcpdump", "-l", "-n", "-c", "1",
                            "-i", "eth0", "udp", "port", "8472"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.5)
        assert c.exec(a, ["ping", "-c", "2", "-W", "1", b.ip], capture_output=True).returncode == 0
        out, _ = cap.communicate(timeout=5)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    assert "192.168.5.11" in out and "192.168.5.12" in out and "8472" in out


def test_external_client_reaches_node_addresses_not_pods(make_cluster):
    c = make_cluster(nodes=2)
    pod = c.add_pod("web", node="node2")
    for node in c.nodes:
        res = c.exec_in(c.external_ns, ["ping", "-c", "1", "-W", "1", node.ip], capture_output=True)
        assert res.returncode == 0, f"external cannot reach {node.name} at {node.ip}"
    # the outside world has no route to pod IPs, as in a real cluster
    res = c.exec_in(c.external_ns, ["ip", "route", "get", pod.ip], capture_output=True, text=True)
    assert res.returncode != 0 and "unreachable" in res.stderr


def test_no_namespace_routes_towards_the_machine(make_cluster):
    c = make_cluster(nodes=2)
    pod = c.add_pod("p")
    # route lookups only: nothing is sent
    for ns in [n.netns for n in c.nodes] + [c.external_ns, c.underlay_ns]:
        res = c.exec_in(ns, ["ip", "route", "get", "8.8.8.8"], capture_output=True, text=True)
        assert res.returncode != 0 and "unreachable" in res.stderr, f"{ns} has a route out: {res.stdout}"
    # a pod's default route ends at its node, which has none further
    hop = c.exec(pod, ["ip", "route", "get", "8.8.8.8"], capture_output=True, text=True).stdout
    assert f"via {c.node(pod.node).gateway}" in hop
    # every veth in the cluster has its peer inside the cluster
    ours = {c.underlay_ns, c.external_ns, pod.netns} | {n.netns for n in c.nodes}
    for ns in ours:
        out = c.exec_in(ns, ["ip", "-j", "-d", "link"], capture_output=True, text=True).stdout
        for link in json.loads(out):
            if (link.get("linkinfo") or {}).get("info_kind") == "veth":
                assert link.get("link_netnsid") is not None, f"{ns}/{link['ifname']} peers with the machine"


def test_machine_namespace_unchanged_during_and_after(state_dir):
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig

    before = snapshot.capture()
    name = unique("t")
    try:
        c = Cluster.create(ClusterConfig(name=name, nodes=["node1", "node2"], network_mode="vxlan"))
        c.add_pods([("x", "default", "node1"), ("y", "default", "node2")])
        assert snapshot.diff(before, snapshot.capture()) == []
    finally:
        report = clean_cluster(name)
    assert report.ok, report.problems
    assert snapshot.diff(before, snapshot.capture()) == []
    assert not [n for n in netns.list_names() if n.startswith(name + "-")]


def test_gateway_mac_stays_while_pods_come_and_go(make_cluster):
    """cni0 has a MAC of its own (0a:58 and the gateway's address), so the gateway address
    pods have cached stays right when the port whose MAC a bridge would otherwise borrow
    (the lowest) goes away.  Before, a rolling update lost the answers of pods on other
    nodes: they went to the MAC of a deleted pod's veth."""
    c = make_cluster(nodes=2)
    node = c.node("node1")
    want = "0a:58:" + ":".join(f"{int(x):02x}" for x in node.gateway.split("."))

    def bridge():
        res = c.exec_in(node.netns, ["cat", "/sys/class/net/cni0/address",
                                     "/sys/class/net/cni0/addr_assign_type"],
                        capture_output=True, text=True, check=True)
        mac, assign = res.stdout.split()
        return mac, assign

    assert bridge() == (want, "3")              # 3: NET_ADDR_SET, chosen rather than borrowed
    client = c.add_pod("client", node="node1")
    server = c.add_pod("server", node="node2")
    start_peer_server(c, server)
    assert seen_by_server(c, client.netns, server.ip) == f"peer={client.ip}"
    churn = [c.add_pod(f"churn{i}", node="node1") for i in range(6)]
    for p in churn:
        c.delete_pod(p.name)
    assert bridge() == (want, "3")
    neigh = c.exec_in(client.netns, ["ip", "neigh", "show", node.gateway], capture_output=True,
                      text=True, check=True).stdout
    assert want in neigh, neigh                 # what the client cached is still the gateway's
    assert seen_by_server(c, client.netns, server.ip) == f"peer={client.ip}"


def test_delete_pod_releases_address_and_namespace(make_cluster):
    c = make_cluster(nodes=1)
    p = c.add_pod("p")
    proc = start_peer_server(c, p)
    c.delete_pod("p")
    assert not netns.exists(p.netns)
    assert proc.wait(timeout=5) is not None
    ipam_dir = os.path.join(c.dir, "ipam", "node1", c.name)
    assert not os.path.exists(os.path.join(ipam_dir, p.ip)), "the pod's address is still reserved"
    # second DEL of the same pod through the protocol is a success (idempotent)
    from cni import invoke
    invoke.call("DEL", c.cni_config(c.node("node1")), container_id=p.container_id,
                netns=netns.path_of(p.netns), host_netns=c.node("node1").netns)
    with pytest.raises(NotFound, match="default/p"):
        c.pod("p")


def test_processes_are_stopped_by_pid_at_cleanup(make_cluster, state_dir):
    from kproxy.clean import clean_cluster
    c = make_cluster(nodes=1)
    p = c.add_pod("sleeper")
    proc = c.start_process(p, ["sleep", "300"])
    report = clean_cluster(c.name)
    assert proc.pid in report.processes_stopped and report.ok
    assert proc.wait(timeout=5) is not None


def test_clean_goes_on_past_a_record_it_cannot_undo(make_cluster, state_dir, monkeypatch):
    """A process that cannot be stopped is reported and kept on record; the namespaces are
    removed anyway, and a second clean (once the failure is gone) finishes the job."""
    from kproxy import state
    from kproxy.clean import clean_cluster
    from kproxy.kernel import process
    c = make_cluster(nodes=1)
    p = c.add_pod("sleeper")
    proc = c.start_process(p, ["sleep", "300"])
    deadline = time.monotonic() + 10                 # `ip netns exec` has entered the pod
    while open(f"/proc/{proc.pid}/comm").read().strip() != "sleep":
        assert time.monotonic() < deadline, "sleep never started"
        time.sleep(0.01)
    real_stop = process.stop

    def refuses(pid, started, grace=2.0):
        if pid == proc.pid:
            raise PermissionError(1, "Operation not permitted")
        return real_stop(pid, started, grace)

    monkeypatch.setattr(process, "stop", refuses)
    report = clean_cluster(c.name)
    assert f"could not stop process {proc.pid}: [Errno 1] Operation not permitted" in report.problems
    assert not [n for n in netns.list_names() if n.startswith(c.name + "-")]
    assert proc.poll() is None                                  # still running, still on record
    assert c.name in state.known_clusters()
    monkeypatch.setattr(process, "stop", real_stop)
    again = clean_cluster(c.name)
    assert again.ok and proc.pid in again.processes_stopped, again.problems
    assert proc.wait(timeout=5) is not None
    assert c.name not in state.known_clusters()


def test_failed_up_undoes_itself(state_dir, monkeypatch):
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig
    from kproxy.kernel import links

    name = unique("t")

    def broken(*a, **k):
        raise RuntimeError("simulated failure half-way through up")

    monkeypatch.setattr(links, "add_vxlan", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        Cluster.create(ClusterConfig(name=name, nodes=["node1", "node2"], network_mode="vxlan"))
    assert not [n for n in netns.list_names() if n.startswith(name + "-")]


def test_clean_after_a_crash_uses_the_journal(state_dir):
    """A process killed mid-`up` leaves namespaces and a journal; `kproxy clean` removes them."""
    from kproxy import state
    name = unique("t")
    script = (
        "import os, signal\n"
        "from kproxy.cluster import Cluster\n"
        "from kproxy.config import ClusterConfig\n"
        "from kproxy.kernel import links\n"
        "real = links.add_bridge\n"
        "def crash(ipr, name, mtu=None, mac=None):\n"
        "    real(ipr, name, mtu, mac)\n"
        "    if name == 'cni0': os.kill(os.getpid(), signal.SIGKILL)\n"
        "links.add_bridge = crash\n"
        f"Cluster.create(ClusterConfig(name={name!r}, nodes=['node1', 'node2']))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == -9
    left = [n for n in netns.list_names() if n.startswith(name + "-")]
    assert left, "the crash should have left namespaces behind"
    out = kproxy_cli("--cluster", name, "clean")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verified" in out.stdout
    assert not [n for n in netns.list_names() if n.startswith(name + "-")]
    assert not state.known_clusters()


def test_cli_lifecycle_get_and_exec(state_dir):
    name = unique("t")
    env = {"KPROXY_CLUSTER": name}
    try:
        kproxy_cli("up", "--nodes", "2", "--network", "vxlan", env=env, check=True)
        kproxy_cli("run", "web", "--node", "node2", "-l", "app=web", env=env, check=True)
        nodes = kproxy_cli("get", "nodes", env=env, check=True).stdout
        assert "node1" in nodes and "192.168.5.12" in nodes and "10.244.1.0/24" in nodes
        wide = kproxy_cli("get", "pods", "-o", "wide", env=env, check=True).stdout
        assert "web" in wide and "node2" in wide and f"{name}-default-web" in wide
        pods = json.loads(kproxy_cli("get", "pods", "-o", "json", env=env, check=True).stdout)
        [item] = pods["items"]
        assert item["spec"]["nodeName"] == "node2" and item["status"]["podIP"].startswith("10.244.1.")
        assert item["metadata"]["labels"] == {"app": "web"}
        assert kproxy_cli("exec", "web", "--", "sh", "-c", "exit 7", env=env).returncode == 7
        addr = kproxy_cli("exec", "web", "--", "ip", "-br", "addr", "show", "eth0", env=env, check=True).stdout
        assert item["status"]["podIP"] in addr
        # `ip netns exec <name>` works on the pod's namespace as on any other
        ipn = subprocess.run(["ip", "netns", "exec", f"{name}-default-web", "true"])
        assert ipn.returncode == 0
        bad = kproxy_cli("run", "x", "--node", "node9", env=env)
        assert bad.returncode == 1 and "node 'node9' does not exist" in bad.stderr
    finally:
        down = kproxy_cli("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "verified" in down.stdout


def test_bad_input_leaves_nothing(make_cluster, state_dir):
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig
    from kproxy import state

    with pytest.raises(ConfigError, match="overlaps"):
        Cluster.create(ClusterConfig(name=unique("t"), pod_cidr="10.96.0.0/16"))
    with pytest.raises(ConfigError, match="at least one node"):
        Cluster.create(ClusterConfig(name=unique("t"), nodes=[]))
    assert not state.known_clusters()
    c = make_cluster(nodes=1)
    with pytest.raises(NotFound, match="node9"):
        c.add_pod("p", node="node9")
    with pytest.raises(ConfigError, match="over the kernel's limit"):
        c.add_pod("a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61)
    with pytest.raises(ConfigError, match="not valid"):
        c.add_pod("Bad_Name")
    assert c.pods == {} and not [n for n in netns.list_names() if n.startswith(c.name + "-default")]
