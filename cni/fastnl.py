"""A small synchronous rtnetlink client for the bridge plugin's hot path.

pyroute2 0.9 runs every request through an asyncio loop (about a millisecond each);
this module packs the few messages an ADD needs with `struct`, sends them on a raw
AF_NETLINK/NETLINK_ROUTE socket and reads the answer in the calling thread:

    with NetlinkSocket.in_namespace("/run/netns/pod") as nl:   # bound to that namespace
        link = nl.get_link("eth0")
        nl.add_address(link.index, ipaddress.ip_interface("10.1.0.2/24"))

Every request asks for an ACK; a kernel error comes back as `OSError` with the
errno (and the kernel's extended-ACK message when there is one).  The packing
functions (`nlmsg`, `attr`, `nest`, `ifinfomsg`, ... and the `*_request` builders)
are pure, so the bytes can be tested without root.

`host_socket(path)` hands out the socket of the "host" namespace of an in-process
plugin call, cached per (thread, namespace) with a memo for facts the plugin knows
about that namespace (see the function).
"""
from __future__ import annotations

import contextlib
import errno as errno_mod
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from cni import netns as nsutil

# netlink (linux/netlink.h) ----------------------------------------------------------
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100      # in an error message: the request's payload was left out
NLM_F_ACK_TLVS = 0x200    # in an error message: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# rtnetlink (linux/rtnetlink.h, if_link.h, if_addr.h) -------------------------------------
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE = 24, 25

IFF_UP = 0x1
IFF_PROMISC = 0x100

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what iproute2 and the reference plugins' netlink library add routes with
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

AF_BRIDGE = 7

# struct layouts (native byte order, as the kernel's) ---------------------------------------
NLMSGHDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")      # family, pad, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")       # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")       # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NLATTR = struct.Struct("=HH")             # len, type
U32 = struct.Struct("=I")
ERRNO = struct.Struct("=i")

RECV_SIZE = 65536


def align4(n: int) -> int:
    return (n + 3) & ~3


# packing -------------------------------------------------------------------------------

def nlmsg(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """One netlink message: nlmsghdr + body (bodies built here are already 4-aligned)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, pid) + body


def attr(atype: int, payload: bytes) -> bytes:
    """One attribute: nlattr header, payload, zero padding to 4 bytes (not counted in nla_len)."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, atype) + payload + b"\0" * (align4(length) - length)


def attr_u32(atype: int, value: int) -> bytes:
    return attr(atype, U32.pack(value))


def attr_u8(atype: int, value: int) -> bytes:
    return attr(atype, bytes((value,)))


def attr_str(atype: int, value: str) -> bytes:
    """A NUL-terminated string (IFLA_IFNAME, IFLA_INFO_KIND)."""
    return attr(atype, value.encode() + b"\0")


def attr_ip(atype: int, ip) -> bytes:
    return attr(atype, ip.packed)


def attr_mac(atype: int, mac: str) -> bytes:
    return attr(atype, bytes.fromhex(mac.replace(":", "")))


def nest(atype: int, *attrs: bytes) -> bytes:
    """A nested attribute holding ``attrs`` (pass ``X | NLA_F_NESTED`` where the kernel wants the flag)."""
    return attr(atype, b"".join(attrs))


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0, family: int = 0, dev_type: int = 0) -> bytes:
    return IFINFOMSG.pack(family, dev_type, index, flags, change)


def ifaddrmsg(family: int, prefixlen: int, index: int, flags: int = 0, scope: int = 0) -> bytes:
    return IFADDRMSG.pack(family, prefixlen, flags, scope, index)


def rtmsg(family: int, dst_len: int, table: int = RT_TABLE_MAIN, protocol: int = RTPROT_BOOT,
          scope: int = RT_SCOPE_UNIVERSE, rtype: int = RTN_UNICAST) -> bytes:
    return RTMSG.pack(family, dst_len, 0, 0, table, protocol, scope, rtype, 0)


def _family(ip) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


# request bodies (what follows the nlmsghdr) ---------------------------------------------------

def veth_request(name: str, peer_name: str, peer_ns_fd: int, *, mtu: int = 0, master: int = 0,
                 up: bool = False) -> bytes:
    """RTM_NEWLINK for a veth pair: ``name`` here, ``peer_name`` created in the namespace
    of ``peer_ns_fd``; this end up when ``up`` and enslaved to ``master``.  (The peer
    cannot be made up in the same request: veth_open refuses while the pair is not
    linked yet, ENOTCONN.)"""
    updown = IFF_UP if up else 0
    peer = ifinfomsg() + attr_str(IFLA_IFNAME, peer_name)
    if mtu:
        peer += attr_u32(IFLA_MTU, mtu)
    peer += attr_u32(IFLA_NET_NS_FD, peer_ns_fd)
    body = ifinfomsg(flags=updown, change=updown) + attr_str(IFLA_IFNAME, name)
    if mtu:
        body += attr_u32(IFLA_MTU, mtu)
    if master:
        body += attr_u32(IFLA_MASTER, master)
    return body + nest(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "veth"),
                       nest(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)))


