"""Links, addresses, routes and sysctls inside a named namespace, over netlink."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import netns
from cni.bridge import random_mac
from kproxy.errors import KernelError

RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80


@contextmanager
def socket_in(ns: str) -> Iterator[IPRoute]:
    """A netlink socket bound to namespace ``ns`` (opened there, used from anywhere)."""
    if netns.same_as_init(ns):
        raise KernelError(f"refusing to act on {ns!r}: it is the machine's own network namespace")
    with netns.entered(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelError(f"no interface {ifname!r}")
    return found[0]


def _do(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NetlinkError as e:
        raise KernelError(f"{what}: {os.strerror(e.code) if e.code > 0 else e}") from e


def set_up(ipr: IPRoute, ifname: str, mtu: Optional[int] = None, master: Optional[str] = None) -> None:
    extra = {}
    if mtu:
        extra["mtu"] = mtu
    if master:
        extra["master"] = _index(ipr, master)
    _do(f"set {ifname} up", ipr.link, "set", index=_index(ipr, ifname), state="up", **extra)


def add_bridge(ipr: IPRoute, name: str, mtu: Optional[int] = None, mac: Optional[str] = None) -> None:
    """A bridge with a MAC address of its own (``mac``, else a random locally administered
    one), set when it is made.  A bridge left to choose takes the lowest MAC among its
    ports and changes it as ports come and go: the neighbours that cached the old one
    (pods, for their gateway) then send to an address that leaves with the port, and
    their traffic through the bridge is lost until they resolve it again."""
    _do(f"create bridge {name}", ipr.link, "add", ifname=name, kind="bridge",
        address=mac or random_mac())
    set_up(ipr, name, mtu)


def mac_for_ipv4(ip: str) -> str:
    """0a:58 and the four bytes of ``ip`` (the form the CNI bridge plugin once gave its
    interfaces): a gateway's MAC that says which gateway it is."""
    return "0a:58:" + ":".join(f"{int(x):02x}" for x in ip.split("."))


def add_veth(ipr: IPRoute, name: str, peer: str, peer_ns: str) -> None:
    """A veth pair: ``name`` in this socket's namespace, ``peer`` in ``peer_ns``."""
    fd = netns.open_fd(peer_ns)
    try:
        _do(f"create veth {name}/{peer}", ipr.link, "add", ifname=name, kind="veth",
            peer={"ifname": peer, "net_ns_fd": fd})
    finally:
        os.close(fd)


def add_vxlan(ipr: IPRoute, name: str, vni: int, local: str, dev: str, port: int, mac: str, mtu: int) -> None:
    _do(f"create vxlan {name}", ipr.link, "add", ifname=name, kind="vxlan", vxlan_id=vni,
        vxlan_local=local, vxlan_link=_index(ipr, dev), vxlan_port=port, vxlan_learning=0,
        address=mac, mtu=mtu)


def add_address(ipr: IPRoute, ifname: str, cidr: str) -> None:
    ip, plen = cidr.split("/")
    _do(f"add address {cidr} to {ifname}", ipr.addr, "add", index=_index(ipr, ifname), address=ip, prefixlen=int(plen))


def add_route(ipr: IPRoute, dst: str, gateway: Optional[str] = None, dev: Optional[str] = None,
              onlink: bool = False) -> None:
    spec: dict = {"dst": dst}
    if gateway:
        spec["gateway"] = gateway
    if dev:
        spec["oif"] = _index(ipr, dev)
    if onlink:
        spec["flags"] = RTNH_F_ONLINK
    _do(f"add route {dst}", ipr.route, "add", **spec)


def add_neighbour(ipr: IPRoute, dev: str, ip: str, mac: str) -> None:
    _do(f"add neighbour {ip}", ipr.neigh, "add", dst=ip, lladdr=mac, ifindex=_index(ipr, dev), state=NUD_PERMANENT)


def add_fdb(ipr: IPRoute, dev: str, mac: str, dst: str) -> None:
    _do(f"add fdb {mac}", ipr.fdb, "add", ifindex=_index(ipr, dev), lladdr=mac, dst=dst)


def addresses(ipr: IPRoute, ifname: str) -> list[str]:
    out = []
    for msg in ipr.get_addr(index=_index(ipr, ifname)):
        out.append(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
    return out


def link_names(ipr: IPRoute) -> list[str]:
    return [m.get_attr("IFLA_IFNAME") for m in ipr.get_links()]


# ---- sysctls ---------------------------------------------------------------------------

def _sysctl_path(key: str) -> str:
    return "/proc/sys/" + key.replace(".", "/")


def write_sysctl(ns: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl (net.*) inside ``ns``, never in the machine's own."""
    if not key.startswith("net."):
        raise KernelError(f"sysctl {key} is not per network namespace; kproxy will not write it")
    if netns.same_as_init(ns):
        raise KernelError(f"refusing to write {key} in the machine's own network namespace")
    with netns.entered(ns):
        with open(_sysctl_path(key), "w") as f:
            f.write(str(value))


def read_sysctl(ns: Optional[str], key: str) -> Optional[str]:
    """Read a sysctl in ``ns`` (None: the calling process's namespace); None if absent."""
    try:
        if ns is None:
            with open(_sysctl_path(key)) as f:
                return f.read().strip()
        with netns.entered(ns):
            with open(_sysctl_path(key)) as f:
                return f.read().strip()
    except FileNotFoundError:
        return None
