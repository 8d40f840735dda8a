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
Service only; its output is byte for byte ``render_payload``'s. ``render`` itself keeps
nothing between calls but bounded memos of chain-name hashes and parsed IPs
(``clear_caches()`` empties them).

The jump rules from the built-in chains are not part of the payload: see ``jumps.py``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from kproxy.model import objects as o
from kproxy.proxy.endpoints import categorize
from kproxy.proxy.iptables import names as n
from kproxy.proxy.netutil import IPAddress, parse_cidr_sloppy, parse_ip_sloppy
from kproxy.proxy.netutil import clear_caches as clear_netutil_caches
from kproxy.proxy.types import (EndpointInfo, ServicePortInfo, ServicePortName, endpoints_by_port,
                                service_group_fingerprint, service_port_list)


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

    def __init__(self, filter_chains: Optional[List[str]] = None, filter_rules: Optional[List[str]] = None,
                 nat_chains: Optional[List[str]] = None, nat_rules: Optional[List[str]] = None,
                 active_nat_chains: Optional[Set[str]] = None, deleted_chains: Optional[List[str]] = None,
                 large_cluster_mode: bool = False, full_sync: bool = True):
        # Either lines (as given here), or chunks (as the renderer makes them: multi-line
        # strings, "" for none) split into lines when a part is asked for.
        self._lines: List[Optional[List[str]]] = [list(part or ()) for part in
                                                  (filter_chains, filter_rules, nat_chains, nat_rules)]
        self._chunks: List[List[str]] = [[], [], [], []]
        self._text: Optional[str] = None
        self.active_nat_chains: Set[str] = set() if active_nat_chains is None else active_nat_chains
        self.deleted_chains: List[str] = [] if deleted_chains is None else deleted_chains
        self.large_cluster_mode = large_cluster_mode
        self.full_sync = full_sync

    @classmethod
    def _from_chunks(cls, chunks: List[List[str]], **kw) -> "Payload":
        out = cls(**kw)
        out._chunks, out._lines = chunks, [None] * 4
        return out

    def _part(self, i: int) -> List[str]:
        lines = self._lines[i]
        if lines is None:
            text = "\n".join(filter(None, self._chunks[i]))
            lines = self._lines[i] = text.split("\n") if text else []
        return lines

    def _set_part(self, i: int, lines: List[str]) -> None:
        self._lines[i] = list(lines)

    filter_chains = property(lambda self: self._part(0), lambda self, v: self._set_part(0, v))
    filter_rules = property(lambda self: self._part(1), lambda self, v: self._set_part(1, v))
    nat_chains = property(lambda self: self._part(2), lambda self, v: self._set_part(2, v))
    nat_rules = property(lambda self: self._part(3), lambda self, v: self._set_part(3, v))

    @property
    def text(self) -> str:
        if any(part is not None for part in self._lines):   # as the lists are now (they may have been edited)
            parts = [self._part(i) for i in range(4)]
            return "\n".join(["*filter", *parts[0], *parts[1], "COMMIT", "*nat", *parts[2], *parts[3],
                              "COMMIT"]) + "\n"
        if self._text is None:
            fc, fr, nc, nr = self._chunks
            self._text = "\n".join(filter(None, ["*filter", *fc, *fr, "COMMIT", "*nat", *nc, *nr, "COMMIT"])) + "\n"
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
    groups = _group_services(services)
    slice_groups = _group_slices(endpoint_slices)
    order = sorted(groups)
    # Large-cluster mode needs the endpoint total, known once every Service is prepared;
    # rendering each one as soon as it is prepared keeps the garbage collector quiet.
    # So the mode is guessed from an upper bound of the total (exact when it says
    # "not large"), and everything is rendered again in the rare case it was wrong.
    guess = sum(map(_endpoint_bound, (slice_groups.get(name, ()) for name in order))) > _THRESHOLD
    rendered, total = _render_all(ctx, order, groups, slice_groups, guess)
    large = total > _THRESHOLD
    if large != guess:
        rendered = _render_all(ctx, order, groups, slice_groups, large)[0]
    return _assemble(ctx, rendered, _changed_names(changed), existing_chains, large)


_THRESHOLD = n.LARGE_CLUSTER_ENDPOINTS_THRESHOLD