def bridge_request(name: str, mtu: int = 0) -> bytes:
    body = ifinfomsg() + attr_str(IFLA_IFNAME, name)
    if mtu:
        body += attr_u32(IFLA_MTU, mtu)
    return body + nest(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge"))


def link_request(index: int = 0, name: str = "", *, up: Optional[bool] = None, promisc: Optional[bool] = None,
                 mac: str = "", master: Optional[int] = None) -> bytes:
    """RTM_SETLINK/RTM_DELLINK/RTM_GETLINK body: a link by index, or by name when index is 0."""
    flags = change = 0
    if up is not None:
        change |= IFF_UP
        flags |= IFF_UP if up else 0
    if promisc is not None:
        change |= IFF_PROMISC
        flags |= IFF_PROMISC if promisc else 0
    body = ifinfomsg(index=index, flags=flags, change=change)
    if not index:
        body += attr_str(IFLA_IFNAME, name)
    if mac:
        body += attr_mac(IFLA_ADDRESS, mac)
    if master is not None:
        body += attr_u32(IFLA_MASTER, master)
    return body


def hairpin_request(index: int, on: bool) -> bytes:
    """RTM_SETLINK (AF_BRIDGE) of a bridge port's hairpin mode, as the reference plugins send it."""
    return (ifinfomsg(index=index, family=AF_BRIDGE)
            + nest(IFLA_PROTINFO | NLA_F_NESTED, attr_u8(IFLA_BRPORT_MODE, 1 if on else 0)))


def address_request(index: int, iface) -> bytes:
    """RTM_NEWADDR/RTM_DELADDR body; IPv4 below /31 gets the subnet's broadcast, as the reference sets."""
    ip = iface.ip
    body = ifaddrmsg(_family(ip), iface.network.prefixlen, index)
    body += attr_ip(IFA_LOCAL, ip) + attr_ip(IFA_ADDRESS, ip)
    if ip.version == 4 and iface.network.prefixlen < 31:
        body += attr_ip(IFA_BROADCAST, iface.network.broadcast_address)
    return body


def route_request(dst, gateway=None, oif: int = 0, protocol: int = RTPROT_BOOT) -> bytes:
    """RTM_NEWROUTE body for the main table, scope universe (the reference's AddRoute)."""
    body = rtmsg(_family(dst.network_address), dst.prefixlen, protocol=protocol)
    if dst.prefixlen:
        body += attr_ip(RTA_DST, dst.network_address)
    if gateway is not None:
        body += attr_ip(RTA_GATEWAY, gateway)
    if oif:
        body += attr_u32(RTA_OIF, oif)
    return body


# parsing -------------------------------------------------------------------------------

def parse_attrs(data: bytes, offset: int = 0, end: Optional[int] = None) -> dict[int, bytes]:
    """Attributes from ``offset`` to ``end`` as {type (flags masked): payload}; the last one of a type wins."""
    out: dict[int, bytes] = {}
    end = len(data) if end is None else end
    while offset + NLATTR.size <= end:
        length, atype = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > end:
            break
        out[atype & NLA_TYPE_MASK] = data[offset + NLATTR.size:offset + length]
        offset += align4(length)
    return out


def parse_messages(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(buf):
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSGHDR.size or offset + length > len(buf):
            break
        yield mtype, flags, seq, buf[offset + NLMSGHDR.size:offset + length]
        offset += align4(length)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


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


def parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(body)
    a = parse_attrs(body, IFINFOMSG.size)
    info = parse_attrs(a[IFLA_LINKINFO]) if IFLA_LINKINFO in a else {}

    def u32(key: int) -> int:
        return U32.unpack(a[key][:4])[0] if key in a else 0

    return Link(index=index, name=_cstr(a.get(IFLA_IFNAME, b"")), kind=_cstr(info.get(IFLA_INFO_KIND, b"")),
                mac=_mac(a.get(IFLA_ADDRESS, b"")), mtu=u32(IFLA_MTU), up=bool(flags & IFF_UP),
                promisc=bool(flags & IFF_PROMISC), master=u32(IFLA_MASTER), peer=u32(IFLA_LINK))


def parse_address(body: bytes):
    """(ifindex, ip_interface) of an RTM_NEWADDR message, or None without IFA_ADDRESS."""
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(body)
    a = parse_attrs(body, IFADDRMSG.size)
    raw = a.get(IFA_ADDRESS) or a.get(IFA_LOCAL)
    if raw is None:
        return None
    return index, ipaddress.ip_interface((ipaddress.ip_address(raw), prefixlen))


def _error_of(body: bytes, flags: int) -> tuple[int, str]:
    """errno (positive, 0 for an ACK) and the extended-ACK message of an NLMSG_ERROR body."""
    err = -ERRNO.unpack_from(body)[0]
    msg = ""
    if err and flags & NLM_F_ACK_TLVS:
        offset = ERRNO.size + NLMSGHDR.size
        if not flags & NLM_F_CAPPED:
            offset = ERRNO.size + align4(NLMSGHDR.unpack_from(body, ERRNO.size)[0])
        msg = _cstr(parse_attrs(body, offset).get(NLMSGERR_ATTR_MSG, b""))
    return err, msg


# the socket ----------------------------------------------------------------------------

class NetlinkSocket:
    """A NETLINK_ROUTE socket bound to the namespace it was opened in."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                try:
                    self.sock.setsockopt(SOL_NETLINK, opt, 1)
                except OSError:
                    pass  # an old kernel: plain errors, full requests echoed back
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0
        self.requests = 0  # how many requests this socket sent (for tests and benchmarks)

    @classmethod
    def in_namespace(cls, ns: str) -> "NetlinkSocket":
        """A socket opened inside namespace ``ns`` (a name or path); it stays bound there."""
        with nsutil.entered(ns):
            return cls()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "NetlinkSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # transport ---------------------------------------------------------------------
    def request(self, msg_type: int, body: bytes, flags: int = 0) -> list[bytes]:
        """Send one request with NLM_F_ACK; the bodies of the answers before the ACK.

        Raises OSError(errno) for a kernel error; answers to older requests (left
        unread by an interrupted call) are skipped by sequence number."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        seq = self.seq
        self.requests += 1
        self.sock.sendto(nlmsg(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, seq, body), (0, 0))
        out: list[bytes] = []
        while True:
            buf = self.sock.recv(RECV_SIZE)
            for mtype, mflags, mseq, mbody in parse_messages(buf):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    err, msg = _error_of(mbody, mflags)
                    if err:
                        text = os.strerror(err) + (f" ({msg})" if msg else "")
                        raise OSError(err, text)
                    return out
                if mtype == NLMSG_DONE:
                    return out
                if mtype != NLMSG_NOOP:
                    out.append(mbody)

    def dump(self, msg_type: int, body: bytes) -> list[bytes]:
        """An NLM_F_DUMP request: the bodies of every answer up to NLMSG_DONE."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        seq = self.seq
        self.requests += 1
        self.sock.sendto(nlmsg(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, body), (0, 0))
        out: list[bytes] = []
        while True:
            buf = self.sock.recv(RECV_SIZE)
            for mtype, mflags, mseq, mbody in parse_messages(buf):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err, msg = _error_of(mbody, mflags)
                    if err:
                        raise OSError(err, os.strerror(err) + (f" ({msg})" if msg else ""))
                    return out
                out.append(mbody)

    # links -------------------------------------------------------------------------
    def get_link(self, name: str = "", index: int = 0) -> Optional[Link]:
        """One RTM_GETLINK (not a dump) by index or name; None if there is no such link."""
        try:
            answers = self.request(RTM_GETLINK, link_request(index, name))
        except OSError as e:
            if e.errno == errno_mod.ENODEV:
                return None
            raise
        return parse_link(answers[0]) if answers else None

    def add_veth(self, name: str, peer_name: str, peer_ns_fd: int, *, mtu: int = 0, master: int = 0,
                 up: bool = False) -> Optional[Link]:
        """Make the pair; this end as the kernel echoes it back (index, MAC, peer index;
        Linux 6.3 and later), None where it does not."""
        answers = self.request(RTM_NEWLINK, veth_request(name, peer_name, peer_ns_fd, mtu=mtu, master=master, up=up),
                               NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO)
        echoed = [link for link in map(parse_link, answers) if link.name == name]
        return echoed[-1] if echoed else None

    def add_bridge(self, name: str, mtu: int = 0) -> None:
        """A bridge (an existing link of that name is left alone)."""
        try:
            self.request(RTM_NEWLINK, bridge_request(name, mtu), NLM_F_CREATE | NLM_F_EXCL)
        except OSError as e:
            if e.errno != errno_mod.EEXIST:
                raise

    def set_link(self, index: int = 0, name: str = "", **changes) -> None:
        """up=, promisc=, mac=, master= on a link by index (or name)."""
        self.request(RTM_SETLINK, link_request(index, name, **changes))

    def set_hairpin(self, index: int, on: bool) -> None:
        self.request(RTM_SETLINK, hairpin_request(index, on))

    def del_link(self, name: str = "", index: int = 0) -> bool:
        """Delete a link by index or name; False if it was not there."""
        try:
            self.request(RTM_DELLINK, link_request(index, name))
        except OSError as e:
            if e.errno == errno_mod.ENODEV:
                return False
            raise
        return True

    # addresses and routes ---------------------------------------------------------------
    def addresses(self, index: int, family: int = 0) -> list:
        """Addresses on a link as ip_interface objects (link-local IPv6 included)."""
        out = []
        for body in self.dump(RTM_GETADDR, ifaddrmsg(family, 0, index)):
            parsed = parse_address(body)
            if parsed is not None and parsed[0] == index and (not family or _family(parsed[1].ip) == family):
                out.append(parsed[1])
        return out

    def add_address(self, index: int, iface) -> None:
        """Add an address (already there: nothing to do)."""
        try:
            self.request(RTM_NEWADDR, address_request(index, iface), NLM_F_CREATE | NLM_F_EXCL)
        except OSError as e:
            if e.errno != errno_mod.EEXIST:
                raise

    def del_address(self, index: int, iface) -> None:
        self.request(RTM_DELADDR, address_request(index, iface))

    def add_route(self, dst, gateway=None, oif: int = 0) -> None:
        """Add a main-table route (already there: nothing to do)."""
        try:
            self.request(RTM_NEWROUTE, route_request(dst, gateway, oif), NLM_F_CREATE | NLM_F_EXCL)
        except OSError as e:
            if e.errno != errno_mod.EEXIST:
                raise


# the host namespace's socket, per thread ------------------------------------------------------------

MAX_CACHED_PER_THREAD = 8


class HostSocket:
    """A socket of the namespace playing the host, with ``memo``: what the plugin
    verified there and may take as known while this namespace lives (a bridge)."""

    def __init__(self, nl: NetlinkSocket, ident: Optional[tuple[int, int]] = None) -> None:
        self.nl = nl
        self.ident = ident
        self.memo: dict = {}

    def close(self) -> None:
        self.memo.clear()
        self.nl.close()

    def __del__(self) -> None:  # a thread's cache goes when the thread ends
        with contextlib.suppress(Exception):
            self.close()


_local = threading.local()


def _ns_ident(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _cache() -> dict[str, HostSocket]:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    return cache


def _sweep(cache: dict[str, HostSocket], keep: str) -> None:
    """Close the sockets of namespaces that were deleted (or replaced under the same
    name) since: a socket holds its namespace alive, so it must not outlive the name."""
    for path, entry in list(cache.items()):
        if path != keep and _ns_ident(path) != entry.ident:
            del cache[path]
            entry.close()


@contextlib.contextmanager
def host_socket(path: Optional[str]) -> Iterator[HostSocket]:
    """The socket of the namespace the calling thread is in, which ``path`` names.

    With a ``path`` (an in-process call with a known host namespace) the socket and
    its memo are kept for the next call on this thread with the same namespace: the
    namespace is identified by the (device, inode) of ``path``, which cannot be
    reused while our socket holds the namespace; a namespace whose name is gone or
    points elsewhere is closed at the next call of this thread (or by `close_cached`).
    If the body is interrupted (KeyboardInterrupt, SystemExit), the socket is
    dropped.  Without a path the socket is opened here and closed on exit.
    """
    if path is None:
        entry = HostSocket(NetlinkSocket())
        try:
            yield entry
        finally:
            entry.close()
        return
    cache = _cache()
    ident = _ns_ident(path)
    _sweep(cache, keep=path)
    entry = cache.get(path)
    if entry is not None and (ident is None or entry.ident != ident):
        del cache[path]
        entry.close()
        entry = None
    if entry is None:
        entry = HostSocket(NetlinkSocket.in_namespace(path), ident)
        if len(cache) >= MAX_CACHED_PER_THREAD:
            oldest = next(iter(cache))
            cache.pop(oldest).close()
        cache[path] = entry
    else:  # most recently used last
        cache[path] = cache.pop(path)
    try:
        yield entry
    except Exception:  # a kernel or plugin error leaves the socket sound
        raise
    except BaseException:  # interrupted, maybe between a request and its answer
        if cache.get(path) is entry:
            del cache[path]
        entry.close()
        raise


def close_cached() -> None:
    """Close this thread's cached host-namespace sockets."""
    cache = _cache()
    while cache:
        cache.popitem()[1].close()
