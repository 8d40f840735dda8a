"""Walk a packet through kube-proxy's rules without a kernel (upstream's packet-flow
tests, ``tracePacket`` in proxier_test.go).

The walk starts where the built-in jump rules lead: nat KUBE-SERVICES (as from
PREROUTING/OUTPUT), then, with the destination rewritten by the first DNAT, filter
KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS and KUBE-PROXY-FIREWALL. A rule
matches on source/destination (address or CIDR, negatable), ``--src-type``/``--dst-type
LOCAL`` (the node IPs and loopback are local), protocol and destination port; rules
that look at state (``--rcheck``, ``--mark``, ``--ctstate``) never match. A jump
taken through a ``--probability`` rule does not end the chain, so every endpoint a
service can choose is collected, in order.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Set

from kproxy.proxy.iptables.dump import Dump, Rule, Value, parse_dump


@dataclass
class FlowResult:
    outputs: List[str] = field(default_factory=list)   # "IP:port" per endpoint, or ACCEPT/DROP/REJECT
    masquerade: bool = False
    matches: List[str] = field(default_factory=list)   # the rules that matched, in order

    @property
    def output(self) -> str:
        return ", ".join(self.outputs)


def _addr_matches(value: Value, ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
        if "/" in value.value:
            hit = addr in ipaddress.ip_network(value.value, strict=False)
        else:
            hit = addr == ipaddress.ip_address(value.value)
    except ValueError:
        hit = False
    return hit != value.negated


class _Tracer:
    def __init__(self, dump: Dump, local_ips: Set[str]):
        self.dump = dump
        self.local_ips = local_ips
        self.result = FlowResult()

    def _type_matches(self, value: Value, ip: str) -> bool:
        kind = "LOCAL" if ip in self.local_ips else "not-matched"
        return value.matches(kind)

    def matches(self, rule: Rule, src: str, proto: str, dst: str, dport: str) -> bool:
        if rule.source is not None and not _addr_matches(rule.source, src):
            return False
        if rule.src_type is not None and not self._type_matches(rule.src_type, src):
            return False
        if rule.protocol is not None and not rule.protocol.matches(proto):
            return False
        if rule.destination is not None and not _addr_matches(rule.destination, dst):
            return False
        if rule.dst_type is not None and not self._type_matches(rule.dst_type, dst):
            return False
        if rule.destination_port is not None and not rule.destination_port.matches(dport):
            return False
        if rule.affinity_check is not None or rule.mark_check is not None or rule.ctstate_check is not None:
            return False
        return True

    def run(self, table: str, chain: str, src: str, proto: str, dst: str, dport: str) -> bool:
        c = self.dump.chain(table, chain)
        if c is None:
            return False
        for rule in c.rules:
            if rule.jump is None or not self.matches(rule, src, proto, dst, dport):
                continue
            self.result.matches.append(rule.raw)
            target = rule.jump.value
            if target == "KUBE-MARK-MASQ":
                self.result.masquerade = True
                continue
            if target in ("ACCEPT", "REJECT", "DROP"):
                self.result.outputs.append(target)
                return True
            if target == "DNAT":
                self.result.outputs.append(rule.dnat_destination.value if rule.dnat_destination else "?")
                return True
            if target in ("RETURN",):
                return False
            terminated = self.run(table, target, src, proto, dst, dport)
            if terminated and rule.probability is None:
                return True
        return False


def trace_packet(payload: str, source_ip: str, protocol: str, dest_ip: str, dest_port: int,
                 node_ips: Iterable[str] = ()) -> FlowResult:
    """Where a packet ends up: endpoints chosen (all candidates), ACCEPT/DROP/REJECT,
    and whether it is marked for masquerade. ``payload`` is restore or save text."""
    dump = parse_dump(payload) if isinstance(payload, str) else payload
    local = {"127.0.0.1", "::1", *node_ips}
    tracer = _Tracer(dump, local)
    proto = protocol.lower() or "tcp"
    dport = str(dest_port)
    tracer.run("nat", "KUBE-SERVICES", source_ip, proto, dest_ip, dport)
    if tracer.result.outputs:
        first = tracer.result.outputs[0]
        dest_ip = first.rsplit(":", 1)[0].strip("[]") if first.count(":") else first
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
        tracer.run("filter", chain, source_ip, proto, dest_ip, dport)
    return tracer.result


def first_dnat(result: FlowResult) -> Optional[str]:
    for out in result.outputs:
        if out not in ("ACCEPT", "DROP", "REJECT"):
            return out
    return None
