"""kproxy-bridge: the bridge CNI plugin (containernetworking/plugins bridge v1.1.1).

The namespace the plugin runs in is the "host" (for kproxy, an emulated node).  ADD:

1. ensure the bridge (``bridge``, default cni0): created if missing, up;
2. a veth pair: the host side ``veth<8 hex of sha256(containerID, ifname)>`` on the
   bridge (hairpin when ``hairpinMode``), the container side CNI_IFNAME created directly
   in CNI_NETNS;
3. IPAM (``ipam.type``, delegated per spec), addresses and routes on the container side
   (a default route via the gateway when ``isDefaultGateway``), ``lo`` up;
4. when ``isGateway``: the gateway address on the bridge and forwarding on, in the host
   namespace only.

Whatever this ADD made is undone if a later step fails.  DEL is idempotent.  CHECK
compares the namespace with ``prevResult`` and asks IPAM to check its allocation.

ADD and DEL talk netlink through `cni.fastnl` (CHECK reads through pyroute2).  In
process, with a known host namespace, the host socket is kept per thread, and so is
what step 1 and the gateway address of step 4 found: the next ADD there goes straight
to step 2, naming the bridge by its index; should the bridge be gone or replaced
meanwhile, that creation fails and the ADD does step 1 again, then goes on.
``ipMasq``, ``vlan`` and ``macspoofchk`` are refused with code 2 (unsupported field):
in kproxy masquerading belongs to the proxier's rules.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from cni import fastnl, invoke
from cni import netns as nsutil
from cni import result as cniresult
from cni import skel
from cni.netns import sysctl
from cni.skel import CmdArgs, CNIError

if TYPE_CHECKING:  # CHECK reads through pyroute2, imported only when it runs
    from cni.links import Links

PLUGIN_NAME = "kproxy-bridge"
DEFAULT_BRIDGE = "cni0"
CONTAINER_INDEX = 2  # position of the container interface in result["interfaces"]


@dataclass
class NetConf:
    name: str
    cni_version: str
    bridge: str = DEFAULT_BRIDGE
    is_gateway: bool = False
    is_default_gateway: bool = False
    force_address: bool = False
    ip_masq: bool = False
    mtu: int = 0
    hairpin_mode: bool = False
    promisc_mode: bool = False
    vlan: int = 0
    macspoofchk: bool = False
    ipam_type: str = ""
    prev_result: Optional[dict] = None


_BOOL_FIELDS = {"isGateway": "is_gateway", "isDefaultGateway": "is_default_gateway",
                "forceAddress": "force_address", "ipMasq": "ip_masq", "hairpinMode": "hairpin_mode",
                "promiscMode": "promisc_mode", "macspoofchk": "macspoofchk"}


def _invalid(msg: str) -> CNIError:
    return CNIError(skel.ERR_INVALID_CONFIG, f"failed to load netconf: {msg}")


def load_conf(config: dict) -> NetConf:
    conf = NetConf(name=config["name"], cni_version=config.get("cniVersion", ""))
    for key, attr in _BOOL_FIELDS.items():
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise _invalid(f"{key} must be a boolean")
        setattr(conf, attr, value)
    for key in ("mtu", "vlan"):
        value = config.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _invalid(f"{key} must be a non-negative integer")
        setattr(conf, key, value)
    bridge = config.get("bridge") or DEFAULT_BRIDGE
    if not isinstance(bridge, str) or len(bridge) > skel.MAX_IFNAME or any(c in "/: " for c in bridge):
        raise _invalid(f"invalid bridge name {bridge!r}")
    conf.bridge = bridge
    ipam = config.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise _invalid("ipam must be an object")
    conf.ipam_type = ipam.get("type") or ""
    conf.prev_result = config.get("prevResult")
    if conf.vlan > 4094:
        raise _invalid(f"invalid VLAN ID {conf.vlan} (must be between 0 and 4094)")
    if conf.is_default_gateway:
        conf.is_gateway = True
    return conf


def _refuse_unsupported(conf: NetConf) -> None:
    if conf.ip_masq:
        raise CNIError(skel.ERR_UNSUPPORTED_FIELD, "ipMasq is not supported by kproxy-bridge",
                       "masquerading is done by the proxier's rules; set ipMasq to false")
    if conf.vlan:
        raise CNIError(skel.ERR_UNSUPPORTED_FIELD, "vlan is not supported by kproxy-bridge")
    if conf.macspoofchk:
        raise CNIError(skel.ERR_UNSUPPORTED_FIELD, "macspoofchk is not supported by kproxy-bridge")
    if conf.hairpin_mode and conf.promisc_mode:
        raise CNIError(skel.ERR_INVALID_CONFIG, "cannot set hairpin mode and promiscuous mode at the same time.")


def host_veth_name(container_id: str, ifname: str) -> str:
    """``veth`` + 8 hex chars, a function of (containerID, ifname): 12 chars."""
    digest = hashlib.sha256(f"{container_id}\x00{ifname}".encode()).hexdigest()
    return "veth" + digest[:8]


def random_mac() -> str:
    """A random unicast, locally administered MAC address."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{x:02x}" for x in b)


