"""iptables rulesets for explain: ``iptables-save`` output or an ``iptables-restore``
payload (``kproxy render``), parsed once and walked offline.

Parsing is lazy: the text is split into chains up front (cheap), and a chain's rules are
tokenised the first time the walk enters it. Big chains (nat KUBE-SERVICES holds one
rule per Service address) are indexed by destination address, so a walk looks only at
the rules for its destination plus the few without a plain ``-d`` (e.g. the final
KUBE-NODEPORTS jump).

A payload without the built-in chains (a restore payload) gets the jump rules kube-proxy
ensures with ``iptables -I`` (kproxy.proxy.iptables.jumps), in the order they end up in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from kproxy.explain import walk as w
from kproxy.explain.report import Hop
from kproxy.proxy.iptables.jumps import all_jump_rules

BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
INDEX_MIN_RULES = 32

_TOKEN = re.compile(r'"((?:\\.|[^"\\])*)"|(\S+)')
_QUOTED = re.compile(r'"(?:\\.|[^"\\])*"')
_DST = re.compile(r'(?:^|\s)(!\s+)?(?:-d|--destination)\s+(\S+)')
_DPORT = re.compile(r'(?:^|\s)(!\s+)?(?:--dport|--destination-port)\s+(\S+)')
_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp", "58": "ipv6-icmp"}

# Match modules whose options explain understands, and ones that always match a NEW packet.
_KNOWN_MODULES = {"comment", "tcp", "udp", "sctp", "multiport", "addrtype", "mark", "conntrack", "state",
                  "statistic", "recent", "nfacct", "limit", "icmp", "icmp6", "hashlimit", "connmark"}


def tokens(text: str) -> List[str]:
    out = []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            out.append(m.group(1).replace('\\"', '"').replace("\\\\", "\\"))
        else:
            out.append(m.group(2))
    return out


def _port_range(text: str) -> Tuple[int, int]:
    if ":" in text:
        lo, hi = text.split(":", 1)
        return int(lo or 0), int(hi or 65535)
    return int(text), int(text)


def _int(text: str) -> int:
    return int(text, 0)


def _mark_mask(text: str) -> Tuple[int, int]:
    value, _, mask = text.partition("/")
    return _int(value), (_int(mask) if mask else 0xFFFFFFFF)


@dataclass
class Rule:
    chain: str
    position: int            # 1-based, as `iptables -L --line-numbers`
    text: str
    matches: List[Tuple[str, bool, object]] = field(default_factory=list)
    target: Optional[str] = None
    goto: bool = False
    targs: Dict[str, Optional[str]] = field(default_factory=dict)
    comment: Optional[str] = None
    unknown: List[str] = field(default_factory=list)
    probability: Optional[float] = None     # statistic match (kernel-quantised)
    recent_check: Optional[Tuple[bool, Optional[int]]] = None   # (negated, seconds) for --rcheck/--update


def parse_rule(chain: str, position: int, text: str) -> Rule:
    ws = tokens(text)
    if len(ws) >= 2 and ws[0] in ("-A", "--append", "-I", "--insert"):
        ws = ws[2:]
    rule = Rule(chain, position, text)
    neg = False
    in_target = False
    stat: Dict[str, str] = {}
    stat_neg = False
    recent: Dict[str, Optional[str]] = {}
    recent_neg = False
    i, n = 0, len(ws)

    def value() -> str:
        nonlocal i
        if i + 1 >= n:
            raise ValueError(f"option {ws[i]} needs a value: {text}")
        i += 1
        return ws[i]

    while i < n:
        t = ws[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            rule.target = value()
            rule.goto = t in ("-g", "--goto")
            in_target = True
        elif in_target:
            if t.startswith("-"):
                nxt = ws[i + 1] if i + 1 < n else None
                if nxt is not None and not nxt.startswith("--"):
                    rule.targs[t] = nxt
                    i += 1
                else:
                    rule.targs[t] = None
        elif t in ("-m", "--match"):
            mod = value()
            if mod not in _KNOWN_MODULES:
                rule.unknown.append(f"-m {mod}")
        elif t in ("-s", "--source"):
            rule.matches.append(("src", neg, [w.network(x) for x in value().split(",")]))
        elif t in ("-d", "--destination"):
            rule.matches.append(("dst", neg, [w.network(x) for x in value().split(",")]))
        elif t in ("-p", "--protocol"):
            p = value().lower()
            rule.matches.append(("proto", neg, _PROTO_NUMBERS.get(p, p)))
        elif t in ("-i", "--in-interface"):
            rule.matches.append(("iif", neg, value()))
        elif t in ("-o", "--out-interface"):
            rule.matches.append(("oif", neg, value()))
        elif t in ("--dport", "--destination-port"):
            rule.matches.append(("dport", neg, [_port_range(value())]))
        elif t in ("--dports", "--destination-ports"):
            rule.matches.append(("dport", neg, [_port_range(x) for x in value().split(",")]))
        elif t in ("--sport", "--source-port", "--sports", "--source-ports"):
            value()
            rule.unknown.append(t)
        elif t == "--ports":
            rule.matches.append(("anyport", neg, [_port_range(x) for x in value().split(",")]))
        elif t == "--src-type":
            rule.matches.append(("srctype", neg, set(value().upper().split(","))))
        elif t == "--dst-type":
            rule.matches.append(("dsttype", neg, set(value().upper().split(","))))
        elif t in ("--limit-iface-in", "--limit-iface-out", "--rsource", "--rdest", "--reap", "--rttl"):
            pass
        elif t == "--mark":
            rule.matches.append(("mark", neg, _mark_mask(value())))
        elif t in ("--ctstate", "--state"):
            rule.matches.append(("ctstate", neg, set(value().upper().split(","))))
        elif t == "--comment":
            rule.comment = value()
        elif t == "--mode":
            stat["mode"] = value()
        elif t == "--probability":
            stat["probability"] = value()
            stat_neg = neg
        elif t == "--every":
            stat["every"] = value()
            stat_neg = neg
        elif t == "--packet":
            value()
        elif t == "--name":
            recent["name"] = value()
        elif t in ("--rcheck", "--update", "--remove"):
            recent["check"] = t
            recent_neg = neg
        elif t == "--set":
            recent["set"] = None
        elif t == "--seconds":
            recent["seconds"] = value()
        elif t in ("--hitcount", "--mask"):
            value()
        elif t in ("--nfacct-name", "--limit", "--limit-burst"):
            value()
        elif t == "--syn":
            rule.matches.append(("syn", neg, None))
        elif t == "--tcp-flags":
            mask, comp = value(), value()
            rule.matches.append(("tcpflags", neg, (set(mask.split(",")), set(comp.split(",")))))
        elif t in ("-f", "--fragment"):
            rule.matches.append(("fragment", neg, None))
        else:
            rule.unknown.append(t)
            if i + 1 < n and not ws[i + 1].startswith("-"):
                i += 1
        neg = False
        i += 1

    if stat:
        if "probability" in stat:
            q = round(float(stat["probability"]) * 2 ** 31) / 2 ** 31    # the kernel's u32 threshold
            rule.probability = 1 - q if stat_neg else q
        elif "every" in stat:
            q = 1.0 / max(1, int(stat["every"]))
            rule.probability = 1 - q if stat_neg else q
    if "check" in recent:
        seconds = recent.get("seconds")
        rule.recent_check = (recent_neg, int(seconds) if seconds and seconds.isdigit() else None)
    return rule


class Chain:
    __slots__ = ("name", "policy", "lines", "implied", "_rules", "_index", "_wild", "_cache")

    def __init__(self, name: str, policy: Optional[str] = None):
        self.name = name
        self.policy = policy if policy not in (None, "-") else None
        self.lines: List[str] = []
        self.implied = False
        self._rules: Dict[int, Rule] = {}
        self._index: Optional[Dict[str, List[int]]] = None
        self._wild: List[int] = []
        self._cache: Dict[str, List[int]] = {}

    def rule(self, i: int) -> Rule:
        r = self._rules.get(i)
        if r is None:
            r = self._rules[i] = parse_rule(self.name, i + 1, self.lines[i])
        return r

    def positions(self, dst, dport: int) -> List[int]:
        """The indexes of the rules that can match a packet to ``dst:dport``, in order."""
        if len(self.lines) < INDEX_MIN_RULES:
            return list(range(len(self.lines)))
        if self._index is None:
            self._build_index()
        key = f"{dst} {dport}"
        hit = self._cache.get(key)
        if hit is None:
            exact = self._index.get(str(dst), []) + self._index.get(f":{dport}", [])
            hit = self._cache[key] = sorted(exact + self._wild) if exact else self._wild
        return hit

    def _build_index(self) -> None:
        """Rules with a plain ``-d ADDRESS`` go under the address, rules without ``-d``
        but with a plain ``--dport N`` under ``:N`` (KUBE-NODEPORTS), the rest are looked
        at for every packet."""
        index: Dict[str, List[int]] = {}
        wild: List[int] = []
        for i, line in enumerate(self.lines):
            bare = _QUOTED.sub('""', line) if '"' in line else line
            key = _dst_key(bare)
            if key is None and not _DST.search(bare):
                key = _dport_key(bare)
            if key is None:
                wild.append(i)
            else:
                index.setdefault(key, []).append(i)
        self._index, self._wild = index, wild


def _dst_key(line: str) -> Optional[str]:
    found = _DST.findall(line)
    if len(found) != 1 or found[0][0] or "," in found[0][1]:
        return None
    host, _, plen = found[0][1].partition("/")
    try:
        a = w.ip(host)
    except ValueError:
        return None
    if plen and int(plen) != a.max_prefixlen:
        return None
    return str(a)


def _dport_key(line: str) -> Optional[str]:
    found = _DPORT.findall(line)
    if len(found) != 1 or found[0][0] or not found[0][1].isdigit():
        return None
    return f":{int(found[0][1])}"


class Table:
    def __init__(self, name: str):
        self.name = name
        self.chains: Dict[str, Chain] = {}

    def chain(self, name: str, create: bool = False) -> Optional[Chain]:
        c = self.chains.get(name)
        if c is None and create:
            c = self.chains[name] = Chain(name)
        return c


class IptablesRuleset:
    """Tables of chains from iptables-save / iptables-restore text."""

    kind = "iptables"

    def __init__(self, text: str):
        self.tables: Dict[str, Table] = {}
        self.saved = False          # has built-in chains with policies: iptables-save output
        self._parse(text)
        self.implied_builtins = False
        self._add_jump_rules()

    @property
    def source(self) -> str:
        return "iptables-save" if self.saved else "kproxy-render"

    def _parse(self, text: str) -> None:
        table: Optional[Table] = None
        chains: Dict[str, Chain] = {}
        for raw in text.splitlines():
            if raw.startswith("-A ") and table is not None:     # the fast path: most lines are rules
                sp = raw.find(" ", 3)
                name = raw[3:sp] if sp > 0 else raw[3:]
                c = chains.get(name)
                if c is None:
                    c = table.chain(name, create=True)
                c.lines.append(raw)
                continue
            line = raw.strip()
            if not line or line[0] == "#":
                continue
            if line[0] == "[":                       # iptables-save -c: "[pkts:bytes] -A ..."
                end = line.find("]")
                line = line[end + 1:].lstrip()
            if line[0] == "*":
                table = self.tables.setdefault(line[1:].strip(), Table(line[1:].strip()))
                chains = table.chains
                continue
            if table is None:
                raise ValueError(f"iptables rules must start with a table (*nat, *filter): {raw!r}")
            if line.startswith("-A "):
                sp = line.find(" ", 3)
                name = line[3:sp] if sp > 0 else line[3:]
                table.chain(name, create=True).lines.append(line)
            elif line[0] == ":":
                parts = line[1:].split()
                name = parts[0]
                policy = parts[1] if len(parts) > 1 else None
                c = table.chain(name, create=True)
                if policy and policy != "-":
                    c.policy = policy
                    self.saved = True
            elif line == "COMMIT":
                table = None
            elif line.startswith(("-X ", "--delete-chain ")):
                table.chains.pop(line.split()[1], None)
            elif line.startswith(("-N ", "--new-chain ")):
                table.chain(line.split()[1], create=True)
            elif line.startswith(("-F ", "--flush ")):
                c = table.chain(line.split()[1])
                if c is not None:
                    c.lines = []
            elif line.startswith(("-P ", "--policy ")):
                parts = line.split()
                table.chain(parts[1], create=True).policy = parts[2]
            elif line.startswith(("-I ", "--insert ")):
                parts = line.split(None, 3)
                c = table.chain(parts[1], create=True)
                if len(parts) > 2 and parts[2].isdigit():
                    pos, rest = int(parts[2]) - 1, (parts[3] if len(parts) > 3 else "")
                else:
                    pos, rest = 0, line.split(None, 2)[2] if len(parts) > 2 else ""
                c.lines.insert(pos, f"-A {parts[1]} {rest}".rstrip())
            else:
                raise ValueError(f"cannot parse iptables line {raw!r}")

    def _add_jump_rules(self) -> None:
        """A restore payload has no built-in chains: add kube-proxy's jump rules (as
        ``iptables -I`` leaves them) for the tables and target chains it has."""
        for jr in all_jump_rules():
            table = self.tables.get(jr.table)
            if table is None or jr.target not in table.chains:
                continue
            c = table.chains.get(jr.chain)
            if c is not None and not c.implied:
                continue
            if c is None:
                c = table.chain(jr.chain, create=True)
                c.implied = True
                self.implied_builtins = True
            args = " ".join(f'"{a}"' if " " in a else a for a in jr.args())
            c.lines.insert(0, f"-A {jr.chain} {args}")
        for table in self.tables.values():
            for c in table.chains.values():
                if c.implied:
                    c._rules.clear()

    def entry(self, from_node: bool) -> str:
        return "nat OUTPUT" if from_node else "nat PREROUTING"

    def node_ip_hints(self) -> List[str]:
        return []

    def cluster_cidr_hint(self) -> Optional[str]:
        """The local-traffic detector's CIDR from a ``! -s CIDR -j KUBE-MARK-MASQ`` rule."""
        nat = self.tables.get("nat")
        if nat is None:
            return None
        pat = re.compile(r"!\s+-s\s+(\S+)\s.*-j KUBE-MARK-MASQ")
        for name, c in nat.chains.items():
            if name.startswith(("KUBE-SVC-", "KUBE-SVL-")):
                for line in c.lines:
                    m = pat.search(line)
                    if m:
                        return str(w.network(m.group(1)))
        return None

    # ------------------------------------------------------------------------------ walk

    def walk(self, walk: w.Walk, pkt: w.Packet) -> List[w.Packet]:
        if self.implied_builtins:
            walk.note("the payload has no built-in chains: the jump rules kube-proxy adds with iptables -I "
                      "(PREROUTING/OUTPUT -> KUBE-SERVICES, ...) are assumed, and built-in policies are ACCEPT")
        for t in ("nat", "filter"):
            if t not in self.tables:
                walk.note(f"the ruleset has no {t} table: its checks are skipped")
        if pkt.from_node:
            stages = [("nat", "OUTPUT"), ("filter", "OUTPUT"), ("nat", "POSTROUTING")]
        else:
            stages = [("nat", "PREROUTING")]
        live = [pkt]
        for table, chain in stages:
            live = self._stage(walk, table, chain, live)
        if not pkt.from_node:
            forward, local = [], []
            for p in live:
                (local if p.final is None and walk.is_local(p.dst) else forward).append(p)
            local = self._stage(walk, "filter", "INPUT", local)
            forward = self._stage(walk, "filter", "FORWARD", forward)
            forward = self._stage(walk, "nat", "POSTROUTING", forward)
            live = forward + local
        else:
            live = [q for p in live for q in
                    (self._stage(walk, "filter", "INPUT", [p]) if p.final is None and walk.is_local(p.dst)
                     else [p])]
        for p in live:
            if p.final is None:
                p.final = "ACCEPT"
        return live

    def _stage(self, walk: w.Walk, table: str, chain: str, packets: List[w.Packet]) -> List[w.Packet]:
        t = self.tables.get(table)
        out: List[w.Packet] = []
        for p in packets:
            if p.final is not None or t is None or chain not in t.chains:
                out.append(p)
                continue
            c = t.chains[chain]
            p.stack = [chain]
            p.call_hops = [None]
            for q, outcome in _Walker(self, walk, table).run(c, p, 0):
                if outcome in ("DROP", "REJECT"):
                    q.final = outcome
                elif outcome in ("RETURN", "END"):
                    policy = c.policy or "ACCEPT"
                    if table == "filter" or policy != "ACCEPT":
                        note = "assumed: a restore payload sets no policy" if c.implied else None
                        q.hops.append(Hop(table, chain, f"policy {policy}", f"policy {policy}", note))
                    if policy == "DROP":
                        q.final = "DROP"
                        q.final_reason = f"policy DROP of {table} {chain}"
                q.stack = []
                out.append(q)
        return out


