"""Walking a packet through an nftables ruleset (kproxy.explain.nft): the base chains of
each hook in priority order (prerouting, then input or forward and postrouting; output
and postrouting for the node's own packets), verdict maps, ``numgen`` forks."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from kproxy.explain import walk as w
from kproxy.explain.nft import (NftChain, NftError, NftRule, NftRuleset, NftTable, _Comp, _int,
                                service_from_chain)
from kproxy.explain.report import Hop


class _Walker:
    def __init__(self, rs: NftRuleset, walk: w.Walk, table: NftTable):
        self.rs = rs
        self.walk = walk
        self.t = table

    def note_rule(self, rule: NftRule, what: str) -> None:
        self.walk.note(f"{self.t.name} {rule.chain} rule {rule.position} uses {what}, which explain cannot "
                       "evaluate: it is assumed not to match")

    # ---- values

    def value(self, e, p: w.Packet):
        kind = e[0]
        if kind == "ip":
            if e[1] == "saddr":
                return p.src
            if e[1] == "daddr":
                return p.dst
            if e[1] == "protocol":
                return p.proto
            raise NftError(f"ip {e[1]}")
        if kind == "meta":
            if e[1] == "l4proto":
                return p.proto
            if e[1] == "mark":
                return p.mark
            if e[1] == "nfproto":
                return "ipv6" if p.dst.version == 6 else "ipv4"
            if e[1] in ("iifname", "iif"):
                self.walk.note("interface matches are guessed: the pod side is taken to be the interface a "
                               "rule names, so it matches when the source is in the cluster CIDR")
                return "<pod>" if self.walk.in_cluster(p.src) else "<other>"
            raise NftError(f"meta {e[1]}")
        if kind == "th":
            if e[1] is not None and e[1] != p.proto:
                return None
            if e[2] == "dport":
                return p.dport
            raise NftError(f"{e[1] or 'th'} {e[2]}")
        if kind == "ct":
            if e[1] == "state":
                return {s.lower() for s in p.ct} - {"dnat", "snat"}
            if e[1] == "status":
                return {s.lower() for s in p.ct} & {"dnat", "snat"}
            raise NftError(f"ct {e[1]}")
        if kind == "fib":
            flags, result = e[1], e[2]
            if result == "type" and flags[:1] in (("saddr",), ("daddr",)):
                addr = p.src if flags[0] == "saddr" else p.dst
                if self.walk.is_local(addr):
                    return "local"
                return "multicast" if addr.is_multicast else "unicast"
            raise NftError("fib " + " . ".join(flags) + f" {result}")
        if kind == "bit":
            _, op, inner, v = e
            x = self.value(inner, p)
            return x & v if op == "&" else (x | v if op == "|" else x ^ v)
        if kind == "concat":
            return tuple(self.value(x, p) for x in e[1])
        raise NftError(f"cannot evaluate {kind}")

    def compare(self, value, op: str, rhs, rule: NftRule) -> bool:
        kind, data = rhs
        if isinstance(value, tuple):
            values = value
        else:
            values = (value,)
        if any(v is None for v in values):      # e.g. "tcp dport" on a UDP packet: the rule does not match
            return False
        if kind == "named":
            s = self.t.sets.get(data)
            if s is None:
                raise NftError(f"no set @{data}")
            if s.dynamic:
                return op == "!="
            hit = s.lookup(values) is not None
        elif kind == "anon":
            hit = any(len(key) == len(values) and all(_Comp(k).matches(v) for k, v in zip(key, values))
                      for key in data)
        else:
            if isinstance(value, set):                       # ct state new,established
                hit = bool(value & {str(x).lower() for x in data})
            elif isinstance(value, int) and not isinstance(value, bool):
                hit = any(_int(x) == value if not _is_range(x) else _Comp(x).matches(value) for x in data)
            else:
                hit = any(_Comp(x).matches(value) for x in data)
        return hit if op == "==" else (not hit if op == "!=" else False)

    # ---- statements

    def run(self, chain: NftChain, p: w.Packet, depth: int):
        return self._from(chain, 0, p, depth)

    def _from(self, chain: NftChain, k: int, p: w.Packet, depth: int):
        while k < len(chain.rules):
            rule = chain.rules[k]
            k += 1
            outs = self.rule(chain, rule, p, depth)
            if len(outs) == 1 and outs[0][1] == "CONTINUE":
                p = outs[0][0]
                continue
            results = []
            for q, o in outs:
                if o == "CONTINUE":
                    results += self._from(chain, k, q, depth)
                else:
                    results.append((q, o))
            return results
        return [(p, "END")]

    def rule(self, chain: NftChain, rule: NftRule, p: w.Packet, depth: int):
        stmts = rule.stmts
        if rule.unknown:
            self.note_rule(rule, ", ".join(rule.unknown))
            return [(p, "CONTINUE")]
        return self._stmts(chain, rule, stmts, 0, p, depth, [])

    def _hop(self, chain: NftChain, rule: NftRule, verdict: str, note: Optional[str] = None) -> Hop:
        return Hop(f"{self.t.family} {self.t.name}", chain.name, rule.text, verdict, note)

    def _stmts(self, chain, rule, stmts, i, p, depth, done):
        """Run statements i.. of a rule; ``done`` says what it did so far (for the hop)."""
        while i < len(stmts):
            st = stmts[i]
            i += 1
            kind = st[0]
            try:
                if kind == "match":
                    _, left, op, rhs = st
                    if left[0] == "numgen":
                        raise NftError("numgen match")
                    if left == ("ip", "saddr") and rhs[0] == "named":
                        s = self.t.sets.get(rhs[1])
                        if s is not None and s.dynamic:
                            self.walk.saw_affinity(_seconds(s.timeout))
                    if not self.compare(self.value(left, p), op, rhs, rule):
                        return [(p, "CONTINUE")]
                    continue
                if kind == "vmap":
                    _, left, (mkind, data) = st
                    if left[0] == "numgen":
                        return self._numgen(chain, rule, left, data, p, depth)
                    value = self.value(left, p)
                    values = value if isinstance(value, tuple) else (value,)
                    if any(v is None for v in values):
                        return [(p, "CONTINUE")]
                    if mkind == "named":
                        m = self.t.sets.get(data)
                        if m is None:
                            raise NftError(f"no map @{data}")
                        hit = m.lookup(values)
                        if hit is None:
                            return [(p, "CONTINUE")]
                        comps, verdict, comment, keytext = hit
                        self._vmap_service(data, verdict, comment, p)
                        note = f"@{data} element {keytext} : {' '.join(verdict or [])}"
                        return self._verdict(chain, rule, verdict or ["continue"], p, depth, note, comment)
                    for key, verdict in data:
                        if len(key) == len(values) and all(_Comp(k).matches(v) for k, v in zip(key, values)):
                            return self._verdict(chain, rule, verdict, p, depth, None, None)
                    return [(p, "CONTINUE")]
                if kind == "verdict":
                    return self._verdict(chain, rule, [st[1]] + ([st[2]] if st[2] else []), p, depth, None,
                                         None)
                if kind == "dnat":
                    ep = p.set_dnat(st[1], st[2])
                    p.hops.append(self._hop(chain, rule, f"DNAT to {ep}"))
                    return [(p, "NAT")]
                if kind in ("snat", "masquerade"):
                    hop = self._hop(chain, rule, "MASQUERADE" if kind == "masquerade" else "SNAT")
                    p.hops.append(hop)
                    p.masq_hop = hop
                    return [(p, "NAT")]
                if kind == "markset":
                    _, left, rhs = st
                    before = p.mark
                    p.mark = rhs if isinstance(rhs, int) else self.value(rhs, p)
                    done.append(f"MARK {p.mark:#x}")
                    if p.mark & ~before and chain.name != "mark-for-masquerade" and not p.mark_reasons \
                            and chain.type != "filter":
                        p.mark_reasons.append((w.OTHER, "", self._hop(chain, rule, f"MARK {p.mark:#x}")))
                    continue
                if kind == "setupdate":
                    done.append("update set")
                    continue
                raise NftError(kind)
            except NftError as e:
                self.note_rule(rule, str(e))
                return [(p, "CONTINUE")]
        if rule.toks:
            p.hops.append(self._hop(chain, rule, ", ".join(done) or "continue"))
        return [(p, "CONTINUE")]

    def _vmap_service(self, mapname: str, verdict: Optional[list], comment: Optional[str], p: w.Packet) -> None:
        target = verdict[1] if verdict and len(verdict) > 1 else ""
        ref = service_from_chain(target)
        if ref is None and comment:
            parsed = w.service_from_comment(comment)
            ref = parsed[0] if parsed else None
        if ref is None:
            return
        if mapname == "service-ips":
            ref.address = "cluster IP" if target.startswith("service-") else "external IP or loadbalancer IP"
        elif mapname == "service-nodeports":
            ref.address = "node port"
        elif mapname == "firewall-ips":
            ref.address = "loadbalancer IP"
        elif mapname == "no-endpoint-services":
            ref.address = "service IP"
        elif mapname == "no-endpoint-nodeports":
            ref.address = "node port"
        p.note_service(ref)

    def _numgen(self, chain, rule, left, data, p, depth):
        _, mode, mod, offset = left
        if mode != "random":
            self.walk.note(f"numgen {mode} in {chain.name} is counted as random")
        if isinstance(data, str):
            m = self.t.sets.get(data)
            entries = [(e[3].split(" . "), e[1]) for e in m.elements] if m else []
        else:
            entries = data
        groups: Dict[str, Tuple[list, int]] = {}
        order: List[str] = []
        unmatched = 0
        for n in range(offset, offset + mod):
            hit = None
            for key, verdict in entries:
                if len(key) == 1 and _Comp(key[0]).matches(n):
                    hit = verdict
                    break
            if hit is None:
                unmatched += 1
                continue
            text = " ".join(hit)
            if text not in groups:
                groups[text] = (hit, 0)
                order.append(text)
            groups[text] = (hit, groups[text][1] + 1)
        results = []
        for text in order:
            verdict, count = groups[text]
            q = p.fork(count / mod)
            note = f"random: numgen value picks this element with probability {count}/{mod}"
            results += self._verdict(chain, rule, verdict, q, depth, note, None)
        if unmatched:
            results.append((p.fork(unmatched / mod), "CONTINUE"))
        return results

    def _verdict(self, chain, rule, verdict: list, p: w.Packet, depth: int, note: Optional[str],
                 comment: Optional[str]):
        kind = verdict[0]
        target = verdict[1] if len(verdict) > 1 else None
        if kind in ("accept", "drop", "reject"):
            v = kind.upper()
            p.hops.append(self._hop(chain, rule, v, note))
            if kind != "accept" or rule.comment or comment:
                p.final_reason = self._terminal_reason(chain, rule, v, comment, p)
            return [(p, v)]
        if kind == "return":
            p.hops.append(self._hop(chain, rule, "RETURN", note))
            return [(p, "RETURN")]
        if kind == "continue":
            p.hops.append(self._hop(chain, rule, "continue", note))
            return [(p, "CONTINUE")]
        if kind not in ("jump", "goto") or target is None:
            p.hops.append(self._hop(chain, rule, " ".join(verdict), note))
            self.walk.note(f"verdict {' '.join(verdict)} in {chain.name} is not evaluated: the walk goes on")
            return [(p, "CONTINUE")]
        sub = self.t.chains.get(target)
        hop = self._hop(chain, rule, f"{kind} {target}", note)
        p.hops.append(hop)
        if sub is None:
            self.walk.note(f"chain {target} is not in the ruleset")
            return [(p, "CONTINUE")]
        ref = service_from_chain(target)
        if ref is not None:
            p.note_service(ref)
        if target == "mark-for-masquerade":
            p.mark_reasons.append(_mark_kind(chain.name, rule) + (hop,))
        if target.startswith("local-"):
            p.local_policy = True
        if depth >= w.MAX_DEPTH:
            self.walk.note(f"stopped following jumps at depth {w.MAX_DEPTH} in {chain.name}")
            return [(p, "CONTINUE")]
        p.stack.append(target)
        p.call_hops.append(hop)
        outs = []
        for q, o in self.run(sub, p, depth + 1):
            if o in ("RETURN", "END"):
                q.stack.pop()
                q.call_hops.pop()
                o = "RETURN" if kind == "goto" else "CONTINUE"
            elif o in ("DROP", "REJECT") and target == "reject-chain" and comment:
                q.final_reason = self._terminal_reason(chain, rule, o, comment, q)
            outs.append((q, o))
        return outs

    def _terminal_reason(self, chain, rule, verdict: str, comment: Optional[str], p: w.Packet) -> str:
        if comment and chain.name in ("service-endpoints-check", "nodeport-endpoints-check"):
            parsed = w.service_from_comment(comment)
            name = parsed[0].port_name if parsed else comment
            if verdict == "REJECT":
                return f"{name} has no endpoints"
            return f"{name} has no local endpoints on this node (traffic policy Local)"
        if chain.name.startswith("firewall-"):
            ref = service_from_chain(chain.name)
            name = ref.port_name if ref else chain.name
            return f"dropped by the load-balancer firewall: the source is not in the loadBalancerSourceRanges of {name}"
        c = rule.comment or ""
        if c.startswith("Reject traffic to invalid ports of ClusterIPs"):
            return f"{p.dst} is a ClusterIP, but no Service uses it with port {p.dport}/{p.proto}"
        if c.startswith("Drop traffic to unallocated ClusterIPs"):
            return f"{p.dst} is in the service CIDR, but no Service has it"
        if comment:
            return f"{verdict}: {comment}"
        return f"{verdict} by {self.t.name} {chain.name} rule {rule.position}: {rule.text}"


def _is_range(x: str) -> bool:
    return "-" in x[1:]


def _seconds(timeout: Optional[str]) -> Optional[int]:
    if not timeout:
        return None
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", timeout)
    if not m:
        return None
    h, mi, s = (int(x) if x else 0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def _mark_kind(chain: str, rule: NftRule) -> Tuple[str, str]:
    if chain.startswith("endpoint-"):
        return w.HAIRPIN, ""
    if chain.startswith("external-"):
        if "fib saddr type local" in rule.text:
            return w.EXTERNAL_LOCAL_NODE, ""
        return w.EXTERNAL_CLUSTER, ""
    if chain.startswith(("service-", "local-")):
        m = re.search(r"saddr != (\S+)", rule.text)
        if m:
            return w.OFF_CLUSTER, m.group(1)
        if "iifname !=" in rule.text:
            return w.OFF_CLUSTER, ""
        return w.MASQUERADE_ALL, ""
    return w.OTHER, ""


# ---- the walk over hooks

def _walk_hook(rs: NftRuleset, walk: w.Walk, hook: str, packets: List[w.Packet]) -> List[w.Packet]:
    out: List[w.Packet] = []
    for p in packets:
        if p.final is not None:
            out.append(p)
            continue
        family = "ip6" if p.dst.version == 6 else "ip"
        chains = sorted(((c.priority, t, c) for t in rs.tables.values() if t.family in (family, "inet")
                         for c in t.chains.values() if c.hook == hook),
                        key=lambda x: x[0])
        live = [p]
        for _, t, c in chains:
            nxt = []
            for q in live:
                if q.final is not None:
                    nxt.append(q)
                    continue
                if c.type == "nat" and hook in q.nat_done:
                    nxt.append(q)
                    continue
                q.stack = [c.name]
                q.call_hops = [None]
                for r, o in _Walker(rs, walk, t).run(c, q, 0):
                    if o in ("DROP", "REJECT"):
                        r.final = o
                    elif o in ("END", "RETURN") and c.policy == "drop":
                        r.hops.append(Hop(f"{t.family} {t.name}", c.name, "policy drop", "policy DROP"))
                        r.final = "DROP"
                        r.final_reason = f"policy drop of {t.name} {c.name}"
                    elif o == "NAT":
                        r.nat_done = r.nat_done | {hook}
                    r.stack = []
                    nxt.append(r)
            live = nxt
        out += live
    return out


def walk_ruleset(rs: NftRuleset, walk: w.Walk, pkt: w.Packet) -> List[w.Packet]:
    if not rs.tables:
        walk.note("the nft ruleset has no tables")
    if pkt.from_node:
        live = _walk_hook(rs, walk, "output", [pkt])
        live = _walk_hook(rs, walk, "postrouting", live)
        local = [p for p in live if p.final is None and walk.is_local(p.dst)]
        rest = [p for p in live if p not in local]
        live = rest + _walk_hook(rs, walk, "input", local)
    else:
        live = _walk_hook(rs, walk, "prerouting", [pkt])
        local = [p for p in live if p.final is None and walk.is_local(p.dst)]
        fwd = [p for p in live if p not in local]
        fwd = _walk_hook(rs, walk, "forward", fwd)
        fwd = _walk_hook(rs, walk, "postrouting", fwd)
        live = fwd + _walk_hook(rs, walk, "input", local)
    for p in live:
        if p.final is None:
            p.final = "ACCEPT"
    return live
