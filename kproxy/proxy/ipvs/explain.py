"""Offline walk of one packet through an :class:`IpvsPlan`: which virtual server takes
it, the real servers with their chances, persistence, and whether it is masqueraded.

The walk follows the order the kernel applies things to the first packet of a flow
that arrives at the node (a pod's or an outside client's; ``from_node`` packets start in
nat OUTPUT instead of nat PREROUTING):

1. nat PREROUTING -> KUBE-SERVICES (the ipset matches that set the masquerade mark);
2. routing: IPVS only sees packets for a local address (a node address, or one bound to
   kube-ipvs0); anything else is forwarded unchanged;
3. filter INPUT -> KUBE-IPVS-FILTER, KUBE-PROXY-FIREWALL (loadBalancerSourceRanges),
   KUBE-NODE-PORT (before IPVS, which hooks LOCAL_IN after the filter table);
4. IPVS: the virtual server for (dst, dport, proto) and its scheduler picks a real
   server; NAT ("Masq") forwarding rewrites the destination. A virtual server without
   real servers makes the kernel answer ICMP port unreachable (``ip_vs_leave``: "the TCP
   RST packet cannot be sent, instead that ICMP_PORT_UNREACH is sent here no matter it
   is TCP/UDP"), so a TCP client gets "connection refused" at once;
5. nat POSTROUTING -> KUBE-POSTROUTING, per real server: KUBE-LOOP-BACK (hairpin) and
   the mark decide MASQUERADE.

The iptables rules are read from the plan's payload text and matched with a small
evaluator of the matches IPVS mode writes (``-s/-d/-p/-i``, ``set``, ``addrtype``,
``physdev``, ``mark``, ``conntrack``, ``ipvs``). The result has the keys of the explain
report schema (kproxy/explain/schema.md, version 1) plus IPVS ones: ``backend``,
``scheduler``, ``virtual_server`` and ``real_servers``.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from kproxy.proxy.ipvs import names as n
from kproxy.proxy.ipvs.render import IPSet, IpvsPlan, RealServer, VirtualServer
from kproxy.proxy.netutil import parse_cidr_sloppy, parse_ip_sloppy

_USER_CHAINS = {"nat": set(n.NAT_CHAINS), "filter": set(n.FILTER_CHAINS)}
_TERMINAL = ("ACCEPT", "DROP", "REJECT", "MASQUERADE")

_MASQ_REASONS = {
    n.CLUSTER_IP: "a ClusterIP reached from outside the cluster CIDR (KUBE-CLUSTER-IP)",
    n.EXTERNAL_IP: "an external IP with externalTrafficPolicy Cluster (KUBE-EXTERNAL-IP)",
    n.NODE_PORT_TCP: "a NodePort with externalTrafficPolicy Cluster (KUBE-NODE-PORT-TCP)",
    n.NODE_PORT_UDP: "a NodePort with externalTrafficPolicy Cluster (KUBE-NODE-PORT-UDP)",
    n.NODE_PORT_SCTP: "a NodePort with externalTrafficPolicy Cluster (KUBE-NODE-PORT-SCTP-HASH)",
    n.LOAD_BALANCER: "a load-balancer IP with externalTrafficPolicy Cluster (KUBE-LOAD-BALANCER)",
    n.LOOP_BACK: "hairpin: the pod reached itself through the Service (KUBE-LOOP-BACK)",
}


@dataclass(frozen=True)
class _Packet:
    src: str
    dst: str
    proto: str
    dport: int
    mark: int = 0
    ipvs_vaddr: Optional[str] = None      # set once IPVS handled the packet (for -m ipvs)
    ipvs_vport: Optional[int] = None


@dataclass
class _Rule:
    table: str
    chain: str
    raw: str
    tokens: List[str]


class _Walker:
    def __init__(self, plan: IpvsPlan, node_ips: Sequence[str], cluster_cidr: Optional[str], from_node: bool):
        self.plan = plan
        self.node_ips = list(node_ips)
        self.local = set(node_ips) | set(plan.bound_addresses())
        self.cluster_nets = [net for net in (parse_cidr_sloppy(c) for c in (cluster_cidr or "").split(","))
                             if net is not None]
        self.from_node = from_node
        self.sets: Dict[str, IPSet] = {s.name: s for s in plan.ipsets.values()}
        self.upstream_name = {s.name: key for key, s in plan.ipsets.items()}
        self.mark_value = int(plan.mark, 16)
        self.chains: Dict[Tuple[str, str], List[_Rule]] = {}
        for table, rules in (("nat", plan.iptables.nat_rules), ("filter", plan.iptables.filter_rules)):
            for raw in rules:
                tokens = shlex.split(raw)
                chain = tokens[1]
                self.chains.setdefault((table, chain), []).append(_Rule(table, chain, raw, tokens[2:]))
        self.notes: List[str] = []
        self.mark_reasons: List[str] = []

    # ------------------------------------------------------------------ matching

    def is_local(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return addr.is_loopback or ip in self.local

    def in_cluster(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.cluster_nets if net.version == addr.version)

    def in_set(self, name: str, flags: str, pkt: _Packet) -> bool:
        st = self.sets.get(name)
        if st is None:
            return False
        dirs = flags.split(",")
        if st.set_type == n.BITMAP_PORT:
            port = pkt.dport if dirs[0] == "dst" else None
            return port is not None and str(port) in st.entries
        if st.set_type == n.HASH_IP:
            return (pkt.dst if dirs[0] == "dst" else pkt.src) in st.entries
        first = pkt.dst if dirs[0] == "dst" else pkt.src
        head = f"{first},{pkt.proto}:{pkt.dport}"
        if st.set_type == n.HASH_IP_PORT:
            return head in st.entries
        third = pkt.src if dirs[2] == "src" else pkt.dst
        if st.set_type == n.HASH_IP_PORT_IP:
            return f"{head},{third}" in st.entries
        addr = ipaddress.ip_address(third)
        for entry in st.entries:
            if entry.startswith(head + ","):
                net = ipaddress.ip_network(entry[len(head) + 1:], strict=False)
                if net.version == addr.version and addr in net:
                    return True
        return False

    def matches(self, rule: _Rule, pkt: _Packet) -> bool:
        t = rule.tokens
        i = 0
        neg = False
        while i < len(t):
            tok = t[i]
            if tok == "!":
                neg = True
                i += 1
                continue
            if tok == "-j":
                return True
            ok: Optional[bool] = None
            if tok in ("-s", "-d"):
                net = ipaddress.ip_network(t[i + 1], strict=False)
                addr = ipaddress.ip_address(pkt.src if tok == "-s" else pkt.dst)
                ok = addr.version == net.version and addr in net
                i += 2
            elif tok == "-p":
                ok = pkt.proto == t[i + 1]
                i += 2
            elif tok == "-i":
                # the bridge / interface-prefix local-traffic detectors: traffic from a pod
                ok = not self.from_node and self.in_cluster(pkt.src)
                i += 2
            elif tok == "-m":
                i += 2
                continue
            elif tok == "--comment":
                i += 2
                continue
            elif tok == "--match-set":
                ok = self.in_set(t[i + 1], t[i + 2], pkt)
                i += 3
            elif tok in ("--src-type", "--dst-type"):
                ok = self.is_local(pkt.src if tok == "--src-type" else pkt.dst)
                i += 2
            elif tok == "--physdev-is-in":
                # arrived through a bridge port: a pod behind the node's cni0 bridge
                ok = not self.from_node and self.in_cluster(pkt.src)
                i += 1
            elif tok == "--mark":
                value, _, mask = t[i + 1].partition("/")
                ok = (pkt.mark & int(mask or value, 16)) == int(value, 16)
                i += 2
            elif tok == "--ctstate":
                ok = "NEW" in t[i + 1].split(",")              # the first packet of a flow
                i += 2
            elif tok == "--vaddr":
                ok = pkt.ipvs_vaddr == t[i + 1]
                i += 2
            elif tok == "--vproto":
                ok = pkt.ipvs_vaddr is not None and pkt.proto == t[i + 1]
                i += 2
            elif tok == "--vport":
                ok = pkt.ipvs_vport == int(t[i + 1])
                i += 2
            else:
                self.notes.append(f"unknown match {tok!r} in {rule.raw!r}: assumed to match")
                i += 1
                ok = True
            if ok is not None and ok == neg:
                return False
            neg = False
        return True

    @staticmethod
    def target(rule: _Rule) -> Tuple[Optional[str], List[str]]:
        t = rule.tokens
        if "-j" not in t:
            return None, []
        k = t.index("-j")
        return t[k + 1], t[k + 2:]

    # ------------------------------------------------------------------ walking

    def hop(self, table: str, chain: str, rule: str, verdict: str, note: Optional[str] = None) -> dict:
        return {"table": table, "chain": chain, "rule": rule, "verdict": verdict, "note": note}

    def walk(self, table: str, chain: str, pkt: _Packet, hops: List[dict]) -> Tuple[Optional[str], _Packet]:
        """Run ``chain``; returns (terminal verdict or None, the packet with its mark)."""
        for rule in self.chains.get((table, chain), []):
            if not self.matches(rule, pkt):
                continue
            target, args = self.target(rule)
            if target is None:
                hops.append(self.hop(table, chain, rule.raw, "continue"))
                continue
            if target in _USER_CHAINS[table]:
                hops.append(self.hop(table, chain, rule.raw, f"jump {target}"))
                if target == n.KUBE_MARK_MASQ:
                    self.mark_reasons.append(self._why(rule, chain))
                verdict, pkt = self.walk(table, target, pkt, hops)
                if verdict is not None:
                    return verdict, pkt
                continue
            if target == "MARK":
                value = int(args[1].split("/")[0], 16)
                pkt = replace(pkt, mark=pkt.mark | value if args[0] == "--or-mark" else pkt.mark ^ value)
                hops.append(self.hop(table, chain, rule.raw, f"MARK {args[0][2:].replace('-mark', '')} {args[1]}"))
                continue
            if target == "RETURN":
                hops.append(self.hop(table, chain, rule.raw, "RETURN"))
                return None, pkt
            hops.append(self.hop(table, chain, rule.raw, target))
            if target in _TERMINAL:
                return target, pkt
        return None, pkt

    def _why(self, rule: _Rule, chain: str) -> str:
        t = rule.tokens
        if "--match-set" in t:
            name = self.upstream_name.get(t[t.index("--match-set") + 1], "")
            if name == n.CLUSTER_IP and not ("!" in t and ("-s" in t or "-i" in t)):
                return ("a ClusterIP, masquerade for every source (--masquerade-all, or no "
                        "local-traffic detector: src,dst)")
            if name in _MASQ_REASONS:
                return _MASQ_REASONS[name]
        if chain == n.KUBE_LOAD_BALANCER:
            return _MASQ_REASONS[n.LOAD_BALANCER]
        return f"marked by {rule.raw}"

    def builtin(self, table: str, chain: str, pkt: _Packet, hops: List[dict]) -> Tuple[Optional[str], _Packet]:
        """The implied jump rules from a built-in chain (as kube-proxy prepends them, the
        last ensured is the first in the chain), each walked in turn."""
        jumps = [j for j in self.plan.jump_rules if j.table == table and j.chain == chain][::-1]
        for j in jumps:
            rule = f'-A {chain} -m comment --comment "{j.comment}" -j {j.target}'
            hops.append(self.hop(table, chain, rule, f"jump {j.target}", "implied jump rule"))
            verdict, pkt = self.walk(table, j.target, pkt, hops)
            if verdict is not None:
                return verdict, pkt
        return None, pkt


def _probabilities(vs: VirtualServer) -> Tuple[List[float], str]:
    total = sum(rs.weight for rs in vs.real_servers)
    shares = [rs.weight / total if total else 0.0 for rs in vs.real_servers]
    sched = vs.scheduler
    if sched == "rr":
        how = f"rr: round robin, each of the {len(shares)} real servers takes every {len(shares)}th new connection"
    elif sched == "wrr":
        how = "wrr: weighted round robin, a share of weight/sum(weights) each"
    elif sched in ("sh", "dh", "mh"):
        what = {"sh": "source address", "dh": "destination address", "mh": "source address and port (mh-port)"}
        how = (f"{sched}: a hash of the {what[sched]} picks one real server, the same one every time; "
               f"over many clients each takes about weight/sum(weights)")
    else:
        how = (f"{sched}: the choice depends on the connections each real server holds now; with none "
               f"open and equal weights every real server is equally likely")
    return shares, how


def explain(plan: IpvsPlan, src: str, proto: str, dst: str, dport: int,
            node_ips: Optional[Sequence[str]] = None, cluster_cidr: Optional[str] = None,
            from_node: Optional[bool] = None) -> dict:
    """Explain a new connection ``src -> dst:dport/proto`` on the plan's node.

    ``node_ips`` are the node's own addresses (default: the plan's) and ``cluster_cidr``
    the pod network (default: the plan's detector). ``from_node`` says the node itself
    sends the packet; by default a source that is a node address, a kube-ipvs0 address
    or loopback counts as the node.
    """
    src_ip, dst_ip = parse_ip_sloppy(src), parse_ip_sloppy(dst)
    if src_ip is None or dst_ip is None:
        raise ValueError(f"not an IP address: {src if src_ip is None else dst}")
    proto = proto.lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"protocol must be tcp, udp or sctp, not {proto!r}")
    node_ips = [str(parse_ip_sloppy(i)) for i in (node_ips if node_ips is not None else plan.node_addresses)
                if parse_ip_sloppy(i) is not None]
    cluster_cidr = cluster_cidr if cluster_cidr is not None else plan.cluster_cidr
    src, dst, dport = str(src_ip), str(dst_ip), int(dport)
    if from_node is None:
        from_node = src_ip.is_loopback or src in node_ips or src in plan.bound_addresses()
    w = _Walker(plan, node_ips, cluster_cidr, from_node)
    pkt = _Packet(src, dst, proto, dport)
    hops: List[dict] = []
    entry = "nat OUTPUT" if from_node else "nat PREROUTING"
    report: dict = {
        "schema_version": 1, "source": "kproxy-render", "backend": "ipvs", "scheduler": plan.scheduler,
        "flow": {"src": src, "proto": proto, "dst": dst, "dport": dport, "node": plan.node_name,
                 "from_node": from_node, "node_ips": node_ips, "cluster_cidr": cluster_cidr, "entry": entry},
        "service": None, "hops": hops, "candidates": [], "virtual_server": None, "real_servers": [],
        "masquerade": {"applied": False, "reason": "no rule marks this packet for masquerade"},
        "verdict": None, "affinity": None, "notes": w.notes,
    }

    def done(action: str, reason: str) -> dict:
        report["verdict"] = {"action": action, "reason": reason}
        return report

    # 1. nat PREROUTING / OUTPUT
    verdict, pkt = w.builtin("nat", "OUTPUT" if from_node else "PREROUTING", pkt, hops)
    vs = plan.virtual_server(dst, dport, proto)
    if vs is not None:
        ns_name, _, port_name = vs.service.partition(":")
        namespace, _, name = ns_name.partition("/")
        report["service"] = {"namespace": namespace, "name": name, "port": port_name, "address": vs.kind}
        report["virtual_server"] = {
            "key": vs.key, "address": vs.address, "port": vs.port, "protocol": vs.protocol,
            "scheduler": vs.scheduler, "persistent_timeout": vs.persistent_timeout, "kind": vs.kind,
            "service": vs.service, "policy": vs.policy, "ipvsadm": vs.add_line()}
        if vs.note:
            w.notes.append(f"{vs.key}: {vs.note}")

    # 2. routing: IPVS sees only locally delivered packets
    if not w.is_local(dst):
        fwd: List[dict] = []
        verdict, pkt = w.builtin("filter", "FORWARD", pkt, fwd)
        hops.extend(fwd)
        if verdict in ("DROP", "REJECT"):
            return done(verdict, f"{dst} is not a local address; filter FORWARD says {verdict}")
        return done("ACCEPT", f"no virtual server: {dst} is not an address of this node nor bound to "
                              f"{plan.dummy_device}, so IPVS never sees the packet; it is routed on unchanged")

    # 3. filter INPUT (before IPVS's LOCAL_IN hook); node-originated packets meet IPVS in
    #    LOCAL_OUT first and filter OUTPUT after it.
    if not from_node:
        verdict, pkt = w.builtin("filter", "INPUT", pkt, hops)
        if verdict in ("DROP", "REJECT"):
            why = {"DROP": "dropped", "REJECT": "rejected"}[verdict]
            return done(verdict, f"{why} in filter INPUT before IPVS: {hops[-1]['rule']}")

    # 4. IPVS
    if vs is None:
        return done("ACCEPT", f"no virtual server for {proto.upper()} {dst}:{dport}: the packet is delivered "
                              f"to the node's own stack (a socket listening there, or a RST / ICMP "
                              f"port unreachable from the node)")
    ipvs_hop = w.hop("ipvs", "LOCAL_OUT" if from_node else "LOCAL_IN", vs.add_line(), "", None)
    if not vs.real_servers:
        ipvs_hop["verdict"] = "ICMP port unreachable"
        hops.append(ipvs_hop)
        return done("REJECT", f"virtual server {vs.key} has no real server: IPVS mode keeps the virtual "
                              f"server and the kernel (ip_vs_leave) answers ICMP port unreachable, so a TCP "
                              f"client gets 'connection refused' at once (no RST, no timeout)")
    if vs.persistent_timeout is not None:
        report["affinity"] = {"timeout_seconds": vs.persistent_timeout,
                              "note": (f"ClientIP session affinity is IPVS persistence (-p {vs.persistent_timeout}): "
                                       f"a client that connected within the last {vs.persistent_timeout} s goes to "
                                       f"the same real server through its persistence template; the shares are "
                                       f"what a new client gets")}
    shares, how = _probabilities(vs)
    ipvs_hop.update(verdict=f"schedule {vs.scheduler}", note=how)
    hops.append(ipvs_hop)
    base_chain = ["OUTPUT" if from_node else "PREROUTING", n.KUBE_SERVICES, f"IPVS {vs.key}"]
    masq_reasons: List[str] = []
    for rs, share in zip(vs.real_servers, shares):
        after = replace(pkt, dst=rs.address, dport=rs.port, ipvs_vaddr=vs.address, ipvs_vport=vs.port)
        c_hops = [w.hop("ipvs", ipvs_hop["chain"], _rs_line(vs, rs), f"DNAT to {rs}",
                        f"Masq forwarding, weight {rs.weight}, taken with probability {share:.4g}")]
        blocked = None
        if from_node:
            verdict, after = w.builtin("filter", "OUTPUT", after, c_hops)
            if verdict in ("DROP", "REJECT"):
                blocked = verdict
        masquerade = False
        if blocked is None:
            before = len(w.mark_reasons)
            verdict, after = w.builtin("nat", "POSTROUTING", after, c_hops)
            masquerade = verdict == "MASQUERADE"
            if masquerade:
                loop = any(h["verdict"] == "MASQUERADE" and n.LOOP_BACK in h["rule"] for h in c_hops)
                reason = _MASQ_REASONS[n.LOOP_BACK] if loop else "; ".join(dict.fromkeys(w.mark_reasons)) or "mark"
                masq_reasons.append(f"{rs}: {reason}")
            del w.mark_reasons[before:]
        report["candidates"].append({"endpoint": str(rs), "probability": share, "chains": base_chain,
                                     "hops": c_hops, "masquerade": masquerade, "weight": rs.weight,
                                     "blocked": blocked})
        report["real_servers"].append({"address": rs.address, "port": rs.port, "weight": rs.weight,
                                       "probability": share, "local": rs.is_local, "node": rs.node_name,
                                       "masquerade": masquerade})
        if (vs.policy == "Local" and not masquerade and not rs.is_local and not from_node
                and not w.in_cluster(src)):
            w.notes.append(f"{rs} is on another node and the source is kept (externalTrafficPolicy Local): "
                           f"its reply leaves that node directly and the client drops it")
    n_masq = sum(1 for c in report["candidates"] if c["masquerade"])
    if n_masq == len(report["candidates"]):
        reasons = sorted({r.split(": ", 1)[1] for r in masq_reasons})
        report["masquerade"] = {"applied": True, "reason": "; ".join(reasons)}
    elif n_masq:
        report["masquerade"] = {"applied": True, "reason": "only when " + "; ".join(masq_reasons)}
    else:
        why = "the source is kept"
        if vs.kind == "cluster IP" and w.in_cluster(src):
            why += f": a pod ({src} is inside {cluster_cidr}) reaching a ClusterIP"
        elif vs.policy == "Local" and vs.kind != "cluster IP":
            why += ": externalTrafficPolicy Local (the KUBE-*-LOCAL set RETURNs before KUBE-MARK-MASQ)"
        report["masquerade"] = {"applied": False, "reason": why}
    if all(c["blocked"] for c in report["candidates"]):
        return done(report["candidates"][0]["blocked"], "dropped by KUBE-IPVS-OUT-FILTER after IPVS")
    return done("DNAT", f"IPVS virtual server {vs.key} ({vs.scheduler}, Masq) rewrites the destination to one "
                        f"of {len(vs.real_servers)} real servers")


def _rs_line(vs: VirtualServer, rs: RealServer) -> str:
    return f"-a {vs.service_flag} {vs.endpoint} -r {rs} -m -w {rs.weight}"

