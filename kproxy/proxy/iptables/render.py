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

Each Service is rendered on its own into a few multi-line chunks (its filter rules, its
nat capture rules, its own chains and their rules) and the payload is those chunks
joined. ``IncrementalRenderer`` keeps the chunks between calls, keyed by a fingerprint
of the Service and its endpoints, so a sync where one Service changed re-renders that
Service only; its output is byte for byte ``render_payload``'s.

The jump rules from the built-in chains are not part of the payload: see ``jumps.py``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from kproxy.model import objects as o
from kproxy.proxy.endpoints import categorize_endpoints
from kproxy.proxy.iptables import names as n
from kproxy.proxy.netutil import IPAddress, parse_cidr_sloppy, parse_ip_sloppy
from kproxy.proxy.netutil import clear_caches as clear_netutil_caches
from kproxy.proxy.types import (EndpointInfo, ServicePortInfo, ServicePortName, endpoints_by_port,
                                service_group_fingerprint, service_port_map, slice_service_key)


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


class Payload:
    """The restore payload in its four parts, plus what the caller needs to remember.

    ``filter_chains``, ``filter_rules``, ``nat_chains`` and ``nat_rules`` are lists of
    lines. The renderer builds each part from multi-line chunks (one per Service) and
    splits them into lines only when a part is asked for; ``text`` joins the chunks
    directly (or the line lists, once they were asked for, so a change made to them
    shows in ``text`` as it used to).
    """

    _PARTS = ("filter_chains", "filter_rules", "nat_chains", "nat_rules")

    def __init__(self, filter_chains: Optional[List[str]] = None, filter_rules: Optional[List[str]] = None,
                 nat_chains: Optional[List[str]] = None, nat_rules: Optional[List[str]] = None,
                 active_nat_chains: Optional[Set[str]] = None, deleted_chains: Optional[List[str]] = None,
                 large_cluster_mode: bool = False, full_sync: bool = True):
        self._chunks: List[List[str]] = [list(part or ()) for part in
                                         (filter_chains, filter_rules, nat_chains, nat_rules)]
        self._lines: List[Optional[List[str]]] = [None] * 4
        self._text: Optional[str] = None
        self.active_nat_chains: Set[str] = set() if active_nat_chains is None else active_nat_chains
        self.deleted_chains: List[str] = [] if deleted_chains is None else deleted_chains
        self.large_cluster_mode = large_cluster_mode
        self.full_sync = full_sync

    @classmethod
    def _from_chunks(cls, chunks: List[List[str]], **kw) -> "Payload":
        out = cls(**kw)
        out._chunks = chunks
        return out

    def _part(self, i: int) -> List[str]:
        lines = self._lines[i]
        if lines is None:
            chunks = self._chunks[i]
            lines = self._lines[i] = "\n".join(chunks).split("\n") if chunks else []
        return lines

    def _set_part(self, i: int, lines: List[str]) -> None:
        self._lines[i] = list(lines)

    filter_chains = property(lambda self: self._part(0), lambda self, v: self._set_part(0, v))
    filter_rules = property(lambda self: self._part(1), lambda self, v: self._set_part(1, v))
    nat_chains = property(lambda self: self._part(2), lambda self, v: self._set_part(2, v))
    nat_rules = property(lambda self: self._part(3), lambda self, v: self._set_part(3, v))

    @property
    def text(self) -> str:
        parts = [self._lines[i] if self._lines[i] is not None else self._chunks[i] for i in range(4)]
        if any(lines is not None for lines in self._lines):
            return "\n".join(["*filter", *parts[0], *parts[1], "COMMIT", "*nat", *parts[2], *parts[3], "COMMIT"]) + "\n"
        if self._text is None:
            self._text = "\n".join(["*filter", *parts[0], *parts[1], "COMMIT",
                                    "*nat", *parts[2], *parts[3], "COMMIT"]) + "\n"
        return self._text

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Payload):
            return NotImplemented
        return (self.text == other.text and self.active_nat_chains == other.active_nat_chains
                and self.deleted_chains == other.deleted_chains
                and self.large_cluster_mode == other.large_cluster_mode and self.full_sync == other.full_sync)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Payload(lines={self.text.count(chr(10))}, active_nat_chains={len(self.active_nat_chains)}, "
                f"deleted_chains={self.deleted_chains!r}, large_cluster_mode={self.large_cluster_mode}, "
                f"full_sync={self.full_sync})")


