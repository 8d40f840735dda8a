"""A picture of the machine's own network namespace, to prove kproxy left it alone.

`kproxy up` takes one before it creates anything; `kproxy verify` (and `down`)
take another and compare: links, addresses, routes, policy rules, the iptables
and nftables rulesets, and every sysctl kproxy ever writes in a namespace.  This
module only reads: `ip -j ... show`, `iptables-save`, `nft list ruleset`, /proc.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Optional

# Every sysctl kproxy writes anywhere (inside its own namespaces only); the
# snapshot proves the machine's own values stay as they were.
TOUCHED_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_tcp_be_liberal",
    "net.ipv4.vs.conntrack",
    "net.ipv4.vs.expire_nodest_conn",
    "net.ipv4.vs.expire_quiescent_template",
    "net.ipv4.vs.conn_reuse_mode",
)

_LINK_KEYS = ("ifname", "link_type", "address", "mtu", "flags", "master", "operstate")
_COUNTERS = re.compile(r"\[\d+:\d+\]")


def _ip_json(*args: str) -> list:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def _links() -> list:
    out = []
    for link in _ip_json("-d", "link", "show"):
        item = {k: link.get(k) for k in _LINK_KEYS}
        item["kind"] = (link.get("linkinfo") or {}).get("info_kind")
        out.append(item)
    return sorted(out, key=lambda x: x["ifname"])


def _addresses() -> list:
    out = []
    for link in _ip_json("addr", "show"):
        for a in link.get("addr_info", []):
            out.append(f"{link['ifname']} {a.get('local')}/{a.get('prefixlen')}")
    return sorted(out)


def _routes() -> list:
    out = []
    for family in ("-4", "-6"):
        for r in _ip_json(family, "route", "show", "table", "all"):
            r.pop("expires", None)
            out.append(json.dumps(r, sort_keys=True))
    return sorted(out)


def _rules() -> list:
    return sorted(json.dumps(r, sort_keys=True) for r in _ip_json("rule", "show"))


def _save(cmd: list[str]) -> Optional[str]:
    if not shutil.which(cmd[0]):
        return None
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return f"<{cmd[0]} failed: {res.stderr.strip()}>"
    lines = [_COUNTERS.sub("[0:0]", ln) for ln in res.stdout.splitlines() if not ln.startswith("#")]
    return "\n".join(lines)


def _sysctls() -> dict:
    out = {}
    for key in TOUCHED_SYSCTLS:
        try:
            with open("/proc/sys/" + key.replace(".", "/")) as f:
                out[key] = f.read().strip()
        except (FileNotFoundError, PermissionError):
            out[key] = None
    return out


def capture() -> dict:
    """The machine's own namespace as kproxy sees it (call from the root namespace)."""
    return {
        "links": _links(),
        "addresses": _addresses(),
        "routes": _routes(),
        "rules": _rules(),
        "iptables": _save(["iptables-save"]),
        "ip6tables": _save(["ip6tables-save"]),
        "nftables": _save(["nft", "list", "ruleset"]),
        "sysctls": _sysctls(),
    }


def diff(before: dict, after: dict) -> list[str]:
    """Human-readable differences; empty when the two pictures agree."""
    problems = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            sa = {json.dumps(x, sort_keys=True) for x in a}
            sb = {json.dumps(x, sort_keys=True) for x in b}
            for x in sorted(sb - sa):
                problems.append(f"{key}: new {x}")
            for x in sorted(sa - sb):
                problems.append(f"{key}: gone {x}")
        elif isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    problems.append(f"{key}: {k} was {a.get(k)!r}, now {b.get(k)!r}")
        else:
            problems.append(f"{key}: changed")
    return problems