def _render_all(ctx: _Context, order: List[ServiceKey], groups: Dict[ServiceKey, List[o.Service]],
                slice_groups: Dict[ServiceKey, List[object]], large: bool
                ) -> Tuple[List[Tuple[str, "_Rendered"]], int]:
    """Every Service rendered (in ``order``), with its "namespace/name", and the
    endpoint total."""
    rendered = []
    total = 0
    for key in order:
        name = f"{key[0]}/{key[1]}"
        ports, count = _prepare(ctx, name, groups[key], slice_groups.get(key))
        total += count
        rendered.append((name, _render_service(ctx, ports, large) if ports else _EMPTY_RENDER))
    return rendered, total


def _endpoint_bound(items: Iterable[object]) -> int:
    """At least as many as the endpoints these slices give the endpoints map: each
    endpoint counts once per port of its slice."""
    total = 0
    for item in items:
        if isinstance(item, o.Endpoints):
            for sub in item.subsets:
                total += (len(sub.addresses) + len(sub.not_ready_addresses)) * len(sub.ports)
        else:
            total += len(item.endpoints) * len(item.ports)  # type: ignore[attr-defined]
    return total


def _changed_names(changed: ChangedSet) -> Optional[Set[str]]:
    if changed is None:
        return None
    return {c.namespaced_name if isinstance(c, ServicePortName) else str(c) for c in changed}


# --------------------------------------------------------------------------- chain names

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
try:        # CPython's own SHA-256: half the cost of OpenSSL's for these short texts
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover
    _sha256 = hashlib.sha256

# Chain-name hashes remembered (one per service port and per endpoint of it), in a
# plain dict emptied when full: its entries are not objects the garbage collector
# tracks, and a hit is one lookup.
HASH_CACHE_SIZE = 1 << 17
_HASHES: Dict[str, str] = {}
_unpack_80 = struct.Struct(">HHHHH").unpack_from      # the first 80 bits as five 16-bit numbers


def _b32_16(text: str) -> str:
    """``names._b32_16``: the first 16 base32 digits of sha256(text), i.e. of its first
    80 bits, ten bits (two digits) at a time, without ``base64`` (pure Python in 3.11)."""
    a, b, c, d, e = _unpack_80(_sha256(text.encode()).digest())
    p = _B32_PAIRS
    return "".join((p[a >> 6], p[((a & 63) << 4) | (b >> 12)], p[(b >> 2) & 1023], p[((b & 3) << 8) | (c >> 8)],
                    p[((c & 255) << 2) | (d >> 14)], p[(d >> 4) & 1023], p[((d & 15) << 6) | (e >> 10)],
                    p[e & 1023]))


def _hash16(text: str) -> str:
    """``_b32_16(text)``, remembered."""
    h = _HASHES.get(text)
    if h is None:
        if len(_HASHES) >= HASH_CACHE_SIZE:
            _HASHES.clear()
        h = _HASHES[text] = _b32_16(text)
    return h


_probability = lru_cache(maxsize=4096)(n.probability)


@lru_cache(maxsize=1024)
def _network(cidr: str):
    return ipaddress.ip_network(cidr)


def clear_caches() -> None:
    """Forget every memo the render keeps between calls (chain-name hashes, parsed
    settings, parsed IPs): for benchmarks that time a cold start."""
    for fn in (_probability, _network, _context):
        fn.cache_clear()
    _HASHES.clear()
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


def _group_services(services: Iterable[object],
                    only: Optional[Set[ServiceKey]] = None) -> Dict[ServiceKey, List[o.Service]]:
    """The Services by (namespace, name), in input order (``only``: just those)."""
    out: Dict[ServiceKey, List[o.Service]] = {}
    Service, default = o.Service, o.DEFAULT_NAMESPACE
    for svc in services:
        if isinstance(svc, Service):
            meta = svc.metadata
            key = (meta.namespace or default, meta.name)
            if only is not None and key not in only:
                continue
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
    Slice, Endpoints = o.EndpointSlice, o.Endpoints
    label, default = o.SERVICE_NAME_LABEL, o.DEFAULT_NAMESPACE
    short = None if only is None else {key[1] for key in only}
    for item in endpoint_slices:
        if isinstance(item, Slice):
            meta = item.metadata
            svc_name = meta.labels.get(label)
            if not svc_name:
                continue
        elif isinstance(item, Endpoints):
            meta = item.metadata
            svc_name = meta.name
        else:
            continue
        if short is not None and svc_name not in short:
            continue
        key = (meta.namespace or default, svc_name)
        if only is not None and key not in only:
            continue
        group = out.get(key)
        if group is None:
            out[key] = [item]
        else:
            group.append(item)
    return out


