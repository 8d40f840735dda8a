"""CNI results: one internal shape (spec 1.0) and its conversion to/from older versions.

The internal shape is the 1.0.0 result as a dict:
``{"cniVersion", "interfaces": [{"name", "mac", "sandbox"}], "ips": [{"interface",
"address", "gateway"}], "routes": [{"dst", "gw"}], "dns": {...}}``.
Keys are emitted in the reference plugins' order, and empty ones are left out as
their Go structs do (``omitempty``), except ``dns`` which is always there.
Versions 0.3.0, 0.3.1 and 0.4.0 share one shape: each IP also carries ``"version"``.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

_OLD_SHAPE = ("0.3.0", "0.3.1", "0.4.0")
_DNS_KEYS = ("nameservers", "domain", "search", "options")


def ip_family(address: str) -> str:
    """"4" or "6" for an address or CIDR string."""
    return str(ipaddress.ip_interface(address).version)


def _interface(i: dict) -> dict:
    out = {"name": i["name"]}
    for key in ("mac", "mtu", "sandbox", "socketPath", "pciID"):
        if i.get(key):
            out[key] = i[key]
    return out


def _ip(ipc: dict, old: bool) -> dict:
    out: dict[str, Any] = {}
    if old:
        out["version"] = ipc.get("version") or ip_family(ipc["address"])
    if ipc.get("interface") is not None:
        out["interface"] = ipc["interface"]
    out["address"] = ipc["address"]
    if ipc.get("gateway"):
        out["gateway"] = ipc["gateway"]
    return out


def _route(r: dict) -> dict:
    out = {"dst": r["dst"]}
    for key in ("gw", "mtu", "advmss", "priority", "table", "scope"):
        if r.get(key) not in (None, ""):
            out[key] = r[key]
    return out


def _dns(d: Optional[dict]) -> dict:
    d = d or {}
    return {k: d[k] for k in _DNS_KEYS if d.get(k)}


def convert(result: dict, version: str) -> dict:
    """The result in the shape of ``version`` (0.3.0 ... 1.1.0)."""
    old = version in _OLD_SHAPE
    out: dict[str, Any] = {"cniVersion": version}
    if result.get("interfaces"):
        out["interfaces"] = [_interface(i) for i in result["interfaces"]]
    if result.get("ips"):
        out["ips"] = [_ip(i, old) for i in result["ips"]]
    if result.get("routes"):
        out["routes"] = [_route(r) for r in result["routes"]]
    out["dns"] = _dns(result.get("dns"))
    return out


def parse(obj: Any) -> dict:
    """A result of any supported version (e.g. a prevResult) in the internal shape."""
    if not isinstance(obj, dict):
        raise ValueError("result is not a JSON object")
    out = convert(obj, "1.0.0")
    out["cniVersion"] = obj.get("cniVersion", "")
    for ipc in out.get("ips", []):
        ipaddress.ip_interface(ipc["address"])  # validates
    return out
