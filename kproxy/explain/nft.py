"""nftables rulesets for explain: ``nft list ruleset`` text, the ``add ...`` script
kube-proxy passes to ``nft -f``, and ``nft -j list ruleset`` JSON.

All three become the same model: tables with base chains (hook, priority, policy),
regular chains, named sets and (verdict) maps. JSON rules are turned into rule text
first, so one rule parser serves every form. The rule language understood is what
upstream's nftables mode writes (``ip daddr . meta l4proto . th dport vmap @map``,
``numgen random mod N vmap { ... }``, ``fib saddr type local``, ``ct state new``,
``mark set mark or 0x4000``, ``dnat to ip:port``, ``masquerade``, ``update @set``, ...)
plus the common matches around it; a rule with anything else is assumed not to match,
and the report says so.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from kproxy.explain import walk as w
from kproxy.explain.report import Hop, ServiceRef

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[{};,\n]|[^\s{};,"]+')
_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp", "58": "ipv6-icmp"}
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_TABLE_BLOCKS = {"chain", "set", "map", "flowtable", "counter", "quota", "limit", "ct", "secmark",
                 "synproxy", "meter"}
_CHAIN_NAME = re.compile(r"^(service|external|local|endpoint|firewall)-[A-Z2-7]{8}-([^/]+)/([^/]+)/([^/]+)/"
                         r"([^_]*?)(?:__(.*))?$")


class NftError(ValueError):
    pass


# ------------------------------------------------------------------------------ tokens

class Group(list):
    """An inline ``{ ... }`` group in a statement (its tokens, newlines dropped)."""


class Block:
    """A ``{ ... }`` block of statements (a table, chain, set or map body)."""

    def __init__(self, statements: List[list]):
        self.statements = statements


def _tokens(text: str) -> List[str]:
    out: List[str] = []
    skipping = False
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if skipping:
            if t == "\n":
                skipping = False
                out.append(t)
            continue
        if t.startswith("#"):
            skipping = True
            continue
        out.append(t)
    return out


class _Reader:
    def __init__(self, toks: List[str]):
        self.t = toks
        self.i = 0

    def group(self) -> Group:
        """After a '{' that opens an inline group: tokens up to the matching '}'."""
        g = Group()
        while self.i < len(self.t):
            tok = self.t[self.i]
            self.i += 1
            if tok == "}":
                return g
            if tok == "{":
                g.append(self.group())
            elif tok != "\n":
                g.append(tok)
        raise NftError("unbalanced '{'")

    def body(self, context: str) -> List[list]:
        """Statements up to the closing '}' (or the end, for the top level)."""
        stmts: List[list] = []
        cur: list = []
        while self.i < len(self.t):
            tok = self.t[self.i]
            self.i += 1
            if tok in ("\n", ";"):
                if cur:
                    stmts.append(cur)
                    cur = []
                continue
            if tok == "}":
                if context in ("top", "flat"):
                    raise NftError("unbalanced '}'")
                if cur:
                    stmts.append(cur)
                return stmts
            if tok == "{":
                if self._opens_block(cur, context):
                    cur.append(Block(self.body(self._block_context(cur, context))))
                    stmts.append(cur)
                    cur = []
                else:
                    cur.append(self.group())
                continue
            cur.append(tok)
        if context not in ("top", "flat"):
            raise NftError("unbalanced '{'")
        if cur:
            stmts.append(cur)
        return stmts

    @staticmethod
    def _kind(cur: list, context: str) -> Optional[str]:
        if not cur:
            return None
        if context == "top":
            if cur[0] == "table":
                return "table"
            if cur[0] in ("add", "create", "insert", "replace") and len(cur) > 1:
                return cur[1]
            return None
        if context == "table" and cur[0] in _TABLE_BLOCKS:
            return cur[0]
        return None

    def _opens_block(self, cur: list, context: str) -> bool:
        kind = self._kind(cur, context)
        return kind in ({"table"} | _TABLE_BLOCKS) if kind else False

    def _block_context(self, cur: list, context: str) -> str:
        kind = self._kind(cur, context)
        return "table" if kind == "table" else (kind or "other")


def _unquote(tok: str) -> str:
    if len(tok) >= 2 and tok[0] == '"' and tok[-1] == '"':
        return tok[1:-1].replace('\\"', '"')
    return tok


def _text(toks: list) -> str:
    parts = []
    for t in toks:
        if isinstance(t, Group):
            parts.append("{ " + _text(t).replace(" , ", ", ") + " }")
        elif isinstance(t, Block):
            parts.append("{ ... }")
        else:
            parts.append(t)
    return " ".join(parts).replace(" , ", ", ")


# ------------------------------------------------------------------------------ model

def _norm_proto(text: str) -> str:
    t = text.lower()
    return _PROTO_NUMBERS.get(t, t)


def _int(text: str) -> int:
    return int(text, 0)


class _Comp:
    """One component of a set element key, or one literal on a rule's right-hand side."""

    __slots__ = ("kind", "a", "b", "exact")

    def __init__(self, text: str):
        text = str(text)
        self.exact: Optional[str] = None
        try:
            if "/" in text:
                self.kind, self.a = "net", ipaddress.ip_network(text, strict=False)
                if self.a.prefixlen == self.a.max_prefixlen:
                    self.exact = str(self.a.network_address)
                return
            if "-" in text and not text.startswith("-"):
                lo, hi = text.split("-", 1)
                if lo.isdigit() and hi.isdigit():
                    self.kind, self.a, self.b = "intrange", int(lo), int(hi)
                    return
                self.kind, self.a, self.b = "iprange", ipaddress.ip_address(lo), ipaddress.ip_address(hi)
                return
            if text.isdigit() or text.startswith("0x"):
                self.kind, self.a = "int", _int(text)
                self.exact = str(self.a)
                return
            addr = ipaddress.ip_address(text)
            self.kind, self.a = "net", ipaddress.ip_network(addr)
            self.exact = str(addr)
        except ValueError:
            self.kind, self.a = "str", _norm_proto(_unquote(text))
            self.exact = self.a

    def matches(self, value: Any) -> bool:
        k = self.kind
        if k == "net":
            return isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and \
                value.version == self.a.version and value in self.a
        if k == "int":
            return isinstance(value, int) and value == self.a
        if k == "intrange":
            return isinstance(value, int) and self.a <= value <= self.b
        if k == "iprange":
            return isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and \
                value.version == self.a.version and self.a <= value <= self.b
        return str(value) == self.a


