"""Pure allocators for Service ClusterIPs, NodePorts and LoadBalancer IPs.

Each allocator hands out the lowest free value in its range (so results are
deterministic in the order of requests), honours an explicitly requested value, and
refuses a requested value that is taken or outside the range with an AllocationError
naming the Service and the field. State is plain data: ``to_dict()`` / ``from_dict()``
(and ``to_json()`` / ``from_json()``) round-trip it, for whoever persists it.

ClusterIPs follow kubeadm: the first address of the service CIDR (``.1``) is kept for
``default/kubernetes`` and the tenth (``.10``) for ``kube-system/kube-dns``. Reserved
addresses are never handed out automatically but may be requested explicitly. The
network address (and, for IPv4, the broadcast address) is never used.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Dict, Iterable, List, Optional, Tuple, Union

try:
    from kproxy.errors import KproxyError as _Base
except ImportError:  # pragma: no cover
    _Base = ValueError

DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORT_RANGE = "30000-32767"


class AllocationError(_Base):
    """A requested value that cannot be given, or an exhausted range."""

    def __init__(self, reason: str, *, owner: str = "", field: str = ""):
        self.owner, self.field, self.reason = owner, field, reason
        where = " ".join(p for p in (f"Service {owner}" if owner else "", field) if p)
        super().__init__(f"{where}: {reason}" if where else reason)


def _owner(owner: str) -> str:
    return owner or "<unnamed>"


class ClusterIPAllocator:
    """ClusterIPs from one service CIDR."""

    def __init__(self, cidr: str = DEFAULT_SERVICE_CIDR, reserved: Optional[Dict[int, str]] = None):
        self.network = ipaddress.ip_network(cidr, strict=False)
        if self.network.num_addresses < 4:
            raise AllocationError(f"service CIDR {cidr} is too small")
        # offset -> the Service the address is reserved for
        self.reserved: Dict[int, str] = dict(reserved) if reserved is not None else {
            1: "default/kubernetes", 10: "kube-system/kube-dns"}
        self.allocated: Dict[str, str] = {}     # ip -> owner ("namespace/name")
        self._next = 1

    def _last_offset(self) -> int:
        size = self.network.num_addresses
        return size - 2 if self.network.version == 4 else size - 1

    def allocate(self, owner: str, requested: str = "", field: str = "spec.clusterIP") -> str:
        """The ClusterIP for ``owner``: ``requested`` if given (and free), else the
        lowest free address. Calling again for the same owner returns its address."""
        if requested:
            try:
                ip = ipaddress.ip_address(requested)
            except ValueError:
                raise AllocationError(f"Invalid value: \"{requested}\": not an IP address",
                                      owner=owner, field=field) from None
            offset = int(ip) - int(self.network.network_address)
            if ip not in self.network or offset == 0 or offset > self._last_offset():
                raise AllocationError(f"Invalid value: \"{requested}\": provided IP is not in the "
                                      f"valid range. The range of valid IPs is {self.network}",
                                      owner=owner, field=field)
            holder = self.allocated.get(str(ip))
            if holder is not None and holder != owner:
                raise AllocationError(f"Invalid value: \"{requested}\": provided IP is already "
                                      f"allocated (to Service {holder})", owner=owner, field=field)
            self.allocated[str(ip)] = owner
            return str(ip)
        for ip, holder in self.allocated.items():
            if holder == owner:
                return ip
        last = self._last_offset()
        for offset, holder in sorted(self.reserved.items()):
            ip = str(self.network.network_address + offset)
            if holder == owner and offset <= last and ip not in self.allocated:
                self.allocated[ip] = owner
                return ip
        offset = self._next
        while offset <= last:
            ip = str(self.network.network_address + offset)
            if ip not in self.allocated and (offset not in self.reserved or self.reserved[offset] == owner):
                self.allocated[ip] = owner
                self._next = offset + 1
                return ip
            offset += 1
        raise AllocationError(f"Internal error: failed to allocate a serviceIP: range {self.network} "
                              "is full", owner=owner, field=field)

    def release(self, owner: str) -> List[str]:
        freed = [ip for ip, holder in self.allocated.items() if holder == owner]
        for ip in freed:
            del self.allocated[ip]
        self._next = 1
        return freed

    def to_dict(self) -> dict:
        return {"cidr": str(self.network), "reserved": {str(k): v for k, v in self.reserved.items()},
                "allocated": dict(sorted(self.allocated.items(),
                                         key=lambda kv: ipaddress.ip_address(kv[0])))}

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterIPAllocator":
        alloc = cls(data["cidr"], {int(k): v for k, v in data.get("reserved", {}).items()})
        alloc.allocated = dict(data.get("allocated", {}))
        return alloc


def parse_port_range(text: str) -> Tuple[int, int]:
    """``"30000-32767"`` (or ``"30000+2767"``, kube-apiserver's other form) as (low, high)."""
    text = text.strip()
    if "+" in text:
        base, _, size = text.partition("+")
        low, high = int(base), int(base) + int(size)
    else:
        low_s, _, high_s = text.partition("-")
        low, high = int(low_s), int(high_s or low_s)
    if not 0 < low <= high <= 65535:
        raise AllocationError(f"invalid port range {text!r}")
    return low, high


class NodePortAllocator:
    """NodePorts (and health-check NodePorts) from one range. A port number belongs to
    one Service; that Service may use it for several protocols."""

    def __init__(self, port_range: str = DEFAULT_NODE_PORT_RANGE):
        self.range_text = port_range
        self.low, self.high = parse_port_range(port_range)
        self.allocated: Dict[int, str] = {}
        self._next = self.low

    def allocate(self, owner: str, requested: int = 0, field: str = "spec.ports[0].nodePort") -> int:
        if requested:
            if not self.low <= requested <= self.high:
                raise AllocationError(f"Invalid value: {requested}: provided port is not in the valid "
                                      f"range. The range of valid ports is {self.low}-{self.high}",
                                      owner=owner, field=field)
            holder = self.allocated.get(requested)
            if holder is not None and holder != owner:
                raise AllocationError(f"Invalid value: {requested}: provided port is already "
                                      f"allocated (to Service {holder})", owner=owner, field=field)
            self.allocated[requested] = owner
            return requested
        port = self._next
        while port <= self.high:
            if port not in self.allocated:
                self.allocated[port] = owner
                self._next = port + 1
                return port
            port += 1
        raise AllocationError(f"range {self.low}-{self.high} is full", owner=owner, field=field)

    def release(self, owner: str) -> List[int]:
        freed = [p for p, holder in self.allocated.items() if holder == owner]
        for p in freed:
            del self.allocated[p]
        self._next = self.low
        return freed

    def to_dict(self) -> dict:
        return {"range": f"{self.low}-{self.high}",
                "allocated": {str(p): o for p, o in sorted(self.allocated.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> "NodePortAllocator":
        alloc = cls(data["range"])
        alloc.allocated = {int(p): o for p, o in data.get("allocated", {}).items()}
        return alloc


def _pool_addresses(pool: Union[str, Iterable[str]]) -> List[str]:
    """A pool given as a CIDR, an ``a-b`` range, a comma-separated mix, or a list."""
    items = pool.split(",") if isinstance(pool, str) else list(pool)
    out: List[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if "/" in item:
            net = ipaddress.ip_network(item, strict=False)
            hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
            out += [str(h) for h in hosts]
        elif "-" in item:
            a, _, b = item.partition("-")
            first, last = ipaddress.ip_address(a.strip()), ipaddress.ip_address(b.strip())
            if int(last) < int(first):
                raise AllocationError(f"invalid address range {item!r}")
            out += [str(ipaddress.ip_address(i)) for i in range(int(first), int(last) + 1)]
        else:
            out.append(str(ipaddress.ip_address(item)))
    seen = set()
    return [a for a in out if not (a in seen or seen.add(a))]


class LoadBalancerAllocator:
    """LoadBalancer ingress IPs from a configured pool (what MetalLB or a cloud would
    put in ``status.loadBalancer.ingress``)."""

    def __init__(self, pool: Union[str, Iterable[str]]):
        self.pool_spec = pool if isinstance(pool, str) else ",".join(pool)
        self.pool = _pool_addresses(pool)
        if not self.pool:
            raise AllocationError("the LoadBalancer pool is empty")
        self.allocated: Dict[str, str] = {}

    def allocate(self, owner: str, requested: str = "", field: str = "spec.loadBalancerIP") -> str:
        if requested:
            try:
                ip = str(ipaddress.ip_address(requested))
            except ValueError:
                raise AllocationError(f"Invalid value: \"{requested}\": not an IP address",
                                      owner=owner, field=field) from None
            if ip not in self.pool:
                raise AllocationError(f"Invalid value: \"{requested}\": not in the LoadBalancer "
                                      f"pool {self.pool_spec}", owner=owner, field=field)
            holder = self.allocated.get(ip)
            if holder is not None and holder != owner:
                raise AllocationError(f"Invalid value: \"{requested}\": already assigned to "
                                      f"Service {holder}", owner=owner, field=field)
            self.allocated[ip] = owner
            return ip
        for ip, holder in self.allocated.items():
            if holder == owner:
                return ip
        for ip in self.pool:
            if ip not in self.allocated:
                self.allocated[ip] = owner
                return ip
        raise AllocationError(f"the LoadBalancer pool {self.pool_spec} is exhausted",
                              owner=owner, field="status.loadBalancer.ingress")

    def release(self, owner: str) -> List[str]:
        freed = [ip for ip, holder in self.allocated.items() if holder == owner]
        for ip in freed:
            del self.allocated[ip]
        return freed

    def to_dict(self) -> dict:
        return {"pool": self.pool_spec, "allocated": dict(self.allocated)}

    @classmethod
    def from_dict(cls, data: dict) -> "LoadBalancerAllocator":
        alloc = cls(data["pool"])
        alloc.allocated = dict(data.get("allocated", {}))
        return alloc


class Allocators:
    """The three allocators of one cluster, serialisable together."""

    def __init__(self, service_cidr: str = DEFAULT_SERVICE_CIDR,
                 node_port_range: str = DEFAULT_NODE_PORT_RANGE,
                 lb_pool: Union[None, str, Iterable[str]] = None):
        self.cluster_ips = ClusterIPAllocator(service_cidr)
        self.node_ports = NodePortAllocator(node_port_range)
        self.load_balancers = LoadBalancerAllocator(lb_pool) if lb_pool else None

    def release(self, owner: str) -> None:
        self.cluster_ips.release(owner)
        self.node_ports.release(owner)
        if self.load_balancers:
            self.load_balancers.release(owner)

    def to_dict(self) -> dict:
        return {"cluster_ips": self.cluster_ips.to_dict(), "node_ports": self.node_ports.to_dict(),
                "load_balancers": self.load_balancers.to_dict() if self.load_balancers else None}

    @classmethod
    def from_dict(cls, data: dict) -> "Allocators":
        alloc = cls.__new__(cls)
        alloc.cluster_ips = ClusterIPAllocator.from_dict(data["cluster_ips"])
        alloc.node_ports = NodePortAllocator.from_dict(data["node_ports"])
        lb = data.get("load_balancers")
        alloc.load_balancers = LoadBalancerAllocator.from_dict(lb) if lb else None
        return alloc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Allocators":
        return cls.from_dict(json.loads(text))
