"""Reading a namespace's links, addresses and routes through pyroute2, for CHECK.

`Links(None)` talks to the namespace the calling thread is in; `Links("/run/netns/x")`
opens its netlink socket inside that namespace (the socket stays bound to it) and
`Links.inside()` puts the thread there for /proc/sys reads.  What ADD and DEL change
goes through `cni.fastnl`, which does not pay pyroute2's per-request asyncio cost.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from typing import Iterator, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import netns as nsutil
from cni.fastnl import Link

IFF_UP = 0x1
IFF_PROMISC = 0x100
RT_TABLE_MAIN = 254


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

    def hairpin(self, index: int) -> bool:
        m = self.ipr.link("get", index=index)[0]
        return bool(m.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_MODE"))

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

    # routes ------------------------------------------------------------
    def routes(self, family: int) -> list[tuple[str, Optional[str], int]]:
        """(dst CIDR, gateway or None, oif) of the main table."""
        out = []
        for m in self.ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            dst = m.get("RTA_DST")
            dst = f"{dst}/{m['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET else "::/0")
            out.append((str(ipaddress.ip_network(dst, strict=False)), m.get("RTA_GATEWAY"), m.get("RTA_OIF") or 0))
        return out
