"""A thin netlink layer for the bridge plugin: one `Links` per network namespace.

`Links(None)` talks to the namespace the calling thread is in; `Links("/run/netns/x")`
opens its netlink socket inside that namespace (the socket stays bound to it) and
`Links.inside()` puts the thread there for /proc/sys writes.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import netns as nsutil

IFF_UP = 0x1
IFF_PROMISC = 0x100
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what iproute2 and the reference plugins' netlink library add routes with


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    up: bool
    promisc: bool
    master: int  # 0: none
    peer: int  # IFLA_LINK: for a veth, the peer's index in the peer's namespace


def sysctl(key: str, value: str) -> bool:
    """Write /proc/sys/<key> ("net/ipv4/ip_forward") in the calling thread's namespace;
    False if impossible."""
    path = os.path.join("/proc/sys", key)
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


class Links:
    def __init__(self, ns: Optional[str] = None) -> None:
        self.ns = ns
        if ns is None:
            self.ipr = IPRoute()
        else:
            with nsutil.entered(ns):
                self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """The calling thread in this namespace, for sysctls."""
        if self.ns is None:
            yield
        else:
            with nsutil.entered(self.ns):
                yield

    # links -------------------------------------------------------------
    def get(self, name: str) -> Optional[Link]:
        try:
            msgs = self.ipr.link("get", ifname=name)  # one RTM_GETLINK, not a dump
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise
        if not msgs:
            return None
        m = msgs[0]
        return Link(
            index=m["index"],
            name=m.get("IFLA_IFNAME"),
            kind=m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "",
            mac=m.get("IFLA_ADDRESS") or "",
            mtu=m.get("IFLA_MTU") or 0,
            up=bool(m["flags"] & IFF_UP),
            promisc=bool(m["flags"] & IFF_PROMISC),
            master=m.get("IFLA_MASTER") or 0,
            peer=m.get("IFLA_LINK") or 0,
        )

    def add_bridge(self, name: str, mtu: int = 0) -> None:
        kw = {"mtu": mtu} if mtu else {}
        try:
            self.ipr.link("add", ifname=name, kind="bridge", **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    def add_veth(self, name: str, peer_name: str, peer_ns: str, mtu: int = 0) -> None:
        """A veth pair: ``name`` here, ``peer_name`` created directly in ``peer_ns``."""
        fd = nsutil.open_fd(peer_ns)
        try:
            peer = {"ifname": peer_name, "net_ns_fd": fd}
            kw = {}
            if mtu:
                peer["mtu"] = kw["mtu"] = mtu
            self.ipr.link("add", ifname=name, kind="veth", peer=peer, **kw)
        finally:
            os.close(fd)

    def delete(self, name: str) -> bool:
        link = self.get(name)
        if link is None:
            return False
        try:
            self.ipr.link("del", index=link.index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True

    def set_up(self, index: int) -> None:
        self.ipr.link("set", index=index, state="up")

    def set_promisc(self, index: int) -> None:
        self.ipr.link("set", index=index, flags=IFF_PROMISC, change=IFF_PROMISC)

    def set_master(self, index: int, master: int) -> None:
        self.ipr.link("set", index=index, master=master)

    def set_hairpin(self, index: int, on: bool) -> None:
        self.ipr.brport("set", index=index, mode=1 if on else 0)

    def hairpin(self, index: int) -> bool:
        m = self.ipr.link("get", index=index)[0]
        return bool(m.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_MODE"))

    def set_mac(self, index: int, mac: str) -> None:
        self.ipr.link("set", index=index, address=mac)

    # addresses ---------------------------------------------------------
    def addresses(self, index: int, family: int = 0) -> list:
        """Addresses on a link as ip_interface objects (link-local IPv6 included)."""
        kw = {"family": family} if family else {}
        out = []
        for m in self.ipr.get_addr(index=index, **kw):
            addr = m.get("IFA_ADDRESS")
            if addr:
                out.append(ipaddress.ip_interface(f"{addr}/{m['prefixlen']}"))
        return out

    def add_address(self, index: int, iface) -> None:
        kw = {}
        if iface.version == 4 and iface.network.prefixlen < 31:
            kw["broadcast"] = str(iface.network.broadcast_address)
        try:
            self.ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    def del_address(self, index: int, iface) -> None:
        self.ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)

    # routes ------------------------------------------------------------
    def routes(self, family: int) -> list[tuple[str, Optional[str], int]]:
        """(dst CIDR, gateway or None, oif) of the main table."""
        out = []
        for m in self.ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            dst = m.get("RTA_DST")
            dst = f"{dst}/{m['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET else "::/0")
            out.append((str(ipaddress.ip_network(dst, strict=False)), m.get("RTA_GATEWAY"), m.get("RTA_OIF") or 0))
        return out

    def add_route(self, dst: str, gateway: Optional[str], oif: int) -> None:
        kw = {"gateway": gateway} if gateway else {}
        try:
            self.ipr.route("add", dst=dst, oif=oif, proto=RTPROT_BOOT, **kw)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
