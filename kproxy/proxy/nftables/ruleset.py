"""An in-memory nftables table: the statements kproxy writes, applied the way the
kernel applies them, and read back from ``nft -f`` text, ``nft list`` text or
``nft -j list`` JSON.

This is kproxy's counterpart of knftables' ``Fake``. It serves three purposes:

* **Statements.** ``Stmt`` tuples are what the renderer produces; ``format_statements``
  writes them as ``nft -f`` text and ``parse_statements`` reads that text back, so the
  tests check the text itself, not the renderer's intentions.
* **What exists.** ``Table`` is also the ``existing`` argument of the renderer: which
  chains exist (and whether they are empty), which sets, and which elements the six
  service maps hold, indexed by the Service that owns them. ``Table.apply`` keeps it
  up to date after a successful sync without asking the kernel again.
* **Checks.** ``apply`` refuses what the kernel refuses (a rule naming a missing chain
  or set, deleting a chain that has rules or is still referenced, adding a map element
  whose key exists with another value, deleting a missing element...), raising
  ``NftError``. The table is not rolled back on error: throw it away, as the kernel
  would have kept the state from before the transaction.

``dump()`` writes the table in knftables' ``Fake.Dump()`` format (one ``add`` line per
object, one element per line), which is what upstream's golden tests compare;
``sort_like_upstream`` is their ``sortNFTablesTransaction``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

from kproxy.proxy.nftables import names as n


class NftError(ValueError):
    """A statement the kernel would refuse."""


# ----------------------------------------------------------------------------- statements
#
#   ("table",   verb, comment)                       verb: add | delete
#   ("chain",   verb, name, base, comment)           verb: add | flush | delete;
#                                                    base: (type, hook, priority) or None
#   ("set",     verb, name, kind, props)             kind: set | map; props: SetProps or None
#   ("rule",    "add", chain, text, comment)
#   ("rules",   "add", chain, [(text, comment), ...])  several rules appended to one chain
#   ("element", "add", container, [(key, comment, value), ...][, (kind, SetProps)])
#                                                    (the container's kind and props let the
#                                                    "blocks" style write an "add map" block)
#   ("element", "delete", container, [key, ...])

Stmt = tuple


@dataclass(frozen=True)
class SetProps:
    type: str                              # "ipv4_addr", "inet_proto . inet_service : verdict", ...
    flags: Tuple[str, ...] = ()
    timeout: Optional[int] = None          # seconds
    comment: Optional[str] = None


def quote(text: str) -> str:
    """Go's ``%q`` for the plain strings kube-proxy uses."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_props(props: SetProps) -> str:
    out = f" {{ type {props.type} ;"
    if props.flags:
        out += f" flags {','.join(props.flags)} ;"
    if props.timeout is not None:
        out += f" timeout {props.timeout}s ;"
    if props.comment is not None:
        out += f" comment {quote(props.comment)} ;"
    return out + " }"


def format_element(key: str, comment: Optional[str], value: Optional[str]) -> str:
    out = key
    if comment is not None:
        out += f" comment {quote(comment)}"
    if value is not None:
        out += f" : {value}"
    return out


def format_statement(family: str, stmt: Stmt, table: str = n.TABLE) -> str:
    """One statement as knftables writes it (one line)."""
    kind, verb = stmt[0], stmt[1]
    if kind == "rules":
        return "\n".join(format_statement(family, ("rule", verb, stmt[2], t, c), table) for t, c in stmt[3])
    head = f"{verb} {kind} {family} {table}"
    if kind == "rule":
        _, _, chain, text, comment = stmt
        line = f"{head} {chain} {text}"
        return line + (f" comment {quote(comment)}" if comment is not None else "")
    if kind == "element":
        container, elems = stmt[2], stmt[3]
        if verb == "add":
            body = ", ".join(format_element(k, c, v) for k, c, v in elems)
        else:
            body = ", ".join(elems)
        return f"{head} {container} {{ {body} }}"
    if kind == "chain":
        _, _, name, base, comment = stmt
        line = f"{head} {name}"
        if verb == "add" and (base is not None or comment is not None):
            line += " {"
            if base is not None:
                line += f" type {base[0]} hook {base[1]} priority {base[2]} ;"
            if comment is not None:
                line += f" comment {quote(comment)} ;"
            line += " }"
        return line
    if kind == "set":
        _, _, name, set_kind, props = stmt
        line = f"{verb} {set_kind} {family} {table} {name}"
        if verb == "add" and props is not None:
            line += _format_props(props)
        return line
    if kind == "table":
        comment = stmt[2]
        if verb == "add" and comment is not None:
            return f"{head} {{ comment {quote(comment)} ; }}"
        return head
    raise ValueError(f"unknown statement {stmt!r}")


STYLE_RULES = "rules"
STYLE_BLOCKS = "blocks"


def _format_rule_body(text: str, comment: Optional[str]) -> str:
    return text + (f" comment {quote(comment)}" if comment is not None else "")


