"""Tell a live trace as a story, in Kubernetes terms, and as JSON and a Mermaid diagram.

The JSON shares its core keys with `kproxy explain` (flow, service, hops, candidates,
masquerade, verdict, source); a live trace adds what only the kernel can tell: the
packets seen on each hop, the conntrack entries, the trace events of every packet, and
what the client got back.  See kproxy/explain/schema.md.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

from kproxy.trace.kernel import ConntrackEntry, TraceEvent
from kproxy.trace.live import LiveTrace

_COMMENT = re.compile(r'^-A (\S+) .*?--comment (?:"([^"]*)"|(\S+))')
_DNAT = re.compile(r"--to-destination (\S+)")
# Where a packet's NAT decisions start and end: iptables' nat table, or the base chains
# of kube-proxy's nftables table.
_DNAT_ENTRY = {("nat", "PREROUTING"), ("nat", "OUTPUT"), ("kube-proxy", "nat-prerouting"),
               ("kube-proxy", "nat-output")}
_SNAT_CHAINS = {("nat", "POSTROUTING"), ("nat", "KUBE-POSTROUTING"), ("kube-proxy", "nat-postrouting"),
                ("kube-proxy", "masquerading")}


def _dnat_entry(e: TraceEvent) -> bool:
    return (e.table, e.chain) in _DNAT_ENTRY


def _snat(e: TraceEvent) -> bool:
    return (e.table, e.chain) in _SNAT_CHAINS


class RuleBook:
    """What iptables-save of the node says about kube-proxy's chains: the comments
    (Kubernetes names) and DNAT targets that the trace events do not print."""

    def __init__(self, rules: str):
        self.lines = [ln for ln in rules.splitlines() if ln.startswith("-A ")]
        self.comments: Dict[str, str] = {}
        self.dnat: Dict[str, str] = {}
        for line in rules.splitlines():
            m = _COMMENT.match(line)
            chain = line.split()[1] if line.startswith("-A ") else None
            if m and chain not in self.comments:
                self.comments[chain] = m.group(2) or m.group(3)
            if chain and chain.startswith("KUBE-SEP-"):
                d = _DNAT.search(line)
                if d:
                    self.dnat[chain] = d.group(1)

    def comment_of(self, chain: str, target: str, dst: str = "") -> str:
        """The comment of the rule in ``chain`` that jumps to ``target`` (preferring one
        whose destination is ``dst``): the Kubernetes name kube-proxy wrote on it."""
        best = ""
        for line in self.lines:
            if not line.startswith(f"-A {chain} ") or not line.endswith(f"-j {target}") and f"-j {target} " not in line:
                continue
            m = _COMMENT.match(line)
            text = (m.group(2) or m.group(3)) if m else ""
            if dst and f"-d {dst}/" in line:
                return text
            best = best or text
        return best


def _by_packet(events: List[TraceEvent]) -> List[List[TraceEvent]]:
    groups: Dict[tuple, List[TraceEvent]] = {}
    for e in events:
        groups.setdefault((e.node, e.id), []).append(e)
    return list(groups.values())


def _first_packet_rules(t: LiveTrace) -> List[TraceEvent]:
    """The rule events of the first packet on the client's node (its netfilter decisions)."""
    groups = [g for g in _by_packet(t.events) if g[0].node == t.entry_node]
    rules: List[TraceEvent] = []
    for g in groups:
        if any(e.table == "kproxy-trace" or e.table.startswith("kproxy-trace") for e in g) and \
                all(e.table.startswith("kproxy-trace") for e in g):
            continue
        if rules and any(_dnat_entry(e) for e in g):
            break                           # a second packet's nat walk: first packet done
        rules += [e for e in g if e.kind in ("rule", "policy") and not e.table.startswith("kproxy-trace")]
        if any(_snat(e) for e in g) or \
                any(e.verdict in ("drop",) or "reject" in e.text for e in g):
            break
    last_post = max((i for i, e in enumerate(rules) if _snat(e)), default=None)
    return rules if last_post is None else rules[:last_post + 1]


