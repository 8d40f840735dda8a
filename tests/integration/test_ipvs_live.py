"""kube-proxy's IPVS mode on a real kernel, in throwaway network namespaces.

Nothing here touches the machine's own namespace: every command runs in a namespace
named ``kpipvs-<6 hex>`` (``kproxy.kernel.ipvs.available`` makes and deletes its own
``kpipvs-probe-<6 hex>``), and every fixture deletes what it made in a ``finally``.

* On a kernel without IP_VS (kproxy's CI and dev machines): ``available()`` says so in
  plain words, and ``apply`` raises KernelError before it creates anything. The ipset
  and iptables parts of a rendered plan still load (``ip_set`` is there), and
  ``cleanup`` removes them.
* On a kernel with IP_VS (a VM with a stock distribution kernel, ``make test-vm``):
  ClusterIP traffic is balanced over two real servers in another namespace, ClientIP
  affinity sticks, a Service without endpoints is refused at once, and cleanup leaves
  nothing. These tests skip with ``available()``'s reason elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from typing import Dict, Iterator, List

import pytest

from cni import netns
from kproxy.errors import KernelError
from kproxy.kernel import ipvs as kipvs
from kproxy.kernel import links, process
from kproxy.model import loads
from kproxy.proxy.iptables import NodeSettings
from kproxy.proxy.ipvs import plan as ipvs_plan
from kproxy.render import resolve_manifests
from tests.conftest import SEED, unique

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("iptables-restore")),
                       reason="needs ip and iptables-restore"),
]

HAVE_IPVS = os.path.exists(kipvs.PROC_IP_VS)
REQUIRED = ("this kernel has no IP_VS (CONFIG_IP_VS): /proc/net/ip_vs is missing; IPVS mode needs the "
            "ip_vs, ip_vs_rr modules — run it in a VM with a stock distribution kernel, e.g. `make test-vm`")


@pytest.fixture
def ipvs_ready() -> None:
    """Skip, with ``available()``'s reason, unless IPVS mode can run here. Kernel modules
    are machine-wide, so they are loaded only where that is wanted: with
    KPROXY_LOAD_MODULES=1 (the test VM sets it) ``modprobe ip_vs ip_vs_rr`` runs first."""
    if not HAVE_IPVS and os.environ.get("KPROXY_LOAD_MODULES") == "1":
        try:
            kipvs.load_modules()
        except KernelError:
            pass
    ok, reason = kipvs.available()
    if not ok:
        pytest.skip(reason)


@contextmanager
def namespace(name: str) -> Iterator[str]:
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


@pytest.fixture
def ns() -> Iterator[str]:
    with namespace(unique("kpipvs-")) as name:
        yield name


def run(ns_name: str, *argv: str, stdin: str = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", "netns", "exec", ns_name, *argv], input=stdin, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in {ns_name} failed ({res.returncode}): {res.stderr}")
    return res


def state(ns_name: str) -> Dict[str, object]:
    """What apply would change in a namespace: links, ipsets, iptables, the sysctls."""
    with links.socket_in(ns_name) as ipr:
        names = sorted(links.link_names(ipr))
    return {
        "links": names,
        "ipsets": run(ns_name, "ipset", "list", "-n").stdout,
        "iptables": "\n".join(line for line in run(ns_name, "iptables-save").stdout.splitlines()
                              if not line.startswith("#")),
        "sysctls": {k: links.read_sysctl(ns_name, k) for k in ("net.ipv4.ip_forward", "net.ipv4.conf.all.arp_ignore",
                                                                "net.ipv4.conf.all.arp_announce")},
    }


def objects(text: str) -> list:
    return [lo.obj for lo in loads(text)]


def probe_namespaces() -> List[str]:
    return [n for n in netns.list_names() if n.startswith("kpipvs-probe-")]


SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
{extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints: [{endpoints}]
ports: [{{name: http, port: 8080, protocol: TCP}}]
"""
BACKENDS = ("10.244.1.2", "10.244.1.3")
NODE_IP = "10.244.1.1"
SETTINGS = NodeSettings("node-a", [NODE_IP], cluster_cidr="10.244.0.0/16")


