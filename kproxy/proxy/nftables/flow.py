"""Walk a packet through kube-proxy's nftables rules without a kernel (upstream's
``tracePacket`` in pkg/proxy/nftables/helpers_test.go).

The walk runs ``filter-prerouting-pre-dnat`` (stopping if it drops), then
``nat-prerouting`` (the first DNAT rewrites the destination), then
``filter-forward`` and, if that did not end it, ``filter-input``. Rules are read
piece by piece, as upstream does, recognising only the forms kube-proxy writes: address
and port matches, ``fib ... type local``, set and verdict-map lookups, ``jump``/
``goto``, ``drop``/``reject``/``return``, ``dnat to`` and the load balancers. ``ct
state new`` always matches and comments are ignored. Every endpoint a load balancer
can choose is followed, so the result lists all of them; a ``numgen ... == 0 goto``
step of the large-cluster cascade does not end its chain, like an iptables
``--probability`` jump.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Set, Union

from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.ruleset import Element, Table

_DEST_ADDR = re.compile(r"^ip6? daddr (!= )?(\S+)")
_DEST_ADDR_SET_NOT = re.compile(r"^ip6? daddr != \{([^}]*)\}")
_DEST_ADDR_SET = re.compile(r"^ip6? daddr \{([^}]*)\}")
_DEST_LOCAL = re.compile(r"^fib daddr type local")
_DEST_PORT = re.compile(r"^(tcp|udp|sctp) dport (\d+)")
_DEST_IP_LOOKUP = re.compile(r"^ip6? daddr @(\S+)")
_DEST_LOOKUP = re.compile(r"^ip6? daddr \. meta l4proto \. th dport @(\S+)")
_DEST_PORT_LOOKUP = re.compile(r"^meta l4proto \. th dport @(\S+)")
_DEST_DISPATCH = re.compile(r"^ip6? daddr \. meta l4proto \. th dport vmap @(\S+)$")
_DEST_PORT_DISPATCH = re.compile(r"^meta l4proto \. th dport vmap @(\S+)$")
_SRC_ADDR = re.compile(r"^ip6? saddr (!= )?([^@\s{]\S*)")
_SRC_ADDR_SET_NOT = re.compile(r"^ip6? saddr != \{([^}]*)\}")
_SRC_LOOKUP = re.compile(r"^ip6? saddr @(\S+)")
_SRC_LOCAL = re.compile(r"^fib saddr type local")
_IIF = re.compile(r'^iif(?:name)? (!= )?"?([^"\s]+)"?')
_VMAP_LB = re.compile(r"^numgen random mod \d+ vmap \{(.*)\}$")
_VMAP_ENTRY = re.compile(r"\d+ : goto (\S+)")
_CASCADE = re.compile(r"^numgen random mod (\d+) (?:== )?0 (goto|jump) (\S+)$")
_MASQ = re.compile(r"^jump " + re.escape(n.MARK_MASQ) + r"$")
_JUMP = re.compile(r"^(jump|goto) (\S+)$")
_RETURN = re.compile(r"^return$")
_VERDICT = re.compile(r"^(drop|reject)$")
_DNAT = re.compile(r"^meta l4proto (tcp|udp|sctp) dnat (?:ip6? )?to (\S+)$")
_UPDATE = re.compile(r"^update @\S+ \{ ip6? saddr \}$")
_IGNORED = re.compile(r'^ct state new\s*')


@dataclass
class FlowResult:
    outputs: List[str] = field(default_factory=list)   # "IP:port" per endpoint, or DROP/REJECT
    masquerade: bool = False
    matches: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)  # rules the walker could not read

    @property
    def output(self) -> str:
        return ", ".join(self.outputs)


def _addr_in(ip: str, text: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
        if "/" in text:
            return addr in ipaddress.ip_network(text, strict=False)
        return addr == ipaddress.ip_address(text)
    except ValueError:
        return False


def _none_in(ip: str, listing: str) -> bool:
    return not any(_addr_in(ip, a.strip()) for a in listing.replace(" ", "").split(",") if a.strip())


class _Tracer:
    def __init__(self, table: Table, local_ips: Set[str], in_interface: Optional[str]):
        self.t = table
        self.local = local_ips
        self.iif = in_interface
        self.r = FlowResult()

    def _elements(self, name: str) -> Iterable[Element]:
        s = self.t.sets.get(name)
        return s.elements.values() if s is not None else ()

    def _find(self, name: str, *parts: str) -> Optional[Element]:
        key = " . ".join(parts)
        s = self.t.sets.get(name)
        if s is None:
            return None
        e = s.elements.get(key)
        if e is not None:
            return e
        if "interval" not in s.props.flags:
            return None
        for e in s.elements.values():
            k = e.key.split(" . ")
            if len(k) == len(parts) and all(a == b or ("/" in a and _addr_in(b, a)) for a, b in zip(k, parts)):
                return e
        return None

    def run(self, chain_name: str, src: str, proto: str, dst: str, dport: str) -> bool:
        chain = self.t.chains.get(chain_name)
        if chain is None:
            return False
        for rule_obj in chain.rules:
            rule = rule_obj.text or ""
            rule = _IGNORED.sub("", rule)
            while rule:
                rule = rule.lstrip(" ")
                if not rule:
                    break
                m = None
                if (m := _DEST_IP_LOOKUP.match(rule)) and not _DEST_LOOKUP.match(rule):
                    rule = rule[m.end():]
                    if self._find(m.group(1), dst) is None:
                        rule = ""
                elif m := _DEST_DISPATCH.match(rule):
                    e = self._find(m.group(1), dst, proto, dport)
                    rule = e.value if e is not None else ""
                elif m := _DEST_LOOKUP.match(rule):
                    rule = rule[m.end():]
                    if self._find(m.group(1), dst, proto, dport) is None:
                        rule = ""
                elif m := _DEST_PORT_DISPATCH.match(rule):
                    e = self._find(m.group(1), proto, dport)
                    rule = e.value if e is not None else ""
                elif m := _DEST_PORT_LOOKUP.match(rule):
                    rule = rule[m.end():]
                    if self._find(m.group(1), proto, dport) is None:
                        rule = ""
                elif m := _DEST_ADDR_SET_NOT.match(rule):
                    rule = rule[m.end():]
                    if not _none_in(dst, m.group(1)):
                        rule = ""
                elif m := _DEST_ADDR_SET.match(rule):
                    rule = rule[m.end():]
                    if _none_in(dst, m.group(1)):
                        rule = ""
                elif m := _DEST_ADDR.match(rule):
                    rule = rule[m.end():]
                    if _addr_in(dst, m.group(2)) == bool(m.group(1)):
                        rule = ""
                elif m := _DEST_LOCAL.match(rule):
                    rule = rule[m.end():]
                    if dst not in self.local:
                        rule = ""
                elif m := _DEST_PORT.match(rule):
                    rule = rule[m.end():]
                    if (proto, dport) != (m.group(1), m.group(2)):
                        rule = ""
                elif m := _SRC_ADDR_SET_NOT.match(rule):
                    rule = rule[m.end():]
                    if not _none_in(src, m.group(1)):
                        rule = ""
                elif m := _SRC_LOOKUP.match(rule):
                    # affinity sets are filled by packets, never by the render: no match
                    rule = rule[m.end():]
                    if self._find(m.group(1), src) is None:
                        rule = ""
                elif m := _SRC_ADDR.match(rule):
                    rule = rule[m.end():]
                    if _addr_in(src, m.group(2)) == bool(m.group(1)):
                        rule = ""
                elif m := _SRC_LOCAL.match(rule):
                    rule = rule[m.end():]
                    if src not in self.local:
                        rule = ""
                elif m := _IIF.match(rule):
                    rule = rule[m.end():]
                    want = m.group(2)
                    hit = self.iif is not None and (self.iif == want or
                                                    (want.endswith("*") and self.iif.startswith(want[:-1])))
                    if hit == bool(m.group(1)):
                        rule = ""
                elif _MASQ.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    self.r.masquerade = True
                    rule = ""
                elif m := _CASCADE.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    self.run(m.group(3), src, proto, dst, dport)
                    rule = ""
                elif m := _JUMP.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    if self.run(m.group(2), src, proto, dst, dport):
                        return True
                    if m.group(1) == "goto":
                        return False
                    rule = ""
                elif m := _VERDICT.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    self.r.outputs.append(m.group(1).upper())
                    return True
                elif _RETURN.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    return False
                elif m := _DNAT.match(rule):
                    self.r.matches.append(rule_obj.text or "")
                    self.r.outputs.append(m.group(2))
                    return True
                elif _UPDATE.match(rule):
                    rule = ""
                elif m := _VMAP_LB.match(rule):
                    for target in _VMAP_ENTRY.findall(m.group(1)):
                        self.r.matches.append(rule_obj.text or "")
                        self.run(target, src, proto, dst, dport)
                    return True
                else:
                    self.r.unmatched.append(rule_obj.text or "")
                    rule = ""
        return False


def trace_packet(ruleset: Union[str, Table], source_ip: str, protocol: str, dest_ip: str, dest_port: int,
                 node_ips: Iterable[str] = (), in_interface: Optional[str] = None,
                 family: str = "ip") -> FlowResult:
    """Where a packet ends up: the endpoints it can be sent to (all candidates), or
    DROP/REJECT, and whether it is marked for masquerade. ``ruleset`` is a ``Table``
    or ``nft -f`` text; ``node_ips`` are the node's local addresses (for ``fib ...
    type local``); ``in_interface`` is matched by ``iif``/``iifname`` rules."""
    table = Table.from_text(ruleset, family) if isinstance(ruleset, str) else ruleset
    tracer = _Tracer(table, set(node_ips), in_interface)
    proto = (protocol or "tcp").lower()
    dport = str(dest_port)
    if tracer.run(n.FILTER_PREROUTING_PRE_DNAT, source_ip, proto, dest_ip, dport):
        return tracer.r
    tracer.run(n.NAT_PREROUTING, source_ip, proto, dest_ip, dport)
    if tracer.r.outputs:
        dest_ip = tracer.r.outputs[0].rsplit(":", 1)[0].strip("[]")
    if tracer.run(n.FILTER_FORWARD, source_ip, proto, dest_ip, dport):
        return tracer.r
    tracer.run(n.FILTER_INPUT, source_ip, proto, dest_ip, dport)
    return tracer.r
