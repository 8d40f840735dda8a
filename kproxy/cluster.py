"""The emulated cluster: nodes and pods as network namespaces.

    underlay namespace      br0 ──┬── port0 ─── eth0  node1 namespace  cni0 ── vethXXXX ── eth0  pod namespace
    (the nodes' L2 segment)       ├── port1 ─── eth0  node2 namespace  cni0 ── ...
                                  └── portN ─── eth0  external client namespace

Each node has its own pod CIDR on its cni0 bridge, forwarding on, and routes to
the other nodes' pod CIDRs: straight via the peer's address (host-gw) or through a
flannel-style VXLAN device (vxlan).  Pods are attached by the CNI bridge plugin in
cni/, through the CNI protocol.  Nothing is created in the machine's own namespace
and no namespace has a route or a link towards it.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

from cni import invoke as cni_invoke
from cni import netns
from kproxy import naming, snapshot, state
from kproxy.dns import resolv as dns_resolv
from kproxy.config import ClusterConfig
from kproxy.errors import ConfigError, KproxyError, NotFound
from kproxy.kernel import links, process

UNDERLAY_BRIDGE = "br0"
POD_BRIDGE = "cni0"
VXLAN_DEVICE = "flannel.1"


@dataclass
class Node:
    name: str
    index: int
    ip: str
    pod_cidr: str
    netns: str
    vtep_mac: str

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr)[1])


@dataclass
class Pod:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    container_id: str
    labels: dict = field(default_factory=dict)
    # what the kubelet knows: managed (made from the store), phase, ready, containers...
    status: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _vtep_mac(cluster: str, index: int) -> str:
    h = naming.short_hash(cluster, str(index), length=10)
    return "0e:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))


class Cluster:
    """A running emulated cluster; create one with Cluster.create, reopen with Cluster.open."""

    def __init__(self, config: ClusterConfig, nodes: list[Node], pods: dict[str, Pod]):
        self.config = config
        self.nodes = nodes
        self.pods = pods
        self.dir = state.cluster_dir(config.name)
        self.journal = state.Journal(self.dir)
        self.proxy_state: dict = {}      # the proxier's memory between syncs (see kproxy.reconciler)
        self.reconciler = False          # True in the process running the controllers (see save)
        self._touched: set = set()

    # ---- names ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def underlay_ns(self) -> str:
        return naming.underlay_netns(self.name)

    @property
    def external_ns(self) -> str:
        return naming.external_netns(self.name)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise NotFound(f"node {name!r} does not exist in cluster {self.name!r} "
                       f"(nodes: {', '.join(n.name for n in self.nodes)})")

    def pod(self, name: str, namespace: str = "default") -> Pod:
        try:
            return self.pods[f"{namespace}/{name}"]
        except KeyError:
            raise NotFound(f"pod {namespace}/{name} does not exist in cluster {self.name!r}") from None

    # ---- persistence ------------------------------------------------------------------
    def save(self) -> None:
        """Write the cluster's records, merged with what other processes wrote since
        this one read them: a daemon and a CLI command may both hold a Cluster.

        Under the cluster lock, the file's pods are taken as they are, except the pods
        this process added, changed or removed (``touch``), and, in the process that
        runs the controllers (``reconciler``), every managed pod, the proxier's memory
        and the configuration."""
        path = os.path.join(self.dir, "state.json")
        with state.locked(self.dir):
            disk = state.read_json(path) or {}
            pods = {k: Pod(**p) for k, p in disk.get("pods", {}).items()}
            if self.reconciler or not disk:
                pods = {k: p for k, p in pods.items() if not p.status.get("managed")}
                pods.update({k: p for k, p in self.pods.items() if p.status.get("managed")})
            for key in self._touched:
                if key in self.pods:
                    pods[key] = self.pods[key]
                else:
                    pods.pop(key, None)
            self._touched.clear()
            self.pods = pods
            mine = self.reconciler or not disk
            state.write_json_atomic(path, {
                "config": self.config.to_dict() if mine else disk["config"],
                "nodes": [asdict(n) for n in self.nodes],
                "pods": {k: asdict(p) for k, p in sorted(pods.items())},
                "proxy": self.proxy_state if mine else disk.get("proxy", {}),
            })

    def touch(self, key: str) -> None:
        """This process changed pod ``key`` (or removed it): its record wins at save."""
        self._touched.add(key)

    @classmethod
    def open(cls, name: str) -> "Cluster":
        data = state.read_json(os.path.join(state.cluster_dir(name), "state.json"))
        if not data:
            raise NotFound(f"cluster {name!r} does not exist (no state in {state.cluster_dir(name)}); "
                           "`kproxy up` creates one")
        config = ClusterConfig.from_dict(data["config"])
        nodes = [Node(**n) for n in data["nodes"]]
        pods = {k: Pod(**p) for k, p in data["pods"].items()}
        cluster = cls(config, nodes, pods)
        cluster.proxy_state = data.get("proxy", {})
        return cluster

    @staticmethod
    def exists(name: str) -> bool:
        return os.path.exists(os.path.join(state.cluster_dir(name), "state.json"))

    # ---- creation ---------------------------------------------------------------------
    @classmethod
    def create(cls, config: ClusterConfig) -> "Cluster":
        """Build the nodes, the underlay and the external client; on failure undo all of it."""
        config.validate()
        from kproxy.proxier import require_backend
        require_backend(config.backend, config.ipvs_scheduler)
        directory = state.cluster_dir(config.name)
        if os.path.exists(os.path.join(directory, "journal.jsonl")):
            raise ConfigError(f"cluster {config.name!r} already exists or was not cleaned "
                              f"(state in {directory}); run `kproxy down --cluster {config.name}` first")
        nodes = [
            Node(name=n, index=i, ip=config.node_ip(i), pod_cidr=config.node_pod_cidr(i),
                 netns=naming.node_netns(config.name, n), vtep_mac=_vtep_mac(config.name, i))
            for i, n in enumerate(config.nodes)
        ]
        wanted = [naming.underlay_netns(config.name), naming.external_netns(config.name)] + [n.netns for n in nodes]
        taken = [ns for ns in wanted if netns.exists(ns)]
        if taken:
            raise ConfigError(f"network namespace(s) {', '.join(taken)} already exist; "
                              f"choose another cluster name than {config.name!r}")
        os.makedirs(directory, exist_ok=True)
        cluster = cls(config, nodes, {})
        try:
            with state.locked(directory):
                state.write_json_atomic(os.path.join(directory, "snapshot.json"), snapshot.capture())
                cluster._build()
                cluster.save()
        except BaseException:
            cluster.journal.close()
            from kproxy.clean import clean_cluster
            clean_cluster(config.name, remove_state=True)
            raise
        return cluster

    def _new_netns(self, name: str) -> None:
        self.journal.record("netns", name=name)
        netns.create(name)

    def build_infrastructure(self) -> None:
        """Make the underlay, the external client and the nodes (again, after a reboot
        took their namespaces): what `up` builds before any pod."""
        with state.locked(self.dir):
            self._build()

    def _build(self) -> None:
        cfg = self.config
        plen = cfg.node_prefixlen()
        self._new_netns(self.underlay_ns)
        self._new_netns(self.external_ns)
        for node in self.nodes:
            self._new_netns(node.netns)

        with links.socket_in(self.underlay_ns) as u:
            links.set_up(u, "lo")
            links.add_bridge(u, UNDERLAY_BRIDGE)

        ports = []
        for node in self.nodes:
            port = naming.underlay_port(node.index)
            ports.append(port)
            with links.socket_in(node.netns) as s:
                links.set_up(s, "lo")
                links.add_veth(s, "eth0", port, self.underlay_ns)
                links.add_address(s, "eth0", f"{node.ip}/{plen}")
                links.set_up(s, "eth0")
                # Real nodes reach the service CIDR through their default route: a packet to a
                # ClusterIP must find a route before kube-proxy's FORWARD/OUTPUT rules see it
                # (REJECT for a Service without endpoints, DNAT in OUTPUT for the node's own
                # traffic).  Here that route stays on the underlay; there is no default route.
                links.add_route(s, cfg.service_cidr, dev="eth0")
                links.add_bridge(s, POD_BRIDGE, mtu=cfg.pod_mtu(), mac=links.mac_for_ipv4(node.gateway))
                links.add_address(s, POD_BRIDGE, f"{node.gateway}/{ipaddress.ip_network(node.pod_cidr).prefixlen}")
            links.write_sysctl(node.netns, "net.ipv4.ip_forward", "1")
            links.write_sysctl(node.netns, "net.bridge.bridge-nf-call-iptables", "1")

        ext_port = naming.underlay_port(len(self.nodes))
        ports.append(ext_port)
        with links.socket_in(self.external_ns) as s:
            links.set_up(s, "lo")
            links.add_veth(s, "eth0", ext_port, self.underlay_ns)
            links.add_address(s, "eth0", f"{cfg.external_ip()}/{plen}")
            links.set_up(s, "eth0")

        with links.socket_in(self.underlay_ns) as u:
            for port in ports:
                links.set_up(u, port, master=UNDERLAY_BRIDGE)

        if cfg.network_mode == "vxlan":
            self._build_vxlan()
        else:
            self._build_host_gw()

    def _build_host_gw(self) -> None:
        for node in self.nodes:
            with links.socket_in(node.netns) as s:
                for peer in self.nodes:
                    if peer is not node:
                        links.add_route(s, peer.pod_cidr, gateway=peer.ip, dev="eth0")

    def _build_vxlan(self) -> None:
        """flannel's vxlan backend: a VTEP per node holding the subnet's .0/32, and for each
        peer a route via its VTEP address, a permanent ARP entry and an FDB entry."""
        cfg = self.config
        for node in self.nodes:
            vtep_ip = str(ipaddress.ip_network(node.pod_cidr)[0])
            with links.socket_in(node.netns) as s:
                links.add_vxlan(s, VXLAN_DEVICE, cfg.vxlan_id, node.ip, "eth0", cfg.vxlan_port,
                                node.vtep_mac, cfg.pod_mtu())
                links.add_address(s, VXLAN_DEVICE, f"{vtep_ip}/32")
                links.set_up(s, VXLAN_DEVICE)
                for peer in self.nodes:
                    if peer is node:
                        continue
                    peer_vtep = str(ipaddress.ip_network(peer.pod_cidr)[0])
                    links.add_neighbour(s, VXLAN_DEVICE, peer_vtep, peer.vtep_mac)
                    links.add_fdb(s, VXLAN_DEVICE, peer.vtep_mac, peer.ip)
                    links.add_route(s, peer.pod_cidr, gateway=peer_vtep, dev=VXLAN_DEVICE, onlink=True)

    # ---- pods -------------------------------------------------------------------------
    def cni_config(self, node: Node) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "kproxy-bridge",
            "bridge": POD_BRIDGE,
            "isGateway": True,
            "hairpinMode": True,
            "mtu": self.config.pod_mtu(),
            "ipam": {
                "type": "kproxy-host-local",
                "ranges": [[{"subnet": node.pod_cidr, "gateway": node.gateway,
                             "rangeStart": str(ipaddress.ip_network(node.pod_cidr)[self.config.first_pod_host])}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": os.path.join(self.dir, "ipam", node.name),
            },
        }

    def _pick_node(self, counts: dict[str, int]) -> Node:
        """The node with the fewest pods (ties: the first), as a scheduler spreading pods would."""
        return min(self.nodes, key=lambda n: (counts.get(n.name, 0), n.index))

    def add_pod(self, name: str, namespace: str = "default", node: Optional[str] = None,
                labels: Optional[dict] = None) -> Pod:
        return self.add_pods([(name, namespace, node, labels)])[0]

    def add_pods(self, specs: Iterable[tuple]) -> list[Pod]:
        """Create pods: each spec is (name, namespace, node or None, labels or None,
        initial status or None); the status is saved with the pod's first record.

        All names are checked before anything is made; a failure part-way removes the
        pod being made and leaves the pods made before it in place (and recorded)."""
        specs = [tuple(s) + (None,) * (5 - len(s)) for s in specs]
        counts: dict[str, int] = {}
        for p in self.pods.values():
            counts[p.node] = counts.get(p.node, 0) + 1
        plan = []
        seen = set()
        for name, namespace, node_name, labels, status in specs:
            try:
                naming.check_dns_subdomain(name, "pod name")
                naming.check_dns_label(namespace, "namespace")
                ns_name = naming.pod_netns(self.name, namespace, name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            key = f"{namespace}/{name}"
            if key in self.pods or key in seen:
                raise ConfigError(f"pod {key} already exists in cluster {self.name!r}")
            if netns.exists(ns_name):
                raise ConfigError(f"network namespace {ns_name} already exists (not this cluster's pod {key})")
            seen.add(key)
            node = self.node(node_name) if node_name else self._pick_node(counts)
            counts[node.name] = counts.get(node.name, 0) + 1
            plan.append((name, namespace, node, dict(labels or {}), ns_name, dict(status or {})))

        made = []
        with state.locked(self.dir):
            try:
                for name, namespace, node, labels, ns_name, status in plan:
                    made.append(self._attach(name, namespace, node, labels, ns_name, status))
            finally:
                self.save()
        return made

    def _attach(self, name: str, namespace: str, node: Node, labels: dict, ns_name: str,
                status: Optional[dict] = None) -> Pod:
        container_id = naming.short_hash(self.name, namespace, name, length=32)
        # what a restarted daemon needs to undo a pod it was making when it died
        self.journal.record("pod", key=f"{namespace}/{name}", netns=ns_name, node=node.name,
                            container_id=container_id)
        self._new_netns(ns_name)
        try:
            result = cni_invoke.call("ADD", self.cni_config(node), container_id=container_id,
                                     netns=netns.path_of(ns_name), ifname="eth0", host_netns=node.netns)
        except BaseException:
            self._release_netns(ns_name)
            raise
        ip = result["ips"][0]["address"].split("/")[0]
        self._install_resolv_conf(ns_name, namespace)
        pod = Pod(name=name, namespace=namespace, node=node.name, netns=ns_name, ip=ip,
                  container_id=container_id, labels=labels, status=dict(status or {}))
        self.pods[pod.key] = pod
        self.touch(pod.key)
        return pod

    def _release_netns(self, ns_name: str) -> None:
        netns.delete(ns_name)
        self.journal.record("release-netns", name=ns_name)
        if dns_resolv.uninstall(ns_name):
            self.journal.record("release-etc-netns", name=ns_name)

    def _install_resolv_conf(self, ns_name: str, namespace: str) -> None:
        """The pod's /etc/resolv.conf as kubelet writes it for dnsPolicy ClusterFirst; `ip
        netns exec` bind-mounts /etc/netns/<netns>/resolv.conf over /etc/resolv.conf."""
        if not os.path.isdir(dns_resolv.NETNS_ETC):
            self.journal.record("etc-netns-base", path=dns_resolv.NETNS_ETC)
        self.journal.record("etc-netns", name=ns_name)
        dns_resolv.install(ns_name, dns_resolv.resolv_conf(namespace, self.config.dns_ip()))

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        pod = self.pod(name, namespace)
        node = self.node(pod.node)
        with state.locked(self.dir):
            for pid, started in self.processes_of(pod):
                process.stop(pid, started)
                self.journal.record("release-process", pid=pid, started=started)
            cni_invoke.call("DEL", self.cni_config(node), container_id=pod.container_id,
                            netns=netns.path_of(pod.netns), ifname="eth0", host_netns=node.netns)
            self._release_netns(pod.netns)
            del self.pods[pod.key]
            self.touch(pod.key)
            self.save()

    # ---- processes --------------------------------------------------------------------
    def processes_of(self, pod: Pod) -> list[tuple[int, int]]:
        out = []
        for e in self.journal.entries():
            if e.op == "process" and e.data.get("netns") == pod.netns:
                out.append((e.data["pid"], e.data["started"]))
        live = set(self.journal.live_processes())
        return [p for p in out if p in live]

    def start_process(self, pod: Pod, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a long-running process in the pod, recorded for cleanup by PID."""
        proc, started = process.spawn(pod.netns, argv, **popen_kwargs)
        self.journal.record("process", pid=proc.pid, started=started, netns=pod.netns, argv=list(argv))
        return proc

    def exec(self, pod: Pod, argv: Sequence[str], **run_kwargs) -> subprocess.CompletedProcess:
        """Run a command in the pod's namespace and wait for it (like `kubectl exec`)."""
        return subprocess.run(process.exec_argv(pod.netns, argv), **run_kwargs)

    def exec_in(self, ns: str, argv: Sequence[str], **run_kwargs) -> subprocess.CompletedProcess:
        ours = {self.underlay_ns, self.external_ns} | {n.netns for n in self.nodes} | {p.netns for p in self.pods.values()}
        if ns not in ours:
            raise NotFound(f"namespace {ns} is not part of cluster {self.name!r}")
        return subprocess.run(process.exec_argv(ns, argv), **run_kwargs)

    # ---- teardown ---------------------------------------------------------------------
    def destroy(self):
        """Remove everything this cluster made; returns a kproxy.clean.CleanReport."""
        from kproxy.clean import clean_cluster
        self.journal.close()
        return clean_cluster(self.name, remove_state=True)


def list_clusters() -> list[str]:
    return state.known_clusters()


def require_root() -> None:
    if os.geteuid() != 0:
        raise KproxyError("this needs root: kproxy creates network namespaces (run with sudo)")


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None