def _comment(text: str) -> List[str]:
    return ["-m", "comment", "--comment", f'"{text}"' if " " in text else text]


def _comment_text(text: str) -> str:
    """``_comment`` as one string."""
    return "-m comment --comment " + (f'"{text}"' if " " in text else text)


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
ServiceKey = Tuple[str, str]          # (namespace, name)


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
    ctx = _context(settings)
    svc_groups = _group_services(services)
    slice_groups = _group_slices(endpoint_slices)
    prepared = []
    total = 0
    for key in sorted(svc_groups):
        ports, count = _prepare(ctx, svc_groups[key], slice_groups.get(key))
        if ports:
            prepared.append((key, ports))
            total += count
    large = total > n.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    wanted = _changed_names(changed)
    rendered = [(f"{key[0]}/{key[1]}", _render_service(ctx, ports, large)) for key, ports in prepared]
    return _assemble(ctx, rendered, wanted, existing_chains, large)


def _changed_names(changed: ChangedSet) -> Optional[Set[str]]:
    if changed is None:
        return None
    return {c.namespaced_name if isinstance(c, ServicePortName) else str(c) for c in changed}


# --------------------------------------------------------------------------- chain names

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
_sha256 = hashlib.sha256

# Distinct chain-name hashes remembered (one per service port and per endpoint of it).
HASH_CACHE_SIZE = 1 << 16


@lru_cache(maxsize=HASH_CACHE_SIZE)
def _hash16(text: str) -> str:
    """``names._b32_16``: the first 16 base32 digits of sha256(text), i.e. of its first
    80 bits, without going through ``base64`` (pure Python in CPython 3.11)."""
    v = int.from_bytes(_sha256(text.encode()).digest()[:10], "big")
    p = _B32_PAIRS
    return (p[v >> 70] + p[(v >> 60) & 1023] + p[(v >> 50) & 1023] + p[(v >> 40) & 1023]
            + p[(v >> 30) & 1023] + p[(v >> 20) & 1023] + p[(v >> 10) & 1023] + p[v & 1023])


_probability = lru_cache(maxsize=4096)(n.probability)


@lru_cache(maxsize=1024)
def _network(cidr: str):
    return ipaddress.ip_network(cidr)


def clear_caches() -> None:
    """Forget every memo the render keeps between calls (chain-name hashes, parsed
    settings, parsed IPs): for benchmarks that time a cold start."""
    for fn in (_hash16, _probability, _network, _context):
        fn.cache_clear()
    clear_netutil_caches()


# --------------------------------------------------------------------------- settings


