"""Reading what the kernel did: nftables trace events and conntrack entries.

`nft monitor trace` prints one line per rule a traced packet met, grouped by a
trace id (one per packet per hook):

    trace id 9f1c ip nat KUBE-SERVICES rule ... jump KUBE-SVC-... (verdict jump KUBE-SVC-...)

iptables-nft rules are nftables rules, so this works for kube-proxy's iptables mode
as well as its nftables mode.  Tracing is switched on only for one flow, by a table of
kproxy's own (`ip kproxy-trace-<id>`) added for the trace and deleted after it.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from kproxy.kernel import process

_TRACE = re.compile(r"^trace id (?P<id>\S+) (?P<family>\S+) (?P<table>\S+) (?P<chain>\S+) (?P<what>packet|rule|policy|verdict)\s*(?P<rest>.*)$")
_VERDICT = re.compile(r"\(verdict (?P<verdict>[^)]*)\)\s*$")


@dataclass
class TraceEvent:
    node: str
    id: str
    table: str
    chain: str
    kind: str                 # packet, rule, policy
    text: str                 # the rule (or packet description)
    verdict: str = ""

    def to_dict(self) -> dict:
        return {"node": self.node, "id": self.id, "table": self.table, "chain": self.chain,
                "kind": self.kind, "rule": self.text, "verdict": self.verdict}


def parse_trace(node: str, text: str) -> List[TraceEvent]:
    events = []
    for line in text.splitlines():
        m = _TRACE.match(line.strip())
        if not m:
            continue
        rest = m.group("rest").strip()
        verdict = ""
        v = _VERDICT.search(rest)
        if v:
            verdict = v.group("verdict")
            rest = rest[:v.start()].strip()
        if m.group("what") == "policy":
            verdict, rest = rest, f"policy {rest}"
        rest = re.sub(r"counter packets \d+ bytes \d+ ?", "", re.sub(r"\s+", " ", rest)).strip()
        events.append(TraceEvent(node, m.group("id"), m.group("table"), m.group("chain"),
                                 m.group("what"), rest, verdict))
    return events


def trace_table(name: str, match: str) -> str:
    """An nftables table that sets nftrace on matching packets, after conntrack (-150)
    and before DNAT (-100), on packets coming in and on the node's own."""
    return (f"table ip {name} {{\n"
            f"  chain pre {{ type filter hook prerouting priority -150; {match} meta nftrace set 1; }}\n"
            f"  chain out {{ type filter hook output priority -150; {match} meta nftrace set 1; }}\n"
            f"}}\n")


def nft(ns: str, script: str) -> None:
    res = subprocess.run(process.exec_argv(ns, ["nft", "-f", "-"]), input=script, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {res.stderr.strip()}")


def delete_table(ns: str, name: str) -> None:
    subprocess.run(process.exec_argv(ns, ["nft", "delete", "table", "ip", name]), capture_output=True)


@dataclass
class Tuple4:
    src: str
    dst: str
    sport: int
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport}"


@dataclass
class ConntrackEntry:
    node: str
    proto: str
    state: str
    original: Tuple4
    reply: Tuple4
    flags: List[str] = field(default_factory=list)

    @property
    def dnat(self) -> bool:
        return (self.reply.src, self.reply.sport) != (self.original.dst, self.original.dport)

    @property
    def snat(self) -> bool:
        return (self.reply.dst, self.reply.dport) != (self.original.src, self.original.sport)

    def to_dict(self) -> dict:
        return {"node": self.node, "proto": self.proto, "state": self.state,
                "original": vars(self.original), "reply": vars(self.reply), "flags": self.flags,
                "dnat": self.dnat, "snat": self.snat}


_KV = re.compile(r"(\w+)=(\S+)")


def conntrack_events(ns: str, proto: str) -> subprocess.Popen:
    """Follow conntrack's events (NEW, UPDATE, DESTROY) in ``ns``: unlike a listing after
    the fact, this also sees a flow the kernel dropped at once (a SYN answered by RST)."""
    return subprocess.Popen(process.exec_argv(ns, ["conntrack", "-E", "-p", proto]), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def parse_conntrack(node: str, proto: str, text: str) -> List[ConntrackEntry]:
    """Entries from `conntrack -L` or `conntrack -E` lines; for events, the last state of
    each flow (keyed by its original tuple) wins."""
    flows: Dict[tuple, ConntrackEntry] = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("["):
            words = words[1:]
        if len(words) < 4:
            continue
        state = words[3] if proto == "tcp" and "=" not in words[3] else ""
        pairs = _KV.findall(line)
        tuples = []
        cur: Dict[str, str] = {}
        for k, v in pairs:
            if k in cur:
                tuples.append(cur)
                cur = {}
            if k in ("src", "dst", "sport", "dport"):
                cur[k] = v
            if len(cur) == 4:
                tuples.append(cur)
                cur = {}
            if len(tuples) == 2:
                break
        if len(tuples) < 2:
            continue
        mk = lambda t: Tuple4(t["src"], t["dst"], int(t["sport"]), int(t["dport"]))  # noqa: E731
        flags = [f for f in re.findall(r"\[(\w+)\]", line) if f not in ("NEW", "UPDATE", "DESTROY")]
        entry = ConntrackEntry(node, proto, state, mk(tuples[0]), mk(tuples[1]), flags)
        key = (entry.original.src, entry.original.sport, entry.original.dst, entry.original.dport)
        if key in flows and not state:
            entry.state = flows[key].state          # DESTROY lines carry no state
        flows[key] = entry
    return list(flows.values())


def find_flow(entries: List[ConntrackEntry], src: str, sport: int) -> Optional[ConntrackEntry]:
    for e in entries:
        if e.original.src == src and e.original.sport == sport:
            return e
    return None