def build(t: LiveTrace) -> dict:
    book = RuleBook(t.rules)
    svc = t.target.service
    sp = t.target.service_port
    first = t.probes[0] if t.probes else {}
    sport = first.get("sport")
    flow_ct: Optional[ConntrackEntry] = next(
        (c for c in t.conntrack if c.node == t.entry_node and c.original.src == t.source.ip
         and c.original.sport == sport), None)
    rules = _first_packet_rules(t)
    dnat_event = next((e for e in rules if "dnat to" in e.text), None)
    # what could have happened: the same rules walked offline (kproxy explain)
    expected = t.expected
    candidates = expected["candidates"]
    # iptables mode jumps to KUBE-MARK-MASQ, nftables mode to mark-for-masquerade
    masq_rule = next((e for e in rules if e.verdict.endswith(("KUBE-MARK-MASQ", "mark-for-masquerade"))), None)
    masq_reason = ""
    if masq_rule is not None:
        c = masq_rule.chain
        if c.startswith(("KUBE-EXT-", "external-")):
            masq_reason = "traffic to an external destination (NodePort/LoadBalancer/externalIP) with externalTrafficPolicy Cluster"
        elif c.startswith(("KUBE-SEP-", "endpoint-")):
            masq_reason = "hairpin: the pod reached itself through its own Service"
        elif c.startswith(("KUBE-SVC-", "KUBE-SVL-", "service-", "local-")):
            masq_reason = "a source outside the cluster CIDR sent to a ClusterIP"
        else:
            masq_reason = f"marked in {c}"
    reject = next((e for e in rules if "reject" in e.text or e.verdict == "drop"), None)
    answered = [p for p in t.probes if p.get("ok")]

    if reject is not None:
        action = "REJECT" if "reject" in reject.text else "DROP"
        verdict = {"action": action, "reason": f"{reject.table} {reject.chain}: {reject.text}"}
        # the filter rule carries the Kubernetes reason ("ns/svc has no endpoints"); the
        # trace shows the rule without its comment, so find it in the node's ruleset
        target = "REJECT" if action == "REJECT" else "DROP"
        found = [ln for ln in book.lines if ln.startswith(f"-A {reject.chain} ") and f"-j {target}" in ln
                 and f"--dport {t.target.port}" in ln]
        found.sort(key=lambda ln: f"-d {t.target.ip}/" not in ln)
        m = _COMMENT.match(found[0]) if found else None
        if m:
            verdict["reason"] = m.group(2) or m.group(3)
        elif expected["verdict"]["action"] == action:
            verdict["reason"] = expected["verdict"]["reason"]      # nftables: the map element's comment
    elif flow_ct is not None and flow_ct.dnat:
        verdict = {"action": "DNAT", "reason": f"{flow_ct.original.dst}:{flow_ct.original.dport} -> "
                                               f"{flow_ct.reply.src}:{flow_ct.reply.sport}"}
    elif t.target.kind == "Headless":
        verdict = {"action": "ACCEPT", "reason": "headless Service: no ClusterIP, no DNAT; the pod IP is used directly"}
    elif answered:
        verdict = {"action": "ACCEPT", "reason": "no kube-proxy rule matched: not a Service address"}
    else:
        verdict = {"action": "DROP", "reason": "no answer and no rule verdict seen"}

    refused_after_dnat = (verdict["action"] == "DNAT" and first and not first.get("ok")
                          and "Refused" in first.get("error", ""))
    later = [g for g in _by_packet(t.events) if g[0].node == t.entry_node]
    later_nat = sum(1 for g in later[1:] if any(_dnat_entry(e) for e in g))
    report = {
        "source": "live",
        "flow": {"from": t.source.label, "src": t.source.ip, "sport": sport, "proto": t.target.proto.lower(),
                 "dst": t.target.ip, "dport": t.target.port, "node": t.entry_node, "kind": t.target.kind},
        "service": ({"namespace": svc.namespace, "name": svc.name, "port": sp.name or sp.port,
                     "type": svc.type} if svc is not None else None),
        "hops": [{"node": e.node, "table": e.table, "chain": e.chain, "rule": e.text, "verdict": e.verdict,
                  "comment": (book.comment_of(e.chain, e.verdict.split()[-1], t.target.ip)
                              if e.verdict.startswith(("jump", "goto")) else "")}
                 for e in rules],
        "candidates": candidates,
        "expected": {"verdict": expected["verdict"], "masquerade": expected["masquerade"]},
        "chosen": ({"chain": dnat_event.chain, "endpoint": dnat_event.text.split("dnat to", 1)[1].split()[0]}
                   if dnat_event else None),
        "masquerade": {"applied": bool(flow_ct and flow_ct.snat) or masq_rule is not None,
                       "reason": masq_reason or ("" if not (flow_ct and flow_ct.snat) else "SNAT seen in conntrack")},
        "verdict": verdict,
        "trap": ({"before": f"{flow_ct.original.dst}:{flow_ct.original.dport}",
                  "after": f"{flow_ct.reply.src}:{flow_ct.reply.sport}"} if flow_ct and flow_ct.dnat else None),
        "refused_after_dnat": bool(refused_after_dnat),
        "conntrack": [c.to_dict() for c in t.conntrack],
        "packets": t.packets,
        "trace_events": [e.to_dict() for e in t.events],
        "later_packets": {"count": max(0, len(later) - 1), "nat_walks": later_nat},
        "probes": t.probes,
        "pcap": t.pcap,
        "capture_errors": t.capture_errors,
        "seconds": round(t.seconds, 3),
    }
    # the keys a live trace shares with `kproxy explain` (kproxy/explain/schema.md)
    report["schema_version"] = expected["schema_version"]
    report["affinity"] = expected["affinity"]
    report["notes"] = expected["notes"]
    for key in ("from_node", "node_ips", "cluster_cidr", "entry"):
        report["flow"][key] = expected["flow"][key]
    if report["service"] is not None:
        report["service"]["port"] = sp.name or ""
        report["service"]["address"] = (expected["service"] or {}).get("address")
    for hop in report["hops"]:
        hop["note"] = None
    report["path"] = _path(report)
    report["diagram"] = mermaid(report)
    return report