class _Context:
    """What ``NodeSettings`` says, worked out once: the per-rule pieces and the fixed
    parts of the payload."""

    def __init__(self, s: NodeSettings):
        self.settings = s
        self.node_name, self.zone, self.ip_family = s.node_name, s.zone, s.ip_family
        self.masquerade_all, self.nfacct = s.masquerade_all, s.nfacct
        self.local_detector = s.local_detector
        self.if_local = " ".join(s.if_local())
        self.if_not_local = " ".join(s.if_not_local())
        self.localhost_nodeports = s.effective_localhost_nodeports
        self.node_ip = s.primary_node_ip
        mark = s.mark

        filter_chains = [_chain_line(c) for c in (n.KUBE_SERVICES, n.KUBE_EXTERNAL_SERVICES, n.KUBE_FORWARD,
                                                   n.KUBE_NODEPORTS, n.KUBE_PROXY_FIREWALL)]
        nat_chains = [_chain_line(c) for c in (n.KUBE_SERVICES, n.KUBE_NODEPORTS, n.KUBE_POSTROUTING,
                                                n.KUBE_MARK_MASQ)]
        nat_rules = [f"-A {n.KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
                     f"-A {n.KUBE_POSTROUTING} -j MARK --xor-mark {mark}"]
        masq = _line("-A", n.KUBE_POSTROUTING, _comment("kubernetes service traffic requiring SNAT"),
                     "-j", "MASQUERADE")
        nat_rules.append(masq + (" --random-fully" if s.random_fully else ""))
        nat_rules.append(f"-A {n.KUBE_MARK_MASQ} -j MARK --or-mark {mark}")
        filter_rules = []
        if self.localhost_nodeports:
            filter_chains.append(_chain_line(n.KUBE_FIREWALL))
            filter_rules.append(_line(
                "-A", n.KUBE_FIREWALL, _comment("block incoming localnet connections"),
                "-d", "127.0.0.0/8", "!", "-s", "127.0.0.0/8", "-m", "conntrack",
                "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"))
        forward = []
        if not s.conntrack_tcp_be_liberal:
            rule = ["-A", n.KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID"]
            if s.nfacct:
                rule += ["-m", "nfacct", "--nfacct-name", n.NFACCT_CT_STATE_INVALID_DROPPED]
            forward.append(_line(rule, "-j", "DROP"))
        forward.append(_line("-A", n.KUBE_FORWARD, _comment("kubernetes forwarding rules"),
                             "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT"))
        forward.append(_line("-A", n.KUBE_FORWARD, _comment("kubernetes forwarding conntrack rule"),
                             "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"))
        # Joined: each is one chunk of the payload.
        self.filter_chains = "\n".join(filter_chains)
        self.filter_head = "\n".join(filter_rules)
        self.filter_tail = "\n".join(forward)
        self.nat_chains = "\n".join(nat_chains)
        self.nat_head = "\n".join(nat_rules)
        self.nat_tail = "\n".join(self._nodeports_jump())

    def _nodeports_jump(self) -> List[str]:
        s, rules = self.settings, []
        comment = _comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        cidrs, match_all = s.nodeport_cidrs()
        if match_all:
            dest = ["-m", "addrtype", "--dst-type", "LOCAL"]
            if s.ipv6:
                dest += ["!", "-d", "::1/128"]
            elif not self.localhost_nodeports:
                dest += ["!", "-d", "127.0.0.0/8"]
            rules.append(_line("-A", n.KUBE_SERVICES, comment, dest, "-j", n.KUBE_NODEPORTS))
            return rules
        addresses = {}
        loopback = "::1" if s.ipv6 else "127.0.0.1"
        for text in (*s.node_ips, loopback):
            ip = parse_ip_sloppy(text)
            if ip is None or (ip.version == 6) != s.ipv6:
                continue
            if any(ip in net for net in cidrs):
                addresses[str(ip)] = ip
        for ip in sorted(addresses.values()):
            if ip.is_loopback and (s.ipv6 or not self.localhost_nodeports):
                continue
            rules.append(_line("-A", n.KUBE_SERVICES, comment, "-d", str(ip), "-j", n.KUBE_NODEPORTS))
        return rules


@lru_cache(maxsize=64)
def _cached_context(settings: NodeSettings) -> _Context:
    return _Context(settings)


def _context(settings: NodeSettings) -> _Context:
    try:
        return _cached_context(settings)
    except TypeError:          # settings that cannot be hashed: worked out every time
        return _Context(settings)


_context.cache_clear = _cached_context.cache_clear  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- inputs


def _group_services(services: Iterable[object]) -> Dict[ServiceKey, List[o.Service]]:
    """The Services by (namespace, name), in input order."""
    out: Dict[ServiceKey, List[o.Service]] = {}
    Service = o.Service
    default = o.DEFAULT_NAMESPACE
    for svc in services:
        if isinstance(svc, Service):
            meta = svc.metadata
            key = (meta.namespace or default, meta.name)
            group = out.get(key)
            if group is None:
                out[key] = [svc]
            else:
                group.append(svc)
    return out


def _group_slices(endpoint_slices: Iterable[object],
                  only: Optional[Set[ServiceKey]] = None) -> Dict[ServiceKey, List[object]]:
    """The EndpointSlices and Endpoints by the (namespace, name) of their Service, in
    input order (``only``: just those Services)."""
    out: Dict[ServiceKey, List[object]] = {}
    kinds = (o.EndpointSlice, o.Endpoints)
    for item in endpoint_slices:
        if isinstance(item, kinds):
            key = slice_service_key(item)
            if key is None or (only is not None and key not in only):
                continue
            group = out.get(key)
            if group is None:
                out[key] = [item]
            else:
                group.append(item)
    return out


Prepared = List[Tuple[str, ServicePortInfo, List[EndpointInfo]]]


def _port_order(item):
    spn = item[0]
    return spn.port, spn.protocol


def _prepare(ctx: _Context, services: List[o.Service], items: Optional[List[object]]) -> Tuple[Prepared, int]:
    """The ports of one Service (sorted as ServicePortNames sort) with their endpoints,
    and how many endpoints they have in all (for large-cluster mode)."""
    svc_map = service_port_map(services, ctx.ip_family)
    if not svc_map:
        return [], 0
    ep_map = endpoints_by_port(items, ctx.node_name, ctx.ip_family) if items else {}
    ports = []
    count = 0
    for spn, info in (sorted(svc_map.items(), key=_port_order) if len(svc_map) > 1 else svc_map.items()):
        eps = ep_map.get((spn.namespace, spn.name, spn.port, spn.protocol), ()) if ep_map else ()
        count += len(eps)
        ports.append((str(spn), info, eps))
    return ports, count


# --------------------------------------------------------------------------- one Service


class _Rendered:
    """One Service's share of the payload: multi-line chunks ("" when empty)."""

    __slots__ = ("filter_rules", "capture", "nat_rules", "chain_lines", "chains")

    def __init__(self, filter_rules: str, capture: str, nat_rules: str, chain_lines: str, chains: Tuple[str, ...]):
        self.filter_rules = filter_rules    # its rules in the filter table
        self.capture = capture              # its nat KUBE-SERVICES / KUBE-NODEPORTS rules only
        self.nat_rules = nat_rules          # those and the rules of its own chains, in order
        self.chain_lines = chain_lines      # ":CHAIN - [0:0]" of its own chains
        self.chains = chains                # its own (active) nat chains


_EMPTY_RENDER = _Rendered("", "", "", "", ())


def _render_service(ctx: _Context, ports: Prepared, large: bool) -> _Rendered:
    """The rules of one Service's ports, as upstream's syncProxyRules writes them."""
    filt: List[str] = []
    capture: List[str] = []
    nat: List[str] = []
    chains: List[str] = []
    hash16 = _hash16
    for name, svc, endpoints in ports:
        cap: List[str] = []
        rules: List[str] = []
        proto = svc.protocol.lower()
        pm = f"-m {proto} -p {proto}"
        h = hash16(name + proto)
        cluster_chain = "KUBE-SVC-" + h
        local_chain = "KUBE-SVL-" + h
        ext_chain = "KUBE-EXT-" + h
        fw_chain = "KUBE-FW-" + h
        c_name = _comment_text(name)

        cat = categorize_endpoints(endpoints, svc, ctx.node_name, ctx.zone)
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
        vips = svc.load_balancer_vips
        uses_ext_chain = has_endpoints and svc.externally_accessible
        uses_fw_chain = has_endpoints and bool(vips) and bool(svc.load_balancer_source_ranges)
        lb_chain = fw_chain if uses_fw_chain else ext_chain

        if not has_endpoints:
            internal_target = external_target = "REJECT"
            internal_comment = external_comment = f'-m comment --comment "{name} has no endpoints"'
        else:
            internal_target = external_target = ""
            internal_comment = external_comment = ""
            if not has_internal:
                internal_target, internal_comment = "DROP", f'-m comment --comment "{name} has no local endpoints"'
            if not has_external:
                external_target, external_comment = "DROP", f'-m comment --comment "{name} has no local endpoints"'

        port = str(svc.port)
        vip_port = f"-d {svc.cluster_ip} --dport {port}"
        c_cluster_ip = f'-m comment --comment "{name} cluster IP"'
        # Capture the ClusterIP.
        if has_internal:
            cap.append(f"-A KUBE-SERVICES {c_cluster_ip} {pm} {vip_port} -j {internal_chain}")
        else:
            filt.append(f"-A KUBE-SERVICES {internal_comment} {pm} {vip_port} -j {internal_target}")
        # Capture external IPs.
        for ip in svc.external_ips:
            if has_endpoints:
                cap.append(f'-A KUBE-SERVICES -m comment --comment "{name} external IP" {pm} -d {ip} '
                           f"--dport {port} -j {ext_chain}")
            if not has_external:
                filt.append(f"-A KUBE-EXTERNAL-SERVICES {external_comment} {pm} -d {ip} --dport {port} "
                            f"-j {external_target}")
        # Capture load-balancer VIPs.
        for ip in vips:
            if has_endpoints:
                cap.append(f'-A KUBE-SERVICES -m comment --comment "{name} loadbalancer IP" {pm} -d {ip} '
                           f"--dport {port} -j {lb_chain}")
            if uses_fw_chain:
                filt.append(f'-A KUBE-PROXY-FIREWALL -m comment --comment "{name} traffic not accepted by '
                            f'{fw_chain}" {pm} -d {ip} --dport {port} -j DROP')
        if not has_external:
            for ip in vips:
                filt.append(f"-A KUBE-EXTERNAL-SERVICES {external_comment} {pm} -d {ip} --dport {port} "
                            f"-j {external_target}")
        # Capture the NodePort.
        if svc.node_port:
            np = str(svc.node_port)
            if has_endpoints:
                if ctx.localhost_nodeports and ctx.nfacct:
                    cap.append(f"-A KUBE-NODEPORTS {c_name} {pm} -d 127.0.0.0/8 --dport {np} -m nfacct "
                               f"--nfacct-name {n.NFACCT_LOCALHOST_NODEPORT_ACCEPTED} -j {ext_chain}")
                cap.append(f"-A KUBE-NODEPORTS {c_name} {pm} --dport {np} -j {ext_chain}")
            if not has_external:
                filt.append(f"-A KUBE-EXTERNAL-SERVICES {external_comment} -m addrtype --dst-type LOCAL {pm} "
                            f"--dport {np} -j {external_target}")
        # Accept the health-check NodePort.
        if svc.health_check_node_port:
            filt.append(f'-A KUBE-NODEPORTS -m comment --comment "{name} health check node port" '
                        f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT")

        # The Service's own chains.
        if has_internal:
            if ctx.masquerade_all:
                rules.append(f"-A {internal_chain} {c_cluster_ip} {pm} {vip_port} -j KUBE-MARK-MASQ")
            elif ctx.local_detector:
                rules.append(f"-A {internal_chain} {c_cluster_ip} {pm} {vip_port} {ctx.if_not_local} "
                             "-j KUBE-MARK-MASQ")

        if uses_ext_chain:
            chains.append(ext_chain)
            if not svc.external_policy_local:
                rules.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external '
                             'destinations" -j KUBE-MARK-MASQ')
            else:
                if ctx.local_detector:
                    rules.append(f'-A {ext_chain} -m comment --comment "pod traffic for {name} external '
                                 f'destinations" {ctx.if_local} -j {cluster_chain}')
                rules.append(f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} '
                             'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ')
                rules.append(f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} '
                             f'external destinations" -m addrtype --src-type LOCAL -j {cluster_chain}')
            if has_external:
                rules.append(f"-A {ext_chain} -j {external_policy_chain}")

        if uses_fw_chain:
            chains.append(fw_chain)
            head = f'-A {fw_chain} -m comment --comment "{name} loadbalancer IP"'
            node_ip = ctx.node_ip
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                rules.append(f"{head} -s {cidr} -j {ext_chain}")
                if node_ip is not None and node_ip in _network(cidr):
                    allow_from_node = True
            if allow_from_node:
                for ip in vips:
                    rules.append(f"{head} -s {ip} -j {ext_chain}")
            rules.append(f'-A {fw_chain} -m comment --comment "other traffic to {name} will be dropped by '
                         'KUBE-PROXY-FIREWALL"')

        name_proto = name + proto
        seps: Dict[str, str] = {}
        affinity = svc.client_ip_affinity
        if uses_cluster_chain:
            chains.append(cluster_chain)
            _dispatch(rules, name, name_proto, cluster_chain, cat.cluster, seps, affinity, svc, large)
        if uses_local_chain:
            chains.append(local_chain)
            _dispatch(rules, name, name_proto, local_chain, cat.local, seps, affinity, svc, large)
        for ep in cat.all_reachable:
            ep_text = str(ep)
            sep = seps.get(ep_text) or "KUBE-SEP-" + hash16(name_proto + ep_text)
            chains.append(sep)
            head = f"-A {sep}" if large else f"-A {sep} {c_name}"
            rules.append(f"{head} -s {ep.ip} -j KUBE-MARK-MASQ")
            if affinity:
                rules.append(f"{head} -m recent --name {sep} --set {pm} -j DNAT --to-destination {ep_text}")
            else:
                rules.append(f"{head} {pm} -j DNAT --to-destination {ep_text}")

        capture += cap
        nat += cap
        nat += rules
    return _Rendered("\n".join(filt), "\n".join(capture), "\n".join(nat),
                     "\n".join([f":{c} - [0:0]" for c in chains]), tuple(chains))