def _internal(msg: str) -> CNIError:
    return CNIError(skel.ERR_INTERNAL, msg)


def _open_container(path: str) -> fastnl.NetlinkSocket:
    try:
        return fastnl.NetlinkSocket.in_namespace(path)
    except OSError as e:
        raise _internal(f'failed to open netns "{path}": {e.strerror or e}') from None


# ADD ------------------------------------------------------------------------
#
# Netlink requests of an ADD whose bridge this process already verified in that host
# namespace (IPv4, hairpin, one route): the veth pair (the host end created up and
# enslaved and echoed back, its peer made directly in the container), the container
# end up and read back (MAC, index), the hairpin flag, the address, the route, lo up,
# and the bridge read back (its MAC for the result; set down since: up again): 8, on
# two sockets (9 on kernels before 6.3, which do not echo the new link).

@dataclass
class KnownBridge:
    """A bridge this process verified (or made) in a host namespace: the memo of
    that namespace's `fastnl.HostSocket`, so the next ADD skips the checks."""
    index: int
    name: str
    promisc: bool
    gateways: set = field(default_factory=set)  # str(ip_interface) found or put on it


# errno of a veth creation whose IFLA_MASTER names no bridge any more (deleted, replaced)
_BRIDGE_GONE = (errno.ENODEV, errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP)


def ensure_bridge(nl: fastnl.NetlinkSocket, conf: NetConf) -> fastnl.Link:
    """The bridge made if missing, its kind checked, promiscuous if asked, up."""
    try:
        br = nl.get_link(conf.bridge)
        if br is None:
            nl.add_bridge(conf.bridge, conf.mtu)
            br = nl.get_link(conf.bridge)
            if br is None:
                raise _internal(f"could not lookup {conf.bridge!r}")
            # a MAC of its own, set explicitly: the bridge id follows it and it does
            # not change to the lowest port MAC as ports come and go
            nl.set_link(br.index, mac=random_mac())
        if br.kind != "bridge":
            raise _internal(f"{conf.bridge!r} already exists but is not a bridge")
        if conf.promisc_mode and not br.promisc:
            nl.set_link(br.index, promisc=True)
        sysctl(f"net/ipv6/conf/{conf.bridge}/accept_ra", "0")  # we own this bridge's routes
        if not br.up:
            nl.set_link(br.index, up=True)
        br = nl.get_link(conf.bridge)
    except OSError as e:
        raise _internal(f"failed to create bridge {conf.bridge!r}: {e}") from None
    if br is None:
        raise _internal(f"could not lookup {conf.bridge!r}")
    return br


def _known_bridge(host: fastnl.HostSocket, conf: NetConf, recheck: bool = False) -> tuple[KnownBridge, bool]:
    """The bridge, from the memo when this process already verified it there (True),
    else after `ensure_bridge` (False)."""
    key = ("bridge", conf.bridge)
    known = host.memo.get(key)
    if known is not None and not recheck and (known.promisc or not conf.promisc_mode):
        return known, True
    br = ensure_bridge(host.nl, conf)
    known = host.memo[key] = KnownBridge(br.index, br.name, br.promisc)
    return known, False