class _Walker:
    def __init__(self, ruleset: IptablesRuleset, walk: w.Walk, table: str):
        self.rs = ruleset
        self.walk = walk
        self.table = table
        self.t = ruleset.tables[table]

    # -------------------------------------------------------------------------- matching

    def _type(self, types, addr) -> bool:
        if self.walk.is_local(addr):
            kind = "LOCAL"
        elif addr.is_multicast:
            kind = "MULTICAST"
        elif str(addr) == "255.255.255.255":
            kind = "BROADCAST"
        else:
            kind = "UNICAST"
        return kind in types

    def _iface(self, addr) -> bool:
        """-i/-o: explain knows addresses, not interfaces. A packet is taken to come in
        (-i) or leave (-o) through the interface a rule names when its source
        (destination) is in the cluster CIDR, i.e. on the pod side, as kube-proxy's
        interface-based local-traffic detectors assume."""
        self.walk.note("interface matches (-i/-o) are guessed: a rule's interface is taken to be the pod side, so "
                       "it matches when the packet's source (-i) or destination (-o) is in the cluster CIDR")
        return bool(self.walk.in_cluster(addr))

    def matches(self, rule: Rule, p: w.Packet) -> bool:
        for kind, neg, arg in rule.matches:
            if kind == "src":
                hit = any(p.src.version == n.version and p.src in n for n in arg)
            elif kind == "dst":
                hit = any(p.dst.version == n.version and p.dst in n for n in arg)
            elif kind == "proto":
                hit = arg in ("all", "0") or arg == p.proto
            elif kind == "dport":
                hit = any(lo <= p.dport <= hi for lo, hi in arg)
            elif kind == "anyport":
                hit = any(lo <= p.dport <= hi for lo, hi in arg)
            elif kind == "srctype":
                hit = self._type(arg, p.src)
            elif kind == "dsttype":
                hit = self._type(arg, p.dst)
            elif kind == "mark":
                value, mask = arg
                hit = (p.mark & mask) == value
            elif kind == "ctstate":
                hit = bool(arg & p.ct)
            elif kind == "iif":
                hit = False if p.from_node else self._iface(p.src)
            elif kind == "oif":
                hit = self._iface(p.dst)
            elif kind == "syn":
                hit = p.proto == "tcp"
            elif kind == "tcpflags":
                mask, comp = arg
                flags = {"SYN"} & (mask if "ALL" not in mask else {"SYN"})
                hit = p.proto == "tcp" and flags == (comp - {"NONE"})
            elif kind == "fragment":
                hit = False
            else:
                hit = False
            if hit == neg:
                return False
        if rule.recent_check is not None:
            negated, seconds = rule.recent_check
            self.walk.saw_affinity(seconds)
            if not negated:
                return False
        if rule.unknown:
            self.walk.note(f"{self.table} {rule.chain} rule {rule.position} uses {', '.join(rule.unknown)}, which "
                           "explain cannot evaluate: it is assumed not to match")
            return False
        return True

    # -------------------------------------------------------------------------- walking

    def run(self, chain: Chain, p: w.Packet, depth: int) -> List[Tuple[w.Packet, str]]:
        """Walk ``chain`` from its first rule. Outcomes: ACCEPT, DROP, REJECT, NAT (the
        nat table is done), RETURN / END (back to the caller)."""
        return self._from(chain, chain.positions(p.dst, p.dport), 0, p, depth)

    def _from(self, chain: Chain, positions: List[int], k: int, p: w.Packet, depth: int):
        while k < len(positions):
            rule = chain.rule(positions[k])
            k += 1
            if not self.matches(rule, p):
                continue
            prob = rule.probability
            if prob is not None and prob < 1.0:
                if prob <= 0.0:
                    continue
                taken = p.fork(prob)
                rest = p.fork(1.0 - prob)
                results = self._after(chain, positions, k, self.take(chain, rule, taken, depth), depth)
                return results + self._from(chain, positions, k, rest, depth)
            outs = self.take(chain, rule, p, depth)
            if len(outs) == 1 and outs[0][1] == "CONTINUE":
                p = outs[0][0]
                continue
            return self._after(chain, positions, k, outs, depth)
        return [(p, "END")]

    def _after(self, chain, positions, k, outs, depth):
        results = []
        for q, o in outs:
            if o == "CONTINUE":
                results += self._from(chain, positions, k, q, depth)
            else:
                results.append((q, o))
        return results

    def _hop(self, chain: Chain, rule: Rule, verdict: str, note: Optional[str] = None) -> Hop:
        if note is None and chain.implied:
            note = "implied: kube-proxy adds this jump rule with iptables -I"
        return Hop(self.table, chain.name, rule.text, verdict, note)

    def _service(self, chain: Chain, rule: Rule, p: w.Packet) -> None:
        parsed = w.service_from_comment(rule.comment)
        if parsed is None:
            return
        ref, rest = parsed
        if self.table == "filter":
            ref.address = {"KUBE-SERVICES": "cluster IP", "KUBE-PROXY-FIREWALL": "loadbalancer IP",
                           "KUBE-NODEPORTS": "health check node port"}.get(chain.name)
            if chain.name == "KUBE-EXTERNAL-SERVICES":
                ref.address = ("node port" if any(k == "dsttype" for k, _, _ in rule.matches)
                               else "external IP or loadbalancer IP")
        elif rest in ("cluster IP", "external IP", "loadbalancer IP"):
            ref.address = rest
        elif chain.name == "KUBE-NODEPORTS" and not rest:
            ref.address = "node port"
        elif rest.startswith("->") or chain.name.startswith(("KUBE-SEP-", "KUBE-SVC-", "KUBE-SVL-")):
            ref.address = None
        p.note_service(ref)

    def take(self, chain: Chain, rule: Rule, p: w.Packet, depth: int) -> List[Tuple[w.Packet, str]]:
        self._service(chain, rule, p)
        target = rule.target
        note = None
        if rule.probability is not None and rule.probability < 1.0:
            note = f"random: taken with probability {rule.probability:.10g} by the packets that get here"
        if target is None:
            p.hops.append(self._hop(chain, rule, "continue", note))
            return [(p, "CONTINUE")]
        if target in ("ACCEPT", "DROP", "REJECT"):
            hop = self._hop(chain, rule, target, note)
            p.hops.append(hop)
            if target != "ACCEPT" or rule.comment:
                p.final_reason = terminal_reason(self.table, chain.name, rule, target)
            return [(p, target)]
        if target == "RETURN":
            p.hops.append(self._hop(chain, rule, "RETURN", note))
            return [(p, "RETURN")]
        if target == "DNAT":
            to = rule.targs.get("--to-destination") or ""
            addr, port = w.split_endpoint(to)
            ep = p.set_dnat(addr, port)
            p.hops.append(self._hop(chain, rule, f"DNAT to {ep}", note))
            return [(p, "NAT")]
        if target in ("MASQUERADE", "SNAT"):
            hop = self._hop(chain, rule, target, note)
            p.hops.append(hop)
            p.masq_hop = hop
            return [(p, "NAT")]
        if target == "MARK":
            before = p.mark
            p.mark = apply_mark(p.mark, rule.targs)
            hop = self._hop(chain, rule, f"MARK {p.mark:#x}", note)
            p.hops.append(hop)
            if p.mark & ~before and chain.name != "KUBE-MARK-MASQ" and p.mark_reasons == [] \
                    and self.table == "nat":
                p.mark_reasons.append((w.OTHER, "", hop))
            return [(p, "CONTINUE")]
        sub = self.t.chains.get(target)
        if sub is None:
            p.hops.append(self._hop(chain, rule, f"{target} (not evaluated)", note))
            if target not in ("LOG", "NFLOG", "TRACE", "CONNMARK", "CT", "NOTRACK", "CHECKSUM", "TCPMSS"):
                self.walk.note(f"target {target} in {self.table} {chain.name} is not evaluated: the walk goes on")
            return [(p, "CONTINUE")]
        verb = "goto" if rule.goto else "jump"
        hop = self._hop(chain, rule, f"{verb} {target}", note)
        p.hops.append(hop)
        if target == "KUBE-MARK-MASQ":
            p.mark_reasons.append(mark_kind(chain.name, rule) + (hop,))
        if target.startswith("KUBE-SVL-"):
            p.local_policy = True
        if depth >= w.MAX_DEPTH:
            self.walk.note(f"stopped following jumps at depth {w.MAX_DEPTH} (a loop?) in {chain.name}")
            return [(p, "CONTINUE")]
        p.stack.append(target)
        p.call_hops.append(hop)
        outs = []
        for q, o in self.run(sub, p, depth + 1):
            if o in ("RETURN", "END"):
                q.stack.pop()
                q.call_hops.pop()
                o = "RETURN" if rule.goto else "CONTINUE"
            outs.append((q, o))
        return outs