def _dispatch(rules: List[str], name: str, name_proto: str, chain: str, endpoints: List[EndpointInfo],
              seps: Dict[str, str], affinity: bool, svc: ServicePortInfo, large: bool) -> None:
    """The KUBE-SVC/KUBE-SVL rules: affinity checks first, then the random cascade.
    ``seps`` remembers the endpoint chain names made (by ``IP:port``)."""
    texts = [str(ep) for ep in endpoints]
    for text in texts:
        if text not in seps:
            seps[text] = "KUBE-SEP-" + _hash16(name_proto + text)
    if large:
        heads = [f"-A {chain}"] * len(texts)
    else:
        heads = [f'-A {chain} -m comment --comment "{name} -> {text}"' for text in texts]
    if affinity:
        seconds = str(svc.sticky_max_age_seconds)
        for head, text in zip(heads, texts):
            sep = seps[text]
            rules.append(f"{head} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}")
    count = len(texts)
    last = count - 1
    for i, (head, text) in enumerate(zip(heads, texts)):
        if i < last:
            rules.append(f"{head} -m statistic --mode random --probability {_probability(count - i)} "
                         f"-j {seps[text]}")
        else:
            rules.append(f"{head} -j {seps[text]}")


# --------------------------------------------------------------------------- the payload


def _assemble(ctx: _Context, rendered: Iterable[Tuple[str, _Rendered]], changed: Optional[Set[str]],
              existing_chains: Optional[Iterable[str]], large: bool) -> Payload:
    """The payload from the Services' chunks (in order): every Service's capture and
    filter rules, and the own chains of those in ``changed`` (all when None)."""
    filter_rules = [ctx.filter_head] if ctx.filter_head else []
    nat_chains = [ctx.nat_chains]
    nat_rules = [ctx.nat_head]
    active: Set[str] = set()
    for name, r in rendered:
        if r.filter_rules:
            filter_rules.append(r.filter_rules)
        if changed is None or name in changed:
            if r.chain_lines:
                nat_chains.append(r.chain_lines)
            if r.nat_rules:
                nat_rules.append(r.nat_rules)
        elif r.capture:
            nat_rules.append(r.capture)
        if r.chains:
            active.update(r.chains)
    deleted: List[str] = []
    if existing_chains is not None:
        for chain in sorted(set(existing_chains) - active):
            if n.is_service_chain(chain):
                nat_chains.append(f":{chain} - [0:0]")
                nat_rules.append(f"-X {chain}")
                deleted.append(chain)
    if ctx.nat_tail:
        nat_rules.append(ctx.nat_tail)
    filter_rules.append(ctx.filter_tail)
    return Payload._from_chunks([[ctx.filter_chains], filter_rules, nat_chains, nat_rules],
                                active_nat_chains=active, deleted_chains=deleted,
                                large_cluster_mode=large, full_sync=changed is None)