Prepared = List[Tuple[str, ServicePortInfo, List[EndpointInfo]]]


def _prepare(ctx: _Context, name: str, services: List[o.Service], items: Optional[List[object]]
             ) -> Tuple[Prepared, int]:
    """The ports of the Service ``name`` ("namespace/name") in ServicePortName order,
    each as (its ServicePortName string, ServicePortInfo, endpoints), and how many
    endpoints they have in all (for large-cluster mode)."""
    family = ctx.ip_family
    if len(services) == 1:
        infos = service_port_list(services[0], family)
        if not infos:
            return [], 0
    else:
        infos = [info for svc in services for info in service_port_list(svc, family)]
    if len(infos) > 1:             # one per ServicePortName, the last one winning, sorted
        by_port = {}
        for info in infos:
            by_port[(info.name.port, info.name.protocol)] = info
        infos = sorted(by_port.values(), key=_port_key)
    elif not infos:
        return [], 0
    ep_map = endpoints_by_port(items, ctx.node_name, family) if items else None
    ports = []
    count = 0
    for info in infos:
        spn = info.name
        eps = ep_map.get((spn.namespace, spn.name, spn.port, spn.protocol), ()) if ep_map else ()
        count += len(eps)
        ports.append((f"{name}:{spn.port}" if spn.port else name, info, eps))
    return ports, count


def _port_key(info: ServicePortInfo) -> Tuple[str, str]:
    return info.name.port, info.name.protocol


# --------------------------------------------------------------------------- one Service


# One Service's share of the payload, as multi-line chunks ("" when empty): a plain
# tuple of strings (the garbage collector stops tracking those: a full render keeps
# 10,000s of them alive at once):
#   FILTER   its rules in the filter table
#   CAPTURE  its nat KUBE-SERVICES / KUBE-NODEPORTS rules only
#   NAT      those and the rules of its own chains, in order
#   LINES    ":CHAIN - [0:0]" of its own chains
#   CHAINS   its own (active) nat chains, a tuple
_Rendered = Tuple[str, str, str, str, Tuple[str, ...]]
FILTER, CAPTURE, NAT, LINES, CHAINS = range(5)


_EMPTY_RENDER: _Rendered = ("", "", "", "", ())


