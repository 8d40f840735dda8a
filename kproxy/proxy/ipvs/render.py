"""A pure render of what kube-proxy's IPVS mode programs on one node.

``plan(services, endpoint_slices, settings)`` builds an :class:`IpvsPlan`, the state
upstream's IPVS proxier (pkg/proxy/ipvs/proxier.go, ``syncProxyRules``) converges a node
to:

* the ``kube-ipvs0`` dummy device with one /32 (/128) per ClusterIP, and per external IP
  and load-balancer IP that is not already a node address;
* one IPVS virtual server per ClusterIP:port, externalIP:port, LB-IP:port and
  node-IP:NodePort, NAT ("Masq") forwarding, the chosen scheduler (``rr`` by default),
  ``persistent <timeout>`` for ClientIP session affinity; real servers of weight 1;
* the 17 ipsets upstream creates on every sync and their entries;
* the iptables-restore payload (nat then filter, upstream's order) and the jump rules
  from the built-in chains;
* the sysctls the proxier sets.

Endpoints are chosen as in the iptables proxier (``kproxy.proxy.endpoints``): the
ClusterIP's virtual server gets the Cluster list (the Local list with
internalTrafficPolicy Local); external IPs, LB IPs and NodePorts get the Local list with
externalTrafficPolicy Local. Where upstream differs from iptables mode it is followed:
with a Local policy and no local endpoint, IPVS mode falls back to the cluster-wide list
(kubernetes#97081); a Service without endpoints keeps its virtual servers with no real
server (the kernel then answers ICMP port unreachable); no chain per Service exists.

Service ports are visited in ServicePortName order (upstream walks a Go map), real
servers in endpoint order (sorted ``IP:port``) and set entries sorted, so the output is
stable.

``render(...)`` returns the plan as one readable text with a section per tool (see
``IpvsPlan.text``); ``split_sections`` gives the sections back.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from kproxy.model import objects as o
from kproxy.proxy.endpoints import Categorized, categorize_endpoints
from kproxy.proxy.iptables.jumps import JumpRule
from kproxy.proxy.iptables.render import NodeSettings
from kproxy.proxy.ipvs import names as n
from kproxy.proxy.netutil import join_host_port, parse_ip_sloppy
from kproxy.proxy.types import EndpointInfo, ServicePortInfo, endpoints_map, service_port_map

SECTION_DUMMY = "kube-ipvs0 (ip -batch)"
SECTION_IPSET = "ipset restore"
SECTION_IPVSADM = "ipvsadm restore"
SECTION_IPTABLES = "iptables-restore"
SECTIONS = (SECTION_DUMMY, SECTION_IPSET, SECTION_IPVSADM, SECTION_IPTABLES)

_SERVICE_FLAG = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


@dataclass(frozen=True)
class RealServer:
    """One IPVS destination: an endpoint, NAT ("Masq") forwarding."""

    address: str
    port: int
    weight: int = 1
    is_local: bool = False
    node_name: str = ""

    def __str__(self) -> str:
        return join_host_port(self.address, self.port)


@dataclass
class VirtualServer:
    """One IPVS virtual service (address, port, protocol) and its real servers.

    ``kind`` says which of the Service's addresses it is: ``"cluster IP"``,
    ``"external IP"``, ``"loadbalancer IP"`` or ``"node port"``. ``bind`` is whether the
    address goes on kube-ipvs0. ``policy`` is the traffic policy its endpoints follow
    (``"Cluster"`` or ``"Local"``) and ``note`` explains a fallback."""

    address: str
    port: int
    protocol: str
    scheduler: str
    service: str
    kind: str
    persistent_timeout: Optional[int] = None
    sched_flags: Tuple[str, ...] = ()
    bind: bool = False
    policy: str = "Cluster"
    real_servers: List[RealServer] = field(default_factory=list)
    note: str = ""

    @property
    def endpoint(self) -> str:
        return join_host_port(self.address, self.port)

    @property
    def key(self) -> str:
        """As ``ipvsadm -Ln`` names it: ``TCP  10.96.0.2:8080`` (one space here)."""
        return f"{self.protocol} {self.endpoint}"

    @property
    def service_flag(self) -> str:
        return _SERVICE_FLAG[self.protocol]

    def add_line(self) -> str:
        """``-A -t VIP:PORT -s rr [-p T] [-b flags]``, as ``ipvsadm -Sn`` prints it."""
        line = f"-A {self.service_flag} {self.endpoint} -s {self.scheduler}"
        if self.persistent_timeout is not None:
            line += f" -p {self.persistent_timeout}"
        if self.sched_flags:
            line += " -b " + ",".join(self.sched_flags)
        return line

    def real_server_lines(self) -> List[str]:
        return [f"-a {self.service_flag} {self.endpoint} -r {rs} -m -w {rs.weight}" for rs in self.real_servers]


@dataclass
class IPSet:
    """One ipset as upstream creates it (``ipset create`` arguments) and its entries."""

    name: str
    set_type: str
    comment: str
    family: str = "inet"
    entries: List[str] = field(default_factory=list)

    def add(self, entry: str) -> None:
        if entry not in self.entries:
            self.entries.append(entry)

    def sort(self) -> None:
        if self.set_type == n.BITMAP_PORT:
            self.entries.sort(key=int)
        else:
            self.entries.sort()

    def create_line(self) -> str:
        if self.set_type == n.BITMAP_PORT:
            return f"create {self.name} {self.set_type} range {n.DEFAULT_PORT_RANGE}"
        return (f"create {self.name} {self.set_type} family {self.family} "
                f"hashsize {n.HASH_SIZE} maxelem {n.MAX_ELEM}")

    def add_lines(self) -> List[str]:
        return [f"add {self.name} {e}" for e in self.entries]


@dataclass
class IptablesPart:
    """The iptables-restore payload IPVS mode writes (nat first, then filter)."""

    nat_chains: List[str] = field(default_factory=list)
    nat_rules: List[str] = field(default_factory=list)
    filter_chains: List[str] = field(default_factory=list)
    filter_rules: List[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        lines = ["*nat", *self.nat_chains, *self.nat_rules, "COMMIT",
                 "*filter", *self.filter_chains, *self.filter_rules, "COMMIT"]
        return "\n".join(lines) + "\n"

    def rules(self, table: str) -> List[str]:
        return self.nat_rules if table == "nat" else self.filter_rules


@dataclass
class IpvsPlan:
    """Everything kube-proxy's IPVS mode sets up on one node (see the module docstring)."""

    node_name: str
    ip_family: str
    scheduler: str
    node_addresses: List[str]
    nodeport_addresses: List[str]
    cluster_cidr: Optional[str]
    masquerade_all: bool
    mark: str
    virtual_servers: List[VirtualServer] = field(default_factory=list)
    ipsets: Dict[str, IPSet] = field(default_factory=dict)
    iptables: IptablesPart = field(default_factory=IptablesPart)
    dummy_device: str = n.DUMMY_DEVICE
    dummy_addresses: List[str] = field(default_factory=list)
    sysctls: Dict[str, str] = field(default_factory=dict)
    jump_rules: Tuple[JumpRule, ...] = n.JUMP_RULES
    warnings: List[str] = field(default_factory=list)

    @property
    def ipv6(self) -> bool:
        return self.ip_family == "IPv6"

    def ipset(self, name: str) -> IPSet:
        """A set by upstream's (IPv4) name, e.g. ``"KUBE-CLUSTER-IP"``."""
        return self.ipsets[name]

    def virtual_server(self, address: str, port: int, protocol: str) -> Optional[VirtualServer]:
        ip = parse_ip_sloppy(address)
        want = str(ip) if ip is not None else address
        for vs in self.virtual_servers:
            if vs.address == want and vs.port == int(port) and vs.protocol == protocol.upper():
                return vs
        return None

    def bound_addresses(self) -> List[str]:
        """The addresses on kube-ipvs0, without their prefix length."""
        return [a.split("/")[0] for a in self.dummy_addresses]

    # ------------------------------------------------------------------ tool inputs

    def ipset_restore(self, flush: bool = False) -> str:
        """``ipset restore`` input: every set's ``create`` line, then the ``add`` lines.
        With ``flush``, each set is flushed between the two, so a restore into a node
        that has older entries leaves exactly these (use with ``ipset restore -exist``)."""
        lines = [s.create_line() for s in self.ipsets.values()]
        if flush:
            lines += [f"flush {s.name}" for s in self.ipsets.values()]
        for s in self.ipsets.values():
            lines += s.add_lines()
        return "\n".join(lines) + "\n"

    def ipvsadm_restore(self) -> str:
        """``ipvsadm -R`` input: each virtual server, then its real servers."""
        lines: List[str] = []
        for vs in self.virtual_servers:
            lines.append(vs.add_line())
            lines.extend(vs.real_server_lines())
        return "\n".join(lines) + ("\n" if lines else "")

    def iptables_restore(self) -> str:
        return self.iptables.text

    def ip_batch(self) -> str:
        """``ip -batch`` input that makes kube-ipvs0 and binds the addresses."""
        lines = [f"link add {self.dummy_device} type dummy"]
        lines += [f"addr add {a} dev {self.dummy_device}" for a in self.dummy_addresses]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        """The readable combined text: a preamble of ``#`` comments (the node, the
        sysctls, warnings), then one section per tool, each starting with its header
        line (``# kube-ipvs0 (ip -batch)``, ``# ipset restore``, ``# ipvsadm restore``,
        ``# iptables-restore``) and each a valid input for that tool."""
        head = [f"# kube-proxy IPVS mode on node {self.node_name} ({self.ip_family}): "
                f"{len(self.virtual_servers)} virtual servers, scheduler {self.scheduler}",
                "# sysctls, written in the node's network namespace:"]
        head += [f"#   {k} = {v}" for k, v in self.sysctls.items()]
        head += [f"# warning: {w}" for w in self.warnings]
        out = "\n".join(head) + "\n"
        bodies = {SECTION_DUMMY: self.ip_batch(), SECTION_IPSET: self.ipset_restore(),
                  SECTION_IPVSADM: self.ipvsadm_restore(), SECTION_IPTABLES: self.iptables_restore()}
        for name in SECTIONS:
            out += f"# {name}\n" + bodies[name]
        return out


