"""A pure render of kube-proxy's iptables-restore payload.

``render(services, endpoint_slices, settings)`` returns the exact text upstream
kube-proxy (iptables mode) would pass to ``iptables-restore --noflush --counters`` on the
node ``settings.node_name``: a ``*filter`` and a ``*nat`` table with their chain lines,
the fixed rules, one block per service port and the trailing rules, in upstream's
emission order. Upstream iterates a Go map over service ports; here they are sorted by
ServicePortName, so the output is stable.

Partial syncs: with ``changed`` (a set of ServicePortName, or ``"namespace/name"``
strings) only the per-service chains (KUBE-SVC/SVL/EXT/FW/SEP) of those Services are
written; the filter table and the nat KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING and
KUBE-MARK-MASQ chains are always written in full. With ``existing_chains`` (the nat
chains ``iptables-save -t nat`` lists now), every kube-proxy service chain that is no
longer used gets a chain line and a ``-X`` line, as upstream's stale-chain cleanup does.

The jump rules from the built-in chains are not part of the payload: see ``jumps.py``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Set, Tuple, Union

from kproxy.model import objects as o
from kproxy.proxy.endpoints import categorize_endpoints
from kproxy.proxy.iptables import names as n
from kproxy.proxy.netutil import IPAddress, parse_cidr_sloppy, parse_ip_sloppy
from kproxy.proxy.types import (EndpointInfo, ServicePortInfo, ServicePortName, endpoints_map,
                                service_port_map)


@dataclass(frozen=True)
class NodeSettings:
    """The kube-proxy flags and node facts that shape the rules.

    ``cluster_cidr`` is the ClusterCIDR local-traffic detector (comma-separated for dual
    stack; None = no detector). ``local_bridge`` / ``local_interface_prefix`` select the
    BridgeInterface / InterfaceNamePrefix detectors instead. ``nodeport_addresses`` are
    ``--nodeport-addresses`` CIDRs (None = all local addresses). ``masquerade_mark``
    overrides the mark text (upstream's tests inject ``0x4000``; kube-proxy itself
    writes ``0x00004000`` for bit 14). ``nfacct`` adds the nfacct matches kube-proxy
    writes when it could create its nfacct objects (a restore naming a missing nfacct
    object fails, so it is off by default). ``zone`` is the node's topology zone, for
    topology hints.
    """

    node_name: str
    node_ips: Sequence[str] = ()
    cluster_cidr: Optional[str] = None
    masquerade_bit: int = 14
    masquerade_all: bool = False
    localhost_nodeports: bool = True
    random_fully: bool = True
    nodeport_addresses: Optional[Sequence[str]] = None
    ip_family: str = "IPv4"
    masquerade_mark: Optional[str] = None
    nfacct: bool = False
    conntrack_tcp_be_liberal: bool = False
    zone: Optional[str] = None
    local_bridge: Optional[str] = None
    local_interface_prefix: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_ips", tuple(self.node_ips))
        if self.nodeport_addresses is not None:
            object.__setattr__(self, "nodeport_addresses", tuple(self.nodeport_addresses))
        if self.ip_family not in ("IPv4", "IPv6"):
            raise ValueError(f"ip_family must be IPv4 or IPv6, not {self.ip_family!r}")

    @property
    def ipv6(self) -> bool:
        return self.ip_family == "IPv6"

    @property
    def mark(self) -> str:
        return self.masquerade_mark or n.masquerade_mark(self.masquerade_bit)

    @property
    def primary_node_ip(self) -> Optional[IPAddress]:
        for text in self.node_ips:
            ip = parse_ip_sloppy(text)
            if ip is not None and (ip.version == 6) == self.ipv6:
                return ip
        return None

    def nodeport_cidrs(self) -> Tuple[List, bool]:
        """(CIDRs of this family, match_all) as upstream's NodePortAddresses."""
        cidrs = []
        for text in self.nodeport_addresses or ():
            net = parse_cidr_sloppy(text)
            if net is not None and (net.version == 6) == self.ipv6:
                cidrs.append(net)
        if not cidrs:
            cidrs = [ipaddress.ip_network("::/0" if self.ipv6 else "0.0.0.0/0")]
        for net in cidrs:
            if net.prefixlen == 0:
                return [net], True
        return cidrs, False

    @property
    def effective_localhost_nodeports(self) -> bool:
        """localhostNodePorts as the proxier applies it: IPv4 only, and off when
        --nodeport-addresses leaves out 127.0.0.0/8."""
        if self.ipv6 or not self.localhost_nodeports:
            return False
        cidrs, _ = self.nodeport_cidrs()
        loopback = ipaddress.ip_address("127.0.0.0")
        return any(net.network_address.is_loopback or loopback in net for net in cidrs)

    def _detector_cidr(self) -> Optional[str]:
        for text in (self.cluster_cidr or "").split(","):
            net = parse_cidr_sloppy(text)
            if net is not None and (net.version == 6) == self.ipv6:
                return str(net)
        return None

    @property
    def local_detector(self) -> bool:
        return bool(self._detector_cidr() or self.local_bridge or self.local_interface_prefix)

    def if_local(self) -> List[str]:
        if self.local_bridge:
            return ["-i", self.local_bridge]
        if self.local_interface_prefix:
            return ["-i", self.local_interface_prefix + "+"]
        cidr = self._detector_cidr()
        return ["-s", cidr] if cidr else []

    def if_not_local(self) -> List[str]:
        local = self.if_local()
        return ["!"] + local if local else []