def _key_text(value: Any) -> str:
    return str(value)


class NftSet:
    """A named set or map; for a map each element has a value (tokens)."""

    def __init__(self, name: str, is_map: bool):
        self.name = name
        self.is_map = is_map
        self.flags: List[str] = []
        self.timeout: Optional[str] = None
        self.elements: List[Tuple[List[_Comp], Optional[list], Optional[str], str]] = []
        self._exact: Optional[Dict[Tuple[str, ...], int]] = None
        self._fuzzy: List[int] = []

    @property
    def dynamic(self) -> bool:
        return "dynamic" in self.flags or "timeout" in self.flags or self.name.startswith("affinity-")

    def add(self, key: List[str], value: Optional[list], comment: Optional[str]) -> None:
        comps = [_Comp(k) for k in key]
        self.elements.append((comps, value, comment, " . ".join(key)))
        self._exact = None

    def remove(self, key: List[str]) -> None:
        text = " . ".join(key)
        self.elements = [e for e in self.elements if e[3] != text]
        self._exact = None

    def _index(self) -> None:
        exact: Dict[Tuple[str, ...], int] = {}
        fuzzy: List[int] = []
        for i, (comps, _, _, _) in enumerate(self.elements):
            if all(c.exact is not None for c in comps):
                exact.setdefault(tuple(c.exact for c in comps), i)
            else:
                fuzzy.append(i)
        self._exact, self._fuzzy = exact, fuzzy

    def lookup(self, values: Tuple[Any, ...]) -> Optional[Tuple[List[_Comp], Optional[list], Optional[str], str]]:
        if self._exact is None:
            self._index()
        i = self._exact.get(tuple(_key_text(v) for v in values))
        if i is not None:
            return self.elements[i]
        for i in self._fuzzy:
            comps = self.elements[i][0]
            if len(comps) == len(values) and all(c.matches(v) for c, v in zip(comps, values)):
                return self.elements[i]
        return None


