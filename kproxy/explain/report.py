"""The report ``explain`` returns (and a live ``trace`` will fill too).

``Report.to_dict()`` is the JSON document described in ``schema.md`` beside this file;
``Report.text()`` is the human-readable form the CLI prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1

ACTIONS = ("DNAT", "REJECT", "DROP", "ACCEPT")
SOURCES = ("kproxy-render", "iptables-save", "nft")


@dataclass
class Flow:
    src: str
    proto: str
    dst: str
    dport: int
    node: Optional[str] = None
    from_node: bool = False
    node_ips: List[str] = field(default_factory=list)
    cluster_cidr: Optional[str] = None
    entry: str = ""          # where the walk starts: "nat PREROUTING", "nat OUTPUT", "prerouting hook", ...

    def to_dict(self) -> Dict[str, Any]:
        return {"src": self.src, "proto": self.proto, "dst": self.dst, "dport": self.dport,
                "node": self.node, "from_node": self.from_node, "node_ips": list(self.node_ips),
                "cluster_cidr": self.cluster_cidr, "entry": self.entry}


@dataclass
class ServiceRef:
    namespace: str
    name: str
    port: str = ""           # the Service port's *name* ("" for an unnamed port), as in "ns/svc:port"
    address: Optional[str] = None   # "cluster IP", "external IP", "loadbalancer IP", "node port", ...

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName string: ``ns/name`` or ``ns/name:port``."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    def to_dict(self) -> Dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "port": self.port,
                "address": self.address}


@dataclass
class Hop:
    table: str
    chain: str
    rule: str                # the rule as written in the ruleset (or "policy ACCEPT" for a chain policy)
    verdict: str             # what it did: "jump KUBE-SVC-...", "goto ...", "DNAT to ip:port", "MARK ...",
                             # "ACCEPT", "DROP", "REJECT", "RETURN", "MASQUERADE", "continue", "policy ACCEPT", ...
    note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"table": self.table, "chain": self.chain, "rule": self.rule, "verdict": self.verdict,
                "note": self.note}


@dataclass
class Candidate:
    endpoint: str            # "ip:port" ("[ipv6]:port")
    probability: float
    chains: List[str] = field(default_factory=list)   # chain path from the entry chain to the DNAT
    hops: List[Hop] = field(default_factory=list)     # this candidate's hops after the common ones
    masquerade: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"endpoint": self.endpoint, "probability": self.probability, "chains": list(self.chains),
                "hops": [h.to_dict() for h in self.hops], "masquerade": self.masquerade}


@dataclass
class Masquerade:
    applied: bool
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return {"applied": self.applied, "reason": self.reason}


@dataclass
class Verdict:
    action: str              # one of ACTIONS
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return {"action": self.action, "reason": self.reason}


@dataclass
class Affinity:
    timeout_seconds: Optional[int]
    note: str

    def to_dict(self) -> Dict[str, Any]:
        return {"timeout_seconds": self.timeout_seconds, "note": self.note}


@dataclass
class Report:
    flow: Flow
    service: Optional[ServiceRef]
    hops: List[Hop]
    candidates: List[Candidate]
    masquerade: Masquerade
    verdict: Verdict
    source: str
    affinity: Optional[Affinity] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "flow": self.flow.to_dict(),
            "service": self.service.to_dict() if self.service else None,
            "hops": [h.to_dict() for h in self.hops],
            "candidates": [c.to_dict() for c in self.candidates],
            "masquerade": self.masquerade.to_dict(),
            "verdict": self.verdict.to_dict(),
            "affinity": self.affinity.to_dict() if self.affinity else None,
            "notes": list(self.notes),
        }

    def text(self, color: bool = False, verbose: bool = False) -> str:
        """The report for people: one line per hop (``verbose``: with each rule's full
        text, and every candidate's own hops), the candidates, masquerade, verdict."""
        return render_text(self, color, verbose)


# ---------------------------------------------------------------------------------- text

_COLORS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34",
           "magenta": "35", "cyan": "36"}


def _paint(text: str, style: str, color: bool) -> str:
    if not color or not text:
        return text
    codes = ";".join(_COLORS[s] for s in style.split("+"))
    return f"\x1b[{codes}m{text}\x1b[0m"