def _format_blocks(family: str, stmts: List[Stmt], table: str) -> Iterator[str]:
    """The same statements with each chain's rules inside an ``add chain NAME { ... }``
    block and each map's new elements inside an ``add map NAME { ... elements = { ... } }``
    block. nft evaluates those needing only its table cache, where ``add rule`` and
    ``add element`` make it first download every chain of the table."""
    i = 0
    while i < len(stmts):
        stmt = stmts[i]
        if stmt[0] == "rules":
            if stmt[3]:
                body = "\n\t".join([t if c is None else f"{t} comment {quote(c)}" for t, c in stmt[3]])
                yield f"add chain {family} {table} {stmt[2]} {{\n\t{body}\n}}"
            i += 1
            continue
        if stmt[0] == "rule":
            # a run of consecutive rules: group it by chain, keeping each chain's order
            order: List[str] = []
            by_chain: Dict[str, List[str]] = {}
            while i < len(stmts) and stmts[i][0] == "rule":
                _, _, chain, text, comment = stmts[i]
                if chain not in by_chain:
                    by_chain[chain] = []
                    order.append(chain)
                by_chain[chain].append(_format_rule_body(text, comment))
                i += 1
            for chain in order:
                body = "".join(f"\t{r}\n" for r in by_chain[chain])
                yield f"add chain {family} {table} {chain} {{\n{body}}}"
            continue
        if (stmt[0] == "chain" and stmt[1] == "add" and stmt[3] is None and stmt[4] is None
                and i + 1 < len(stmts) and stmts[i + 1][0] in ("rule", "rules") and stmts[i + 1][2] == stmt[2]
                and (stmts[i + 1][0] == "rule" or stmts[i + 1][3])):
            i += 1          # the rule block right after creates the chain
            continue
        if stmt[0] == "element" and stmt[1] == "add" and len(stmt) > 4 and stmt[4] is not None:
            set_kind, props = stmt[4]
            items = ",\n".join(f"\t\t{format_element(k, c, v)}" for k, c, v in stmt[3])
            head = f"add {set_kind} {family} {table} {stmt[2]}"
            yield f"{head} {{\n\t{_format_props(props)[3:-2].strip()}\n\telements = {{\n{items}\n\t}}\n}}"
            i += 1
            continue
        yield format_statement(family, stmt, table)
        i += 1


def format_statements(family: str, stmts: Iterable[Stmt], table: str = n.TABLE, style: str = STYLE_RULES) -> str:
    """``nft -f`` text. ``style="rules"`` is knftables' form (one ``add rule`` / ``add
    element`` line each); ``style="blocks"`` groups them as described in
    ``_format_blocks``. Both give the same table."""
    if style == STYLE_BLOCKS:
        return "".join(line + "\n" for line in _format_blocks(family, list(stmts), table))
    return "".join(format_statement(family, s, table) + "\n" for s in stmts)


# ----------------------------------------------------------------------------- parsing nft -f

