"""What the iptables and nftables walkers share: the packet being walked, its branches,
and turning the branches into a Report.

A walk follows one NEW packet (conntrack state NEW, no affinity entry yet) through the
hooks of one node. Where a rule picks at random (``-m statistic --probability p``,
``numgen random mod N``) the walk forks: each branch carries the probability of getting
there, so the branches that end in a DNAT are the candidate endpoints with their
probabilities (rule i with p_i is taken with p_i * prod(1 - p_j, j < i)).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from kproxy.explain.report import (Affinity, Candidate, Flow, Hop, Masquerade, Report, ServiceRef,
                                   Verdict)

IPAddress = ipaddress._BaseAddress

# Why a packet was marked for masquerade (set by the walkers, worded by build_report).
OFF_CLUSTER = "off-cluster"
MASQUERADE_ALL = "masquerade-all"
EXTERNAL_CLUSTER = "external-cluster"
EXTERNAL_LOCAL_NODE = "external-local-node"
HAIRPIN = "hairpin"
OTHER = "other"

MAX_DEPTH = 64


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.strip().strip("[]"))


def network(text: str):
    """An address or CIDR as a network (``1.2.3.4`` is ``1.2.3.4/32``)."""
    return ipaddress.ip_network(text.strip(), strict=False)


def endpoint_text(addr: str, port: Optional[int]) -> str:
    a = ip(addr)
    host = f"[{a}]" if a.version == 6 else str(a)
    return f"{host}:{port}" if port is not None else host


def split_endpoint(text: str) -> Tuple[str, Optional[int]]:
    """``1.2.3.4:80`` / ``[fd00::1]:80`` / ``1.2.3.4`` -> (address, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if "-" in host:            # a range: the first address
        host = host.split("-", 1)[0]
    if "-" in port:
        port = port.split("-", 1)[0]
    return host, (int(port) if port.isdigit() else None)


_SPN = re.compile(r"(?:^|\s)([a-z0-9](?:[-a-z0-9.]*[a-z0-9])?)/([a-z0-9](?:[-a-z0-9.]*[a-z0-9])?)"
                  r"(?::([^\s:]+))?(?=\s|$)")


def service_from_comment(comment: Optional[str]) -> Optional[Tuple[ServiceRef, str]]:
    """The ServicePortName in one of kube-proxy's comments ("ns/svc:port cluster IP",
    "ns/svc:port -> 10.0.0.1:80", "masquerade traffic for ns/svc:port external
    destinations") and the words after it."""
    if not comment or comment.startswith("kubernetes "):
        return None
    m = _SPN.search(comment)
    if m is None:
        return None
    return ServiceRef(m.group(1), m.group(2), m.group(3) or ""), comment[m.end():].strip()


class Packet:
    """One branch of the walk: the packet as rewritten so far, and what happened to it."""

    def __init__(self, src: str, dst: str, proto: str, dport: int, from_node: bool):
        self.src = ip(src)
        self.dst = ip(dst)
        self.proto = proto
        self.dport = dport
        self.from_node = from_node
        self.prob = 1.0
        self.mark = 0
        self.ct = {"NEW"}
        self.hops: List[Hop] = []
        self.stack: List[str] = []
        self.call_hops: List[Optional[Hop]] = []
        self.dnat: Optional[str] = None
        self.dnat_chains: List[str] = []
        self.mark_reasons: List[Tuple[str, str, Hop]] = []    # (kind, detail, hop)
        self.masq_hop: Optional[Hop] = None                     # the MASQUERADE/SNAT that applied
        self.final: Optional[str] = None                        # ACCEPT / DROP / REJECT
        self.final_reason: Optional[str] = None
        self.service: Optional[ServiceRef] = None
        self.kube_rule_seen = False                             # a kube-proxy Service rule matched
        self.local_policy = False                               # went through an eTP/iTP Local chain
        self.nat_done: frozenset = frozenset()                  # nft hooks where a nat chain already NATed

    def fork(self, p: float) -> "Packet":
        c = Packet.__new__(Packet)
        c.__dict__.update(self.__dict__)
        c.prob = self.prob * p
        c.ct = set(self.ct)
        c.hops = list(self.hops)
        c.stack = list(self.stack)
        c.call_hops = list(self.call_hops)
        c.dnat_chains = list(self.dnat_chains)
        c.mark_reasons = list(self.mark_reasons)
        return c

    def note_service(self, ref: Optional[ServiceRef]) -> None:
        if ref is not None:
            self.kube_rule_seen = True
            if self.service is None:
                self.service = ref
            elif self.service.address is None and ref.address and (
                    (ref.namespace, ref.name, ref.port) == (self.service.namespace, self.service.name,
                                                           self.service.port)):
                self.service.address = ref.address

    def set_dnat(self, addr: str, port: Optional[int]) -> str:
        self.dst = ip(addr)
        if port is not None:
            self.dport = port
        self.ct.add("DNAT")
        self.dnat = endpoint_text(addr, self.dport)
        self.dnat_chains = list(self.stack)
        return self.dnat


class Walk:
    """Shared facts for one walk: the node's local addresses, notes, affinity."""

    def __init__(self, node_ips: Iterable[str], cluster_cidr: Optional[str]):
        self.node_ips = [ip(x) for x in node_ips]
        self.local = set(self.node_ips)
        self.cluster_nets = [network(c) for c in (cluster_cidr or "").split(",") if c.strip()]
        self.notes: List[str] = []
        self.affinity: Optional[Affinity] = None

    def is_local(self, addr: IPAddress) -> bool:
        return addr in self.local or addr.is_loopback

    def in_cluster(self, addr: IPAddress) -> Optional[bool]:
        if not self.cluster_nets:
            return None
        return any(addr.version == n.version and addr in n for n in self.cluster_nets)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def saw_affinity(self, seconds: Optional[int]) -> None:
        if self.affinity is None:
            t = f" (timeout {seconds}s)" if seconds else ""
            self.affinity = Affinity(seconds, f"ClientIP session affinity{t}: the affinity entry decides for a "
                                              "returning client, which goes back to the endpoint it had; a new "
                                              "client is balanced as the candidates show")


# ---------------------------------------------------------------------------------- report

def _common_prefix(lists: Sequence[List[Hop]]) -> int:
    if not lists:
        return 0
    n = min(len(x) for x in lists)
    for i in range(n):
        first = lists[0][i]
        if any(x[i] is not first and x[i] != first for x in lists[1:]):
            return i
    return n


def _mark_reason(kind: str, detail: str, hop: Hop, pkt: Packet, walk: Walk) -> str:
    if kind == OFF_CLUSTER:
        where = f" {detail}" if detail else ""
        return (f"source {pkt.src} is outside the cluster CIDR{where}: traffic from outside the pod "
                "network to a ClusterIP is masqueraded, so that replies come back through this node")
    if kind == MASQUERADE_ALL:
        return "every packet to this ClusterIP is masqueraded (kube-proxy --masquerade-all)"
    if kind == EXTERNAL_CLUSTER:
        return ("external destination (NodePort, externalIP or LoadBalancer IP) with externalTrafficPolicy "
                "Cluster: the client address is replaced by the node's, as the endpoint may be on another node")
    if kind == EXTERNAL_LOCAL_NODE:
        return ("the node itself connects to an external destination of a Service with "
                "externalTrafficPolicy Local")
    if kind == HAIRPIN:
        return (f"hairpin: the source {pkt.src} is the endpoint chosen ({pkt.dnat}); it is masqueraded to the "
                "node so that the reply comes back through the node")
    return f"marked for masquerade by {hop.table} {hop.chain}: {hop.rule}"


def _masq_reason(pkt: Packet, walk: Walk) -> str:
    if pkt.mark_reasons:
        kind, detail, hop = pkt.mark_reasons[0]
        return _mark_reason(kind, detail, hop, pkt, walk)
    hop = pkt.masq_hop
    return f"masqueraded by {hop.table} {hop.chain}: {hop.rule}" if hop else "masqueraded"


def _no_masq_reason(pkt: Packet, walk: Walk) -> str:
    if pkt.final in ("DROP", "REJECT"):
        return "the packet is not forwarded"
    if pkt.dnat is None:
        return "no Service rule marked the packet for masquerade"
    if pkt.mark_reasons and pkt.masq_hop is None:
        return "the packet was marked, but it is delivered locally (no nat POSTROUTING)"
    if pkt.local_policy:
        return ("externalTrafficPolicy/internalTrafficPolicy Local: only this node's endpoints are used and "
                "the client address is kept")
    if pkt.from_node:
        return "no rule marked the packet for masquerade"
    inside = walk.in_cluster(pkt.src)
    if inside:
        nets = ", ".join(str(n) for n in walk.cluster_nets)
        return f"source {pkt.src} is inside the cluster CIDR {nets}: pod traffic to a Service keeps its address"
    return "no rule marked the packet for masquerade"


def build_report(flow: Flow, branches: List[Packet], walk: Walk, source: str) -> Report:
    branches = [b for b in branches if b.prob > 0] or branches
    prefix = _common_prefix([b.hops for b in branches])
    common = branches[0].hops[:prefix] if branches else []

    delivered = [b for b in branches if b.final == "ACCEPT" and b.dnat]
    by_ep: Dict[str, Candidate] = {}
    for b in delivered:
        c = by_ep.get(b.dnat)
        if c is None:
            by_ep[b.dnat] = Candidate(b.dnat, b.prob, list(b.dnat_chains), b.hops[prefix:],
                                      masquerade=b.masq_hop is not None)
        else:
            c.probability += b.prob
            c.masquerade = c.masquerade or b.masq_hop is not None
    candidates = list(by_ep.values())

    service = next((b.service for b in branches if b.service), None)

    # masquerade
    masq = [b for b in branches if b.masq_hop is not None and b.final == "ACCEPT"]
    if masq:
        reason = _masq_reason(masq[0], walk)
        if delivered and len(masq) < len(delivered):
            eps = ", ".join(sorted({b.dnat for b in masq if b.dnat}))
            reason = f"only when {eps} is chosen: {reason}"
        masquerade = Masquerade(True, reason)
    else:
        ref = max(delivered or branches, key=lambda b: b.prob) if branches else None
        masquerade = Masquerade(False, _no_masq_reason(ref, walk) if ref else "no packet")

    # verdict
    if delivered:
        total = sum(b.prob for b in delivered)
        name = f" of {service.port_name}" if service else ""
        if len(candidates) == 1:
            reason = f"DNAT to {candidates[0].endpoint}{name}"
        else:
            reason = f"DNAT to one of {len(candidates)} endpoints{name}, chosen at random"
        others = [b for b in branches if b not in delivered]
        if others and total < 1 - 1e-9:
            o = max(others, key=lambda b: b.prob)
            reason += f"; otherwise ({(1 - total) * 100:.2f}%) {o.final}: {o.final_reason or ''}".rstrip(": ")
        verdict = Verdict("DNAT", reason)
    else:
        b = max(branches, key=lambda x: x.prob)
        action = b.final or "ACCEPT"
        if action == "ACCEPT" and not b.kube_rule_seen:
            reason = "no rule matched: not a Service address"
        else:
            reason = b.final_reason or f"{action}"
        verdict = Verdict(action, reason)

    return Report(flow=flow, service=service, hops=common, candidates=candidates, masquerade=masquerade,
                  verdict=verdict, source=source, affinity=walk.affinity, notes=list(walk.notes))