def _render_service(ctx: _Context, ports: Prepared, large: bool) -> _Rendered:
    """The rules of one Service's ports, as upstream's syncProxyRules writes them."""
    filt: List[str] = []
    capture: List[str] = []
    nat: List[str] = []
    chains: List[str] = []
    hashes, hash16 = _HASHES, _hash16
    for name, svc, endpoints in ports:
        proto = svc.protocol.lower()
        pm = f"-m {proto} -p {proto}"
        name_proto = name + proto
        h = hashes.get(name_proto) or hash16(name_proto)
        cluster_chain = "KUBE-SVC-" + h
        local_chain = "KUBE-SVL-" + h
        ext_chain = "KUBE-EXT-" + h
        c_name = f'-m comment --comment "{name}"' if " " in name else "-m comment --comment " + name

        # ServicePortInfo's properties, worked out once
        node_port, vips, external_ips = svc.node_port, svc.load_balancer_vips, svc.external_ips
        internal_local, external_local = svc.internal_policy_local, svc.external_policy_local
        externally = bool(node_port or vips or external_ips)
        uses_cluster = not internal_local or externally
        uses_local = internal_local or (external_local and externally)
        cluster_eps, local_eps, reachable, has_endpoints = categorize(
            endpoints, uses_cluster, uses_local, ctx.node_name, ctx.zone)
        uses_cluster_chain = bool(cluster_eps) and uses_cluster
        uses_local_chain = bool(local_eps) and uses_local

        internal_chain, has_internal = cluster_chain, has_endpoints
        if internal_local:
            internal_chain = local_chain
            has_internal = has_internal and bool(local_eps)
        external_policy_chain, has_external = cluster_chain, has_endpoints
        if external_local:
            external_policy_chain = local_chain
            has_external = has_external and bool(local_eps)
        uses_fw_chain = has_endpoints and bool(vips) and bool(svc.load_balancer_source_ranges)
        fw_chain = "KUBE-FW-" + h
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
        cap: List[str] = []
        # Capture the ClusterIP.
        if has_internal:
            cap.append(f"-A KUBE-SERVICES {c_cluster_ip} {pm} {vip_port} -j {internal_chain}")
        else:
            filt.append(f"-A KUBE-SERVICES {internal_comment} {pm} {vip_port} -j {internal_target}")
        if externally or svc.health_check_node_port:
            # Capture external IPs.
            for ip in external_ips:
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
            if node_port:
                np = str(node_port)
                if has_endpoints:
                    if ctx.localhost_nodeports and ctx.nfacct:
                        cap.append(f"-A KUBE-NODEPORTS {c_name} {pm} -d 127.0.0.0/8 --dport {np} -m nfacct "
                                   f"--nfacct-name {n.NFACCT_LOCALHOST_NODEPORT_ACCEPTED} -j {ext_chain}")
                    cap.append(f"-A KUBE-NODEPORTS {c_name} {pm} --dport {np} -j {ext_chain}")
                if not has_external:
                    filt.append(f"-A KUBE-EXTERNAL-SERVICES {external_comment} -m addrtype --dst-type LOCAL "
                                f"{pm} --dport {np} -j {external_target}")
            # Accept the health-check NodePort.
            if svc.health_check_node_port:
                filt.append(f'-A KUBE-NODEPORTS -m comment --comment "{name} health check node port" '
                            f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT")
        capture += cap
        nat += cap

        # The Service's own chains.
        if has_internal:
            if ctx.masquerade_all:
                nat.append(f"-A {internal_chain} {c_cluster_ip} {pm} {vip_port} -j KUBE-MARK-MASQ")
            elif ctx.local_detector:
                nat.append(f"-A {internal_chain} {c_cluster_ip} {pm} {vip_port} {ctx.if_not_local} "
                           "-j KUBE-MARK-MASQ")

        if has_endpoints and externally:
            chains.append(ext_chain)
            if not external_local:
                nat.append(f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external '
                           'destinations" -j KUBE-MARK-MASQ')
            else:
                if ctx.local_detector:
                    nat.append(f'-A {ext_chain} -m comment --comment "pod traffic for {name} external '
                               f'destinations" {ctx.if_local} -j {cluster_chain}')
                nat.append(f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} '
                           'external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ')
                nat.append(f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} '
                           f'external destinations" -m addrtype --src-type LOCAL -j {cluster_chain}')
            if has_external:
                nat.append(f"-A {ext_chain} -j {external_policy_chain}")

        if uses_fw_chain:
            chains.append(fw_chain)
            head = f'-A {fw_chain} -m comment --comment "{name} loadbalancer IP"'
            node_ip = ctx.node_ip
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                nat.append(f"{head} -s {cidr} -j {ext_chain}")
                if node_ip is not None and node_ip in _network(cidr):
                    allow_from_node = True
            if allow_from_node:
                for ip in vips:
                    nat.append(f"{head} -s {ip} -j {ext_chain}")
            nat.append(f'-A {fw_chain} -m comment --comment "other traffic to {name} will be dropped by '
                       'KUBE-PROXY-FIREWALL"')

        if not (uses_cluster_chain or uses_local_chain or reachable):
            continue
        # The endpoint chains by "IP:port" (those of the dispatch lists are among them).
        seps: Dict[str, str] = {}
        texts = []
        for ep in reachable:
            text = str(ep)
            texts.append(text)
            key = name_proto + text
            seps[text] = "KUBE-SEP-" + (hashes.get(key) or hash16(key))
        affinity = svc.session_affinity == "ClientIP"
        for used, chain, eps in ((uses_cluster_chain, cluster_chain, cluster_eps),
                                 (uses_local_chain, local_chain, local_eps)):
            if not used:
                continue
            # The KUBE-SVC/KUBE-SVL rules: affinity checks first, then the random cascade.
            chains.append(chain)
            count = len(eps)
            eps_texts = texts if eps == reachable else [str(ep) for ep in eps]
            if large:
                heads = [f"-A {chain}"] * count
            else:
                heads = [f'-A {chain} -m comment --comment "{name} -> {text}"' for text in eps_texts]
            sep_of = []
            for text in eps_texts:
                sep = seps.get(text)
                if sep is None:
                    sep = seps[text] = "KUBE-SEP-" + hash16(name_proto + text)
                sep_of.append(sep)
            if affinity:
                seconds = str(svc.sticky_max_age_seconds)
                for head, sep in zip(heads, sep_of):
                    nat.append(f"{head} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}")
            last = count - 1
            for i in range(last):
                nat.append(f"{heads[i]} -m statistic --mode random --probability {_probability(count - i)} "
                           f"-j {sep_of[i]}")
            nat.append(f"{heads[last]} -j {sep_of[last]}")
        for ep, text in zip(reachable, texts):
            sep = seps[text]
            chains.append(sep)
            head = f"-A {sep}" if large else f"-A {sep} {c_name}"
            nat.append(f"{head} -s {ep.ip} -j KUBE-MARK-MASQ")
            if affinity:
                nat.append(f"{head} -m recent --name {sep} --set {pm} -j DNAT --to-destination {text}")
            else:
                nat.append(f"{head} {pm} -j DNAT --to-destination {text}")
    return ("\n".join(filt), "\n".join(capture), "\n".join(nat),
                     "\n".join([f":{c} - [0:0]" for c in chains]), tuple(chains))