@dataclass
class Payload:
    """The restore payload in its four parts, plus what the caller needs to remember."""

    filter_chains: List[str] = field(default_factory=list)
    filter_rules: List[str] = field(default_factory=list)
    nat_chains: List[str] = field(default_factory=list)
    nat_rules: List[str] = field(default_factory=list)
    active_nat_chains: Set[str] = field(default_factory=set)
    deleted_chains: List[str] = field(default_factory=list)
    large_cluster_mode: bool = False
    full_sync: bool = True

    @property
    def text(self) -> str:
        lines = ["*filter", *self.filter_chains, *self.filter_rules, "COMMIT",
                 "*nat", *self.nat_chains, *self.nat_rules, "COMMIT"]
        return "\n".join(lines) + "\n"


def _comment(text: str) -> List[str]:
    return ["-m", "comment", "--comment", f'"{text}"' if " " in text else text]


def _line(*parts: Union[str, Sequence[str]]) -> str:
    words: List[str] = []
    for part in parts:
        if isinstance(part, str):
            words.append(part)
        else:
            words.extend(part)
    return " ".join(words)


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


ChangedSet = Optional[Iterable[Union[ServicePortName, str]]]


def render(services: Iterable[object], endpoint_slices: Iterable[object], settings: NodeSettings,
           changed: ChangedSet = None, existing_chains: Optional[Iterable[str]] = None) -> str:
    """The iptables-restore payload text; see the module docstring."""
    return render_payload(services, endpoint_slices, settings, changed, existing_chains).text


def render_payload(services: Iterable[object], endpoint_slices: Iterable[object],
                   settings: NodeSettings, changed: ChangedSet = None,
                   existing_chains: Optional[Iterable[str]] = None) -> Payload:
    """Like ``render`` but returns the parts (and the active/deleted chain names).

    ``services`` and ``endpoint_slices`` may hold any model objects: only Services,
    and EndpointSlices / core-v1 Endpoints respectively, are used.
    """
    svc_map = service_port_map((s for s in services if isinstance(s, o.Service)), settings.ip_family)
    ep_map = endpoints_map((e for e in endpoint_slices if isinstance(e, (o.EndpointSlice, o.Endpoints))),
                           settings.node_name, settings.ip_family)
    return _Renderer(settings, changed).run(svc_map, ep_map, existing_chains)


