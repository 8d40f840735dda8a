"""nftables rulesets for explain: ``nft list ruleset`` text, the ``add ...`` script
kube-proxy passes to ``nft -f``, and ``nft -j list ruleset`` JSON.

All three become the same model (here): tables with base chains (hook, priority,
policy), regular chains, named sets and (verdict) maps. JSON (nftjson.py) is turned into
rule text first, so one rule parser serves every form; nftwalk.py walks the model. The rule language understood is what
upstream's nftables mode writes (``ip daddr . meta l4proto . th dport vmap @map``,
``numgen random mod N vmap { ... }``, ``fib saddr type local``, ``ct state new``,
``mark set mark or 0x4000``, ``dnat to ip:port``, ``masquerade``, ``update @set``, ...)
plus the common matches around it; a rule with anything else is assumed not to match,
and the report says so.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Dict, List, Optional, Tuple

from kproxy.explain import walk as w
from kproxy.explain.report import ServiceRef

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
        i = self._exact.get(tuple(str(v) for v in values))
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

    def walk(self, walk: w.Walk, pkt: w.Packet) -> List[w.Packet]:
        from kproxy.explain.nftwalk import walk_ruleset
        return walk_ruleset(self, walk, pkt)

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


def service_from_chain(name: str) -> Optional[ServiceRef]:
    m = _CHAIN_NAME.match(name)
    if m is None:
        return None
    return ServiceRef(m.group(2), m.group(3), m.group(5))