def apply_mark(mark: int, targs: Dict[str, Optional[str]]) -> int:
    if "--set-xmark" in targs:
        value, mask = _mark_mask(targs["--set-xmark"] or "0")
        return (mark & ~mask) ^ value
    if "--set-mark" in targs:
        value, mask = _mark_mask(targs["--set-mark"] or "0")
        return (mark & ~mask) | value
    if "--or-mark" in targs:
        return mark | _int(targs["--or-mark"] or "0")
    if "--xor-mark" in targs:
        return mark ^ _int(targs["--xor-mark"] or "0")
    if "--and-mark" in targs:
        return mark & _int(targs["--and-mark"] or "0")
    return mark


def mark_kind(chain: str, rule: Rule) -> Tuple[str, str]:
    """Why kube-proxy's rule ``rule`` in ``chain`` jumps to KUBE-MARK-MASQ."""
    if chain.startswith("KUBE-SEP-"):
        return w.HAIRPIN, ""
    if chain.startswith("KUBE-EXT-"):
        if any(k == "srctype" for k, _, _ in rule.matches):
            return w.EXTERNAL_LOCAL_NODE, ""
        return w.EXTERNAL_CLUSTER, ""
    if chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
        for kind, neg, arg in rule.matches:
            if kind == "src" and neg:
                return w.OFF_CLUSTER, ",".join(str(n) for n in arg)
            if kind == "iif" and neg:
                return w.OFF_CLUSTER, f"(it does not come from {arg})"
        return w.MASQUERADE_ALL, ""
    return w.OTHER, ""


def terminal_reason(table: str, chain: str, rule: Rule, verdict: str) -> str:
    parsed = w.service_from_comment(rule.comment)
    if parsed is not None:
        ref, rest = parsed
        if rest == "has no endpoints":
            return f"{ref.port_name} has no endpoints"
        if rest == "has no local endpoints":
            return f"{ref.port_name} has no local endpoints on this node (traffic policy Local)"
        if rest.startswith("traffic not accepted by"):
            return (f"dropped by the load-balancer firewall: the source is not in the "
                    f"loadBalancerSourceRanges of {ref.port_name}")
        if rest == "health check node port":
            return f"accepted: health check node port of {ref.port_name}"
    if rule.comment == "block incoming localnet connections":
        return "dropped by KUBE-FIREWALL: connections to 127.0.0.0/8 from a non-loopback source"
    return f"{verdict} by {table} {chain} rule {rule.position}: {rule.text}"
