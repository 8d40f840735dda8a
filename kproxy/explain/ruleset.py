"""Reading a ruleset of any supported format: ``parse_ruleset(text)``.

Formats, detected from the text:

* ``iptables-save`` output (``*nat`` ... ``COMMIT``, built-in chains with policies);
* an ``iptables-restore`` payload such as ``kproxy render`` prints (no built-in chains:
  kube-proxy's jump rules into its chains are assumed);
* ``nft list ruleset`` text, or the ``add table/chain/rule/element`` script kube-proxy
  passes to ``nft -f`` (upstream's nftables mode, ``table ip kube-proxy``);
* ``nft -j list ruleset`` JSON.
"""

from __future__ import annotations

import re
from typing import List, Optional, Protocol

FORMATS = ("iptables", "nft", "nft-json")


class Ruleset(Protocol):
    """What explain needs from a parsed ruleset."""

    kind: str

    @property
    def source(self) -> str: ...            # "kproxy-render", "iptables-save" or "nft"

    def entry(self, from_node: bool) -> str: ...

    def node_ip_hints(self) -> List[str]: ...

    def cluster_cidr_hint(self) -> Optional[str]: ...

    def walk(self, walk, pkt) -> list: ...


_NFT_TEXT = re.compile(r"^\s*(?:(?:add|create|insert|flush|delete|destroy)\s+\w+|table\s+\w+\s+\S+\s*\{|"
                       r"table\s+\S+\s*\{)", re.M)


def detect_format(text: str) -> str:
    """"iptables", "nft" or "nft-json"; ValueError when it is none of them."""
    head = text.lstrip()
    if head.startswith("{") and '"nftables"' in head[:4096]:
        return "nft-json"
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("*") or s.startswith(":") or s.startswith("-A ") or s.startswith("["):
            return "iptables"
        if _NFT_TEXT.match(s):
            return "nft"
        break
    raise ValueError("unrecognised ruleset: expected iptables-save / iptables-restore text, "
                     "nft list ruleset text (or nft -f script), or nft -j JSON")


def parse_ruleset(text: str):
    """Parse ``text`` once into a Ruleset that ``explain`` can walk many times."""
    fmt = detect_format(text)
    if fmt == "iptables":
        from kproxy.explain.iptables import IptablesRuleset
        return IptablesRuleset(text)
    if fmt == "nft-json":
        from kproxy.explain.nftjson import parse_json
        return parse_json(text)
    from kproxy.explain.nft import parse_text
    return parse_text(text)