class NftChain:
    def __init__(self, name: str):
        self.name = name
        self.type: Optional[str] = None
        self.hook: Optional[str] = None
        self.priority: int = 0
        self.policy: str = "accept"
        self.rules: List["NftRule"] = []


class NftTable:
    def __init__(self, family: str, name: str):
        self.family = family
        self.name = name
        self.chains: Dict[str, NftChain] = {}
        self.sets: Dict[str, NftSet] = {}

    def chain(self, name: str) -> NftChain:
        c = self.chains.get(name)
        if c is None:
            c = self.chains[name] = NftChain(name)
        return c


# ------------------------------------------------------------------------------ rules

class NftRule:
    """One rule: its text and its statements, parsed on first use."""

    def __init__(self, chain: str, position: int, toks: list):
        self.chain = chain
        self.position = position
        self.toks = toks
        self.text = _text(toks)
        self._stmts: Optional[list] = None
        self.comment: Optional[str] = None
        self.unknown: List[str] = []

    @property
    def stmts(self) -> list:
        if self._stmts is None:
            try:
                self._stmts = _RuleParser(self).parse()
            except (NftError, ValueError, IndexError) as e:
                self._stmts = []
                self.unknown.append(f"unparsed ({e})")
        return self._stmts


_FAMILY_WORDS = {"ip", "ip6"}
_VERDICTS = {"accept", "drop", "continue", "return", "reject", "jump", "goto", "queue"}


