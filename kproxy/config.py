"""Cluster settings: what `kproxy up` is asked to build, checked before anything is made.

Defaults follow kubeadm and kind, so what a student sees matches a real cluster:
pod CIDR 10.244.0.0/16 (a /24 per node), service CIDR 10.96.0.0/12, NodePorts
30000-32767, node addresses on 192.168.5.0/24 starting at .11.
"""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Optional

from kproxy.errors import ConfigError
from kproxy.naming import CLUSTER_NAME_MAX, check_dns_label

NETWORK_MODES = ("host-gw", "vxlan")
BACKENDS = ("iptables", "nftables", "ipvs")
DEFAULT_CLUSTER = "kproxy"


@dataclass
class ClusterConfig:
    name: str = DEFAULT_CLUSTER
    nodes: list[str] = field(default_factory=lambda: ["node1", "node2"])
    network_mode: str = "host-gw"
    pod_cidr: str = "10.244.0.0/16"
    node_subnet_prefix: int = 24
    service_cidr: str = "10.96.0.0/12"
    node_cidr: str = "192.168.5.0/24"
    first_node_host: int = 11          # node i gets host number first_node_host + i
    external_host: int = 100           # the "external" client's host number
    first_pod_host: int = 2            # pods get addresses from host .N of their node's subnet (IPAM rangeStart)
    node_port_range: str = "30000-32767"
    lb_pool: Optional[str] = "192.168.5.240/28"
    backend: str = "iptables"
    iptables_flavour: str = "nft"      # iptables-nft (traceable) or iptables-legacy (faster restores)
    ipvs_scheduler: str = "rr"         # IPVS mode's --ipvs-scheduler
    vxlan_id: int = 1
    vxlan_port: int = 8472             # flannel's port

    # ---- derived values -------------------------------------------------------------
    def node_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.node_cidr)[self.first_node_host + index])

    def external_ip(self) -> str:
        return str(ipaddress.ip_network(self.node_cidr)[self.external_host])

    def node_prefixlen(self) -> int:
        return ipaddress.ip_network(self.node_cidr).prefixlen

    def node_pod_cidr(self, index: int) -> str:
        subnets = ipaddress.ip_network(self.pod_cidr).subnets(new_prefix=self.node_subnet_prefix)
        for i, net in enumerate(subnets):
            if i == index:
                return str(net)
        raise ConfigError(f"pod CIDR {self.pod_cidr} has no /{self.node_subnet_prefix} left for node #{index + 1}")

    def dns_ip(self) -> str:
        """kube-dns's ClusterIP: the service CIDR's .10, as kubeadm gives it."""
        return str(ipaddress.ip_network(self.service_cidr)[10])

    def pod_mtu(self) -> int:
        return 1450 if self.network_mode == "vxlan" else 1500

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> "ClusterConfig":
        """Raise ConfigError naming the bad value; return self when all is well."""
        try:
            check_dns_label(self.name, "cluster name", CLUSTER_NAME_MAX)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.nodes:
            raise ConfigError("a cluster needs at least one node (node count 0 given)")
        seen = set()
        for n in self.nodes:
            try:
                check_dns_label(n, "node name")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if n in ("underlay", "external"):
                raise ConfigError(f"node name {n!r} is reserved for kproxy's own namespaces")
            if n in seen:
                raise ConfigError(f"node name {n!r} is given twice")
            seen.add(n)
        if self.network_mode not in NETWORK_MODES:
            raise ConfigError(f"network mode {self.network_mode!r} is not one of {', '.join(NETWORK_MODES)}")
        if self.iptables_flavour not in ("nft", "legacy"):
            raise ConfigError(f"iptables flavour {self.iptables_flavour!r} is not nft or legacy")
        if self.backend not in BACKENDS:
            raise ConfigError(f"proxy backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        nets = {}
        for label in ("pod_cidr", "service_cidr", "node_cidr"):
            value = getattr(self, label)
            try:
                net = ipaddress.ip_network(value, strict=True)
            except ValueError as e:
                raise ConfigError(f"{label.replace('_', ' ')} {value!r} is not a valid network: {e}") from None
            if net.version != 4:
                raise ConfigError(f"{label.replace('_', ' ')} {value!r}: only IPv4 is emulated")
            nets[label] = net
        if self.lb_pool:
            try:
                nets["lb_pool"] = ipaddress.ip_network(self.lb_pool, strict=True)
            except ValueError as e:
                raise ConfigError(f"load-balancer pool {self.lb_pool!r} is not a valid network: {e}") from None
        for a, b in (("pod_cidr", "service_cidr"), ("pod_cidr", "node_cidr"), ("service_cidr", "node_cidr"),
                     ("lb_pool", "pod_cidr"), ("lb_pool", "service_cidr")):
            if a in nets and b in nets and nets[a].overlaps(nets[b]):
                raise ConfigError(
                    f"{a.replace('_', ' ')} {nets[a]} overlaps {b.replace('_', ' ')} {nets[b]}: they must be disjoint"
                )
        pod = nets["pod_cidr"]
        if not pod.prefixlen <= self.node_subnet_prefix <= 30:
            raise ConfigError(
                f"per-node pod subnet /{self.node_subnet_prefix} does not fit in pod CIDR {pod} (need /{pod.prefixlen}../30)"
            )
        if len(self.nodes) > 2 ** (self.node_subnet_prefix - pod.prefixlen):
            raise ConfigError(
                f"pod CIDR {pod} holds only {2 ** (self.node_subnet_prefix - pod.prefixlen)} "
                f"/{self.node_subnet_prefix} node subnets, {len(self.nodes)} nodes asked"
            )
        if not 2 <= self.first_pod_host < 2 ** (32 - self.node_subnet_prefix) - 1:
            raise ConfigError(f"first pod host .{self.first_pod_host} is outside the /{self.node_subnet_prefix} "
                              "node subnets (.1 is the bridge)")
        node_net = nets["node_cidr"]
        hosts = node_net.num_addresses - 2
        last = self.first_node_host + len(self.nodes) - 1
        if self.first_node_host < 1 or last > hosts:
            raise ConfigError(f"node network {node_net} has no room for {len(self.nodes)} nodes from host .{self.first_node_host}")
        if self.first_node_host <= self.external_host <= last or not 1 <= self.external_host <= hosts:
            raise ConfigError(f"external client host number {self.external_host} collides with a node or is outside {node_net}")
        if "lb_pool" in nets:
            ips = [ipaddress.ip_address(self.node_ip(i)) for i in range(len(self.nodes))]
            ips.append(ipaddress.ip_address(self.external_ip()))
            for ip in ips:
                if ip in nets["lb_pool"]:
                    raise ConfigError(f"load-balancer pool {nets['lb_pool']} contains node or client address {ip}")
        try:
            lo, hi = (int(x) for x in self.node_port_range.split("-"))
        except ValueError:
            raise ConfigError(f"node port range {self.node_port_range!r} is not of the form LOW-HIGH") from None
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(f"node port range {self.node_port_range!r} is outside 1-65535")
        if not 1 <= self.vxlan_id <= 16777215:
            raise ConfigError(f"VXLAN id {self.vxlan_id} is outside 1-16777215")
        return self


def nodes_from_count(count: int) -> list[str]:
    if count < 1:
        raise ConfigError(f"node count {count}: a cluster needs at least one node")
    return [f"node{i + 1}" for i in range(count)]