def _make_veth(host: fastnl.NetlinkSocket, cont: fastnl.NetlinkSocket, host_name: str, args: CmdArgs,
               conf: NetConf, master: int) -> Optional[fastnl.Link]:
    """One request: the container end made in its namespace, the host end up and on
    the bridge (returned as the kernel echoes it, when it does).  A name already
    taken is reported as the reference does."""
    fd = nsutil.open_fd(args.netns)
    try:
        return host.add_veth(host_name, args.ifname, fd, mtu=conf.mtu, master=master, up=True)
    except OSError as e:
        if e.errno == errno.EEXIST:
            if cont.get_link(args.ifname) is not None:
                raise _internal(f"container veth name provided ({args.ifname}) already exists") from None
            if host.get_link(host_name) is not None:
                raise _internal(f"host veth name {host_name} (for {args.container_id}/{args.ifname}) "
                                "already exists") from None
        raise
    finally:
        os.close(fd)


def _setup_veth(host: fastnl.HostSocket, cont: fastnl.NetlinkSocket, args: CmdArgs, conf: NetConf,
                bridge: KnownBridge, from_memo: bool, undo: list[Callable[[], None]]):
    host_name = host_veth_name(args.container_id, args.ifname)
    nl = host.nl
    try:
        try:
            hveth = _make_veth(nl, cont, host_name, args, conf, bridge.index)
        except OSError as e:
            if not (from_memo and e.errno in _BRIDGE_GONE):
                raise
            # the bridge this process knew is gone or replaced: the whole ensure again
            bridge, _ = _known_bridge(host, conf, recheck=True)
            hveth = _make_veth(nl, cont, host_name, args, conf, bridge.index)
    except OSError as e:
        raise _internal(f"failed to make veth pair: {e}") from None
    undo.append(lambda: nl.del_link(host_name))
    try:
        if hveth is None:  # a kernel that does not echo a new link
            hveth = nl.get_link(host_name)
        cont.set_link(name=args.ifname, up=True)
        cveth = cont.get_link(args.ifname)
        if hveth is None or cveth is None:
            raise _internal(f"veth pair {host_name}/{args.ifname} vanished after creation")
        if conf.hairpin_mode:
            try:
                nl.set_hairpin(hveth.index, True)
            except OSError as e:
                raise _internal(f"failed to setup hairpin mode for {host_name}: {e}") from None
    except OSError as e:
        raise _internal(f"failed to set up veth pair {host_name}/{args.ifname}: {e}") from None
    return bridge, hveth, cveth


def _calc_gateways(res: dict, conf: NetConf) -> dict[int, list]:
    """Fill in gateways (.1 of the subnet when isGateway and IPAM gave none), the
    default routes of isDefaultGateway, and the bridge addresses per family."""
    gws: dict[int, list] = {4: [], 6: []}
    default_done = {4: False, 6: False}
    routes = res.setdefault("routes", [])
    for ipc in res["ips"]:
        iface = ipaddress.ip_interface(ipc["address"])
        fam = iface.version
        ipc["interface"] = CONTAINER_INDEX
        if not ipc.get("gateway") and conf.is_gateway:
            ipc["gateway"] = str(iface.network.network_address + 1)
        if conf.is_default_gateway and not default_done[fam]:
            default = "0.0.0.0/0" if fam == 4 else "::/0"
            if not any(r.get("gw") and r["dst"] == default for r in routes):
                routes.append({"dst": default, "gw": ipc["gateway"]})
            default_done[fam] = True
        if conf.is_gateway:
            gws[fam].append(ipaddress.ip_interface(f"{ipc['gateway']}/{iface.network.prefixlen}"))
    return gws