class _RuleParser:
    def __init__(self, rule: NftRule):
        self.rule = rule
        self.t = rule.toks
        self.i = 0

    def peek(self, k: int = 0):
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def next(self):
        tok = self.peek()
        if tok is None:
            raise NftError("unexpected end of rule")
        self.i += 1
        return tok

    def parse(self) -> list:
        out = []
        while self.i < len(self.t):
            tok = self.peek()
            if isinstance(tok, (Group, Block)):
                raise NftError(f"unexpected {{ }} in {self.rule.text}")
            if tok == "counter":
                self.i += 1
                while self.peek() in ("packets", "bytes", "name"):
                    self.i += 2
            elif tok == "comment":
                self.i += 1
                self.rule.comment = _unquote(self.next())
            elif tok in ("accept", "drop", "continue", "return"):
                self.i += 1
                out.append(("verdict", tok, None))
            elif tok == "reject":
                self.i += 1
                if self.peek() == "with":
                    self.i += 1
                    while self.peek() not in (None, "comment", "counter"):
                        self.i += 1
                out.append(("verdict", "reject", None))
            elif tok in ("jump", "goto"):
                self.i += 1
                out.append(("verdict", tok, self.next()))
            elif tok in ("dnat", "snat"):
                self.i += 1
                if self.peek() in _FAMILY_WORDS:
                    self.i += 1
                if self.peek() != "to":
                    raise NftError(f"{tok} without 'to'")
                self.i += 1
                addr, port = w.split_endpoint(self.next())
                while self.peek() in ("persistent", "random", "fully-random"):
                    self.i += 1
                out.append((tok, addr, port))
            elif tok == "masquerade":
                self.i += 1
                while self.peek() in ("persistent", "random", "fully-random", ","):
                    self.i += 1
                if self.peek() == "to":
                    self.i += 2
                out.append(("masquerade", None, None))
            elif tok in ("log", "notrack"):
                self.i += 1
                while self.peek() in ("prefix", "level", "group", "snaplen", "queue-threshold", "flags"):
                    self.i += 2
            elif tok in ("update", "add", "delete") and str(self.peek(1) or "").startswith("@"):
                self.i += 2
                if isinstance(self.peek(), Group):
                    self.i += 1
                out.append(("setupdate", tok, None))
            elif tok == "limit":
                self.i += 1
                while self.peek() is not None and self.peek() not in _VERDICTS and self.peek() != "comment" \
                        and self.peek() != "counter":
                    self.i += 1
            else:
                out.append(self.expression_statement())
        return out

    # ---- expressions

    def primary(self):
        tok = self.next()
        if tok in _FAMILY_WORDS:
            field = self.next()
            return ("ip", field)
        if tok == "meta":
            return ("meta", self.next())
        if tok in ("mark", "l4proto", "iifname", "oifname", "iif", "oif", "nfproto"):
            return ("meta", tok)
        if tok in ("th", "tcp", "udp", "sctp"):
            field = self.next()
            return ("th", None if tok == "th" else tok, field)
        if tok == "ct":
            key = self.next()
            if key in ("original", "reply"):
                key = f"{key} {self.next()}"
            return ("ct", key)
        if tok == "fib":
            flags = []
            while self.peek() not in ("type", "oif", "oifname", None):
                t = self.next()
                if t != ".":
                    flags.append(t)
            return ("fib", tuple(flags), self.next())
        if tok == "numgen":
            mode = self.next()
            if self.next() != "mod":
                raise NftError("numgen without mod")
            mod = _int(self.next())
            offset = 0
            if self.peek() == "offset":
                self.i += 1
                offset = _int(self.next())
            return ("numgen", mode, mod, offset)
        raise NftError(f"unknown expression {tok!r}")

    def expression(self):
        e = self.primary()
        while self.peek() in ("and", "&", "or", "|", "xor", "^"):
            op = {"and": "&", "or": "|", "xor": "^"}.get(self.next(), self.t[self.i - 1])
            e = ("bit", op, e, _int(self.next()))
        if self.peek() == ".":
            parts = [e]
            while self.peek() == ".":
                self.i += 1
                parts.append(self.expression_single())
            return ("concat", tuple(parts))
        return e

    def expression_single(self):
        e = self.primary()
        while self.peek() in ("and", "&", "or", "|", "xor", "^"):
            op = {"and": "&", "or": "|", "xor": "^"}.get(self.next(), self.t[self.i - 1])
            e = ("bit", op, e, _int(self.next()))
        return e

    def expression_statement(self):
        left = self.expression()
        tok = self.peek()
        if tok == "vmap":
            self.i += 1
            rhs = self.next()
            if isinstance(rhs, Group):
                return ("vmap", left, ("anon", _map_elements(rhs)))
            return ("vmap", left, ("named", rhs[1:]))
        if tok == "set":
            self.i += 1
            if self.peek() in ("mark", "meta") or str(self.peek()).isdigit() or str(self.peek()).startswith("0x"):
                if str(self.peek()).isdigit() or str(self.peek()).startswith("0x"):
                    return ("markset", left, _int(self.next()))
                return ("markset", left, self.expression_single())
            raise NftError("unsupported 'set'")
        op = "=="
        if tok in ("==", "!=", "eq", "ne", "<", ">", "<=", ">=", "lt", "gt", "le", "ge"):
            op = {"eq": "==", "ne": "!=", "lt": "<", "gt": ">", "le": "<=", "ge": ">="}.get(tok, tok)
            self.i += 1
        rhs = self.next()
        if isinstance(rhs, Group):
            elems = [e[0] for e in _elements(rhs)]
            return ("match", left, op, ("anon", elems))
        if isinstance(rhs, str) and rhs.startswith("@"):
            return ("match", left, op, ("named", rhs[1:]))
        values = [rhs]
        while self.peek() == ",":
            self.i += 1
            values.append(self.next())
        return ("match", left, op, ("values", values))


