"""Rules compared the way the kernel holds them, not the way they were written.

kube-proxy's payload and `iptables-save` spell one rule differently: iptables-save puts
``-s``/``-d``/``-p`` first, writes ``/32`` after a host address, ``--set-xmark`` for
``--or-mark``, the default ``--reject-with`` and ``recent`` options, and the probability
as the kernel rounded it.  :func:`canonical_rules` reads either text into one form per
rule: its options, each with its arguments and negation, normalised and sorted (the
order of rules in a chain is kept; the order of options inside one rule does not change
what it matches).  Comments are left out: they change nothing a rule does, and kube-proxy
itself leaves them on chains a partial sync did not rewrite after it stopped writing them
(more than 1,000 endpoints).  Two texts that program the same rules give equal results,
so the daemon's periodic check can tell a rule edited in place from one it wrote.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from typing import Callable, Dict, List, Tuple, TypeVar

Option = Tuple[str, Tuple[str, ...]]
CanonicalRule = Tuple[Option, ...]
T = TypeVar("T")

_ADDRESS_OPTIONS = {"-s", "-d"}
_MARK_OPTIONS = {"--mark", "--set-xmark"}
_RECENT_DEFAULTS = {("--mask", ("255.255.255.255",)), ("--rsource", ())}
_PORT_MATCH = {"--dport", "--sport"}
# a word: a double-quoted string (kube-proxy's comments; they hold no quote) or a run of
# non-blanks
_WORD = re.compile(r'"([^"]*)"|(\S+)')


def canonical_rules(text: str, prefix: str = "KUBE-") -> Dict[Tuple[str, str], List[CanonicalRule]]:
    """(table, chain) -> the chain's rules in order, canonical, for the chains whose name
    starts with ``prefix``; from iptables-save or iptables-restore text.  A declared chain
    without rules is there with an empty list."""
    return _per_chain(text, prefix, canonical_rule)


def rule_digests(text: str, prefix: str = "KUBE-") -> Dict[Tuple[str, str], List[int]]:
    """:func:`canonical_rules` with each rule reduced to the hash of its canonical form:
    as good for comparing texts within one process, at a fraction of the memory (the
    daemon compares every rule of every node)."""
    return _per_chain(text, prefix, lambda args: hash(canonical_rule(args)))


def _per_chain(text: str, prefix: str, read: Callable[[str], T]) -> Dict[Tuple[str, str], List[T]]:
    chains: Dict[Tuple[str, str], List[T]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":" + prefix):
            chains.setdefault((table, line[1:].split()[0]), [])
        elif line.startswith("-A " + prefix):
            _, chain, *rest = line.split(None, 2)
            chains.setdefault((table, chain), []).append(read(rest[0] if rest else ""))
    return chains


def canonical_rule(args: str) -> CanonicalRule:
    """One rule's options (everything after ``-A CHAIN``), in canonical form."""
    options: List[Option] = []
    words = [quoted if bare is None or bare == "" else bare for quoted, bare in _WORD.findall(args)]
    i, negated = 0, False
    while i < len(words):
        word = words[i]
        if word == "!":
            negated, i = True, i + 1
            continue
        j = i + 1
        while j < len(words) and words[j] != "!" and not words[j].startswith("-"):
            j += 1
        options.append((("!" if negated else "") + word, tuple(words[i + 1:j])))
        negated, i = False, j
    return tuple(sorted(_normalise(options)))


def _normalise(options: List[Option]) -> List[Option]:
    out: List[Option] = []
    recent = reject = ports = False
    for name, args in options:
        bare = name[1:] if name[0] == "!" else name
        if bare == "--comment" or (bare == "-m" and args == ("comment",)):
            continue                            # says nothing about what the rule does
        if bare in _ADDRESS_OPTIONS and args:
            args = (_network(args[0]),)
        elif bare in _MARK_OPTIONS and args:
            args = (_mark(args[0]),)
        elif bare == "--or-mark":
            name, args = "--set-xmark", (_mark(f"{args[0]}/{args[0]}"),)
        elif bare == "--xor-mark":
            name, args = "--set-xmark", (_mark(f"{args[0]}/0"),)
        elif bare == "--set-mark":
            value, _, mask = args[0].partition("/")
            name, args = "--set-xmark", (_mark(f"{value}/{mask or '0xffffffff'}"),)
        elif bare == "--probability":
            # the kernel keeps a 31-bit fraction; iptables-save prints it back with 11 digits
            args = (str(round(float(args[0]) * 0x80000000)),)
        elif bare == "-m" and args == ("recent",):
            recent = True
        elif bare == "--reject-with":
            reject = True
        elif bare in _PORT_MATCH:
            ports = True
        out.append((name, args))
    if recent:
        out = [o for o in out if o not in _RECENT_DEFAULTS]
    if not reject and ("-j", ("REJECT",)) in out:
        out.append(("--reject-with", ("icmp-port-unreachable",)))
    if ports:
        for proto in ("tcp", "udp", "sctp"):
            if ("-p", (proto,)) in out and ("-m", (proto,)) not in out:
                out.append(("-m", (proto,)))    # iptables adds the protocol's match itself
    return out


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> str:
    """An address or network as iptables-save prints it: 10.96.0.1 -> 10.96.0.1/32."""
    return str(ipaddress.ip_network(text, strict=False))


def _mark(text: str) -> str:
    value, _, mask = text.partition("/")
    return f"{int(value, 0):#x}/{int(mask or '0xffffffff', 0):#x}"
