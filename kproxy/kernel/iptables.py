"""Programming kube-proxy's iptables rules inside a node's namespace.

Two flavours, as on real nodes: ``nft`` (iptables-nft: the rules are nftables rules, so
`nft monitor trace` can follow a packet through them; Debian's default) and ``legacy``
(iptables-legacy: the x_tables blob; much faster to restore at thousands of Services,
but invisible to nftables tracing).

One `iptables-restore --noflush --counters` per sync, with both tables, as upstream
does: chains that are declared are created or flushed, others are left alone.  The
jump rules from the built-in chains are checked with `-C` and inserted with `-I`,
on full syncs only.
"""
from __future__ import annotations

import re
import subprocess
from typing import Iterable

from kproxy.errors import KernelError
from kproxy.kernel import process


FLAVOURS = ("nft", "legacy")


def _tool(name: str, flavour: str) -> str:
    """`iptables-restore` -> `iptables-nft-restore` / `iptables-legacy-restore`, etc."""
    if flavour not in FLAVOURS:
        raise KernelError(f"iptables flavour {flavour!r} is not one of {', '.join(FLAVOURS)}")
    head, _, tail = name.partition("-")
    return f"{head}-{flavour}" + (f"-{tail}" if tail else "")


def _run(ns: str, argv: list, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(process.exec_argv(ns, argv), input=stdin, capture_output=True, text=True)


def restore(ns: str, payload: str, flavour: str = "nft") -> None:
    res = _run(ns, [_tool("iptables-restore", flavour), "-w", "5", "--noflush", "--counters"], stdin=payload)
    if res.returncode != 0:
        raise KernelError(f"iptables-restore in {ns} failed: {res.stderr.strip()}")


def ensure_jumps(ns: str, rules: Iterable, flavour: str = "nft") -> int:
    """Make sure each jump rule exists (prepending missing ones); returns how many were added."""
    added = 0
    ipt = _tool("iptables", flavour)
    for rule in rules:
        if _run(ns, [ipt, "-w", "5", *rule.check_argv()]).returncode == 0:
            continue
        _run(ns, [ipt, "-w", "5", "-t", rule.table, "-N", rule.target])   # exists already: fine
        res = _run(ns, [ipt, "-w", "5", *rule.insert_argv()])
        if res.returncode != 0:
            raise KernelError(f"iptables {' '.join(rule.insert_argv())} in {ns}: {res.stderr.strip()}")
        added += 1
    return added


def remove_jumps(ns: str, rules: Iterable, flavour: str = "nft") -> None:
    """Delete the jump rules from the built-in chains (every copy of each)."""
    ipt = _tool("iptables", flavour)
    for rule in rules:
        while _run(ns, [ipt, "-w", "5", *rule.delete_argv()]).returncode == 0:
            pass


def save(ns: str, table: str | None = None, flavour: str = "nft") -> str:
    argv = [_tool("iptables-save", flavour)] + (["-t", table] if table else [])
    res = _run(ns, argv)
    if res.returncode != 0:
        raise KernelError(f"iptables-save in {ns} failed: {res.stderr.strip()}")
    return res.stdout


_SERVICE_CHAIN = re.compile(r"^:(KUBE-(?:SVC|SVL|EXT|FW|SEP)-\S+) ")


def service_chains(ns: str, flavour: str = "nft") -> set:
    """kube-proxy's per-service nat chains present now (to delete the stale ones, as upstream)."""
    return {m.group(1) for line in save(ns, "nat", flavour).splitlines() if (m := _SERVICE_CHAIN.match(line))}


def forget_endpoint_udp_conntrack(ns: str, endpoint_ip: str) -> None:
    """Forget the UDP flows NATed to an endpoint whose pod is gone, whatever address they
    were sent to (ClusterIP, NodePort, LoadBalancer).  A UDP flow has no end: its entry,
    refreshed by every datagram the client sends, would keep the old binding to an
    address nobody answers.

    TCP entries are left alone, as kube-proxy leaves them.  A SYN that reuses the tuple
    of a closed connection (TIME_WAIT or CLOSE) makes conntrack drop the old entry and
    NAT the new connection afresh.  Deleting TCP entries here races with that: the
    `conntrack` tool lists the entries, then deletes each by its tuple, so a connection
    that reused the tuple in between (a busy client's source port comes round within
    seconds) loses its NAT binding, and the server's answer never reaches the client."""
    _run(ns, ["conntrack", "-D", "-p", "udp", "--reply-src", endpoint_ip])


def flush_udp_conntrack(ns: str, service_ip: str, port: int, endpoint_ip: str) -> None:
    """Forget UDP flows from a Service to an endpoint that went away (as kube-proxy does)."""
    _run(ns, ["conntrack", "-D", "-p", "udp", "--orig-dst", service_ip, "--orig-port-dst", str(port),
              "--reply-src", endpoint_ip])