def fraction_text(p: float) -> str:
    """A short fraction for a probability when one is close (1/3, 1/4, 2/5)."""
    frac = Fraction(p).limit_denominator(64)
    if frac.denominator == 1 or abs(float(frac) - p) > 1e-6:
        return ""
    return f"{frac.numerator}/{frac.denominator}"


def _percent(p: float) -> str:
    text = f"{p * 100:.2f}%"
    frac = fraction_text(p)
    return f"{text} ({frac})" if frac else text


_COMMENT = re.compile(r'(?:--comment|(?<!-m )(?<![-\w])comment) (?:"((?:\\.|[^"\\])*)"|(\S+))')


def rule_label(rule: str, width: int = 90) -> str:
    """A rule in a few words: its comment when it has one, else the rule, shortened."""
    m = _COMMENT.search(rule)
    if m:
        return f'"{m.group(1) if m.group(1) is not None else m.group(2)}"'
    return rule if len(rule) <= width else rule[: width - 3] + "..."


def _hop_lines(hops: List[Hop], color: bool, indent: str, verbose: bool) -> List[str]:
    lines = []
    wt = max((len(h.table) for h in hops), default=0)
    wc = min(max((len(h.chain) for h in hops), default=0), 40)
    for h in hops:
        verdict = _paint(h.verdict, _verdict_style(h.verdict), color)
        where = f"{h.table.ljust(wt)} {h.chain.ljust(wc)}"
        if verbose:
            lines.append(f"{indent}{_paint(where, 'cyan', color)}  {verdict}")
            lines.append(f"{indent}    {_paint(h.rule, 'dim', color)}")
            if h.note:
                lines.append(f"{indent}    ({h.note})")
        else:
            label = "" if h.rule.startswith("policy ") else "  " + _paint(rule_label(h.rule), "dim", color)
            lines.append(f"{indent}{_paint(where, 'cyan', color)}  {verdict}{label}")
    return lines


def _verdict_style(verdict: str) -> str:
    head = verdict.split(" ", 1)[0]
    if head in ("DROP", "REJECT") or verdict in ("policy DROP",):
        return "red+bold"
    if head == "DNAT":
        return "green+bold"
    if head in ("MARK", "MASQUERADE", "SNAT"):
        return "yellow"
    return "blue"


def render_text(r: Report, color: bool = False, verbose: bool = False) -> str:
    f = r.flow
    out: List[str] = []
    where = f" on node {f.node}" if f.node else ""
    origin = "the node itself" if f.from_node else "a pod or an outside client"
    out.append(_paint(f"explain {f.proto} {f.src} -> {f.dst}:{f.dport}{where}", "bold", color))
    out.append(f"  from {origin}; rules: {r.source}; the walk starts at {f.entry}")
    if r.service:
        addr = f" ({r.service.address})" if r.service.address else ""
        out.append(f"  service: {_paint(r.service.port_name, 'bold', color)}{addr}")
    else:
        out.append("  service: none")
    if r.hops:
        out.append("")
        out.append(_paint("path", "bold", color))
        out += _hop_lines(r.hops, color, "  ", verbose)
    if r.candidates:
        out.append("")
        out.append(_paint(f"candidates ({len(r.candidates)})", "bold", color))
        width = max(len(c.endpoint) for c in r.candidates)
        some = any(c.masquerade for c in r.candidates) and not all(c.masquerade for c in r.candidates)
        for c in r.candidates:
            masq = "  (masqueraded)" if some and c.masquerade else ""
            out.append(f"  {_paint(c.endpoint.ljust(width), 'green', color)}  {_percent(c.probability):>15}"
                       f"  {' > '.join(c.chains)}{masq}")
            if c.hops and (verbose or len(r.candidates) == 1):
                out += _hop_lines(c.hops, color, "      ", verbose)
    if r.affinity:
        out.append("")
        out.append(f"{_paint('affinity', 'bold', color)}: {r.affinity.note}")
    out.append("")
    masq = "yes" if r.masquerade.applied else "no"
    out.append(f"{_paint('masquerade', 'bold', color)}: {_paint(masq, 'yellow', color)} - {r.masquerade.reason}")
    out.append(f"{_paint('verdict', 'bold', color)}: "
               f"{_paint(r.verdict.action, _verdict_style(r.verdict.action), color)} - {r.verdict.reason}")
    if r.notes:
        out.append("")
        out.append(_paint("notes", "bold", color))
        out += [f"  - {n}" for n in r.notes]
    return "\n".join(out) + "\n"