def service_plan(endpoints=BACKENDS, extra: str = ""):
    eps = ", ".join(f"{{addresses: [{ip}], nodeName: node-b}}" for ip in endpoints)
    objs = objects(SERVICE.format(extra=extra, endpoints=eps))
    return ipvs_plan(objs, objs, SETTINGS)


# --------------------------------------------------------------------------- without IP_VS


@pytest.mark.skipif(HAVE_IPVS, reason="this kernel has IP_VS: the missing-feature report cannot be seen here")
def test_available_says_plainly_that_ip_vs_is_missing():
    ok, reason = kipvs.available()
    assert ok is False
    assert REQUIRED in reason
    dummy_ok, _ = kipvs.dummy_supported()
    if dummy_ok is False:
        assert "no dummy interface type (CONFIG_DUMMY)" in reason and "ip link add type dummy" in reason
    assert probe_namespaces() == []                      # the dummy probe cleaned up after itself


@pytest.mark.skipif(HAVE_IPVS, reason="this kernel has IP_VS: apply would succeed")
def test_apply_raises_before_creating_anything(ns):
    before = state(ns)
    with pytest.raises(KernelError) as err:
        kipvs.apply(ns, service_plan())
    assert "CONFIG_IP_VS" in str(err.value) and "/proc/net/ip_vs is missing" in str(err.value)
    assert ns in str(err.value)
    assert state(ns) == before                            # no kube-ipvs0, no sets, no chains, no sysctls
    assert "kube-ipvs0" not in state(ns)["links"]
    assert probe_namespaces() == []


def test_apply_refuses_the_machines_namespace_and_missing_ones():
    with pytest.raises(KernelError, match="machine's own network namespace"):
        kipvs.apply("/proc/self/ns/net", service_plan())
    with pytest.raises(KernelError, match="does not exist"):
        kipvs.apply(unique("kpipvs-"), service_plan())
    with pytest.raises(KernelError, match="machine's own network namespace"):
        kipvs.cleanup("/proc/self/ns/net")


@pytest.mark.skipif(shutil.which("ipset") is None, reason="needs the ipset tool")
@pytest.mark.skipif(not SEED.is_dir(), reason=f"the course manifests are not at {SEED}")
def test_ipset_and_iptables_sections_load_and_cleanup_removes_them(ns):
    """Even without IP_VS the ipset and iptables parts are real inputs for their tools:
    the Stateful-app's plan loads, a second sync converges the sets (stale entries go),
    and cleanup removes chains and sets."""
    resolved = resolve_manifests(str(SEED / "Sesion4-Kubernetes" / "Stateful-app"), lb_pool="192.168.5.240/28")
    p = ipvs_plan(resolved.services, resolved.endpoint_slices,
                  NodeSettings("node-1", ["192.168.5.11"], cluster_cidr="10.244.0.0/16"))
    run(ns, "ipset", "restore", "-exist", stdin=kipvs.ipset_sync_text(p, {}))
    run(ns, "iptables-restore", "-w", "5", "--noflush", "--counters", stdin=p.iptables_restore())
    saved = run(ns, "ipset", "save").stdout
    for s in p.ipsets.values():
        assert f"create {s.name} {s.set_type}" in saved
        for entry in s.entries:
            assert f"add {s.name} {entry}" in saved
    nat = run(ns, "iptables-save", "-t", "nat").stdout
    assert ("-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment \"Kubernetes service cluster ip + port for "
            "masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ") in nat
    filt = run(ns, "iptables-save", "-t", "filter").stdout
    assert "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT" in filt

    # a stale entry is deleted and a missing one added by the next sync
    run(ns, "ipset", "add", "KUBE-CLUSTER-IP", "10.96.9.9,tcp:9")
    run(ns, "ipset", "del", "KUBE-NODE-PORT-TCP", "30000")
    current = {}
    for line in run(ns, "ipset", "save").stdout.splitlines():
        parts = line.split()
        if parts[0] == "create":
            current.setdefault(parts[1], set())
        elif parts[0] == "add":
            current.setdefault(parts[1], set()).add(parts[2])
    text = kipvs.ipset_sync_text(p, current)
    assert "del KUBE-CLUSTER-IP 10.96.9.9,tcp:9" in text and "add KUBE-NODE-PORT-TCP 30000" in text
    assert "add KUBE-CLUSTER-IP 10.96.0.2,tcp:8080" not in text                # already there
    run(ns, "ipset", "restore", "-exist", stdin=text)
    assert run(ns, "ipset", "list", "KUBE-CLUSTER-IP").stdout.rstrip().endswith("Members:\n10.96.0.2,tcp:8080")

    assert kipvs.cleanup(ns) == []
    assert run(ns, "ipset", "list", "-n").stdout.strip() == ""
    assert "KUBE-" not in run(ns, "iptables-save").stdout
    assert kipvs.cleanup(ns) == []                                            # idempotent