def _path(report: dict) -> List[dict]:
    """The hops the first exchange crossed, in time order, with the addresses seen there."""
    flow = report["flow"]
    sport = flow["sport"]
    ct = next((c for c in report["conntrack"] if c["original"]["sport"] == sport), None)
    keys = {(flow["src"], sport)}
    if ct:
        keys |= {(ct["reply"]["dst"], ct["reply"]["dport"])}
    out, seen = [], set()
    for p in sorted(report["packets"], key=lambda p: p["time"]):
        ends = {(p["src"], p.get("sport")), (p["dst"], p.get("dport"))}
        if not ends & keys:
            continue
        key = (p["hop"], p["src"], p.get("sport"), p["dst"], p.get("dport"))
        if key in seen:
            continue
        seen.add(key)
        out.append({"hop": p["hop"], "src": f"{p['src']}:{p.get('sport', '')}", "dst": f"{p['dst']}:{p.get('dport', '')}",
                    "flags": p.get("flags", ""), "direction": p["direction"]})
    return out


def mermaid(report: dict) -> str:
    f = report["flow"]
    lines = ["sequenceDiagram", f"    participant C as {report['flow']['from']} ({f['src']})",
             f"    participant N as node {f['node']} (kube-proxy rules)"]
    trap = report["trap"]
    dest = trap["after"] if trap else f"{f['dst']}:{f['dport']}"
    lines.append(f"    participant P as endpoint {dest}")
    lines.append(f"    C->>N: {f['src']}:{f['sport']} -> {f['dst']}:{f['dport']}")
    v = report["verdict"]
    if trap:
        lines.append(f"    Note over N: TRAP: DNAT {trap['before']} -> {trap['after']}")
        if report["masquerade"]["applied"]:
            lines.append("    Note over N: masquerade (SNAT to the node)")
        lines.append(f"    N->>P: to {trap['after']}")
        if report["refused_after_dnat"]:
            lines.append("    P-->>C: RST (nobody listens on the target port)")
        else:
            lines.append("    P-->>N: reply")
            lines.append(f"    N-->>C: reply un-NATed: from {trap['before']}")
    else:
        lines.append(f"    Note over N: {v['action']}: {v['reason']}")
        if v["action"] == "REJECT":
            lines.append("    N-->>C: ICMP port unreachable / RST")
    return "\n".join(lines)


