"""Explain where a packet to a Service goes, offline: no root, nothing sent.

Walks one NEW packet (source, protocol, destination, port) through a node's kube-proxy
rules and reports every endpoint it could be DNATed to with its probability, the rules
and chains on the way, whether it is masqueraded and why, and the final verdict.

    >>> from kproxy.explain import explain
    >>> report = explain(open("node1.iptables-save").read(), "10.244.1.5", "tcp",
    ...                  "10.96.0.10", 53, node_ips=["192.168.5.11"])   # doctest: +SKIP
    >>> print(report.text())                                           # doctest: +SKIP
    >>> report.to_dict()["candidates"]                                 # doctest: +SKIP

Rulesets: ``iptables-save`` output, an ``iptables-restore`` payload (what ``kproxy
render`` prints), ``nft list ruleset`` text or the ``add ...`` script kube-proxy feeds to
``nft -f``, and ``nft -j list ruleset`` JSON (upstream's nftables mode). The format is
detected. The JSON form of the report is documented in ``schema.md``.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

from kproxy.explain.report import (Affinity, Candidate, Flow, Hop, Masquerade, Report, ServiceRef,
                                   Verdict)
from kproxy.explain.ruleset import Ruleset, detect_format, parse_ruleset
from kproxy.explain import walk as _w

__all__ = ["Affinity", "Candidate", "Flow", "Hop", "Masquerade", "Report", "Ruleset", "ServiceRef",
           "Verdict", "detect_format", "explain", "explain_ruleset", "parse_ruleset"]

PROTOCOLS = ("tcp", "udp", "sctp")


def explain(ruleset_text: Union[str, Ruleset], src: str, proto: str, dst: str, dport: int,
            node_ips: Iterable[str] = (), cluster_cidr: Optional[str] = None, from_node: bool = False,
            *, node: Optional[str] = None, source: Optional[str] = None) -> Report:
    """Walk a NEW ``proto`` packet from ``src`` to ``dst:dport`` through a node's rules.

    ``ruleset_text`` is the ruleset text (any supported format) or a ``Ruleset`` from
    ``parse_ruleset`` (parse once, explain many). ``node_ips`` are the addresses
    ``addrtype LOCAL`` / ``fib ... type local`` match (loopback always does); for nft
    rulesets without them the ``nodeport-ips`` set is used. ``cluster_cidr`` (comma
    separated for dual stack) is the pod network; when not given it is read from the
    rules' local-traffic detector (``! -s CIDR -j KUBE-MARK-MASQ``) if there is one.

    ``from_node`` starts the walk where a packet the node sends starts (nat OUTPUT, the
    output hook) instead of where an arriving one does (nat PREROUTING, the prerouting
    hook); a source that is one of ``node_ips`` or a loopback address always starts
    there, as in the kernel. ``node`` is only a label for the report; ``source``
    overrides the report's ``source`` ("kproxy-render", "iptables-save", "nft").
    """
    rs = parse_ruleset(ruleset_text) if isinstance(ruleset_text, str) else ruleset_text
    return explain_ruleset(rs, src, proto, dst, dport, node_ips, cluster_cidr, from_node, node=node,
                           source=source)


def explain_ruleset(rs: Ruleset, src: str, proto: str, dst: str, dport: int,
                    node_ips: Iterable[str] = (), cluster_cidr: Optional[str] = None,
                    from_node: bool = False, *, node: Optional[str] = None,
                    source: Optional[str] = None) -> Report:
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
    dport = int(dport)
    if not 0 < dport < 65536:
        raise ValueError(f"port {dport} is out of range")
    src_ip, dst_ip = _w.ip(src), _w.ip(dst)
    if src_ip.version != dst_ip.version:
        raise ValueError(f"{src} and {dst} are of different IP families")
    ips: Sequence[str] = [str(_w.ip(x)) for x in node_ips]
    notes = []
    if not ips:
        ips = rs.node_ip_hints()
        if ips:
            notes.append(f"node IPs taken from the ruleset: {', '.join(ips)}")
        else:
            notes.append("no node IPs given: only loopback addresses count as local (addrtype LOCAL)")
    cidr = cluster_cidr
    if cidr is None:
        cidr = rs.cluster_cidr_hint()
        if cidr:
            notes.append(f"cluster CIDR taken from the rules' local-traffic detector: {cidr}")
    walk = _w.Walk(ips, cidr)
    walk.notes.extend(notes)
    local_src = walk.is_local(src_ip)
    if local_src and not from_node:
        walk.note(f"{src_ip} is an address of this node: the packet starts in the output path")
    from_node = bool(from_node or local_src)
    pkt = _w.Packet(str(src_ip), str(dst_ip), proto, dport, from_node)
    entry = rs.entry(from_node)
    flow = _w.Flow(src=str(src_ip), proto=proto, dst=str(dst_ip), dport=dport, node=node, from_node=from_node,
                   node_ips=list(ips), cluster_cidr=cidr, entry=entry)
    branches = rs.walk(walk, pkt)
    return _w.build_report(flow, branches, walk, source or rs.source)
