"""A range-set allocator that behaves like the reference host-local's.

A *range* is one subnet with an inclusive [rangeStart, rangeEnd] window and a gateway;
a *range set* is a list of ranges of one family tried in order (one address comes out
of each range set).  Allocation is round-robin: the search starts right after the
last address this range set reserved and wraps around, so a released address is not
handed out again until the whole set has been walked.  The gateway, the network
address and (IPv4) the broadcast address are never handed out.

Everything here is pure except through the `Store` it is given.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]


class ConfigError(ValueError):
    """The IPAM configuration is invalid (message as the reference plugin words it)."""


class AllocationError(Exception):
    """No address could be handed out."""


def parse_ip(value: object) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ConfigError(f"invalid IP address: {value}") from None


def parse_cidr(value: object) -> IPInterface:
    """A CIDR keeping its host bits (Go's ParseCIDR as types.IPNet uses it)."""
    if not isinstance(value, str) or "/" not in value:
        raise ConfigError(f"invalid CIDR address: {value}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise ConfigError(f"invalid CIDR address: {value}") from None


@dataclass(frozen=True)
class Range:
    subnet: IPNetwork
    range_start: IPAddress
    range_end: IPAddress
    gateway: IPAddress

    @classmethod
    def parse(cls, obj: dict) -> "Range":
        """Canonicalize one range as the reference does (same defaults, same errors)."""
        if not isinstance(obj, dict):
            raise ConfigError("a range must be a JSON object")
        iface = parse_cidr(obj.get("subnet"))
        net = iface.network
        if net.prefixlen > net.max_prefixlen - 2:
            raise ConfigError(f"Network {iface.with_prefixlen} too small to allocate from")
        if iface.ip != net.network_address:
            raise ConfigError(
                f"Network has host bits set. For a subnet mask of length {net.prefixlen} "
                f"the network address is {net.network_address}")
        gateway = parse_ip(obj["gateway"]) if obj.get("gateway") else net.network_address + 1
        start = parse_ip(obj["rangeStart"]) if obj.get("rangeStart") else net.network_address + 1
        if start not in net:
            raise ConfigError(f"RangeStart {start} not in network {net}")
        if obj.get("rangeEnd"):
            end = parse_ip(obj["rangeEnd"])
            if end not in net or end < start:
                raise ConfigError(f"RangeEnd {end} not in network {net}")
        else:
            end = net.broadcast_address - 1 if net.version == 4 else net.broadcast_address
        return cls(net, start, end, gateway)

    @property
    def version(self) -> int:
        return self.subnet.version

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.version and self.range_start <= ip <= self.range_end

    def overlaps(self, other: "Range") -> bool:
        if self.version != other.version:
            return False
        return (self.contains(other.range_start) or self.contains(other.range_end)
                or other.contains(self.range_start) or other.contains(self.range_end))

    def reserved(self, ip: IPAddress) -> bool:
        """Never handed out: the gateway, the network address, the IPv4 broadcast."""
        if ip == self.gateway or ip == self.subnet.network_address:
            return True
        return self.version == 4 and ip == self.subnet.broadcast_address

    def interface(self, ip: IPAddress) -> IPInterface:
        return ipaddress.ip_interface(f"{ip}/{self.subnet.prefixlen}")

    def __str__(self) -> str:
        return f"{self.range_start}-{self.range_end}"


class RangeSet(tuple):
    """An ordered, non-empty tuple of non-overlapping ranges of one family."""

    @classmethod
    def parse(cls, obj: Sequence[dict]) -> "RangeSet":
        if not isinstance(obj, list) or not obj:
            raise ConfigError("empty range set")
        ranges = [Range.parse(r) for r in obj]
        if len({r.version for r in ranges}) > 1:
            raise ConfigError("mixed address families")
        for i, r1 in enumerate(ranges):
            for r2 in ranges[i + 1:]:
                if r1.overlaps(r2):
                    raise ConfigError(f"subnets {r1} and {r2} overlap")
        return cls(ranges)

    @property
    def version(self) -> int:
        return self[0].version

    def range_for(self, ip: IPAddress) -> Optional[Range]:
        return next((r for r in self if r.contains(ip)), None)

    def contains(self, ip: IPAddress) -> bool:
        return self.range_for(ip) is not None

    def overlaps(self, other: "RangeSet") -> bool:
        return any(a.overlaps(b) for a in self for b in other)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self)


def candidates(rangeset: RangeSet, last_reserved: Optional[IPAddress]) -> Iterator[tuple[IPAddress, Range]]:
    """Every allocatable address of the set once, in host-local's round-robin order.

    Starts just after ``last_reserved`` when the set contains it (ending with
    ``last_reserved`` itself), else at the first range's start.
    """
    n = len(rangeset)
    first, cursor = 0, None
    if last_reserved is not None:
        for i, r in enumerate(rangeset):
            if r.contains(last_reserved):
                first, cursor = i, last_reserved
                break
    # (range index, from, to) segments covering the whole set exactly once
    segments: list[tuple[int, IPAddress, IPAddress]] = []
    if cursor is None:
        segments = [(i, r.range_start, r.range_end) for i, r in enumerate(rangeset)]
    else:
        r0 = rangeset[first]
        if cursor < r0.range_end:
            segments.append((first, cursor + 1, r0.range_end))
        for k in range(1, n):
            i = (first + k) % n
            segments.append((i, rangeset[i].range_start, rangeset[i].range_end))
        segments.append((first, r0.range_start, cursor))
    for i, lo, hi in segments:
        r = rangeset[i]
        ip = lo
        while ip <= hi:
            if not r.reserved(ip):
                yield ip, r
            if ip == hi:
                break
            ip += 1


class IPAllocator:
    """Hands out one address of one range set, recording it in a `Store`."""

    def __init__(self, rangeset: RangeSet, store, range_id: int) -> None:
        self.rangeset = rangeset
        self.store = store
        self.range_id = range_id

    def get(self, container_id: str, ifname: str,
            requested: Optional[IPAddress] = None) -> tuple[IPInterface, IPAddress]:
        """Reserve an address; returns (address with prefix, gateway)."""
        with self.store.lock():
            if requested is not None:
                r = self.rangeset.range_for(requested)
                if r is None:
                    raise AllocationError(f"{requested} not in range set {self.rangeset}")
                if requested == r.gateway:
                    raise AllocationError(f"requested ip {requested} is subnet's gateway")
                if not self.store.reserve(container_id, ifname, requested, self.range_id):
                    raise AllocationError(
                        f"requested IP address {requested} is not available in range set {self.rangeset}")
                return r.interface(requested), r.gateway

            for ip in self.store.get_by_id(container_id, ifname):
                if self.rangeset.contains(ip):
                    raise AllocationError(
                        f"{ip} has been allocated to {container_id}, duplicate allocation is not allowed")
            last = self.store.last_reserved_ip(self.range_id)
            for ip, r in candidates(self.rangeset, last):
                if self.store.reserve(container_id, ifname, ip, self.range_id):
                    return r.interface(ip), r.gateway
        raise AllocationError(f"no IP addresses available in range set: {self.rangeset}")

    def release(self, container_id: str, ifname: str) -> None:
        with self.store.lock():
            self.store.release_by_id(container_id, ifname)