def text(report: dict, color: bool = False) -> str:
    def b(s: str) -> str:
        return f"\033[1m{s}\033[0m" if color else s

    def y(s: str) -> str:
        return f"\033[1;33m{s}\033[0m" if color else s

    f = report["flow"]
    out = []
    svc = report["service"]
    what = f"{svc['namespace']}/{svc['name']}:{svc['port']} ({f['kind']} {f['dst']}:{f['dport']})" if svc \
        else f"{f['dst']}:{f['dport']}"
    out.append(b(f"kproxy trace: {f['from']} -> {what}, {f['proto'].upper()}"))
    n = 1
    out.append(f"{n}. Sent: {f['src']}:{f['sport']} -> {f['dst']}:{f['dport']} from {f['from']}.")
    if f["kind"] in ("ClusterIP", "LoadBalancer"):
        out.append(f"   No interface anywhere owns {f['dst']}: only the rules on the client's node know it.")
    n += 1
    if f["kind"] == "Headless":
        out.append(f"{n}. Node {f['node']} forwarded it: no kube-proxy rule is written for a headless Service. "
                   "Packet 1, rule by rule:")
    else:
        out.append(f"{n}. Node {f['node']} matched it (kube-proxy's rules run on the node the packet enters). "
                   "Packet 1, rule by rule:")
    for h in report["hops"]:
        desc = f"{h['table']} {h['chain']}: {h['rule']}".rstrip()
        tail = f"  [{h['verdict']}]" if h["verdict"] else ""
        if h.get("comment"):
            tail += f"  \"{h['comment']}\""
        out.append(f"     {desc}{tail}")
    if report["candidates"]:
        n += 1
        chosen = (report.get("chosen") or {}).get("endpoint")
        out.append(f"{n}. Endpoint choice: {len(report['candidates'])} candidates; rule i of the cascade is "
                   "taken with 1/(n-i), so each new connection picks:")
        for c in report["candidates"]:
            mark = "  <- chosen" if c["endpoint"] == chosen else ""
            out.append(f"     {c['endpoint']:<22} probability {c['probability']:.3f}  via {' -> '.join(c['chains'][-2:])}{mark}")
    n += 1
    if report["trap"]:
        out.append(f"{n}. {y('TRAP: ' + report['trap']['before'] + ' -> ' + report['trap']['after'])}"
                   f"  (DNAT on node {f['node']}, recorded by conntrack)")
        ct = next((c for c in report["conntrack"] if c["original"]["sport"] == f["sport"]), None)
        if ct:
            o_, r_ = ct["original"], ct["reply"]
            out.append(f"     conntrack original {o_['src']}:{o_['sport']} -> {o_['dst']}:{o_['dport']}, "
                       f"reply {r_['src']}:{r_['sport']} -> {r_['dst']}:{r_['dport']}")
    else:
        out.append(f"{n}. No DNAT: {report['verdict']['reason']}")
    n += 1
    m = report["masquerade"]
    out.append(f"{n}. Source NAT: " + (f"masqueraded ({m['reason'] or 'SNAT'}): the pod sees the node, not the client"
                                        if m["applied"] else f"none: the endpoint sees the client's own {f['src']}"))
    if report["path"]:
        n += 1
        out.append(f"{n}. Hop by hop (first exchange):")
        for p in report["path"][:16]:
            out.append(f"     {p['hop']:<34} {p['src']:>21} -> {p['dst']:<21} {p['flags']}")
    n += 1
    probes = report["probes"]
    ok = [p for p in probes if p.get("ok")]
    if report["refused_after_dnat"]:
        out.append(f"{n}. The DNAT happened, then the endpoint answered with a RST: nothing listens on "
                   f"{report['trap']['after']} (a targetPort the container does not serve).")
    elif ok:
        ans = str(ok[0].get("answer", "")).strip().splitlines()
        out.append(f"{n}. Delivered; the answer came back from {f['dst']}:{f['dport']} "
                   f"(conntrack un-NATed the reply): {ans[0] if ans else ''}")
    else:
        out.append(f"{n}. No answer: {probes[0].get('error') if probes else 'nothing sent'}")
    lp = report["later_packets"]
    if report["trap"]:
        n += 1
        out.append(f"{n}. NAT is decided on the first packet only: the {lp['count']} later packets of this flow "
                   f"traced on node {f['node']} walked {lp['nat_walks']} nat chains; conntrack rewrote them.")
    out.append(b(f"Verdict: {report['verdict']['action']}: {report['verdict']['reason']}"))
    if report["capture_errors"]:
        out.append("capture problems: " + "; ".join(report["capture_errors"]))
    if report.get("pcap"):
        out.append(f"packets written to {report['pcap']}")
    return "\n".join(out)
