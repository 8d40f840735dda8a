"""Names, set types, comments and fixed rules of kube-proxy's IPVS mode.

Facts from upstream kube-proxy (kubernetes/kubernetes pkg/proxy/ipvs, v1.29+):
``proxier.go`` (``ipsetInfo``, ``ipsetWithIptablesChain``, ``iptablesChains``,
``iptablesJumpChain``, the sysctl constants), ``ipset.go`` (set names and comments) and
``ipset/ipset.go`` (``create`` arguments and entry strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from kproxy.proxy.iptables.jumps import JumpRule

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"

# ipset types (pkg/proxy/ipvs/ipset/types.go)
HASH_IP = "hash:ip"
HASH_IP_PORT = "hash:ip,port"
HASH_IP_PORT_IP = "hash:ip,port,ip"
HASH_IP_PORT_NET = "hash:ip,port,net"
BITMAP_PORT = "bitmap:port"
DEFAULT_PORT_RANGE = "0-65535"
HASH_SIZE = 1024
MAX_ELEM = 65536
MAX_SET_NAME = 31           # the kernel's IPSET_MAXNAMELEN - 1

# iptables chains the IPVS proxier owns
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

# upstream's iptablesChains, in order
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL,
                 KUBE_IPVS_FILTER, KUBE_IPVS_OUT_FILTER)

# upstream's iptablesJumpChain: ensured with `iptables -C` / `-I` (prepend), in this order,
# so in one built-in chain a later row ends up above an earlier one. No conntrack matches.
JUMP_RULES: Tuple[JumpRule, ...] = (
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    JumpRule("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)


@dataclass(frozen=True)
class SetInfo:
    name: str
    set_type: str
    comment: str


LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# upstream's ipsetInfo: every set is created on every sync, in this order
SETS: Tuple[SetInfo, ...] = (
    SetInfo(LOOP_BACK, HASH_IP_PORT_IP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    SetInfo(CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"),
    SetInfo(EXTERNAL_IP, HASH_IP_PORT, "Kubernetes service external ip + port for masquerade and filter purpose"),
    SetInfo(EXTERNAL_IP_LOCAL, HASH_IP_PORT, "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    SetInfo(LOAD_BALANCER, HASH_IP_PORT, "Kubernetes service lb portal"),
    SetInfo(LOAD_BALANCER_FW, HASH_IP_PORT,
            "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    SetInfo(LOAD_BALANCER_LOCAL, HASH_IP_PORT,
            "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    SetInfo(LOAD_BALANCER_SOURCE_IP, HASH_IP_PORT_IP,
            "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    SetInfo(LOAD_BALANCER_SOURCE_CIDR, HASH_IP_PORT_NET,
            "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    SetInfo(NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    SetInfo(NODE_PORT_LOCAL_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    SetInfo(NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    SetInfo(NODE_PORT_LOCAL_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    SetInfo(NODE_PORT_SCTP, HASH_IP_PORT,
            "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    SetInfo(NODE_PORT_LOCAL_SCTP, HASH_IP_PORT,
            "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    SetInfo(HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    SetInfo(IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
SET_INFO = {s.name: s for s in SETS}


@dataclass(frozen=True)
class SetChain:
    """One row of upstream's ipsetWithIptablesChain: ``-A <chain> [-p proto] -m comment
    --comment "<set comment>" -m set --match-set <set> <match> -j <target>``, written only
    when the set is not empty."""

    set_name: str
    table: str
    chain: str
    target: str
    match: str
    protocol: str = ""


SET_CHAINS: Tuple[SetChain, ...] = (
    SetChain(LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src"),
    SetChain(LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst"),
    SetChain(LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst"),
    SetChain(NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    SetChain(NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    SetChain(NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    SetChain(NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    SetChain(NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    SetChain(NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    SetChain(LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst"),
    SetChain(LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src"),
    SetChain(LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src"),
)

NODE_PORT_SETS = {"tcp": (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP), "udp": (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
                  "sctp": (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP)}


def set_name(name: str, ipv6: bool) -> str:
    """Upstream's NewIPSet: IPv6 sets get the ``KUBE-6-`` prefix, cut to 31 characters."""
    if ipv6 and name.startswith("KUBE-"):
        name = name.replace("KUBE-", "KUBE-6-", 1)[:MAX_SET_NAME]
    return name


# sysctls (proxier.go); conn_reuse_mode is set to 0 only on kernels [4.1, 5.9)
SYSCTL_VS_CONNTRACK = "net.ipv4.vs.conntrack"
SYSCTL_CONN_REUSE = "net.ipv4.vs.conn_reuse_mode"
SYSCTL_EXPIRE_NODEST_CONN = "net.ipv4.vs.expire_nodest_conn"
SYSCTL_EXPIRE_QUIESCENT_TEMPLATE = "net.ipv4.vs.expire_quiescent_template"
SYSCTL_FORWARD = "net.ipv4.ip_forward"
SYSCTL_ARP_IGNORE = "net.ipv4.conf.all.arp_ignore"
SYSCTL_ARP_ANNOUNCE = "net.ipv4.conf.all.arp_announce"
CONN_REUSE_MIN_KERNEL = (4, 1)
CONN_REUSE_FIXED_KERNEL = (5, 9)

# IPVS schedulers (ipvsadm(8)); "mh" gets the source-hash flag (-b mh-port) as upstream sets
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