def _configure_container(cont: fastnl.NetlinkSocket, link: fastnl.Link, netns_path: str, res: dict) -> None:
    """Addresses and routes: libcni's ipam.ConfigureIface (the link is up since its creation)."""
    ifname = link.name
    ifaces = [ipaddress.ip_interface(ipc["address"]) for ipc in res["ips"]]
    if any(i.version == 6 for i in ifaces):
        with nsutil.entered(netns_path):
            sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "0")
            sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "0")
    gw_by_family: dict[int, str] = {}
    for ipc, iface in zip(res["ips"], ifaces):
        try:
            cont.add_address(link.index, iface)
        except OSError as e:
            raise _internal(f"failed to add IP addr {iface} to {ifname!r}: {e}") from None
        if ipc.get("gateway"):
            gw_by_family.setdefault(iface.version, ipc["gateway"])
    for r in res.get("routes", []):
        dst = ipaddress.ip_network(r["dst"], strict=False)
        gw = r.get("gw") or gw_by_family.get(dst.version)
        try:
            cont.add_route(dst, ipaddress.ip_address(gw) if gw else None, link.index)
        except OSError as e:
            raise _internal(f"failed to add route '{dst} via {gw} dev {ifname}': {e}") from None


def _ensure_bridge_addr(nl: fastnl.NetlinkSocket, br: KnownBridge, gw, force: bool) -> None:
    family = socket.AF_INET if gw.version == 4 else socket.AF_INET6
    for a in nl.addresses(br.index, family):
        if a == gw:
            return
        if gw.version == 4 or gw.ip in a.network or a.ip in gw.network:
            if not force:
                raise _internal(f'"{br.name}" already has an IP address different from {gw}')
            nl.del_address(br.index, a)
    nl.add_address(br.index, gw)
    # pin the bridge's MAC, or it follows the lowest port MAC as ports come and go
    link = nl.get_link(index=br.index)
    if link is not None:
        nl.set_link(br.index, mac=link.mac)


def _enable_forwarding(version: int) -> None:
    key = "net/ipv4/ip_forward" if version == 4 else "net/ipv6/conf/all/forwarding"
    if not sysctl(key, "1"):
        raise _internal(f"failed to enable forwarding ({key})")


def cmd_add(args: CmdArgs) -> dict:
    conf = load_conf(args.config)
    _refuse_unsupported(conf)
    undo: list[Callable[[], None]] = []
    host_path = invoke.host_namespace() if args.in_process else None
    with fastnl.host_socket(host_path) as host, _open_container(args.netns) as cont:
        bridge, from_memo = _known_bridge(host, conf)
        try:
            bridge, hveth, cveth = _setup_veth(host, cont, args, conf, bridge, from_memo, undo)
            res: dict = {
                "interfaces": [
                    {"name": bridge.name, "mac": ""},
                    {"name": hveth.name, "mac": hveth.mac},
                    {"name": cveth.name, "mac": cveth.mac, "sandbox": args.netns},
                ],
            }
            if conf.ipam_type:
                ipam_out = invoke.delegate("ADD", conf.ipam_type, args)
                undo.append(lambda: _quiet(lambda: invoke.delegate("DEL", conf.ipam_type, args)))
                try:
                    ipam = cniresult.parse(ipam_out)
                except (ValueError, KeyError, TypeError) as e:
                    raise CNIError(skel.ERR_DECODE, f"cannot parse the IPAM result: {e}") from None
                if not ipam.get("ips"):
                    raise _internal("IPAM plugin returned missing IP config")
                res.update(ips=ipam["ips"], routes=ipam.get("routes", []), dns=ipam.get("dns", {}))
                gws = _calc_gateways(res, conf)
                _configure_container(cont, cveth, args.netns, res)
                for version, family_gws in gws.items():
                    for gw in family_gws:
                        if str(gw) in bridge.gateways:
                            continue  # found or put there by an earlier ADD of this process
                        try:
                            _ensure_bridge_addr(host.nl, bridge, gw, conf.force_address)
                        except OSError as e:
                            raise _internal(f"failed to set bridge addr: {e}") from None
                        bridge.gateways.add(str(gw))
                    if family_gws:
                        _enable_forwarding(version)
            try:
                cont.set_link(name="lo", up=True)
                br = host.nl.get_link(conf.bridge)
            except OSError as e:
                raise _internal(f"failed to finish the interfaces of {args.container_id}: {e}") from None
            if br is not None and from_memo and (not br.up or (conf.promisc_mode and not br.promisc)):
                # set down (or back to non-promiscuous) since this process checked it
                br = ensure_bridge(host.nl, conf)
            if br is None:
                raise _internal(f"could not lookup {conf.bridge!r}")
            if br.index != bridge.index or br.kind != "bridge":
                host.memo.pop(("bridge", conf.bridge), None)  # replaced meanwhile: the next ADD checks it all
            # the MAC read last, as the reference does: a bridge's follows its ports unless set
            res["interfaces"][0]["mac"] = br.mac
            return res
        except BaseException:
            for step in reversed(undo):
                _quiet(step)
            raise