# --------------------------------------------------------------------------- with IP_VS

SERVER = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(256)
while True:
    c, peer = s.accept()
    try:
        c.sendall(f"{ip} {peer[0]}\n".encode())
    finally:
        c.close()
"""


def connect(ns_name: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """One TCP connection from inside ``ns_name``: the server's answer ("server client")."""
    with netns.entered(ns_name):
        sock = socket.create_connection((ip, port), timeout=timeout)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()
    finally:
        sock.close()


@pytest.fixture
def topology(ipvs_ready):
    """Two namespaces joined by a veth: ``node`` (10.244.1.1, where IPVS runs) and
    ``pods`` (10.244.1.2 and 10.244.1.3, each with a server on :8080, default route via
    the node). Yields (node, pods)."""
    base = unique("kpipvs-")
    procs = []
    with namespace(base) as node, namespace(base + "-pods") as pods:
        try:
            with links.socket_in(node) as ipr:
                links.set_up(ipr, "lo")
                links.add_veth(ipr, "kpv0", "eth0", pods)
                links.add_address(ipr, "kpv0", f"{NODE_IP}/24")
                links.set_up(ipr, "kpv0")
            with links.socket_in(pods) as ipr:
                links.set_up(ipr, "lo")
                for ip in BACKENDS:
                    links.add_address(ipr, "eth0", f"{ip}/24")
                links.set_up(ipr, "eth0")
                links.add_route(ipr, "0.0.0.0/0", gateway=NODE_IP)
            for ip in BACKENDS:
                procs.append(process.spawn(pods, [sys.executable, "-c", SERVER, ip, "8080"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            for ip in BACKENDS:
                while True:
                    try:
                        connect(node, ip, 8080, timeout=0.5)
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            yield node, pods
        finally:
            for proc, started in procs:
                process.stop(proc.pid, started)
                proc.wait(timeout=5)
            kipvs.cleanup(node)


def test_cluster_ip_is_balanced_over_two_real_servers(topology):
    node, _ = topology
    p = service_plan()
    kipvs.apply(node, p)
    saved = set(kipvs.saved(node).splitlines())
    assert saved == set(p.ipvsadm_restore().splitlines())
    with links.socket_in(node) as ipr:
        link = ipr.get_links(ifname="kube-ipvs0")[0]
        assert not link["flags"] & 1                       # IFF_UP: left down, as upstream
        assert link["flags"] & 0x80                        # IFF_NOARP
        assert links.addresses(ipr, "kube-ipvs0") == ["10.96.0.10/32"]
    assert links.read_sysctl(node, "net.ipv4.vs.conntrack") == "1"
    answers = [connect(node, "10.96.0.10", 80) for _ in range(40)]
    servers = Counter(a.split()[0] for a in answers)
    assert set(servers) == set(BACKENDS), servers
    assert all(15 <= count <= 25 for count in servers.values()), servers      # rr: 20 each
    # the node's connection leaves from the VIP, so it is masqueraded to the node's address
    assert {a.split()[1] for a in answers} == {NODE_IP}


def test_client_ip_affinity_sticks_to_one_real_server(topology):
    node, _ = topology
    kipvs.apply(node, service_plan(extra="  sessionAffinity: ClientIP"))
    assert " -p 10800" in kipvs.saved(node)
    servers = {connect(node, "10.96.0.10", 80).split()[0] for _ in range(12)}
    assert len(servers) == 1


def test_service_without_endpoints_is_refused_at_once(topology):
    """The virtual server stays with no real server; the kernel answers ICMP port
    unreachable (ip_vs_leave), so the client sees 'connection refused' quickly."""
    node, _ = topology
    kipvs.apply(node, service_plan(endpoints=()))
    assert "-A -t 10.96.0.10:80 -s rr" in kipvs.saved(node)
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(node, "10.96.0.10", 80, timeout=5)
    assert time.monotonic() - start < 2


def test_apply_converges_and_cleanup_leaves_nothing(topology):
    node, _ = topology
    before = state(node)
    kipvs.apply(node, service_plan())
    kipvs.apply(node, service_plan(endpoints=BACKENDS[:1]), incremental=True)   # scale down, no flush
    assert [line for line in kipvs.saved(node).splitlines() if line.startswith("-a")] == [
        "-a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1"]
    assert {connect(node, "10.96.0.10", 80).split()[0] for _ in range(6)} == {"10.244.1.2"}
    kipvs.apply(node, service_plan(endpoints=BACKENDS[:1]), incremental=True)   # nothing to change
    assert kipvs.ipvsadm_sync_text(service_plan(endpoints=BACKENDS[:1]), kipvs.saved(node)) == ""
    assert kipvs.cleanup(node) == []
    assert kipvs.saved(node).strip() == ""
    after = state(node)
    assert after["links"] == before["links"] and after["ipsets"] == before["ipsets"]
    assert "KUBE-" not in after["iptables"]


EVERYTHING = """
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: 30200
  loadBalancerSourceRanges: [203.0.113.0/25]
  externalIPs: [192.168.99.33]
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 8053, nodePort: 30053, protocol: UDP}
  - {name: sctp, port: 9, targetPort: 9009, nodePort: 30009, protocol: SCTP}
status: {loadBalancer: {ingress: [{ip: 192.168.5.240}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: default, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.2], nodeName: node-a}, {addresses: [10.244.1.3], nodeName: node-b}]
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 8053, protocol: UDP}
- {name: sctp, port: 9009, protocol: SCTP}
"""


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "sh", "mh"])
def test_every_feature_applies_and_ipvsadm_reads_back_the_plan(ipvs_ready, ns, scheduler):
    """LoadBalancer with eTP Local, source ranges (the ``-m ipvs`` out-filter), an external
    IP, affinity, TCP/UDP/SCTP NodePorts: the kernel takes all of it, ``ipvsadm -Sn``
    prints back exactly the plan's lines, and iptables-save has every rule."""
    objs = objects(EVERYTHING)
    p = ipvs_plan(objs, objs, SETTINGS, scheduler=scheduler)
    kipvs.apply(ns, p)
    assert set(kipvs.saved(ns).splitlines()) == set(p.ipvsadm_restore().splitlines())
    filt = run(ns, "iptables-save", "-t", "filter").stdout
    for proto, port in ((6, 80), (17, 53), (132, 9)):        # iptables-save prints protocol numbers
        assert (f"-A KUBE-IPVS-OUT-FILTER -s 192.168.5.240/32 -m ipvs --vproto {proto} --vaddr 192.168.5.240 "
                f"--vport {port} -j DROP") in filt
    saved_sets = run(ns, "ipset", "save").stdout
    for s in p.ipsets.values():
        for entry in s.entries:
            assert f"add {s.name} {entry}" in saved_sets
    with links.socket_in(ns) as ipr:
        assert sorted(links.addresses(ipr, "kube-ipvs0")) == sorted(p.dummy_addresses)
    assert kipvs.ipvsadm_sync_text(p, kipvs.saved(ns)) == ""                  # nothing left to change
    assert kipvs.cleanup(ns) == []
    assert kipvs.saved(ns).strip() == ""
