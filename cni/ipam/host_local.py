"""kproxy-host-local: the host-local IPAM plugin (containernetworking/plugins v1.1.1).

Config (the ``ipam`` object of a network config)::

    {"type": "kproxy-host-local", "dataDir": "/var/lib/cni/networks",
     "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": ..., "rangeEnd": ..., "gateway": ...}]],
     "subnet": ..., "rangeStart": ..., "rangeEnd": ..., "gateway": ...,   (old style, one range)
     "routes": [{"dst": "0.0.0.0/0"}], "resolvConf": "/etc/resolv.conf"}

One address per range set.  A specific address can be asked for with CNI_ARGS
``IP=10.244.1.7``, ``args.cni.ips`` or ``runtimeConfig.ips``.  Messages match the
reference plugin's; configuration errors use code 7, allocation failures 999 as it does.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from cni import result as cniresult
from cni import skel
from cni.ipam.allocator import (AllocationError, ConfigError, IPAddress, IPAllocator,
                                RangeSet, parse_cidr, parse_ip)
from cni.ipam.store import DiskStore
from cni.skel import CmdArgs, CNIError

PLUGIN_NAME = "kproxy-host-local"


@dataclass
class IPAMConfig:
    name: str
    ranges: list[RangeSet]
    routes: list[dict] = field(default_factory=list)
    data_dir: Optional[str] = None
    resolv_conf: str = ""
    requested: list[IPAddress] = field(default_factory=list)


def _requested_ips(config: dict, cni_args: str) -> list[IPAddress]:
    out: list[IPAddress] = []
    ip_arg = skel.parse_args(cni_args).get("IP")
    if ip_arg:
        out.append(parse_ip(ip_arg))
    args_ips = ((config.get("args") or {}).get("cni") or {}).get("ips") or []
    runtime_ips = (config.get("runtimeConfig") or {}).get("ips") or []
    for value in list(args_ips) + list(runtime_ips):
        out.append(parse_ip(str(value).split("/")[0]))
    return out


def _parse_routes(routes: object) -> list[dict]:
    if routes is None:
        return []
    if not isinstance(routes, list):
        raise ConfigError("routes must be a list")
    out = []
    for r in routes:
        if not isinstance(r, dict):
            raise ConfigError("a route must be a JSON object")
        dst = parse_cidr(r.get("dst"))
        route = {"dst": dst.with_prefixlen}
        if r.get("gw"):
            route["gw"] = str(parse_ip(r["gw"]))
        out.append(route)
    return out


def load_config(config: dict, cni_args: str = "") -> IPAMConfig:
    """Parse and validate the IPAM part of a network config (raises CNIError)."""
    ipam = config.get("ipam")
    if not isinstance(ipam, dict):
        raise CNIError(skel.ERR_INVALID_CONFIG, "IPAM config missing 'ipam' key")
    try:
        raw_sets = list(ipam.get("ranges") or [])
        if ipam.get("subnet"):
            old = {k: ipam.get(k) for k in ("subnet", "rangeStart", "rangeEnd", "gateway")}
            raw_sets.insert(0, [old])
        runtime_ranges = (config.get("runtimeConfig") or {}).get("ipRanges") or []
        raw_sets = list(runtime_ranges) + raw_sets
        if not raw_sets:
            raise ConfigError("no IP ranges specified")
        ranges = []
        for i, raw in enumerate(raw_sets):
            try:
                ranges.append(RangeSet.parse(raw))
            except ConfigError as e:
                raise ConfigError(f"invalid range set {i}: {e}") from None
        for i, a in enumerate(ranges):
            for j in range(i + 1, len(ranges)):
                if a.overlaps(ranges[j]):
                    raise ConfigError(f"range set {i} overlaps with {j}")
        return IPAMConfig(
            name=config["name"],
            ranges=ranges,
            routes=_parse_routes(ipam.get("routes")),
            data_dir=ipam.get("dataDir") or None,
            resolv_conf=ipam.get("resolvConf") or "",
            requested=_requested_ips(config, cni_args),
        )
    except ConfigError as e:
        raise CNIError(skel.ERR_INVALID_CONFIG, str(e)) from None


def parse_resolv_conf(path: str) -> dict:
    dns: dict = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CNIError(skel.ERR_IO, f"failed to read resolvConf {path}: {e}") from None
    for line in lines:
        fields = line.split("#")[0].split()
        if len(fields) < 2:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver":
            dns.setdefault("nameservers", []).append(values[0])
        elif key == "domain":
            dns["domain"] = values[0]
        elif key == "search":
            dns["search"] = values
        elif key == "options":
            dns.setdefault("options", []).extend(values)
    return dns


def cmd_add(args: CmdArgs) -> dict:
    conf = load_config(args.config, args.args)
    dns = parse_resolv_conf(conf.resolv_conf) if conf.resolv_conf else {}
    requested = list(conf.requested)
    used: list[IPAllocator] = []
    ips = []
    with DiskStore(conf.name, conf.data_dir) as store:
        try:
            for idx, rangeset in enumerate(conf.ranges):
                alloc = IPAllocator(rangeset, store, idx)
                want = next((ip for ip in requested if rangeset.contains(ip)), None)
                if want is not None:
                    requested.remove(want)
                try:
                    address, gateway = alloc.get(args.container_id, args.ifname, want)
                except AllocationError as e:
                    raise CNIError(skel.ERR_INTERNAL, f"failed to allocate for range {idx}: {e}") from None
                used.append(alloc)
                ips.append({"address": address.with_prefixlen, "gateway": str(gateway)})
            if requested:
                raise CNIError(skel.ERR_INTERNAL, "failed to allocate all requested IPs: "
                               + " ".join(str(ip) for ip in requested))
        except BaseException:
            for alloc in used:
                alloc.release(args.container_id, args.ifname)
            raise
    return {"ips": ips, "routes": conf.routes, "dns": dns}


def cmd_del(args: CmdArgs) -> None:
    conf = load_config(args.config, args.args)
    with DiskStore(conf.name, conf.data_dir) as store:
        errors = []
        for idx, rangeset in enumerate(conf.ranges):
            try:
                IPAllocator(rangeset, store, idx).release(args.container_id, args.ifname)
            except OSError as e:
                errors.append(str(e))
        if errors:
            raise CNIError(skel.ERR_IO, ";".join(errors))


def cmd_check(args: CmdArgs) -> None:
    """An address is recorded for (containerID, ifname); prevResult's addresses in our
    ranges are the recorded ones."""
    conf = load_config(args.config, args.args)
    with DiskStore(conf.name, conf.data_dir) as store:
        mine = set(store.get_by_id(args.container_id, args.ifname))
    if not mine:
        raise CNIError(skel.ERR_INTERNAL, f"host-local: Failed to find address added by container {args.container_id}")
    prev = args.config.get("prevResult")
    if prev:
        try:
            prev = cniresult.parse(prev)
        except (ValueError, KeyError, TypeError) as e:
            raise CNIError(skel.ERR_DECODE, f"failed to parse prevResult: {e}") from None
        for ipc in prev.get("ips", []):
            ip = ipaddress.ip_interface(ipc["address"]).ip
            if any(rs.contains(ip) for rs in conf.ranges) and ip not in mine:
                raise CNIError(skel.ERR_INTERNAL,
                               f"host-local: {ip} in prevResult is not allocated to container {args.container_id}")


def cmd_gc(args: CmdArgs) -> None:
    """Release every address whose (containerID, ifname) is not in cni.dev/valid-attachments."""
    conf = load_config(args.config, args.args)
    valid = {(a.get("containerID", ""), a.get("ifname", ""))
             for a in args.config.get("cni.dev/valid-attachments") or []}
    with DiskStore(conf.name, conf.data_dir) as store, store.lock():
        for ip, (cid, ifname) in store.allocations().items():
            if (cid, ifname) not in valid:
                store.release(ip)


def cmd_status(args: CmdArgs) -> None:
    load_config(args.config, args.args)


PLUGIN = skel.Plugin(PLUGIN_NAME, add=cmd_add, delete=cmd_del, check=cmd_check, gc=cmd_gc, status=cmd_status)


def main() -> None:
    skel.main(PLUGIN)


if __name__ == "__main__":
    main()
