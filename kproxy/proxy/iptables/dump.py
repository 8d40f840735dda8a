"""Reading iptables-restore / iptables-save text: tables, chains, parsed rules.

``parse_dump`` follows upstream's test parser (pkg/util/iptables/testing/parse.go): a
rule is split into words (a quoted string is one word), ``-m MODULE`` pairs are
skipped, and the parameters kube-proxy uses are recorded with their negation.
``sort_like_upstream`` reorders a payload the way upstream's proxier tests do before
comparing it with a fixture, so output that differs only in service order compares
equal.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import List, Optional, Set

_TABLE = re.compile(r"^\*(.*)$")
_CHAIN = re.compile(r"^:([^ ]*) (\S+) \[([0-9]*):([0-9]*)\]$")
_RULE = re.compile(r"^-A ([^ ]*) (.*)$")
_DELETE = re.compile(r"^-X (.*)$")
_WORD = re.compile(r'(?:^|\s)("[^"]*"|[^"]\S*)')


class DumpError(ValueError):
    pass


@dataclass
class Value:
    value: str
    negated: bool = False

    def matches(self, other: str) -> bool:
        return (self.value != other) if self.negated else (self.value == other)


# parameter -> (attribute, takes a value, negatable)
_PARAMS = {
    "--comment": ("comment", True, False),
    "-p": ("protocol", True, True),
    "-s": ("source", True, True),
    "--src-type": ("src_type", True, True),
    "--sport": ("source_port", True, True),
    "-d": ("destination", True, True),
    "--dst-type": ("dst_type", True, True),
    "--dport": ("destination_port", True, True),
    "-i": ("in_interface", True, True),
    "-o": ("out_interface", True, True),
    "--match-set": ("match_set", True, True),
    "-j": ("jump", True, False),
    "--random-fully": ("random_fully", False, False),
    "--probability": ("probability", True, False),
    "--to-destination": ("dnat_destination", True, False),
    "--rcheck": ("affinity_check", False, True),
    "--mark": ("mark_check", True, True),
    "--ctstate": ("ctstate_check", True, True),
    "--name": ("affinity_name", True, False),
    "--seconds": ("affinity_seconds", True, False),
    "--set": ("affinity_set", False, True),
    "--reap": ("affinity_reap", False, False),
    "--mode": ("statistic_mode", True, False),
}


@dataclass
class Rule:
    raw: str
    chain: str = ""
    comment: Optional[Value] = None
    protocol: Optional[Value] = None
    source: Optional[Value] = None
    src_type: Optional[Value] = None
    source_port: Optional[Value] = None
    destination: Optional[Value] = None
    dst_type: Optional[Value] = None
    destination_port: Optional[Value] = None
    in_interface: Optional[Value] = None
    out_interface: Optional[Value] = None
    match_set: Optional[Value] = None
    jump: Optional[Value] = None
    random_fully: Optional[bool] = None
    probability: Optional[Value] = None
    dnat_destination: Optional[Value] = None
    affinity_check: Optional[bool] = None
    mark_check: Optional[Value] = None
    ctstate_check: Optional[Value] = None
    affinity_name: Optional[Value] = None
    affinity_seconds: Optional[Value] = None
    affinity_set: Optional[bool] = None
    affinity_reap: Optional[bool] = None
    statistic_mode: Optional[Value] = None


def words(rule: str) -> List[str]:
    return [m.strip('"') for m in _WORD.findall(rule)]


def parse_rule(line: str) -> Rule:
    ws = words(line)
    if len(ws) < 2 or ws[0] != "-A":
        raise DumpError(f'bad iptables rule (does not start with "-A CHAIN"): {line}')
    rule = Rule(raw=line, chain=ws[1])
    negated = False
    i = 2
    while i < len(ws):
        w = ws[i]
        if w == "-m" and i < len(ws) - 1:
            i += 2
            continue
        if w == "!":
            negated = True
            i += 1
            continue
        spec = _PARAMS.get(w)
        if spec is None:
            i += 1
        else:
            attr, takes_value, _negatable = spec
            if takes_value:
                if i == len(ws) - 1:
                    raise DumpError(f"parameter {w!r} requires an argument: {line}")
                setattr(rule, attr, Value(ws[i + 1], negated))
                i += 2
            else:
                setattr(rule, attr, not negated)
                i += 1
        negated = False
    return rule


@dataclass
class Chain:
    name: str
    policy: str = "-"
    rules: List[Rule] = field(default_factory=list)
    deleted: bool = False


@dataclass
class Table:
    name: str
    chains: List[Chain] = field(default_factory=list)

    def chain(self, name: str) -> Optional[Chain]:
        for c in self.chains:
            if c.name == name:
                return c
        return None


@dataclass
class Dump:
    tables: List[Table] = field(default_factory=list)

    def table(self, name: str) -> Optional[Table]:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    def chain(self, table: str, chain: str) -> Optional[Chain]:
        t = self.table(table)
        return t.chain(chain) if t else None

    def chain_names(self, table: str) -> Set[str]:
        t = self.table(table)
        return {c.name for c in t.chains} if t else set()

    def text(self) -> str:
        out: List[str] = []
        for t in self.tables:
            out.append(f"*{t.name}")
            out += [f":{c.name} {c.policy} [0:0]" for c in t.chains]
            out += [r.raw for c in t.chains for r in c.rules]
            out += [f"-X {c.name}" for c in t.chains if c.deleted]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def parse_dump(data: str) -> Dump:
    """Parse iptables-save output or iptables-restore input (``-X`` lines allowed)."""
    dump = Dump()
    table: Optional[Table] = None
    in_chain_decls = False
    for raw in data.strip("\n").split("\n"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if table is None:
            m = _TABLE.match(line)
            if not m:
                raise DumpError(f"table {len(dump.tables) + 1} starts with {line!r}, not a table name")
            table = Table(m.group(1))
            dump.tables.append(table)
            in_chain_decls = True
            continue
        if in_chain_decls:
            m = _CHAIN.match(line)
            if m:
                table.chains.append(Chain(m.group(1), m.group(2)))
                continue
            in_chain_decls = False
        m = _RULE.match(line)
        if m:
            chain = table.chain(m.group(1))
            if chain is None:
                raise DumpError(f"rule for undeclared chain {m.group(1)!r}: {line}")
            if chain.deleted:
                raise DumpError(f"cannot add rules to deleted chain {chain.name!r}")
            chain.rules.append(parse_rule(line))
            continue
        m = _DELETE.match(line)
        if m:
            chain = table.chain(m.group(1))
            if chain is None:
                raise DumpError(f"-X of undeclared chain {m.group(1)!r}")
            if chain.rules:
                raise DumpError(f"cannot delete chain {chain.name!r} after adding rules")
            chain.deleted = True
            continue
        if line == "COMMIT":
            table = None
            continue
        raise DumpError(f"cannot parse {line!r}")
    if table is not None:
        raise DumpError("no COMMIT line at the end")
    return dump


def _comment_service(rule: Rule) -> str:
    name = rule.comment.value if rule.comment else ""
    m = re.search(r"[ :]", name)
    return name[: m.start()] if m else name


def _by_comment(a: Rule, b: Rule) -> int:
    if a.comment is None or b.comment is None:
        return 0
    x, y = _comment_service(a), _comment_service(b)
    return -1 if x < y else (1 if y < x else 0)


def _services_chain_order(a: Rule, b: Rule) -> int:
    last_a = a.comment is not None and "must be the last rule" in a.comment.value
    last_b = b.comment is not None and "must be the last rule" in b.comment.value
    if last_a and not last_b:
        return 1
    if last_b and not last_a:
        return -1
    return _by_comment(a, b)


def _chain_key(name: str):
    if name == "KUBE-NODEPORTS":
        return (0, name)
    if name == "KUBE-SERVICES":
        return (1, name)
    return (2 if name.startswith("KUBE-") else 3, name)


def sort_like_upstream(data: str) -> str:
    """Sort a payload as upstream's ``sortIPTablesRules``: tables by name; chains with
    KUBE-NODEPORTS, then KUBE-SERVICES, then other KUBE-* and then the rest, each group
    alphabetically; rules in both tables' KUBE-NODEPORTS and KUBE-SERVICES stably
    ordered by the service name in their comment (nat KUBE-SERVICES keeps its "must be
    the last rule" rule last); everything else in emission order."""
    dump = parse_dump(data)
    dump.tables.sort(key=lambda t: t.name)
    for t in dump.tables:
        t.chains.sort(key=lambda c: _chain_key(c.name))
    for table, chain, cmp in (("filter", "KUBE-NODEPORTS", _by_comment),
                              ("nat", "KUBE-NODEPORTS", _by_comment),
                              ("filter", "KUBE-SERVICES", _by_comment),
                              ("nat", "KUBE-SERVICES", _services_chain_order)):
        c = dump.chain(table, chain)
        if c is not None:
            c.rules.sort(key=functools.cmp_to_key(cmp))
    return dump.text()