def split_sections(text: str) -> Dict[str, str]:
    """The sections of ``IpvsPlan.text()`` (or ``render``) by name, without their
    header lines: ``{"ipset restore": "create ...", "ipvsadm restore": ..., ...}``."""
    out: Dict[str, List[str]] = {}
    current: Optional[str] = None
    headers = {f"# {name}": name for name in SECTIONS}
    for line in text.splitlines():
        if line in headers:
            current = headers[line]
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) + ("\n" if v else "") for k, v in out.items()}


# --------------------------------------------------------------------------- building


def kernel_version(release: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(major, minor) of a kernel release string (default: this machine's)."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def sysctls_for(kernel: Optional[str] = None, strict_arp: bool = True) -> Dict[str, str]:
    """The sysctls upstream's NewProxier sets. ``conn_reuse_mode=0`` only on kernels
    from 4.1 (where it exists) to before 5.9 (where its 1 s SYN-drop bug was fixed);
    ``arp_ignore``/``arp_announce`` only with strict ARP (``--ipvs-strict-arp``, which
    MetalLB in L2 mode needs; on by default here)."""
    out = {n.SYSCTL_VS_CONNTRACK: "1"}
    version = kernel_version(kernel)
    if version is not None and n.CONN_REUSE_MIN_KERNEL <= version < n.CONN_REUSE_FIXED_KERNEL:
        out[n.SYSCTL_CONN_REUSE] = "0"
    out[n.SYSCTL_EXPIRE_NODEST_CONN] = "1"
    out[n.SYSCTL_EXPIRE_QUIESCENT_TEMPLATE] = "1"
    out[n.SYSCTL_FORWARD] = "1"
    if strict_arp:
        out[n.SYSCTL_ARP_IGNORE] = "1"
        out[n.SYSCTL_ARP_ANNOUNCE] = "2"
    return out


def _node_addresses(settings: NodeSettings) -> List[str]:
    """The node's own addresses of this family, loopback and IPv6 link-local left out
    (upstream's GetAllLocalAddressesExcept(kube-ipvs0) with isValidForSet)."""
    out: List[str] = []
    for text in settings.node_ips:
        ip = parse_ip_sloppy(text)
        if ip is None or (ip.version == 6) != settings.ipv6 or ip.is_loopback:
            continue
        if ip.version == 6 and ip.is_link_local:
            continue
        if str(ip) not in out:
            out.append(str(ip))
    return out


def _nodeport_addresses(settings: NodeSettings, node_addresses: List[str]) -> List[str]:
    """Where NodePort virtual servers go: every node address, or those inside
    --nodeport-addresses (never loopback)."""
    cidrs, match_all = settings.nodeport_cidrs()
    if match_all:
        return list(node_addresses)
    return [a for a in node_addresses if any(ipaddress.ip_address(a) in net for net in cidrs)]


def _choose(cat: Categorized, local_policy: bool) -> Tuple[List[EndpointInfo], str, str]:
    """upstream syncEndpoint: the Local list when the policy is Local and it is not
    empty, otherwise the Cluster list (even for a Local policy: kubernetes#97081)."""
    if not local_policy:
        return cat.cluster, "Cluster", ""
    if cat.local:
        return cat.local, "Local", ""
    if cat.cluster:
        return cat.cluster, "Local", ("no local endpoint: IPVS mode falls back to the cluster-wide "
                                      "endpoints (kubernetes#97081), unmasqueraded")
    return [], "Local", ""


def _quote(comment: str) -> str:
    return f'"{comment}"'


def plan(services: Iterable[object], endpoint_slices: Iterable[object], settings: NodeSettings,
         scheduler: str = n.DEFAULT_SCHEDULER, *, strict_arp: bool = True,
         kernel: Optional[str] = None) -> IpvsPlan:
    """The IPVS-mode state of node ``settings.node_name``.

    ``services`` and ``endpoint_slices`` may hold any model objects (only Services, and
    EndpointSlices / core-v1 Endpoints, are used). ``settings`` is the same NodeSettings
    the iptables backend takes: ``node_ips`` are the node's addresses (NodePort virtual
    servers are made on each, filtered by ``nodeport_addresses``), ``cluster_cidr`` the
    local-traffic detector, ``masquerade_all``/``masquerade_bit`` as upstream.
    ``scheduler`` is any IPVS scheduler (``rr``, ``wrr``, ``lc``, ``sh``, ``mh``...).
    ``kernel`` is the kernel release the sysctls are chosen for (default: this one).
    """
    if scheduler not in n.SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {scheduler!r}; one of {', '.join(n.SCHEDULERS)}")
    family = settings.ip_family
    ipv6 = settings.ipv6
    svc_map = service_port_map((s for s in services if isinstance(s, o.Service)), family)
    ep_map = endpoints_map((e for e in endpoint_slices if isinstance(e, (o.EndpointSlice, o.Endpoints))),
                           settings.node_name, family)
    node_addresses = _node_addresses(settings)
    out = IpvsPlan(node_name=settings.node_name, ip_family=family, scheduler=scheduler,
                   node_addresses=node_addresses,
                   nodeport_addresses=_nodeport_addresses(settings, node_addresses),
                   cluster_cidr=settings.cluster_cidr, masquerade_all=settings.masquerade_all,
                   mark=settings.mark, sysctls=sysctls_for(kernel, strict_arp))
    for info in n.SETS:
        out.ipsets[info.name] = IPSet(n.set_name(info.name, ipv6), info.set_type, info.comment,
                                      "inet6" if ipv6 else "inet")
    builder = _Builder(out, settings)
    for spn in sorted(svc_map):
        builder.service(str(spn), svc_map[spn], ep_map.get(spn, []))
    host_bits = 128 if ipv6 else 32
    for ip in builder.bound:
        out.ipset(n.IPVS_IPS).add(ip)
    out.dummy_addresses = [f"{ip}/{host_bits}" for ip in builder.bound]
    for s in out.ipsets.values():
        s.sort()
    _write_iptables(out, settings, builder.no_node_access)
    return out


def render(services: Iterable[object], endpoint_slices: Iterable[object], settings: NodeSettings,
           scheduler: str = n.DEFAULT_SCHEDULER, **kwargs) -> str:
    """``plan(...).text()``: what ``kproxy render --backend ipvs`` shows."""
    return plan(services, endpoint_slices, settings, scheduler, **kwargs).text()


class _Builder:
    def __init__(self, out: IpvsPlan, settings: NodeSettings):
        self.out = out
        self.s = settings
        self.bound: List[str] = []
        self.node_set = set(out.node_addresses)
        self.no_node_access: List[Tuple[str, str, int]] = []

    def _vs(self, address: str, port: int, svc: ServicePortInfo, name: str, kind: str, bind: bool,
            cat: Categorized, local_policy: bool) -> None:
        endpoints, policy, note = _choose(cat, local_policy)
        flags: Tuple[str, ...] = ("mh-port",) if self.out.scheduler == "mh" else ()
        vs = VirtualServer(address=address, port=port, protocol=svc.protocol.upper(),
                           scheduler=self.out.scheduler, service=name, kind=kind,
                           persistent_timeout=svc.sticky_max_age_seconds if svc.client_ip_affinity else None,
                           sched_flags=flags, bind=bind, policy=policy, note=note,
                           real_servers=[RealServer(ep.ip, ep.port, 1, ep.is_local, ep.node_name)
                                         for ep in endpoints])
        self.out.virtual_servers.append(vs)
        if bind and address not in self.bound:
            self.bound.append(address)

    def service(self, name: str, svc: ServicePortInfo, endpoints: List[EndpointInfo]) -> None:
        sets = self.out.ipsets
        proto = svc.protocol.lower()
        cat = categorize_endpoints(endpoints, svc, self.s.node_name, self.s.zone)
        for ep in endpoints:                      # hairpin: every local endpoint, ready or not
            if ep.is_local:
                sets[n.LOOP_BACK].add(f"{ep.ip},{proto}:{ep.port},{ep.ip}")

        sets[n.CLUSTER_IP].add(f"{svc.cluster_ip},{proto}:{svc.port}")
        self._vs(svc.cluster_ip, svc.port, svc, name, "cluster IP", True, cat, svc.internal_policy_local)

        for ip in svc.external_ips:
            entry = f"{ip},{proto}:{svc.port}"
            sets[n.EXTERNAL_IP_LOCAL if svc.external_policy_local else n.EXTERNAL_IP].add(entry)
            self._vs(ip, svc.port, svc, name, "external IP", ip not in self.node_set, cat,
                     svc.external_policy_local)

        for ip in svc.load_balancer_vips:
            entry = f"{ip},{proto}:{svc.port}"
            sets[n.LOAD_BALANCER].add(entry)
            if svc.external_policy_local:
                sets[n.LOAD_BALANCER_LOCAL].add(entry)
            if svc.load_balancer_source_ranges:
                sets[n.LOAD_BALANCER_FW].add(entry)
                node_ip = self.s.primary_node_ip
                allow_from_node = False
                for cidr in svc.load_balancer_source_ranges:
                    net = ipaddress.ip_network(cidr)
                    if net.prefixlen == 0:
                        self.out.warnings.append(
                            f"{name}: loadBalancerSourceRange {cidr} cannot be stored in a "
                            f"hash:ip,port,net set (zero prefix); upstream's add fails too")
                    else:
                        sets[n.LOAD_BALANCER_SOURCE_CIDR].add(f"{entry},{cidr}")
                    if node_ip is not None and node_ip in net:
                        allow_from_node = True
                if allow_from_node:
                    sets[n.LOAD_BALANCER_SOURCE_IP].add(f"{entry},{ip}")
                else:
                    self.no_node_access.append((ip, proto, svc.port))
            self._vs(ip, svc.port, svc, name, "loadbalancer IP", ip not in self.node_set, cat,
                     svc.external_policy_local)

        if svc.node_port and self.out.nodeport_addresses:
            main, local = n.NODE_PORT_SETS[proto]
            if proto == "sctp":
                entries = [f"{ip},{proto}:{svc.node_port}" for ip in self.out.nodeport_addresses]
            else:
                entries = [str(svc.node_port)]
            for e in entries:
                sets[main].add(e)
                if svc.external_policy_local:
                    sets[local].add(e)
            for ip in self.out.nodeport_addresses:
                self._vs(ip, svc.node_port, svc, name, "node port", False, cat, svc.external_policy_local)

        if svc.health_check_node_port:
            sets[n.HEALTH_CHECK_NODE_PORT].add(str(svc.health_check_node_port))


def _write_iptables(out: IpvsPlan, s: NodeSettings, no_node_access: Sequence[Tuple[str, str, int]]) -> None:
    """upstream's createAndLinkKubeChain + writeIptablesRules, in their order."""
    ipt = out.iptables
    sets = out.ipsets
    mark = out.mark
    ipt.nat_chains = [f":{c} - [0:0]" for c in n.NAT_CHAINS]
    ipt.filter_chains = [f":{c} - [0:0]" for c in n.FILTER_CHAINS]
    nat, filt = ipt.nat_rules, ipt.filter_rules

    nat.append(f"-A {n.KUBE_SERVICES} -s {'::1/128' if out.ipv6 else '127.0.0.0/8'} -j RETURN")
    for row in n.SET_CHAINS:
        st = sets[row.set_name]
        if not st.entries:
            continue
        args = ["-A", row.chain] + (["-p", row.protocol] if row.protocol else [])
        args += ["-m", "comment", "--comment", _quote(st.comment), "-m", "set", "--match-set", st.name,
                 row.match, "-j", row.target]
        (filt if row.table == "filter" else nat).append(" ".join(args))

    cluster = sets[n.CLUSTER_IP]
    if cluster.entries:
        args = ["-A", n.KUBE_SERVICES, "-m", "comment", "--comment", _quote(cluster.comment),
                "-m", "set", "--match-set", cluster.name]
        if s.masquerade_all:
            args += ["dst,dst", "-j", n.KUBE_MARK_MASQ]
        elif s.local_detector:
            args += ["dst,dst", *s.if_not_local(), "-j", n.KUBE_MARK_MASQ]
        else:
            args += ["src,dst", "-j", n.KUBE_MARK_MASQ]
        nat.append(" ".join(args))

    def external_ip_rules(args: List[str]) -> None:
        nat.append(" ".join(args + ["-m", "physdev", "!", "--physdev-is-in", "-m", "addrtype", "!",
                                    "--src-type", "LOCAL", "-j", "ACCEPT"]))
        nat.append(" ".join(args + ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"]))

    for set_name, masquerade in ((n.EXTERNAL_IP, True), (n.EXTERNAL_IP_LOCAL, False)):
        st = sets[set_name]
        if st.entries:
            args = ["-A", n.KUBE_SERVICES, "-m", "comment", "--comment", _quote(st.comment),
                    "-m", "set", "--match-set", st.name, "dst,dst"]
            if masquerade:
                nat.append(" ".join(args + ["-j", n.KUBE_MARK_MASQ]))
            external_ip_rules(args)

    nat.append(f"-A {n.KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {n.KUBE_NODE_PORT}")
    nat.append(f"-A {n.KUBE_LOAD_BALANCER} -j {n.KUBE_MARK_MASQ}")
    filt.append(f"-A {n.KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    for ip, proto, port in no_node_access:
        filt.append(f"-A {n.KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {proto} "
                    f"--vport {port} -j DROP")
    for set_name in (n.CLUSTER_IP, n.LOAD_BALANCER):       # acceptIPVSTraffic
        st = sets[set_name]
        if st.entries:
            nat.append(f"-A {n.KUBE_SERVICES} -m set --match-set {st.name} dst,dst -j ACCEPT")

    filt.append(f'-A {n.KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
                f"-m mark --mark {mark}/{mark} -j ACCEPT")
    filt.append(f'-A {n.KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
                f"-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    health = sets[n.HEALTH_CHECK_NODE_PORT]
    filt.append(f"-A {n.KUBE_NODE_PORT} -m comment --comment {_quote(health.comment)} "
                f"-m set --match-set {health.name} dst -j ACCEPT")
    for set_name, match in ((n.LOAD_BALANCER, "dst,dst"), (n.CLUSTER_IP, "dst,dst"), (n.EXTERNAL_IP, "dst,dst"),
                            (n.EXTERNAL_IP_LOCAL, "dst,dst"), (n.HEALTH_CHECK_NODE_PORT, "dst")):
        filt.append(f"-A {n.KUBE_IPVS_FILTER} -m set --match-set {sets[set_name].name} {match} -j RETURN")
    filt.append(f"-A {n.KUBE_IPVS_FILTER} -m conntrack --ctstate NEW "
                f"-m set --match-set {sets[n.IPVS_IPS].name} dst -j REJECT")

    nat.append(f"-A {n.KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
    nat.append(f"-A {n.KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
    masq = f'-A {n.KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    nat.append(masq + (" --random-fully" if s.random_fully else ""))
    nat.append(f"-A {n.KUBE_MARK_MASQ} -j MARK --or-mark {mark}")