# --------------------------------------------------------------------------- incremental


class _Entry:
    """What an IncrementalRenderer remembers of one Service."""

    __slots__ = ("name", "fingerprint", "count", "large", "rendered")

    def __init__(self, name: str, fingerprint: Hashable, count: int):
        self.name = name                    # "namespace/name"
        self.fingerprint = fingerprint      # of the Service objects and their slices
        self.count = count                  # endpoints of its ports (large-cluster mode)
        self.large: Optional[bool] = None   # the mode ``rendered`` was made in (None: either)
        self.rendered: _Rendered = _EMPTY_RENDER


class IncrementalRenderer:
    """``render_payload`` for one node's settings that re-renders only the Services that
    changed since the previous call.

    It keeps each Service's share of the payload (its filter rules, its nat capture
    rules in KUBE-SERVICES / KUBE-NODEPORTS, its own chains and their rules) keyed by a
    fingerprint of the Service objects and of the EndpointSlices / Endpoints that name
    it. A call fingerprints every Service, re-renders those whose fingerprint moved (and
    those whose own chains it writes that were rendered in the other large-cluster
    mode), and joins the kept pieces. The result equals ``render_payload(services,
    endpoint_slices, settings, changed, existing_chains)`` exactly, whatever the calls
    before it were: nothing is reused without an equal fingerprint.

    ``fingerprints`` (optional): ``{"namespace/name": value}`` the caller already has,
    e.g. from ``kproxy.proxy.types.service_fingerprints`` or digests of its own; the
    renderer then does not fingerprint those Services (and does not even look at the
    slices of unchanged ones): the cheapest partial sync. A value must change whenever
    anything of the Service or of its slices changes. Services missing from the mapping
    are fingerprinted by the renderer.
    """

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self._ctx = _context(settings)
        self._entries: Dict[ServiceKey, _Entry] = {}
        self._keys: Set[ServiceKey] = set()
        self._order: List[ServiceKey] = []           # the keys, sorted
        self._by_name: Dict[str, ServiceKey] = {}    # "namespace/name" -> key
        self._in_mode = {False: 0, True: 0}          # entries rendered in each large-cluster mode
        self.last_rendered = 0                       # Services (re-)rendered by the last call

    def clear(self) -> None:
        """Forget every Service (the next call renders them all)."""
        self._entries.clear()
        self._keys, self._order, self._by_name = set(), [], {}
        self._in_mode = {False: 0, True: 0}

    def __len__(self) -> int:
        return len(self._entries)

    def render(self, services: Iterable[object], endpoint_slices: Iterable[object], changed: ChangedSet = None,
               existing_chains: Optional[Iterable[str]] = None,
               fingerprints: Optional[Mapping[str, Hashable]] = None) -> str:
        """The payload text; see ``render_payload``."""
        return self.render_payload(services, endpoint_slices, changed, existing_chains, fingerprints).text

    def render_payload(self, services: Iterable[object], endpoint_slices: Iterable[object],
                       changed: ChangedSet = None, existing_chains: Optional[Iterable[str]] = None,
                       fingerprints: Optional[Mapping[str, Hashable]] = None) -> Payload:
        """What ``render_payload(services, endpoint_slices, settings, changed,
        existing_chains)`` returns (see the class docstring for ``fingerprints``)."""
        ctx, entries = self._ctx, self._entries
        if not isinstance(endpoint_slices, (list, tuple)):
            endpoint_slices = list(endpoint_slices)
        svc_groups = _group_services(services)
        slice_groups: Optional[Dict[ServiceKey, List[object]]] = None

        # 1. Fingerprint every Service; the new and changed ones are stale.
        stale: List[ServiceKey] = []
        for key, svcs in svc_groups.items():
            fp = None
            if fingerprints is not None:
                fp = fingerprints.get(f"{key[0]}/{key[1]}")
            if fp is None:
                if slice_groups is None:
                    slice_groups = _group_slices(endpoint_slices)
                fp = service_group_fingerprint(svcs, slice_groups.get(key, ()))
            entry = entries.get(key)
            if entry is None:
                entries[key] = _Entry(f"{key[0]}/{key[1]}", fp, 0)
                stale.append(key)
            elif entry.fingerprint != fp:
                entry.fingerprint = fp
                stale.append(key)
        if svc_groups.keys() != self._keys:
            for key in self._keys - svc_groups.keys():
                self._set_mode(entries.pop(key), None)
            self._keys = set(svc_groups)
            self._order = sorted(self._keys)
            self._by_name = {entries[key].name: key for key in self._order}

        # 2. The ports and endpoints of the stale ones (their endpoint counts decide the mode).
        prepared: Dict[ServiceKey, Prepared] = {}
        if stale:
            slice_groups = _slices_for(endpoint_slices, slice_groups, stale)
            for key in stale:
                prepared[key], entries[key].count = _prepare(ctx, svc_groups[key], slice_groups.get(key))
        large = sum(e.count for e in entries.values()) > n.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
        wanted = _changed_names(changed)

        # 3. Services whose own chains this payload writes, kept from the other mode.
        if self._in_mode[not large]:
            names = self._by_name if wanted is None else wanted
            other = [key for key in (self._by_name.get(name) for name in names)
                     if key is not None and key not in prepared and entries[key].large is (not large)]
            if other:
                slice_groups = _slices_for(endpoint_slices, slice_groups, other)
                for key in other:
                    prepared[key] = _prepare(ctx, svc_groups[key], slice_groups.get(key))[0]

        # 4. Render those, and join every Service's pieces.
        for key, ports in prepared.items():
            entry = entries[key]
            entry.rendered = _render_service(ctx, ports, large) if ports else _EMPTY_RENDER
            self._set_mode(entry, large if entry.count > 0 else None)
        self.last_rendered = len(prepared)
        return _assemble(ctx, [(entries[key].name, entries[key].rendered) for key in self._order],
                         wanted, existing_chains, large)

    def _set_mode(self, entry: _Entry, large: Optional[bool]) -> None:
        if entry.large is not None:
            self._in_mode[entry.large] -= 1
        entry.large = large
        if large is not None:
            self._in_mode[large] += 1


def _slices_for(endpoint_slices: Sequence[object], slice_groups: Optional[Dict[ServiceKey, List[object]]],
                keys: List[ServiceKey]) -> Dict[ServiceKey, List[object]]:
    """Slices grouped by Service, at least for ``keys``."""
    if slice_groups is not None:
        return slice_groups
    return _group_slices(endpoint_slices, only=set(keys))


_SHARED: Dict[NodeSettings, IncrementalRenderer] = {}
SHARED_RENDERERS = 64


def shared_renderer(settings: NodeSettings) -> IncrementalRenderer:
    """This process's IncrementalRenderer for ``settings`` (one per node), for callers
    that are themselves made anew for every sync. At most ``SHARED_RENDERERS`` are kept
    (the oldest is dropped)."""
    renderer = _SHARED.get(settings)
    if renderer is None:
        if len(_SHARED) >= SHARED_RENDERERS:
            del _SHARED[next(iter(_SHARED))]
        renderer = _SHARED[settings] = IncrementalRenderer(settings)
    return renderer