class _Renderer:
    def __init__(self, settings: NodeSettings, changed: ChangedSet):
        self.s = settings
        self.out = Payload(full_sync=changed is None)
        self.changed: Optional[Set[str]] = None
        if changed is not None:
            self.changed = {c.namespaced_name if isinstance(c, ServicePortName) else str(c)
                            for c in changed}
        self.large = False

    # ------------------------------------------------------------------ top level

    def run(self, svc_map, ep_map, existing_chains) -> Payload:
        s, out = self.s, self.out
        mark = s.mark
        for chain in (n.KUBE_SERVICES, n.KUBE_EXTERNAL_SERVICES, n.KUBE_FORWARD, n.KUBE_NODEPORTS,
                      n.KUBE_PROXY_FIREWALL):
            out.filter_chains.append(_chain_line(chain))
        for chain in (n.KUBE_SERVICES, n.KUBE_NODEPORTS, n.KUBE_POSTROUTING, n.KUBE_MARK_MASQ):
            out.nat_chains.append(_chain_line(chain))

        out.nat_rules.append(f"-A {n.KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
        out.nat_rules.append(f"-A {n.KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
        masq = _line("-A", n.KUBE_POSTROUTING, _comment("kubernetes service traffic requiring SNAT"),
                     "-j", "MASQUERADE")
        out.nat_rules.append(masq + (" --random-fully" if s.random_fully else ""))
        out.nat_rules.append(f"-A {n.KUBE_MARK_MASQ} -j MARK --or-mark {mark}")

        if s.effective_localhost_nodeports:
            out.filter_chains.append(_chain_line(n.KUBE_FIREWALL))
            out.filter_rules.append(_line(
                "-A", n.KUBE_FIREWALL, _comment("block incoming localnet connections"),
                "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8", "-m", "conntrack",
                "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"))

        total = sum(len(ep_map.get(spn, ())) for spn in svc_map)
        self.large = out.large_cluster_mode = total > n.LARGE_CLUSTER_ENDPOINTS_THRESHOLD

        for spn in sorted(svc_map):
            self.service(spn, svc_map[spn], ep_map.get(spn, []))

        if existing_chains is not None:
            for chain in sorted(set(existing_chains) - out.active_nat_chains):
                if n.is_service_chain(chain):
                    out.nat_chains.append(_chain_line(chain))
                    out.nat_rules.append(f"-X {chain}")
                    out.deleted_chains.append(chain)

        self.nodeports_jump()

        if not s.conntrack_tcp_be_liberal:
            rule = ["-A", n.KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID"]
            if s.nfacct:
                rule += ["-m", "nfacct", "--nfacct-name", n.NFACCT_CT_STATE_INVALID_DROPPED]
            out.filter_rules.append(_line(rule, "-j", "DROP"))
        out.filter_rules.append(_line("-A", n.KUBE_FORWARD, _comment("kubernetes forwarding rules"),
                                      "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT"))
        out.filter_rules.append(_line("-A", n.KUBE_FORWARD, _comment("kubernetes forwarding conntrack rule"),
                                      "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"))
        return out

    def nodeports_jump(self) -> None:
        s, rules = self.s, self.out.nat_rules
        comment = _comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        cidrs, match_all = s.nodeport_cidrs()
        if match_all:
            dest = ["-m", "addrtype", "--dst-type", "LOCAL"]
            if s.ipv6:
                dest += ["!", "-d", "::1/128"]
            elif not s.effective_localhost_nodeports:
                dest += ["!", "-d", "127.0.0.0/8"]
            rules.append(_line("-A", n.KUBE_SERVICES, comment, dest, "-j", n.KUBE_NODEPORTS))
            return
        addresses = {}
        loopback = "::1" if s.ipv6 else "127.0.0.1"
        for text in (*s.node_ips, loopback):
            ip = parse_ip_sloppy(text)
            if ip is None or (ip.version == 6) != s.ipv6:
                continue
            if any(ip in net for net in cidrs):
                addresses[str(ip)] = ip
        for ip in sorted(addresses.values()):
            if ip.is_loopback and (s.ipv6 or not s.effective_localhost_nodeports):
                continue
            rules.append(_line("-A", n.KUBE_SERVICES, comment, "-d", str(ip), "-j", n.KUBE_NODEPORTS))

    # ------------------------------------------------------------------ one service port

    def service(self, spn: ServicePortName, svc: ServicePortInfo, endpoints: List[EndpointInfo]) -> None:
        s, out = self.s, self.out
        name = str(spn)
        proto = svc.protocol.lower()
        p_match = ["-m", proto, "-p", proto]
        cluster_chain = n.svc_chain(name, proto)
        local_chain = n.svl_chain(name, proto)
        ext_chain = n.ext_chain(name, proto)
        fw_chain = n.fw_chain(name, proto)

        cat = categorize_endpoints(endpoints, svc, s.node_name, s.zone)
        has_endpoints = cat.has_any
        uses_cluster_chain = bool(cat.cluster) and svc.uses_cluster_endpoints
        uses_local_chain = bool(cat.local) and svc.uses_local_endpoints

        internal_chain, has_internal = cluster_chain, has_endpoints
        if svc.internal_policy_local:
            internal_chain = local_chain
            has_internal = has_internal and bool(cat.local)
        external_policy_chain, has_external = cluster_chain, has_endpoints
        if svc.external_policy_local:
            external_policy_chain = local_chain
            has_external = has_external and bool(cat.local)
        uses_ext_chain = has_endpoints and svc.externally_accessible
        uses_fw_chain = has_endpoints and bool(svc.load_balancer_vips) and bool(svc.load_balancer_source_ranges)
        lb_chain = fw_chain if uses_fw_chain else ext_chain

        if not has_endpoints:
            internal_target = external_target = "REJECT"
            internal_comment = external_comment = f"{name} has no endpoints"
        else:
            internal_target = external_target = ""
            internal_comment = external_comment = ""
            if not has_internal:
                internal_target, internal_comment = "DROP", f"{name} has no local endpoints"
            if not has_external:
                external_target, external_comment = "DROP", f"{name} has no local endpoints"

        vip_port = ["-d", svc.cluster_ip, "--dport", str(svc.port)]
        # Capture the ClusterIP.
        if has_internal:
            out.nat_rules.append(_line("-A", n.KUBE_SERVICES, _comment(f"{name} cluster IP"), p_match,
                                       vip_port, "-j", internal_chain))
        else:
            out.filter_rules.append(_line("-A", n.KUBE_SERVICES, _comment(internal_comment), p_match,
                                          vip_port, "-j", internal_target))
        # Capture external IPs.
        for ip in svc.external_ips:
            dest = ["-d", ip, "--dport", str(svc.port)]
            if has_endpoints:
                out.nat_rules.append(_line("-A", n.KUBE_SERVICES, _comment(f"{name} external IP"),
                                           p_match, dest, "-j", ext_chain))
            if not has_external:
                out.filter_rules.append(_line("-A", n.KUBE_EXTERNAL_SERVICES, _comment(external_comment),
                                              p_match, dest, "-j", external_target))
        # Capture load-balancer VIPs.
        for ip in svc.load_balancer_vips:
            dest = ["-d", ip, "--dport", str(svc.port)]
            if has_endpoints:
                out.nat_rules.append(_line("-A", n.KUBE_SERVICES, _comment(f"{name} loadbalancer IP"),
                                           p_match, dest, "-j", lb_chain))
            if uses_fw_chain:
                out.filter_rules.append(_line("-A", n.KUBE_PROXY_FIREWALL,
                                              _comment(f"{name} traffic not accepted by {fw_chain}"),
                                              p_match, dest, "-j", "DROP"))
        if not has_external:
            for ip in svc.load_balancer_vips:
                out.filter_rules.append(_line("-A", n.KUBE_EXTERNAL_SERVICES, _comment(external_comment),
                                              p_match, "-d", ip, "--dport", str(svc.port),
                                              "-j", external_target))
        # Capture the NodePort.
        if svc.node_port:
            np = str(svc.node_port)
            if has_endpoints:
                if s.effective_localhost_nodeports and s.nfacct:
                    out.nat_rules.append(_line("-A", n.KUBE_NODEPORTS, _comment(name), p_match,
                                               "-d", "127.0.0.0/8", "--dport", np, "-m", "nfacct",
                                               "--nfacct-name", n.NFACCT_LOCALHOST_NODEPORT_ACCEPTED,
                                               "-j", ext_chain))
                out.nat_rules.append(_line("-A", n.KUBE_NODEPORTS, _comment(name), p_match,
                                           "--dport", np, "-j", ext_chain))
            if not has_external:
                out.filter_rules.append(_line("-A", n.KUBE_EXTERNAL_SERVICES, _comment(external_comment),
                                              "-m", "addrtype", "--dst-type", "LOCAL", p_match,
                                              "--dport", np, "-j", external_target))
        # Accept the health-check NodePort.
        if svc.health_check_node_port:
            out.filter_rules.append(_line("-A", n.KUBE_NODEPORTS, _comment(f"{name} health check node port"),
                                          "-m", "tcp", "-p", "tcp", "--dport", str(svc.health_check_node_port),
                                          "-j", "ACCEPT"))

        # Per-service chains: written only in full syncs or when the Service changed.
        if self.changed is None or spn.namespaced_name in self.changed:
            chains, rules = out.nat_chains, out.nat_rules
        else:
            chains, rules = [], []

        def activate(chain: str) -> None:
            chains.append(_chain_line(chain))
            out.active_nat_chains.add(chain)

        if has_internal:
            args = [_comment(f"{name} cluster IP"), p_match, vip_port]
            if s.masquerade_all:
                rules.append(_line("-A", internal_chain, *args, "-j", n.KUBE_MARK_MASQ))
            elif s.local_detector:
                rules.append(_line("-A", internal_chain, *args, s.if_not_local(), "-j", n.KUBE_MARK_MASQ))

        if uses_ext_chain:
            activate(ext_chain)
            if not svc.external_policy_local:
                rules.append(_line("-A", ext_chain, _comment(f"masquerade traffic for {name} external destinations"),
                                   "-j", n.KUBE_MARK_MASQ))
            else:
                if s.local_detector:
                    rules.append(_line("-A", ext_chain, _comment(f"pod traffic for {name} external destinations"),
                                       s.if_local(), "-j", cluster_chain))
                rules.append(_line("-A", ext_chain,
                                   _comment(f"masquerade LOCAL traffic for {name} external destinations"),
                                   "-m", "addrtype", "--src-type", "LOCAL", "-j", n.KUBE_MARK_MASQ))
                rules.append(_line("-A", ext_chain,
                                   _comment(f"route LOCAL traffic for {name} external destinations"),
                                   "-m", "addrtype", "--src-type", "LOCAL", "-j", cluster_chain))
            if has_external:
                rules.append(_line("-A", ext_chain, "-j", external_policy_chain))

        if uses_fw_chain:
            activate(fw_chain)
            head = ["-A", fw_chain, *_comment(f"{name} loadbalancer IP")]
            node_ip = s.primary_node_ip
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                rules.append(_line(head, "-s", cidr, "-j", ext_chain))
                if node_ip is not None and node_ip in ipaddress.ip_network(cidr):
                    allow_from_node = True
            if allow_from_node:
                for ip in svc.load_balancer_vips:
                    rules.append(_line(head, "-s", ip, "-j", ext_chain))
            rules.append(_line("-A", fw_chain,
                               _comment(f"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL")))

        if uses_cluster_chain:
            activate(cluster_chain)
            self.dispatch(rules, name, proto, svc, cluster_chain, cat.cluster)
        if uses_local_chain:
            activate(local_chain)
            self.dispatch(rules, name, proto, svc, local_chain, cat.local)

        for ep in cat.all_reachable:
            sep = n.sep_chain(name, proto, str(ep))
            activate(sep)
            head = ["-A", sep] + ([] if self.large else _comment(name))
            rules.append(_line(head, "-s", ep.ip, "-j", n.KUBE_MARK_MASQ))
            affinity = ["-m", "recent", "--name", sep, "--set"] if svc.client_ip_affinity else []
            rules.append(_line(head, affinity, p_match, "-j", "DNAT", "--to-destination", str(ep)))

    def dispatch(self, rules: List[str], name: str, proto: str, svc: ServicePortInfo, chain: str,
                 endpoints: List[EndpointInfo]) -> None:
        """The KUBE-SVC/KUBE-SVL rules: affinity checks first, then the random cascade."""
        def head(ep: EndpointInfo) -> List[str]:
            return ["-A", chain] + ([] if self.large else _comment(f"{name} -> {ep}"))

        if svc.client_ip_affinity:
            for ep in endpoints:
                sep = n.sep_chain(name, proto, str(ep))
                rules.append(_line(head(ep), "-m", "recent", "--name", sep, "--rcheck", "--seconds",
                                   str(svc.sticky_max_age_seconds), "--reap", "-j", sep))
        count = len(endpoints)
        for i, ep in enumerate(endpoints):
            sep = n.sep_chain(name, proto, str(ep))
            stat = []
            if i < count - 1:
                stat = ["-m", "statistic", "--mode", "random", "--probability", n.probability(count - i)]
            rules.append(_line(head(ep), stat, "-j", sep))