def _quiet(step: Callable[[], object]) -> None:
    try:
        step()
    except Exception:
        pass


# DEL ------------------------------------------------------------------------

def cmd_del(args: CmdArgs) -> None:
    conf = load_conf(args.config)
    if args.netns:
        try:
            cont = fastnl.NetlinkSocket.in_namespace(args.netns)
        except OSError as e:
            # the namespace is gone (or its mount is): its veth end went with it
            if e.errno not in (errno.ENOENT, errno.EINVAL):
                raise _internal(f'failed to open netns "{args.netns}": {e.strerror or e}') from None
        else:
            with cont:
                try:
                    cont.del_link(args.ifname)
                except OSError as e:
                    raise _internal(f"failed to delete {args.ifname!r}: {e}") from None
    host_path = invoke.host_namespace() if args.in_process else None
    with fastnl.host_socket(host_path) as host:
        # gone with its peer normally; still here if the namespace outlived its mount
        try:
            hveth = host.nl.get_link(host_veth_name(args.container_id, args.ifname))
            if hveth is not None and hveth.kind == "veth":
                host.nl.del_link(index=hveth.index)
        except OSError as e:
            raise _internal(f"failed to delete the host veth of {args.container_id}: {e}") from None
    if conf.ipam_type:
        invoke.delegate("DEL", conf.ipam_type, args)


# CHECK ----------------------------------------------------------------------

def _check_links(host: Links, cont: Links, args: CmdArgs, conf: NetConf, prev: dict) -> None:
    br_if = next((i for i in prev.get("interfaces", []) if i["name"] == conf.bridge), None)
    cont_if = next((i for i in prev.get("interfaces", [])
                    if i["name"] == args.ifname and i.get("sandbox") == args.netns), None)
    if br_if is None:
        raise _internal(f"CNI created bridge {conf.bridge} in host namespace was not found")
    if br_if.get("sandbox"):
        raise _internal(f"Interface {br_if['name']} should not be in sandbox")
    br = host.get(conf.bridge)
    if br is None:
        raise _internal(f"Interface name {conf.bridge} not found")
    if br.kind != "bridge":
        raise _internal(f"Interface {conf.bridge} does not have link type of bridge")
    if br_if.get("mac") and br_if["mac"] != br.mac:
        raise _internal(f"Bridge interface {conf.bridge} Mac doesn't match: {br_if['mac']}")
    if br.promisc != conf.promisc_mode:
        raise _internal(f"Bridge interface {conf.bridge} configured Promisc Mode {conf.promisc_mode} "
                        f"doesn't match current state: {br.promisc}")
    if cont_if is None:
        raise _internal(f"Sandbox in prevResult doesn't match configured netns: {args.netns}")
    cveth = cont.get(args.ifname)
    if cveth is None:
        raise _internal(f"CNI created interface in container {args.ifname} not found")
    if cveth.kind != "veth":
        raise _internal(f"Error: Container interface {args.ifname} not of type veth")
    if cont_if.get("mac") and cont_if["mac"] != cveth.mac:
        raise _internal(f"Interface {args.ifname} Mac {cont_if['mac']} doesn't match container Mac: {cveth.mac}")
    if not cveth.up:
        raise _internal(f"Interface {args.ifname} in container is down")
    if conf.mtu and cveth.mtu != conf.mtu:
        raise _internal(f"Interface {args.ifname} MTU {cveth.mtu} doesn't match configured mtu {conf.mtu}")
    for intf in prev.get("interfaces", []):
        if intf["name"] in (conf.bridge, args.ifname) or intf.get("sandbox"):
            continue
        veth = host.get(intf["name"])
        if veth is None or veth.kind != "veth":
            continue
        if veth.index == cveth.peer and veth.peer == cveth.index and veth.master == br.index:
            if intf.get("mac") and intf["mac"] != veth.mac:
                raise _internal(f"Interface {intf['name']} Mac doesn't match: {intf['mac']} not found")
            if conf.hairpin_mode != host.hairpin(veth.index):
                raise _internal(f"Interface {intf['name']} hairpin mode doesn't match hairpinMode {conf.hairpin_mode}")
            return
    raise _internal(f"CNI veth created for bridge {conf.bridge} was not found")


