"""IP helpers that behave like Go's ``netutils.ParseIPSloppy`` and ``net.JoinHostPort``.

Kubernetes still accepts IPv4 addresses with leading zeros in old objects ("010.0.0.1"
meaning 10.0.0.1, decimal), and kube-proxy canonicalises them before writing rules.

The parsers are memoised (bounded LRU caches): a proxier parses the same few thousand
ClusterIPs and endpoint IPs on every sync. Their results (``ipaddress`` objects,
strings and tuples) are immutable, so sharing them is safe.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Dict, Optional, Tuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Distinct IP texts remembered by the parsers (per parser).
CACHE_SIZE = 1 << 17

# A canonical dotted quad (ASCII digits, no leading zeros, each part <= 255): its own
# canonical form, no parsing needed.
_CANONICAL_V4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                           r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def _parse_ip(text: str) -> Optional[IPAddress]:
    text = text.strip()
    if not text:
        return None
    if ":" not in text:
        parts = text.split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            return None
        octets = [int(p, 10) for p in parts]
        if any(x > 255 for x in octets):
            return None
        return ipaddress.IPv4Address(".".join(str(x) for x in octets))
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@lru_cache(maxsize=CACHE_SIZE)
def parse_ip_sloppy(text: str) -> Optional[IPAddress]:
    """An IP address, allowing decimal leading zeros in IPv4 parts; None if invalid."""
    return _parse_ip(text)


_TEXT_FAMILY: Dict[str, Optional[Tuple[str, str]]] = {}
_MISSING = object()


def ip_text_family(text: str) -> Optional[Tuple[str, str]]:
    """``(canonical text, "IPv4" | "IPv6")`` of ``parse_ip_sloppy(text)``; None if invalid."""
    # A plain dict (emptied when full), not an lru_cache: its entries are not objects the
    # garbage collector tracks, and a hit costs one lookup.
    out = _TEXT_FAMILY.get(text, _MISSING)
    if out is not _MISSING:
        return out  # type: ignore[return-value]
    if _CANONICAL_V4.fullmatch(text):
        out = (text, "IPv4")
    else:
        ip = parse_ip_sloppy(text)
        out = None if ip is None else (str(ip), "IPv6" if ip.version == 6 else "IPv4")
    if len(_TEXT_FAMILY) >= CACHE_SIZE:
        _TEXT_FAMILY.clear()
    _TEXT_FAMILY[text] = out
    return out


@lru_cache(maxsize=CACHE_SIZE)
def parse_cidr_sloppy(text: str) -> Optional[IPNetwork]:
    """A CIDR (host bits cleared, like Go's ParseCIDR), leading zeros allowed."""
    addr, sep, prefix = text.strip().partition("/")
    if not sep or not prefix.isdigit():
        return None
    ip = parse_ip_sloppy(addr)
    if ip is None:
        return None
    bits = int(prefix, 10)
    if bits > ip.max_prefixlen:
        return None
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


@lru_cache(maxsize=CACHE_SIZE)
def cidr_text_family(text: str) -> Optional[Tuple[str, str]]:
    """``(canonical text, "IPv4" | "IPv6")`` of ``parse_cidr_sloppy(text)``; None if invalid."""
    net = parse_cidr_sloppy(text)
    if net is None:
        return None
    return str(net), ("IPv6" if net.version == 6 else "IPv4")


def canonical_ip(text: str) -> Optional[str]:
    parsed = ip_text_family(text)
    return parsed[0] if parsed is not None else None


def ip_family(text: str) -> Optional[str]:
    """"IPv4", "IPv6" or None for something that is not an IP."""
    parsed = ip_text_family(text)
    return parsed[1] if parsed is not None else None


def join_host_port(host: str, port: int) -> str:
    """``net.JoinHostPort``: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def clear_caches() -> None:
    """Forget every memoised parse (for benchmarks that time a cold start)."""
    for fn in (parse_ip_sloppy, parse_cidr_sloppy, cidr_text_family):
        fn.cache_clear()
    _TEXT_FAMILY.clear()