# --------------------------------------------------------------------------- the payload


def _assemble(ctx: _Context, rendered: Iterable[Tuple[str, _Rendered]], changed: Optional[Set[str]],
              existing_chains: Optional[Iterable[str]], large: bool) -> Payload:
    """The payload from the Services' chunks (in order): every Service's capture and
    filter rules, and the own chains of those in ``changed`` (all when None)."""
    filter_rules: List[str] = []
    nat_chains: List[str] = []
    nat_rules: List[str] = []
    active: Set[str] = set()
    for name, r in rendered:
        filter_rules.append(r[FILTER])
        if changed is None or name in changed:
            nat_chains.append(r[LINES])
            nat_rules.append(r[NAT])
        else:
            nat_rules.append(r[CAPTURE])
        active.update(r[CHAINS])
    return _payload(ctx, filter_rules, nat_rules, nat_chains, changed is None, existing_chains, active, large)


def _payload(ctx: _Context, filter_rules: List[str], nat_rules: List[str], nat_chains: List[str], full: bool,
             existing_chains: Optional[Iterable[str]], active: Union[Set[str], Dict[str, int]],
             large: bool) -> Payload:
    """The payload around the Services' chunks ("" for none): the fixed chains and
    rules, and the stale chains of ``existing_chains`` (those not in ``active``)."""
    deleted = []
    if existing_chains is not None:
        gone = set(existing_chains)
        gone.difference_update(active)
        deleted = sorted(c for c in gone if n.is_service_chain(c))
    chunks = [[ctx.filter_chains], [ctx.filter_head, *filter_rules, ctx.filter_tail],
              [ctx.nat_chains, *nat_chains, *[f":{c} - [0:0]" for c in deleted]],
              [ctx.nat_head, *nat_rules, *[f"-X {c}" for c in deleted], ctx.nat_tail]]
    return Payload._from_chunks(chunks, active_nat_chains=active if isinstance(active, set) else set(active),
                                deleted_chains=deleted,
                                large_cluster_mode=large, full_sync=full)


# --------------------------------------------------------------------------- incremental


class _Entry:
    """What an IncrementalRenderer remembers of one Service."""

    __slots__ = ("name", "fingerprint", "count", "large", "rendered", "pos")

    def __init__(self, name: str, fingerprint: Hashable):
        self.name = name                    # "namespace/name"
        self.fingerprint = fingerprint      # of the Service objects and their slices
        self.count = 0                      # endpoints of its ports (large-cluster mode)
        self.large: Optional[bool] = None   # the mode ``rendered`` was made in (None: either)
        self.rendered: _Rendered = _EMPTY_RENDER
        self.pos = -1                       # its place in the sorted order