def _check_addresses_and_routes(cont: Links, ifname: str, prev: dict) -> None:
    link = cont.get(ifname)
    have = set(cont.addresses(link.index))
    for ipc in prev.get("ips", []):
        want = ipaddress.ip_interface(ipc["address"])
        if want not in have:
            raise _internal(f"Failed to match addr {want} on interface {ifname}")
    table: dict[str, set] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for dst, gw, _oif in cont.routes(family):
            table.setdefault(dst, set()).add(str(ipaddress.ip_address(gw)) if gw else None)
    for ipc in prev.get("ips", []):
        subnet = str(ipaddress.ip_interface(ipc["address"]).network)
        if subnet not in table:
            raise _internal(f"Failed to find Gateway {ipc.get('gateway')} for interface {ifname}")
    for r in prev.get("routes", []):
        dst = str(ipaddress.ip_network(r["dst"], strict=False))
        gw = str(ipaddress.ip_address(r["gw"])) if r.get("gw") else None
        if dst not in table or (gw and gw not in table[dst]):
            shown = f"{{Dst:{dst} GW:{r.get('gw', '<nil>')}}}"
            raise _internal(f"Expected Route {shown} not found in routing table")


def cmd_check(args: CmdArgs) -> None:
    conf = load_conf(args.config)
    _refuse_unsupported(conf)
    from cni.links import Links

    try:
        cont = Links(args.netns)
    except OSError as e:
        raise _internal(f'failed to open netns "{args.netns}": {e.strerror or e}') from None
    with cont, Links() as host:
        if conf.ipam_type:
            invoke.delegate("CHECK", conf.ipam_type, args)
        if not conf.prev_result:
            raise _internal("Required prevResult missing")
        try:
            prev = cniresult.parse(conf.prev_result)
        except (ValueError, KeyError, TypeError) as e:
            raise CNIError(skel.ERR_DECODE, f"failed to parse prevResult: {e}") from None
        _check_links(host, cont, args, conf, prev)
        _check_addresses_and_routes(cont, args.ifname, prev)


# GC / STATUS (spec 1.1): the bridge keeps no per-attachment state of its own

def cmd_gc(args: CmdArgs) -> None:
    conf = load_conf(args.config)
    if conf.ipam_type:
        invoke.delegate("GC", conf.ipam_type, args)


def cmd_status(args: CmdArgs) -> None:
    conf = load_conf(args.config)
    if conf.ipam_type:
        invoke.delegate("STATUS", conf.ipam_type, args)


PLUGIN = skel.Plugin(PLUGIN_NAME, add=cmd_add, delete=cmd_del, check=cmd_check, gc=cmd_gc, status=cmd_status)


def main() -> None:
    skel.main(PLUGIN)


if __name__ == "__main__":
    main()