def _elements(group: Group) -> List[Tuple[List[str], Optional[list], Optional[str]]]:
    """``{ a . b comment "c" : goto X, ... }`` -> [(key parts, value tokens, comment)]."""
    out = []
    cur: list = []
    items = []
    for tok in group:
        if tok == ",":
            if cur:
                items.append(cur)
            cur = []
        else:
            cur.append(tok)
    if cur:
        items.append(cur)
    for item in items:
        key, value, comment = [], None, None
        k = 0
        part: List[str] = []
        while k < len(item):
            tok = item[k]
            if tok == ":":
                value = list(item[k + 1:])
                break
            if tok == "comment":
                comment = _unquote(item[k + 1])
                k += 2
                continue
            if tok in ("timeout", "expires", "counter", "packets", "bytes"):
                k += 2 if tok != "counter" else 1
                continue
            if tok == ".":
                key.append(" ".join(part))
                part = []
            else:
                part.append(tok if isinstance(tok, str) else _text([tok]))
            k += 1
        if part:
            key.append(" ".join(part))
        out.append((key, value, comment))
    return out


def _map_elements(group: Group):
    return [(key, value) for key, value, _ in _elements(group)]


# ------------------------------------------------------------------------------ ruleset

class NftRuleset:
    kind = "nft"
    source = "nft"

    def __init__(self):
        self.tables: Dict[Tuple[str, str], NftTable] = {}

    def table(self, family: str, name: str) -> NftTable:
        t = self.tables.get((family, name))
        if t is None:
            t = self.tables[(family, name)] = NftTable(family, name)
        return t

    def entry(self, from_node: bool) -> str:
        return "output hook" if from_node else "prerouting hook"

    def node_ip_hints(self) -> List[str]:
        for t in self.tables.values():
            s = t.sets.get("nodeport-ips")
            if s is not None:
                return [e[3] for e in s.elements if e[0] and e[0][0].exact]
        return []

    def cluster_cidr_hint(self) -> Optional[str]:
        for t in self.tables.values():
            for name, c in t.chains.items():
                if not name.startswith(("service-", "local-")):
                    continue
                for r in c.rules:
                    m = re.search(r"ip6? saddr != (\S+) jump mark-for-masquerade", r.text)
                    if m and "/" in m.group(1):
                        return str(ipaddress.ip_network(m.group(1), strict=False))
        return None

    # ---- building

    def add_chain(self, t: NftTable, name: str, body: Optional[Block]) -> None:
        c = t.chain(name)
        if body is None:
            return
        for st in body.statements:
            words = [x for x in st if isinstance(x, str)]
            if words and words[0] == "type":
                _chain_header(c, words)
            elif words and words[0] == "policy":
                c.policy = words[1]
            elif words and words[0] in ("comment", "devices", "device", "flags"):
                continue
            elif words:
                c.rules.append(NftRule(name, len(c.rules) + 1, st))

    def add_set(self, t: NftTable, name: str, is_map: bool, body: Optional[Block]) -> NftSet:
        s = t.sets.get(name)
        if s is None:
            s = t.sets[name] = NftSet(name, is_map)
        if body is None:
            return s
        for st in body.statements:
            if not st:
                continue
            if st[0] == "flags":
                s.flags += [x for x in st[1:] if isinstance(x, str) and x != ","]
            elif st[0] == "timeout":
                s.timeout = st[1]
            elif st[0] == "elements":
                group = next((x for x in st if isinstance(x, Group)), Group())
                for key, value, comment in _elements(group):
                    s.add(key, value, comment)
        return s


