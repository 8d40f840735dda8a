"""IP helpers that behave like Go's ``netutils.ParseIPSloppy`` and ``net.JoinHostPort``.

Kubernetes still accepts IPv4 addresses with leading zeros in old objects ("010.0.0.1"
meaning 10.0.0.1, decimal), and kube-proxy canonicalises them before writing rules.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_ip_sloppy(text: str) -> Optional[IPAddress]:
    """An IP address, allowing decimal leading zeros in IPv4 parts; None if invalid."""
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


def canonical_ip(text: str) -> Optional[str]:
    ip = parse_ip_sloppy(text)
    return str(ip) if ip is not None else None


def ip_family(text: str) -> Optional[str]:
    """"IPv4", "IPv6" or None for something that is not an IP."""
    ip = parse_ip_sloppy(text)
    if ip is None:
        return None
    return "IPv6" if ip.version == 6 else "IPv4"


def join_host_port(host: str, port: int) -> str:
    """``net.JoinHostPort``: IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