class IncrementalRenderer:
    """``render_payload`` for one node's settings that re-renders only the Services that
    changed since the previous call.

    It keeps each Service's share of the payload (its filter rules, its nat capture
    rules in KUBE-SERVICES / KUBE-NODEPORTS, its own chains and their rules) keyed by a
    fingerprint of the Service objects and of the EndpointSlices / Endpoints that name
    it (``types.service_group_fingerprint``). A call fingerprints every Service,
    re-renders those whose fingerprint moved (and those whose own chains it writes that
    were rendered in the other large-cluster mode), and joins the kept pieces. The
    result equals ``render_payload(services, endpoint_slices, settings, changed,
    existing_chains)`` exactly, whatever the calls before it were: nothing is reused
    without an equal fingerprint.

    ``fingerprints`` (optional): ``{"namespace/name": value}`` the caller already has,
    from ``types.service_fingerprints`` or digests of its own; the renderer then does
    not fingerprint those Services, nor look at the slices of unchanged ones: the
    cheapest partial sync. A value must change whenever anything of the Service or of
    its slices does (the caller vouches for it). Services missing from the mapping are
    fingerprinted by the renderer.
    """

    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self._ctx = _context(settings)
        self.clear()

    def clear(self) -> None:
        """Forget every Service (the next call renders them all)."""
        self._entries: Dict[ServiceKey, _Entry] = {}
        self._order: List[ServiceKey] = []            # the keys, sorted
        self._by_name: Dict[str, List[ServiceKey]] = {}
        self._filter: List[str] = []                  # each one's filter rules, in that order
        self._capture: List[str] = []                 # each one's nat capture rules, in that order
        self._active: Dict[str, int] = {}             # chain -> how many Services have it
        self._total = 0                               # endpoints, for large-cluster mode
        self._in_mode = {False: 0, True: 0}           # Services rendered in each mode
        self.last_rendered = 0                        # Services (re-)rendered by the last call

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
        if not isinstance(services, (list, tuple)):
            services = list(services)
        if not isinstance(endpoint_slices, (list, tuple)):
            endpoint_slices = list(endpoint_slices)

        # 1. The Services by key: the new ones and those whose fingerprint moved are
        # stale. With a given fingerprint that did not move, a Service is not looked at
        # further (nothing kept per unchanged Service: the garbage collector stays quiet).
        groups: Dict[ServiceKey, List[o.Service]] = {}     # the objects of those that may be stale
        seen: Set[ServiceKey] = set()
        Service, default = o.Service, o.DEFAULT_NAMESPACE
        for svc in services:
            if not isinstance(svc, Service):
                continue
            meta = svc.metadata
            key = (meta.namespace or default, meta.name)
            group = groups.get(key)
            if group is not None:
                group.append(svc)
                continue
            if key in seen:
                continue                                   # another object of an unchanged Service
            seen.add(key)
            if fingerprints is not None:
                entry = entries.get(key)
                if entry is not None:
                    fp = fingerprints.get(entry.name)
                    if fp is not None and entry.fingerprint == fp:
                        continue
            groups[key] = [svc]
        slice_groups: Optional[Dict[ServiceKey, List[object]]] = None
        all_slices = False            # slice_groups has every Service's slices
        stale: List[ServiceKey] = []
        for key, svcs in groups.items():
            name = f"{key[0]}/{key[1]}"
            fp = None if fingerprints is None else fingerprints.get(name)
            if fp is None:
                if not all_slices:
                    slice_groups, all_slices = _group_slices(endpoint_slices), True
                fp = service_group_fingerprint(svcs, slice_groups.get(key, ()))
            entry = entries.get(key)
            if entry is None:
                entries[key] = _Entry(name, fp)
                stale.append(key)
            elif entry.fingerprint != fp:
                entry.fingerprint = fp
                stale.append(key)
        if len(entries) != len(seen):
            for key in [key for key in entries if key not in seen]:
                self._drop(entries.pop(key))
        if len(self._order) != len(entries) or any(entries[key].pos < 0 for key in stale):
            self._reorder()

        # 2. Render the stale ones, in the large-cluster mode their endpoint counts are
        # likely to give (as render_payload guesses it); step 3 mends a wrong guess.
        if stale:
            if not all_slices:
                slice_groups = _group_slices(endpoint_slices, set(stale))
            bound = self._total - sum(entries[key].count for key in stale)
            guess = bound + sum(_endpoint_bound(slice_groups.get(key, ())) for key in stale) > _THRESHOLD
            for key in stale:
                entry = entries[key]
                ports, count = _prepare(ctx, entry.name, groups[key], slice_groups.get(key))
                self._total += count - entry.count
                entry.count = count
                self._put(entry, _render_service(ctx, ports, guess) if ports else _EMPTY_RENDER, guess)
        large = self._total > _THRESHOLD
        wanted = _changed_names(changed)
        if wanted is None:
            written = self._order
        else:
            written = [key for name in wanted for key in self._by_name.get(name, ())]

        # 3. Services whose own chains this payload writes, rendered in the other mode.
        again: List[ServiceKey] = []
        if self._in_mode[not large]:
            again = [key for key in written if entries[key].large is (not large)]
            if again:
                missing = {key for key in again if key not in groups}
                if missing:
                    groups.update(_group_services(services, missing))
                if not all_slices:
                    slice_groups = _group_slices(endpoint_slices, set(again))
                for key in again:
                    entry = entries[key]
                    ports = _prepare(ctx, entry.name, groups[key], slice_groups.get(key))[0]
                    self._put(entry, _render_service(ctx, ports, large) if ports else _EMPTY_RENDER, large)
        self.last_rendered = len(set(stale).union(again))

        # 4. Join every Service's pieces.
        if wanted is None:
            rendered = [entries[key].rendered for key in self._order]
            nat = [r[NAT] for r in rendered]
            chains = [r[LINES] for r in rendered]
        else:
            nat = list(self._capture)
            mine = sorted((entries[key].pos, entries[key].rendered) for key in written)
            for pos, r in mine:
                nat[pos] = r[NAT]
            chains = [r[LINES] for _, r in mine]
        return _payload(ctx, self._filter, nat, chains, wanted is None, existing_chains, self._active, large)

    def _put(self, entry: _Entry, rendered: _Rendered, large: bool) -> None:
        """Keep ``rendered`` (made in mode ``large``) as the entry's pieces."""
        active = self._active
        for chain in entry.rendered[CHAINS]:
            if active[chain] == 1:
                del active[chain]
            else:
                active[chain] -= 1
        for chain in rendered[CHAINS]:
            active[chain] = active.get(chain, 0) + 1
        entry.rendered = rendered
        self._set_mode(entry, large if entry.count > 0 else None)
        self._filter[entry.pos] = rendered[FILTER]
        self._capture[entry.pos] = rendered[CAPTURE]

    def _drop(self, entry: _Entry) -> None:
        for chain in entry.rendered[CHAINS]:
            if self._active[chain] == 1:
                del self._active[chain]
            else:
                self._active[chain] -= 1
        self._total -= entry.count
        self._set_mode(entry, None)

    def _reorder(self) -> None:
        entries = self._entries
        self._order = sorted(entries)
        self._by_name = {}
        for pos, key in enumerate(self._order):
            entry = entries[key]
            entry.pos = pos
            self._by_name.setdefault(entry.name, []).append(key)
        self._filter = [entries[key].rendered[FILTER] for key in self._order]
        self._capture = [entries[key].rendered[CAPTURE] for key in self._order]

    def _set_mode(self, entry: _Entry, large: Optional[bool]) -> None:
        if entry.large is not None:
            self._in_mode[entry.large] -= 1
        entry.large = large
        if large is not None:
            self._in_mode[large] += 1


_SHARED: Dict[NodeSettings, IncrementalRenderer] = {}
SHARED_RENDERERS = 8       # one holds ~20 MB at 10,000 Services


def shared_renderer(settings: NodeSettings) -> IncrementalRenderer:
    """This process's IncrementalRenderer for ``settings`` (one per node), for callers
    that are themselves made anew for every sync. At most ``SHARED_RENDERERS`` are kept
    (the oldest is dropped). Like the renderer itself, not for use from several threads
    at once."""
    renderer = _SHARED.get(settings)
    if renderer is None:
        if len(_SHARED) >= SHARED_RENDERERS:
            del _SHARED[next(iter(_SHARED))]
        renderer = _SHARED[settings] = IncrementalRenderer(settings)
    return renderer