def _chain_header(c: NftChain, words: List[str]) -> None:
    i = 0
    while i < len(words):
        wd = words[i]
        if wd == "type":
            c.type = words[i + 1]
            i += 2
        elif wd == "hook":
            c.hook = words[i + 1]
            i += 2
        elif wd == "priority":
            j = i + 1
            base = words[j]
            value = _PRIORITIES.get(base)
            if value is None:
                value = int(base)
            j += 1
            if j + 1 < len(words) and words[j] in ("+", "-"):
                delta = int(words[j + 1])
                value = value + delta if words[j] == "+" else value - delta
                j += 2
            c.priority = value
            i = j
        elif wd == "policy":
            c.policy = words[i + 1]
            i += 2
        else:
            i += 1


def parse_text(text: str) -> NftRuleset:
    """``nft list ruleset`` output, or an ``nft -f`` script of add/flush/delete commands."""
    rs = NftRuleset()
    stmts = _Reader(_tokens(text)).body("top")
    for st in stmts:
        if not st:
            continue
        head = st[0]
        if head == "table":
            words = [x for x in st[1:] if isinstance(x, str)]
            family, name = (words[0], words[1]) if len(words) >= 2 else ("ip", words[0])
            t = rs.table(family, name)
            block = st[-1] if isinstance(st[-1], Block) else None
            if block is not None:
                _table_body(rs, t, block)
        elif head in ("add", "create", "insert", "replace"):
            _command(rs, st)
        elif head in ("flush", "delete", "destroy"):
            _command(rs, st)
        else:
            raise NftError(f"cannot read nft statement: {_text(st)[:80]}")
    return rs


def _table_ref(st: list, k: int) -> Tuple[str, str, int]:
    """family and table name at st[k:], defaulting the family to ip; returns the next index."""
    a = st[k]
    b = st[k + 1] if k + 1 < len(st) else None
    if a in ("ip", "ip6", "inet", "arp", "bridge", "netdev") and isinstance(b, str):
        return a, b, k + 2
    return "ip", a, k + 1


def _table_body(rs: NftRuleset, t: NftTable, block: Block) -> None:
    for st in block.statements:
        if not st:
            continue
        body = st[-1] if isinstance(st[-1], Block) else None
        if st[0] == "chain":
            rs.add_chain(t, st[1], body)
        elif st[0] in ("set", "map"):
            rs.add_set(t, st[1], st[0] == "map", body)


def _command(rs: NftRuleset, st: list) -> None:
    verb, obj = st[0], st[1]
    if obj == "ruleset":
        if verb in ("flush", "delete", "destroy"):
            rs.tables.clear()
        return
    family, tname, k = _table_ref(st, 2)
    body = st[-1] if isinstance(st[-1], Block) else None
    if obj == "table":
        if verb in ("delete", "destroy"):
            rs.tables.pop((family, tname), None)
        elif verb == "flush":
            t = rs.table(family, tname)
            for c in t.chains.values():
                c.rules = []
        else:
            rs.table(family, tname)
        return
    t = rs.table(family, tname)
    name = st[k] if k < len(st) and isinstance(st[k], str) else None
    if obj == "chain":
        if verb in ("delete", "destroy"):
            t.chains.pop(name, None)
        elif verb == "flush":
            if name in t.chains:
                t.chains[name].rules = []
        else:
            rs.add_chain(t, name, body)
    elif obj in ("set", "map"):
        if verb in ("delete", "destroy"):
            t.sets.pop(name, None)
        elif verb == "flush":
            if name in t.sets:
                t.sets[name].elements = []
                t.sets[name]._exact = None
        else:
            rs.add_set(t, name, obj == "map", body)
    elif obj == "element":
        s = t.sets.get(name) or rs.add_set(t, name, False, None)
        group = next((x for x in st[k + 1:] if isinstance(x, Group)), Group())
        for key, value, comment in _elements(group):
            if verb in ("delete", "destroy"):
                s.remove(key)
            else:
                if value is not None:
                    s.is_map = True
                s.add(key, value, comment)
    elif obj == "rule":
        c = t.chain(name)
        rest = st[k + 1:]
        if verb in ("delete", "destroy"):
            return
        if rest[:1] in (["handle"], ["position"], ["index"]):
            rest = rest[2:]
        rule = NftRule(name, 0, rest)
        if verb == "insert":
            c.rules.insert(0, rule)
        else:
            c.rules.append(rule)
        for i, r in enumerate(c.rules):
            r.position = i + 1


