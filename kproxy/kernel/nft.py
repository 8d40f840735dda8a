"""Programming kube-proxy's nftables table inside a node's namespace.

Everything runs as ``ip netns exec <ns> nft ...``, so it touches only that namespace's
ruleset; the machine's own namespace is refused. A sync is one ``nft -f -``
transaction: it applies whole or not at all.

    apply(ns, text)            nft -f -            (raises KernelError with nft's message)
    sync(ns, payload)          a rendered NftPayload: its changes, then its cleanup transaction
    list_table(ns)             nft -j list table ip kube-proxy, parsed (None if absent)
    list_table_text(ns)        nft list table ip kube-proxy (None if absent)
    read_table(ns)             the table as a ruleset.Table: the ``existing`` of a render
    delete_table(ns)           nft delete table ip kube-proxy (cleanup, or switching modes)
"""
from __future__ import annotations

import json
import subprocess
from typing import Optional

from cni import netns
from kproxy.errors import KernelError
from kproxy.kernel import process
from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.ruleset import Table

_MISSING = ("No such file or directory", "does not exist")


def _argv(ns: str, argv: list) -> list:
    if netns.same_as_init(ns):
        raise KernelError(f"refusing to run nft in {ns!r}: it is the machine's own network namespace")
    return process.exec_argv(ns, argv)


def _run(ns: str, argv: list, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(ns, argv), input=stdin, capture_output=True, text=True)


def apply(ns: str, text: str) -> None:
    """Run ``text`` as one ``nft -f`` transaction in namespace ``ns``."""
    if not text.strip():
        return
    res = _run(ns, ["nft", "-f", "-"], stdin=text)
    if res.returncode != 0:
        raise KernelError(f"nft -f in {ns} failed: {res.stderr.strip()}")


def sync(ns: str, payload) -> bool:
    """Apply a rendered ``NftPayload`` as upstream does: the changes in one
    transaction, then the deletion of chains an earlier sync flushed in a second one.
    A failed cleanup is harmless (the chains are empty and unused; a later sync tries
    again), so it only makes this return False; a failed change raises KernelError."""
    apply(ns, payload.sync_text)
    try:
        apply(ns, payload.cleanup_text)
    except KernelError:
        return False
    return True


def list_table(ns: str, family: str = "ip", table: str = n.TABLE) -> Optional[dict]:
    """``nft -j list table``, parsed; None when the table does not exist."""
    res = _run(ns, ["nft", "-j", "list", "table", family, table])
    if res.returncode != 0:
        if any(m in res.stderr for m in _MISSING):
            return None
        raise KernelError(f"nft list table {family} {table} in {ns} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def list_table_text(ns: str, family: str = "ip", table: str = n.TABLE) -> Optional[str]:
    """``nft list table`` as nft prints it; None when the table does not exist."""
    res = _run(ns, ["nft", "list", "table", family, table])
    if res.returncode != 0:
        if any(m in res.stderr for m in _MISSING):
            return None
        raise KernelError(f"nft list table {family} {table} in {ns} failed: {res.stderr.strip()}")
    return res.stdout


def read_table(ns: str, family: str = "ip", table: str = n.TABLE) -> Table:
    """What the kernel holds, as the ``existing`` argument of the nftables render
    (an empty, non-existent Table when there is no such table)."""
    data = list_table(ns, family, table)
    if data is None:
        return Table(family, table)
    return Table.from_json(data, family, table)


def table_exists(ns: str, family: str = "ip", table: str = n.TABLE) -> bool:
    res = _run(ns, ["nft", "list", "table", family, table])
    return res.returncode == 0


def delete_table(ns: str, family: str = "ip", table: str = n.TABLE) -> bool:
    """Remove kube-proxy's table (all its chains, sets and maps at once); False if
    there was none. Used for cleanup and when a node switches proxy mode."""
    res = _run(ns, ["nft", "delete", "table", family, table])
    if res.returncode == 0:
        return True
    if any(m in res.stderr for m in _MISSING):
        return False
    raise KernelError(f"nft delete table {family} {table} in {ns} failed: {res.stderr.strip()}")