_HEAD = re.compile(r"^(add|flush|delete|create|insert)\s+(table|chain|rule|set|map|element)\s+(\S+)\s+(\S+)\s*(.*)$")
_COMMENT_TAIL = re.compile(r'\s+comment\s+("(?:[^"\\]|\\.)*")\s*$')
_BASE = re.compile(r"type\s+(\S+)\s+hook\s+(\S+)(?:\s+device\s+\S+)?\s+priority\s+(-?\d+|\S+)\s*;")
_PROP_COMMENT = re.compile(r'comment\s+("(?:[^"\\]|\\.)*")\s*;')
_NAMED_PRIORITY = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def _unquote(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


def _priority(text: str) -> int:
    m = re.match(r"^(-?\d+)$", text)
    if m:
        return int(text)
    m = re.match(r"^([a-z]+)\s*([+-]\s*\d+)?$", text)
    if m and m.group(1) in _NAMED_PRIORITY:
        return _NAMED_PRIORITY[m.group(1)] + (int(m.group(2).replace(" ", "")) if m.group(2) else 0)
    raise NftError(f"unknown priority {text!r}")


def split_top(text: str, sep: str = ",") -> List[str]:
    """Split on ``sep`` outside quotes and braces."""
    out, depth, quoted, cur = [], 0, False, []
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            cur.append(ch)
        elif ch in "{[(":
            depth += 1
            cur.append(ch)
        elif ch in "}])":
            depth -= 1
            cur.append(ch)
        elif ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_element(text: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``KEY [comment "c"] [: VALUE]`` -> (key, comment, value). Keys never hold ``:``
    outside IPv6 addresses, so the value separator is the ``" : "`` with spaces."""
    value = None
    quoted_at = text.find('"')
    search_from = text.rfind('"') + 1 if quoted_at >= 0 else 0
    idx = text.find(" : ", search_from)
    if idx >= 0:
        value = text[idx + 3:].strip()
        text = text[:idx]
    comment = None
    m = re.search(r'\s+comment\s+("(?:[^"\\]|\\.)*")\s*$', text)
    if m:
        comment = _unquote(m.group(1))
        text = text[:m.start()]
    return text.strip(), comment, value


def _block_items(body: str) -> List[str]:
    """The items of a ``{ ... }`` body: split on newlines and top-level ``;``."""
    inner = body.strip()
    if inner.startswith("{"):
        inner = inner[1:inner.rindex("}")]
    # newlines separate items at the top level only; inside braces they are spaces
    chars, depth, quoted = [], 0, False
    for ch in inner:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{":
            depth += 1
        elif not quoted and ch in "}":
            depth -= 1
        if ch == "\n":
            ch = ";" if depth == 0 else " "
        chars.append(ch)
    items: List[str] = []
    for part in split_top("".join(chars), ";"):
        part = part.strip()
        if part:
            items.append(part)
    return items


def _parse_props(items: List[str], kind: str) -> Tuple[Optional[SetProps], Optional[List[str]]]:
    type_ = flags = timeout = comment = None
    elements = None
    for part in items:
        if part.startswith("type "):
            type_ = part[5:].strip()
        elif part.startswith("typeof "):
            type_ = part.strip()
        elif part.startswith("flags "):
            flags = tuple(f.strip() for f in part[6:].split(","))
        elif part.startswith("timeout "):
            timeout = _duration(part[8:].strip())
        elif part.startswith("comment "):
            comment = _unquote(part[8:].strip())
        elif part.startswith("elements"):
            body = part.split("=", 1)[1].strip()
            elements = split_top(body[1:body.rindex("}")])
    if type_ is None:
        return None, elements
    return SetProps(type_, flags or (), timeout, comment), elements


def _duration(text: str) -> int:
    total = 0
    for num, unit in re.findall(r"(\d+)([dhms]?)", text):
        total += int(num) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[unit]
    return total


def _logical_lines(text: str) -> Iterator[Tuple[int, str]]:
    """Statements, one per line, except that a ``{`` block may span lines."""
    pending: List[str] = []
    depth = 0
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = lineno
        pending.append(line)
        quoted = False
        for ch in line:
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch == "{":
                depth += 1
            elif not quoted and ch == "}":
                depth -= 1
        if depth <= 0:
            yield start, "\n".join(pending)
            pending, depth = [], 0
    if pending:
        raise NftError(f"line {start}: unterminated block")


def parse_statements(text: str) -> Tuple[Optional[str], Optional[str], List[Stmt]]:
    """Parse ``nft -f`` text of ``add``/``flush``/``delete`` statements, in knftables'
    one-line form or with chain and set/map blocks (``add chain X { rules }``,
    ``add map X { type ... ; elements = { ... } }``). Returns (family, table, statements)."""
    family = table = None
    out: List[Stmt] = []
    for lineno, line in _logical_lines(text):
        head_line = line.split("\n", 1)[0]
        m = _HEAD.match(head_line)
        if not m:
            raise NftError(f"line {lineno}: cannot parse {head_line!r}")
        verb, kind, fam, tbl, rest = m.groups()
        if "\n" in line:
            rest = rest + "\n" + line.split("\n", 1)[1]
        if verb == "create":
            verb = "add"
        family, table = family or fam, table or tbl
        if kind == "table":
            comment = None
            if rest.startswith("{"):
                for item in _block_items(rest):
                    if item.startswith("comment "):
                        comment = _unquote(item[8:].strip())
            out.append(("table", verb, comment))
        elif kind == "chain":
            name = rest.split(None, 1)[0]
            body = rest[len(name):]
            base = comment = None
            rules: List[Stmt] = []
            if body.strip().startswith("{"):
                for item in _block_items(body):
                    bm = re.match(r"^type\s+(\S+)\s+hook\s+(\S+)(?:\s+device\s+\S+)?\s+priority\s+(.+)$", item)
                    if bm:
                        base = (bm.group(1), bm.group(2), _priority(bm.group(3).strip()))
                    elif item.startswith("policy ") or item.startswith("devices "):
                        continue
                    elif item.startswith("comment "):
                        comment = _unquote(item[8:].strip())
                    else:
                        rcomment = None
                        cm = _COMMENT_TAIL.search(item)
                        if cm:
                            rcomment = _unquote(cm.group(1))
                            item = item[:cm.start()]
                        rules.append(("rule", "add", name, item.strip(), rcomment))
            out.append(("chain", verb, name, base, comment))
            if rules:
                out.append(("rules", "add", name, [(r[3], r[4]) for r in rules]))
        elif kind in ("set", "map"):
            name = rest.split()[0]
            body = rest[len(name):].strip()
            props, elements = (None, None)
            if verb == "add" and body:
                props, elements = _parse_props(_block_items(body), kind)
            out.append(("set", verb, name, kind, props))
            if elements:
                out.append(("element", "add", name, [parse_element(i) for i in elements]))
        elif kind == "rule":
            chain, _, body = rest.partition(" ")
            comment = None
            cm = _COMMENT_TAIL.search(body)
            if cm:
                comment = _unquote(cm.group(1))
                body = body[:cm.start()]
            out.append(("rule", verb, chain, body.strip(), comment))
        elif kind == "element":
            name = rest.split()[0]
            body = rest[len(name):].strip()
            if not (body.startswith("{") and body.endswith("}")):
                raise NftError(f"line {lineno}: bad element list {body!r}")
            items = split_top(body[1:-1].replace("\n", " "))
            if verb == "add":
                out.append(("element", "add", name, [parse_element(i) for i in items]))
            else:
                out.append(("element", verb, name, [parse_element(i)[0] for i in items]))
    return family, table, out


# ----------------------------------------------------------------------------- the model

_TARGETS = re.compile(r"\b(?:jump|goto)\s+([^\s,}]+)")
_SET_REFS = re.compile(r"@([^\s,}]+)")


@dataclass
class Rule:
    text: Optional[str]                    # None when read from JSON (see Table.from_json)
    comment: Optional[str] = None
    targets: Tuple[str, ...] = ()
    set_refs: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, comment: Optional[str] = None) -> "Rule":
        return cls(text, comment, tuple(_TARGETS.findall(text)), tuple(_SET_REFS.findall(text)))


@dataclass
class Chain:
    name: str
    base: Optional[Tuple[str, str, int]] = None
    comment: Optional[str] = None
    rules: List[Rule] = field(default_factory=list)


@dataclass
class Element:
    key: str
    comment: Optional[str] = None
    value: Optional[str] = None


@dataclass
class NftSet:
    name: str
    kind: str                              # "set" or "map"
    props: SetProps
    elements: Dict[str, Element] = field(default_factory=dict)


def _element_owner(container: str, elem: Element) -> Optional[str]:
    if container in (n.NO_ENDPOINT_SERVICES, n.NO_ENDPOINT_NODEPORTS):
        return n.owner_of_comment(elem.comment)
    return n.owner_of_verdict(elem.value)


class Table:
    """One nftables table (``ip kube-proxy`` by default); see the module docstring."""

    def __init__(self, family: str = "ip", name: str = n.TABLE):
        self.family = family
        self.name = name
        self.exists = False
        self.comment: Optional[str] = None
        self.chains: Dict[str, Chain] = {}
        self.sets: Dict[str, NftSet] = {}
        self._refs: Dict[str, int] = {}                 # chain -> references from rules/elements
        self._set_refs: Dict[str, int] = {}             # set -> references from rules
        self._owned_chains: Dict[str, Set[str]] = {}    # "ns/svc" -> chain names
        self._owned_sets: Dict[str, Set[str]] = {}
        self._owned_elems: Dict[str, Dict[str, Set[str]]] = {}   # "ns/svc" -> container -> keys
        self._empty: Set[str] = set()                   # per-service chains without rules
        self._endpoint_chains = 0

    # ---- construction
    @classmethod
    def from_text(cls, text: str, family: str = "ip", name: str = n.TABLE) -> "Table":
        t = cls(family, name)
        t.apply_text(text)
        return t

    def apply_text(self, text: str) -> "Table":
        fam, tbl, stmts = parse_statements(text)
        if fam is not None and (fam, tbl) != (self.family, self.name):
            raise NftError(f"statements for {fam} {tbl}, not {self.family} {self.name}")
        return self.apply(stmts)

    def copy(self) -> "Table":
        t = Table(self.family, self.name)
        t.apply(self.statements())
        return t

    # ---- queries used by the renderer
    def chain_rule_count(self, name: str) -> Optional[int]:
        c = self.chains.get(name)
        return None if c is None else len(c.rules)

    def is_referenced(self, chain: str) -> bool:
        return self._refs.get(chain, 0) > 0

    def elements(self, container: str) -> Dict[str, Element]:
        s = self.sets.get(container)
        return s.elements if s is not None else {}

    def owned_chains(self, owner: str) -> Set[str]:
        return self._owned_chains.get(owner, set())

    def owned_sets(self, owner: str) -> Set[str]:
        return self._owned_sets.get(owner, set())

    def owned_elements(self, owner: str) -> Dict[str, Set[str]]:
        return self._owned_elems.get(owner, {})

    def owners(self) -> Set[str]:
        return set(self._owned_chains) | set(self._owned_sets) | set(self._owned_elems)

    def empty_service_chains(self) -> Set[str]:
        """Per-service chains that have no rules. A chain in use always has rules, so
        these are the ones an earlier sync flushed because they went stale."""
        return self._empty

    def endpoint_chain_count(self) -> int:
        return self._endpoint_chains

    # ---- bookkeeping
    def _index(self, bucket: Dict[str, Set[str]], name: str, add: bool) -> None:
        who = n.owner(name)
        if who is None:
            return
        if add:
            bucket.setdefault(who, set()).add(name)
        else:
            s = bucket.get(who)
            if s is not None:
                s.discard(name)
                if not s:
                    del bucket[who]

    def _index_elem(self, container: str, elem: Element, add: bool) -> None:
        who = _element_owner(container, elem)
        if who is None:
            return
        if add:
            self._owned_elems.setdefault(who, {}).setdefault(container, set()).add(elem.key)
        else:
            by = self._owned_elems.get(who, {})
            keys = by.get(container)
            if keys is not None:
                keys.discard(elem.key)
                if not keys:
                    del by[container]
            if not by and who in self._owned_elems:
                del self._owned_elems[who]

    def _ref(self, targets: Iterable[str], delta: int, bucket: Dict[str, int]) -> None:
        for t in targets:
            bucket[t] = bucket.get(t, 0) + delta

    def _need_table(self) -> None:
        if not self.exists:
            raise NftError(f"table {self.family} {self.name} does not exist")

    def _need_chain(self, name: str) -> Chain:
        c = self.chains.get(name)
        if c is None:
            raise NftError(f"chain {name!r} does not exist")
        return c

    def _need_set(self, name: str) -> NftSet:
        s = self.sets.get(name)
        if s is None:
            raise NftError(f"set/map {name!r} does not exist")
        return s

    def _value_target(self, value: Optional[str]) -> Optional[str]:
        if value and (value.startswith("goto ") or value.startswith("jump ")):
            return value.split(" ", 1)[1]
        return None

    def _flush_chain(self, c: Chain) -> None:
        for r in c.rules:
            self._ref(r.targets, -1, self._refs)
            self._ref(r.set_refs, -1, self._set_refs)
        c.rules = []
        if n.is_service_chain(c.name):
            self._empty.add(c.name)

    # ---- applying statements
    def apply(self, stmts: Iterable[Stmt]) -> "Table":
        for stmt in stmts:
            getattr(self, "_do_" + stmt[0])(*stmt[1:])
        return self

    def _do_table(self, verb: str, comment: Optional[str]) -> None:
        if verb == "add":
            if not self.exists:
                self.exists = True
                self.comment = comment
        elif verb == "delete":
            self._need_table()
            self.__init__(self.family, self.name)
        elif verb == "flush":
            self._need_table()
            for c in self.chains.values():
                self._flush_chain(c)
        else:
            raise NftError(f"{verb} table is not supported")

    def _do_chain(self, verb: str, name: str, base, comment) -> None:
        self._need_table()
        if verb == "add":
            c = self.chains.get(name)
            if c is None:
                if len(name) >= n.NAME_LENGTH_MAX:
                    raise NftError(f"chain name too long: {name!r}")
                self.chains[name] = Chain(name, base, comment)
                self._index(self._owned_chains, name, True)
                if n.is_service_chain(name):
                    self._empty.add(name)
                if name.startswith(n.ENDPOINT_PREFIX):
                    self._endpoint_chains += 1
            elif base is not None and c.base is not None and tuple(base) != tuple(c.base):
                raise NftError(f"chain {name!r} exists with {c.base}, cannot change it to {base}")
        elif verb == "flush":
            self._flush_chain(self._need_chain(name))
        elif verb == "delete":
            c = self._need_chain(name)
            if c.rules:
                raise NftError(f"chain {name!r} is not empty (Device or resource busy)")
            if self.is_referenced(name):
                raise NftError(f"chain {name!r} is still referenced (Device or resource busy)")
            del self.chains[name]
            self._index(self._owned_chains, name, False)
            self._empty.discard(name)
            if name.startswith(n.ENDPOINT_PREFIX):
                self._endpoint_chains -= 1
        else:
            raise NftError(f"{verb} chain is not supported")

    def _do_set(self, verb: str, name: str, kind: str, props: Optional[SetProps]) -> None:
        self._need_table()
        if verb == "add":
            s = self.sets.get(name)
            if s is None:
                if props is None:
                    raise NftError(f"{kind} {name!r} needs a type")
                self.sets[name] = NftSet(name, kind, props)
                self._index(self._owned_sets, name, True)
            elif props is not None:
                if s.kind != kind or s.props.type != props.type:
                    raise NftError(f"{kind} {name!r} exists with another type (File exists)")
                if props.timeout is not None and props.timeout != s.props.timeout:
                    # the kernel takes the new timeout
                    s.props = SetProps(s.props.type, s.props.flags, props.timeout, s.props.comment)
        elif verb == "flush":
            s = self._need_set(name)
            for e in s.elements.values():
                self._index_elem(name, e, False)
                self._ref([t for t in [self._value_target(e.value)] if t], -1, self._refs)
            s.elements = {}
        elif verb == "delete":
            s = self._need_set(name)
            if self._set_refs.get(name, 0) > 0:
                raise NftError(f"{kind} {name!r} is in use (Device or resource busy)")
            for e in s.elements.values():
                self._index_elem(name, e, False)
                self._ref([t for t in [self._value_target(e.value)] if t], -1, self._refs)
            del self.sets[name]
            self._index(self._owned_sets, name, False)
        else:
            raise NftError(f"{verb} {kind} is not supported")

    def _do_rule(self, verb: str, chain: str, text: str, comment: Optional[str]) -> None:
        self._need_table()
        if verb != "add":
            raise NftError(f"{verb} rule is not supported")
        c = self._need_chain(chain)
        rule = Rule.parse(text, comment)
        for t in rule.targets:
            if t not in self.chains:
                raise NftError(f"rule in {chain!r} names missing chain {t!r} (No such file or directory)")
        for s in rule.set_refs:
            if s not in self.sets:
                raise NftError(f"rule in {chain!r} names missing set {s!r} (No such file or directory)")
        c.rules.append(rule)
        self._empty.discard(chain)
        self._ref(rule.targets, 1, self._refs)
        self._ref(rule.set_refs, 1, self._set_refs)

    def _do_rules(self, verb: str, chain: str, rules) -> None:
        for text, comment in rules:
            self._do_rule(verb, chain, text, comment)

    def _do_element(self, verb: str, container: str, items, _props=None) -> None:
        self._need_table()
        s = self._need_set(container)
        if verb == "add":
            for key, comment, value in items:
                if (value is None) != (s.kind == "set"):
                    raise NftError(f"element {key!r} does not fit {s.kind} {container!r}")
                target = self._value_target(value)
                if target is not None and target not in self.chains:
                    raise NftError(f"element {key!r} of {container!r} names missing chain {target!r}")
                old = s.elements.get(key)
                if old is not None:
                    if old.value != value:
                        raise NftError(f"element {key!r} of {container!r} exists with another value (File exists)")
                    continue
                e = Element(key, comment, value)
                s.elements[key] = e
                self._index_elem(container, e, True)
                if target is not None:
                    self._ref([target], 1, self._refs)
        elif verb == "delete":
            for key in items:
                e = s.elements.pop(key, None)
                if e is None:
                    raise NftError(f"element {key!r} of {container!r} does not exist (No such file or directory)")
                self._index_elem(container, e, False)
                target = self._value_target(e.value)
                if target is not None:
                    self._ref([target], -1, self._refs)
        else:
            raise NftError(f"{verb} element is not supported")

    # ---- output
    def statements(self) -> List[Stmt]:
        """The table as statements that rebuild it (table, chains, sets, rules, elements)."""
        if not self.exists:
            return []
        out: List[Stmt] = [("table", "add", self.comment)]
        for name in sorted(self.chains):
            c = self.chains[name]
            out.append(("chain", "add", name, c.base, c.comment))
        for name in sorted(self.sets):
            s = self.sets[name]
            out.append(("set", "add", name, s.kind, s.props))
        for name in sorted(self.chains):
            for r in self.chains[name].rules:
                if r.text is None:
                    raise NftError("rules read from JSON have no text")
                out.append(("rule", "add", name, r.text, r.comment))
        for name in sorted(self.sets):
            elems = self.sets[name].elements
            if elems:
                out.append(("element", "add", name,
                            [(e.key, e.comment, e.value) for _, e in sorted(elems.items())]))
        return out

    def dump_lines(self) -> Iterator[str]:
        """knftables ``Fake.Dump()`` lines: one object or element per line."""
        for stmt in self.statements():
            if stmt[0] == "element":
                for item in stmt[3]:
                    yield format_statement(self.family, ("element", "add", stmt[2], [item]), self.name)
            else:
                yield format_statement(self.family, stmt, self.name)

    def dump(self) -> str:
        return "".join(line + "\n" for line in self.dump_lines())

    # ---- reading what the kernel has
    @classmethod
    def from_json(cls, data, family: str = "ip", name: str = n.TABLE) -> "Table":
        """Build from ``nft -j list table`` output (a dict or its text). Rules keep
        only what they reference (chains and sets), not their text."""
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        t = cls(family, name)
        objs = data.get("nftables", []) if isinstance(data, dict) else data
        rules: List[dict] = []
        elements: List[Tuple[str, list]] = []
        for obj in objs:
            if "table" in obj:
                tb = obj["table"]
                if tb.get("family") == family and tb.get("name") == name:
                    t.exists = True
                    t.comment = tb.get("comment")
            elif "chain" in obj:
                c = obj["chain"]
                base = None
                if "hook" in c:
                    base = (c.get("type"), c.get("hook"), int(c.get("prio", 0)))
                t.chains[c["name"]] = Chain(c["name"], base, c.get("comment"))
                t._index(t._owned_chains, c["name"], True)
                if n.is_service_chain(c["name"]):
                    t._empty.add(c["name"])
                if c["name"].startswith(n.ENDPOINT_PREFIX):
                    t._endpoint_chains += 1
            elif "set" in obj or "map" in obj:
                kind = "set" if "set" in obj else "map"
                s = obj[kind]
                type_ = s.get("type")
                if isinstance(type_, list):
                    type_ = " . ".join(type_)
                if kind == "map":
                    type_ = f"{type_} : {s.get('map')}"
                flags = tuple(s.get("flags", ()))
                props = SetProps(type_ or "", flags, s.get("timeout"), s.get("comment"))
                t.sets[s["name"]] = NftSet(s["name"], kind, props)
                t._index(t._owned_sets, s["name"], True)
                if s.get("elem"):
                    elements.append((s["name"], s["elem"]))
            elif "rule" in obj:
                rules.append(obj["rule"])
        for r in rules:
            chain = t.chains.get(r.get("chain"))
            if chain is None:
                continue
            targets, set_refs = [], []
            _walk_refs(r.get("expr", []), targets, set_refs)
            rule = Rule(None, r.get("comment"), tuple(targets), tuple(set_refs))
            chain.rules.append(rule)
            t._empty.discard(chain.name)
            t._ref(rule.targets, 1, t._refs)
            t._ref(rule.set_refs, 1, t._set_refs)
        for set_name, elems in elements:
            s = t.sets[set_name]
            for item in elems:
                key, comment, value = _json_element(item, s.kind == "map")
                e = Element(key, comment, value)
                s.elements[key] = e
                t._index_elem(set_name, e, True)
                target = t._value_target(value)
                if target is not None:
                    t._ref([target], 1, t._refs)
        return t


def _walk_refs(node, targets: List[str], set_refs: List[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("jump", "goto") and isinstance(v, dict) and "target" in v:
                targets.append(v["target"])
            else:
                _walk_refs(v, targets, set_refs)
    elif isinstance(node, list):
        for v in node:
            _walk_refs(v, targets, set_refs)
    elif isinstance(node, str) and node.startswith("@"):
        set_refs.append(node[1:])


def _json_value(v) -> str:
    if isinstance(v, dict):
        if "concat" in v:
            return " . ".join(_json_value(x) for x in v["concat"])
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            return "-".join(_json_value(x) for x in v["range"])
        for verdict in ("goto", "jump"):
            if verdict in v:
                return f"{verdict} {v[verdict]['target']}"
        for verdict in ("drop", "accept", "return", "continue"):
            if verdict in v:
                return verdict
        if "elem" in v:
            return _json_value(v["elem"].get("val"))
    return str(v)


def _json_element(item, is_map: bool) -> Tuple[str, Optional[str], Optional[str]]:
    key_node, value = item, None
    if is_map and isinstance(item, list) and len(item) == 2:
        key_node, value = item[0], _json_value(item[1])
    comment = None
    if isinstance(key_node, dict) and "elem" in key_node:
        comment = key_node["elem"].get("comment")
        key_node = key_node["elem"].get("val")
    return _json_value(key_node), comment, value


# ----------------------------------------------------------------------------- comparing

_OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def sort_like_upstream(text: str) -> str:
    """Upstream's ``sortNFTablesTransaction``: drop blank and ``#`` lines; order by
    object type (table, chain, rule, set, map, element), then object name; rules
    keep their order within a chain, other lines sort by their text."""
    lines = [l for l in text.split("\n") if l and not l.startswith("#")]

    def key(item):
        idx, line = item
        w = line.split(" ")
        if len(w) < 5:
            return (0, "", idx, "")
        kind = w[1]
        if kind == "rule":
            return (-_OBJECT_ORDER.get(kind, 0), w[4], idx, "")
        return (-_OBJECT_ORDER.get(kind, 0), w[4], 0, line)

    return "\n".join(line for _, line in sorted(enumerate(lines), key=key))


# ----------------------------------------------------------------------------- nft list

def parse_listing(text: str, family: str = "ip", name: str = n.TABLE) -> Table:
    """Build a Table from ``nft list table``/``nft list ruleset`` output (the block
    form nft prints). Rule texts are kept as nft prints them; compare them with
    ``canonical_rule``."""
    t = Table(family, name)
    lines = text.splitlines()
    i = 0
    current: Optional[object] = None
    in_table = False
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        m = re.match(r"^table (\S+) (\S+) \{$", line)
        if m:
            in_table = (m.group(1), m.group(2)) == (family, name)
            if in_table:
                t.exists = True
            current = None
            continue
        if not in_table:
            continue
        m = re.match(r"^(set|map|chain) (\S+) \{$", line)
        if m:
            kind, obj = m.groups()
            if kind == "chain":
                current = Chain(obj)
                t.chains[obj] = current
                t._index(t._owned_chains, obj, True)
                if n.is_service_chain(obj):
                    t._empty.add(obj)
                if obj.startswith(n.ENDPOINT_PREFIX):
                    t._endpoint_chains += 1
            else:
                current = NftSet(obj, kind, SetProps(""))
                t.sets[obj] = current
                t._index(t._owned_sets, obj, True)
            continue
        if line == "}":
            if current is None:
                in_table = False
            current = None
            continue
        if current is None:
            cm = re.match(r'^comment ("(?:[^"\\]|\\.)*")$', line)
            if cm:
                t.comment = _unquote(cm.group(1))
            continue
        if isinstance(current, Chain):
            bm = re.match(r"^type (\S+) hook (\S+)(?: device \S+)? priority ([^;]+);", line)
            if bm:
                current.base = (bm.group(1), bm.group(2), _priority(bm.group(3).strip()))
                continue
            cm = re.match(r'^comment ("(?:[^"\\]|\\.)*")$', line)
            if cm and not current.rules:
                current.comment = _unquote(cm.group(1))
                continue
            comment = None
            rm = _COMMENT_TAIL.search(line)
            if rm:
                comment = _unquote(rm.group(1))
                line = line[:rm.start()]
            rule = Rule.parse(line.strip(), comment)
            current.rules.append(rule)
            t._empty.discard(current.name)
            t._ref(rule.targets, 1, t._refs)
            t._ref(rule.set_refs, 1, t._set_refs)
            continue
        s = current  # a set or map
        props = s.props
        if line.startswith("type ") or line.startswith("typeof "):
            s.props = SetProps(line[5:] if line.startswith("type ") else line, props.flags, props.timeout,
                               props.comment)
        elif line.startswith("flags "):
            s.props = SetProps(props.type, tuple(f.strip() for f in line[6:].split(",")), props.timeout,
                               props.comment)
        elif line.startswith("timeout "):
            s.props = SetProps(props.type, props.flags, _duration(line[8:]), props.comment)
        elif line.startswith("comment "):
            s.props = SetProps(props.type, props.flags, props.timeout, _unquote(line[8:].strip()))
        elif line.startswith("elements = {"):
            body = line[len("elements = {"):]
            while not body.rstrip().endswith("}") and i < len(lines):
                body += " " + lines[i].strip()
                i += 1
            body = body.rstrip()[:-1]
            for item in split_top(body):
                key, comment, value = parse_element(item)
                e = Element(key, comment, value)
                s.elements[key] = e
                t._index_elem(s.name, e, True)
                target = t._value_target(value)
                if target is not None:
                    t._ref([target], 1, t._refs)
    return t


_CANON = [
    (re.compile(r"^mark set mark or (0x[0-9a-f]+)$"),
     lambda m: f"meta mark set meta mark | {int(m.group(1), 16):#010x}"),
    (re.compile(r"^mark and (0x[0-9a-f]+) == 0 return$"),
     lambda m: f"meta mark & {int(m.group(1), 16):#010x} == 0x00000000 return"),
    (re.compile(r"^mark set mark xor (0x[0-9a-f]+)$"),
     lambda m: f"meta mark set meta mark ^ {int(m.group(1), 16):#010x}"),
]
_SINGLE_SET = re.compile(r"(ip6? [sd]addr (?:!= )?)\{ ([^,{}\s]+) \}")
_ADDR_SET = re.compile(r"(ip6? [sd]addr (?:!= )?)\{ ([^{}]+) \}")


def _sorted_addresses(m) -> str:
    """nft lists an anonymous set of addresses in address order."""
    import ipaddress as _ip

    def key(text):
        try:
            net = _ip.ip_network(text, strict=False)
            return (net.version, int(net.network_address), net.prefixlen, text)
        except ValueError:
            return (9, 0, 0, text)
    items = [i.strip() for i in m.group(2).replace(" , ", ",").split(",") if i.strip()]
    if len(items) == 1:
        return m.group(1) + items[0]
    return m.group(1) + "{ " + ", ".join(sorted(items, key=key)) + " }"
_SPACED_COMMA = re.compile(r" , ")
_NUMGEN_EQ = re.compile(r"(numgen random mod \d+) == (\d+)")
_IIF_BARE = re.compile(r'\b(iif(?:name)?) (!= )?([^"\s]+)')


def canonical_rule(text: str) -> str:
    """A rule as ``nft list`` prints it, from the form kube-proxy writes: ``mark``
    becomes ``meta mark`` with 8-digit hex, an anonymous set of addresses is sorted
    (and loses its braces when it has one element), ``" , "`` becomes ``", "``,
    ``== 0`` after numgen is dropped, interface names are quoted. Already-canonical
    text is left as it is."""
    text = text.strip()
    for pat, repl in _CANON:
        m = pat.match(text)
        if m:
            return repl(m)
    text = _ADDR_SET.sub(_sorted_addresses, text)
    text = _SPACED_COMMA.sub(", ", text)
    text = _NUMGEN_EQ.sub(lambda m: f"{m.group(1)} {m.group(2)}", text)
    text = _IIF_BARE.sub(lambda m: f'{m.group(1)} {m.group(2) or ""}"{m.group(3)}"', text)
    return text