# ------------------------------------------------------------------------------ JSON

def _jv(v: Any) -> str:
    """A JSON value (set element, right-hand side) as nft text."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, float)):
        return str(int(v))
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return ",".join(_jv(x) for x in v)
    if isinstance(v, dict):
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            a, b = v["range"]
            return f"{_jv(a)}-{_jv(b)}"
        if "concat" in v:
            return " . ".join(_jv(x) for x in v["concat"])
        if "set" in v:
            items = v["set"]
            if isinstance(items, list):
                return "{ " + ", ".join(_jelem(x) for x in items) + " }"
            return "{ " + _jv(items) + " }"
        if "elem" in v:
            e = v["elem"]
            text = _jv(e.get("val"))
            if e.get("comment"):
                text += f' comment "{e["comment"]}"'
            return text
        return _jexpr(v)
    raise NftError(f"unsupported JSON value {v!r}")


def _jverdict(v: Any) -> str:
    if isinstance(v, dict):
        for k in ("jump", "goto"):
            if k in v:
                return f"{k} {v[k]['target']}"
        for k in ("accept", "drop", "continue", "return", "reject"):
            if k in v:
                return k
    if isinstance(v, str):
        return v
    raise NftError(f"unsupported verdict {v!r}")


def _jelem(x: Any) -> str:
    if isinstance(x, list) and len(x) == 2:
        return f"{_jv(x[0])} : {_jverdict(x[1]) if isinstance(x[1], (dict, str)) else _jv(x[1])}"
    return _jv(x)


def _jexpr(e: Any) -> str:
    if not isinstance(e, dict):
        return _jv(e)
    if "payload" in e:
        p = e["payload"]
        return f"{p.get('protocol', 'th')} {p['field']}"
    if "meta" in e:
        return f"meta {e['meta']['key']}"
    if "ct" in e:
        return f"ct {e['ct']['key']}"
    if "fib" in e:
        f = e["fib"]
        return "fib " + " . ".join(f.get("flags", [])) + f" {f.get('result')}"
    if "numgen" in e:
        n = e["numgen"]
        off = f" offset {n['offset']}" if n.get("offset") else ""
        return f"numgen {n.get('mode', 'random')} mod {n['mod']}{off}"
    if "concat" in e:
        return " . ".join(_jexpr(x) for x in e["concat"])
    for op in ("&", "|", "^"):
        if op in e:
            a, b = e[op]
            return f"{_jexpr(a)} {op} {hex(b) if isinstance(b, int) else _jv(b)}"
    return _jv(e)


def _jstmt(s: Dict[str, Any]) -> str:
    if "match" in s:
        m = s["match"]
        left, right, op = _jexpr(m["left"]), m["right"], m.get("op", "==")
        rtext = _jv(right) if not isinstance(right, dict) or "set" in right or "prefix" in right \
            or "range" in right else _jexpr(right)
        if op in ("==", "in"):
            return f"{left} {rtext}" if "&" not in left else f"{left} == {rtext}"
        return f"{left} {op} {rtext}"
    if "vmap" in s:
        v = s["vmap"]
        data = v["data"]
        dtext = data if isinstance(data, str) else "{ " + ", ".join(_jelem(x) for x in data["set"]) + " }"
        return f"{_jexpr(v['key'])} vmap {dtext}"
    for k in ("jump", "goto"):
        if k in s:
            return f"{k} {s[k]['target']}"
    for k in ("accept", "drop", "continue", "return", "reject"):
        if k in s:
            return k
    for k in ("dnat", "snat"):
        if k in s:
            d = s[k]
            addr = d.get("addr")
            addr = _jv(addr) if addr is not None else ""
            port = d.get("port")
            if port is not None:
                addr = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
            return f"{k} to {addr}"
    if "masquerade" in s:
        return "masquerade"
    if "mangle" in s:
        m = s["mangle"]
        return f"{_jexpr(m['key'])} set {_jexpr(m['value'])}"
    if "set" in s:
        st = s["set"]
        return f"{st.get('op', 'update')} {st['set']} {{ {_jexpr(st['elem'])} }}"
    if "counter" in s or "log" in s or "limit" in s or "notrack" in s:
        return ""
    return "<" + ",".join(s) + ">"


def parse_json(text: str) -> NftRuleset:
    """``nft -j list ruleset`` output."""
    data = json.loads(text)
    rs = NftRuleset()
    for item in data.get("nftables", []):
        if "table" in item:
            rs.table(item["table"]["family"], item["table"]["name"])
        elif "chain" in item:
            c = item["chain"]
            ch = rs.table(c["family"], c["table"]).chain(c["name"])
            ch.type, ch.hook = c.get("type"), c.get("hook")
            if "prio" in c:
                prio = c["prio"]
                ch.priority = prio if isinstance(prio, int) else _PRIORITIES.get(str(prio), 0)
            ch.policy = c.get("policy", "accept")
        elif "set" in item or "map" in item:
            is_map = "map" in item
            s = item["map" if is_map else "set"]
            t = rs.table(s["family"], s["table"])
            ns = rs.add_set(t, s["name"], is_map, None)
            flags = s.get("flags", [])
            ns.flags = list(flags) if isinstance(flags, list) else [flags]
            if "timeout" in s:
                ns.timeout = f"{s['timeout']}s"
            for e in s.get("elem", []):
                if is_map and isinstance(e, list):
                    key, value = e
                    ktext, vtext = _jv(key), _jverdict(value)
                    comment = key.get("elem", {}).get("comment") if isinstance(key, dict) else None
                    ktext = _jv(key.get("elem", {}).get("val")) if isinstance(key, dict) and "elem" in key else ktext
                    ns.add([p.strip() for p in ktext.split(" . ")], vtext.split(), comment)
                else:
                    comment = e.get("elem", {}).get("comment") if isinstance(e, dict) else None
                    val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                    ns.add([p.strip() for p in _jv(val).split(" . ")], None, comment)
        elif "rule" in item:
            r = item["rule"]
            parts = [p for p in (_jstmt(s) for s in r.get("expr", [])) if p]
            if r.get("comment"):
                parts.append(f'comment "{r["comment"]}"')
            t = rs.table(r["family"], r["table"])
            c = t.chain(r["chain"])
            toks = _Reader(_tokens(" ".join(parts))).body("flat")
            c.rules.append(NftRule(c.name, len(c.rules) + 1, toks[0] if toks else []))
    return rs


# ------------------------------------------------------------------------------ walking

def service_from_chain(name: str) -> Optional[ServiceRef]:
    m = _CHAIN_NAME.match(name)
    if m is None:
        return None
    return ServiceRef(m.group(2), m.group(3), m.group(5))


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
        if any(v is None for v in values):
            return op == "!=" and False
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
        if target == "reject-chain" or (target.startswith("firewall-")):
            pass
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
                if c.type == "nat" and "NATDONE:" + hook in q.ct:
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
                        r.ct.add("NATDONE:" + hook)
                    r.stack = []
                    nxt.append(r)
            live = nxt
        out += live
    for p in out:
        p.ct = {s for s in p.ct if not s.startswith("NATDONE:")} if p.final is not None else p.ct
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
        p.ct = {s for s in p.ct if not s.startswith("NATDONE:")}
        if p.final is None:
            p.final = "ACCEPT"
    return live


NftRuleset.walk = lambda self, walk, pkt: walk_ruleset(self, walk, pkt)
