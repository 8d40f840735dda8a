"""The node agents' proxiers: kube-proxy's sync loop, one instance per node.

Like upstream, a sync renders the whole desired ruleset for the node and writes it in
one atomic transaction.  Changes are tracked per Service (a fingerprint of the Service
and of its endpoints): a sync writes the per-service chains only of Services whose
fingerprint changed (upstream's partial sync), stale chains are deleted from the set
of chains the last sync made active, and a failed partial sync falls back to a full one
at once.  The first sync of a node is full and also ensures the jump rules from the
built-in chains.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Set

from kproxy.errors import KernelError
from kproxy.kernel import iptables, links
from kproxy.model import objects as o
from kproxy.proxy.iptables import names
from kproxy.proxy.iptables.canon import rule_digests
from kproxy.proxy.iptables.jumps import CLEANUP_CHAINS, all_jump_rules
from kproxy.proxy.iptables.render import NodeSettings, render_payload
from kproxy.proxy.types import service_fingerprints


def fingerprints(services: List[o.Service], slices: List[o.EndpointSlice]) -> Dict[str, str]:
    """One digest per Service ("ns/name") of everything that shapes its rules: the
    renderer's own fingerprint (kproxy.proxy.types.service_fingerprints), made short
    and JSON-safe so it can be kept in the cluster's state between runs."""
    return {key: hashlib.sha256(repr(value).encode()).hexdigest()[:16]
            for key, value in service_fingerprints(services, slices).items()}


class Proxier:
    """What every mode shares: the node, its remembered state, change detection."""

    name = ""

    def __init__(self, cluster, node):
        self.cluster = cluster
        self.node = node
        self.state = cluster.proxy_state.setdefault("nodes", {}).setdefault(node.name, {})
        self.settings = NodeSettings(node_name=node.name, node_ips=[node.ip],
                                     cluster_cidr=cluster.config.pod_cidr)
        self.flavour = cluster.config.iptables_flavour

    def changes(self, prints: Dict[str, str], force_full: bool) -> Optional[Set[str]]:
        """None for a full sync, else the Services ("ns/name") whose fingerprint changed."""
        if force_full or not self.state.get("synced"):
            return None
        before: Dict[str, str] = self.state.get("fingerprints", {})
        return {k for k in set(before) | set(prints) if before.get(k) != prints.get(k)}

    def drifted(self, services, slices) -> Optional[str]:
        """Whether the node's rules differ from what they should be (someone flushed or
        edited them): what differs first, or None; the periodic check rewrites everything
        only then.  A mode without a cheap check always answers: its periodic check is a
        full resync."""
        return "no cheap check in this mode: the check is a full resync"

    def forget(self) -> None:
        self.cluster.proxy_state.get("nodes", {}).pop(self.node.name, None)

    def explain(self, services, slices, src: str, proto: str, dst: str, dport: int) -> dict:
        """`kproxy explain` of a new packet through the rules this node holds now."""
        from kproxy.explain import explain
        return explain(self.ruleset(), src, proto, dst, dport, node_ips=[self.node.ip],
                       cluster_cidr=self.cluster.config.pod_cidr, node=self.node.name).to_dict()

    def ruleset(self) -> str:
        raise NotImplementedError


class IptablesProxier(Proxier):
    """kube-proxy's iptables mode for one node (state kept in the cluster's proxy_state)."""

    name = "iptables"

    def sync(self, services, slices, prints: Dict[str, str], force_full: bool = False) -> str:
        """Bring the node's rules to the desired state; returns "full", "partial" or "none"."""
        changed = self.changes(prints, force_full)
        if changed is not None and not changed:
            return "none"
        existing = set(self.state.get("active_chains", []))
        try:
            kind = self._write(services, slices, changed, existing)
        except KernelError:
            if changed is None:
                raise
            kind = self._write(services, slices, None, iptables.service_chains(self.node.netns, self.flavour))
        self.state["fingerprints"] = prints
        return kind

    def _write(self, services, slices, changed, existing) -> str:
        payload = render_payload(services, slices, self.settings, changed=changed, existing_chains=existing)
        iptables.restore(self.node.netns, payload.text, self.flavour)
        if changed is None:
            links.write_sysctl(self.node.netns, "net.ipv4.conf.all.route_localnet", "1")
            iptables.ensure_jumps(self.node.netns, all_jump_rules(), self.flavour)
        self.state["active_chains"] = sorted(payload.active_nat_chains)
        self.state["synced"] = True
        return "full" if changed is None else "partial"


    def drifted(self, services, slices) -> Optional[str]:
        """Compare the node's tables with a full render, chain by chain and rule by rule
        (in canonical form: iptables-save spells rules its own way), and look for every
        jump from the built-in chains.  A flushed, deleted, added or edited rule is found;
        the first difference is returned."""
        if not self.state.get("synced"):
            return "not synced yet"
        text = self.ruleset()
        jumps = {(t, c, target) for t, c, target in _jumps(text)}
        for j in all_jump_rules():
            if (j.table, j.chain, j.target) not in jumps:
                return f"{j.table} {j.chain}: the jump to {j.target} is missing"
        rendered = render_payload(services, slices, self.settings, changed=None, existing_chains=set()).text
        # the same render and the same tables as at the last check that found them equal:
        # equal still, without reading every rule again
        seen = hashlib.sha256(f"{rendered}\0{text}".encode()).hexdigest()
        if _CHECKED_EQUAL.get(self.node.netns) == seen:
            return None
        want, have = rule_digests(rendered), rule_digests(text)
        for (table, chain), rules in want.items():
            held = have.get((table, chain))
            if held is None:
                return f"{table} {chain} is missing"
            if len(held) != len(rules):
                return f"{table} {chain} has {len(held)} rules, not {len(rules)}"
            for i, (a, b) in enumerate(zip(held, rules)):
                if a != b:
                    return f"{table} {chain}: rule {i + 1} differs"
        _CHECKED_EQUAL[self.node.netns] = seen
        return None

    def ruleset(self) -> str:
        """What the node holds now: iptables-save of nat and filter (for trace and explain)."""
        ns = self.node.netns
        return iptables.save(ns, "nat", self.flavour) + iptables.save(ns, "filter", self.flavour)

    def cleanup(self) -> None:
        """Upstream's CleanupLeftovers: the jump rules, then kube-proxy's chains in both
        tables, in one restore.  Upstream leaves kubelet's KUBE-FIREWALL; here kproxy
        played kubelet's part and made it, so it goes too: nothing of the mode is left."""
        ns = self.node.netns
        iptables.remove_jumps(ns, all_jump_rules(), self.flavour)
        present = {t: {ln[1:].split()[0] for ln in iptables.save(ns, t, self.flavour).splitlines()
                       if ln.startswith(":")} for t in ("filter", "nat")}
        lines = []
        for table in ("filter", "nat"):
            chains = [c for c in CLEANUP_CHAINS[table] + ((names.KUBE_FIREWALL,) if table == "filter" else ())
                      if c in present[table]]
            if table == "nat":
                chains += sorted(c for c in present[table] if names.is_service_chain(c))
            lines += [f"*{table}"] + [f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT"]
        iptables.restore(ns, "\n".join(lines) + "\n", self.flavour)
        self.forget()


def _jumps(text: str):
    """(table, built-in chain, target) of each jump to a KUBE- chain in iptables-save text."""
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A ") and not line.startswith("-A KUBE-") and " -j KUBE-" in line:
            yield table, line.split()[1], line.rsplit(" -j ", 1)[1].split()[0]


# netns -> hash of the render and tables the last drift check found equal (in memory:
# the check may run beside a pass that saves the cluster's state)
_CHECKED_EQUAL: Dict[str, str] = {}

_NFT_TABLES: dict = {}      # netns -> the kproxy.proxy.nftables.Table the kernel holds


class NftablesProxier(Proxier):
    """kube-proxy's nftables mode for one node: table `ip kube-proxy`, verdict maps.

    A partial sync is rendered against the table the kernel holds (read back with
    `nft -j`), so it adds, replaces and deletes only what changed."""

    name = "nftables"

    def sync(self, services, slices, prints: Dict[str, str], force_full: bool = False) -> str:
        from kproxy.kernel import nft
        from kproxy.proxy.nftables import render_payload as nft_render

        changed = self.changes(prints, force_full)
        if changed is not None and not changed:
            return "none"
        svc_cidr = self.cluster.config.service_cidr
        ns = self.node.netns
        try:
            # what the kernel holds: remembered from this process's last sync of the node
            # (reading it back with `nft -j` costs seconds at thousands of Services)
            existing = _NFT_TABLES.get(ns) or nft.read_table(ns)
            payload = nft_render(services, slices, self.settings, changed=changed, existing=existing,
                                 service_cidrs=svc_cidr)
            cleaned = nft.sync(ns, payload)
            kind = "full" if payload.full_sync else "partial"
        except KernelError:
            _NFT_TABLES.pop(ns, None)
            if changed is None:
                raise
            existing = nft.read_table(ns)
            payload = nft_render(services, slices, self.settings, existing=existing, service_cidrs=svc_cidr)
            cleaned = nft.sync(ns, payload)
            kind = "full"
        _NFT_TABLES[ns] = payload.apply_to(existing, cleanup=cleaned)
        self.state.update(fingerprints=prints, synced=True)
        return kind

    def cleanup(self) -> None:
        from kproxy.kernel import nft
        _NFT_TABLES.pop(self.node.netns, None)
        nft.delete_table(self.node.netns)
        self.forget()

    def ruleset(self) -> str:
        from kproxy.kernel import nft
        return nft.list_table_text(self.node.netns) or ""


class IpvsProxier(Proxier):
    """kube-proxy's IPVS mode for one node: kube-ipvs0, ipsets, virtual servers, and the
    iptables rules IPVS mode still needs.  Needs a kernel with IP_VS (see `make test-vm`)."""

    name = "ipvs"

    def __init__(self, cluster, node):
        super().__init__(cluster, node)
        # NodePorts listen on every node address: eth0 and the cni0 gateway
        self.settings = NodeSettings(node_name=node.name, node_ips=[node.ip, node.gateway],
                                     cluster_cidr=cluster.config.pod_cidr)

    def plan(self, services, slices):
        from kproxy.proxy.ipvs import plan
        return plan(services, slices, self.settings, scheduler=self.cluster.config.ipvs_scheduler)

    def sync(self, services, slices, prints: Dict[str, str], force_full: bool = False) -> str:
        from kproxy.kernel import ipvs
        changed = self.changes(prints, force_full)
        if changed is not None and not changed:
            return "none"
        ipvs.apply(self.node.netns, self.plan(services, slices), self.flavour, incremental=changed is not None)
        self.state.update(fingerprints=prints, synced=True)
        return "full" if changed is None else "partial"

    def cleanup(self) -> None:
        from kproxy.kernel import ipvs
        ipvs.cleanup(self.node.netns, self.flavour)
        self.forget()

    def ruleset(self) -> str:
        from kproxy.kernel import ipvs
        ns = self.node.netns
        return ipvs.saved(ns) + iptables.save(ns, "nat", self.flavour) + iptables.save(ns, "filter", self.flavour)

    def explain(self, services, slices, src: str, proto: str, dst: str, dport: int) -> dict:
        from kproxy.proxy.ipvs import explain
        return explain(self.plan(services, slices), src, proto, dst, dport, node_ips=list(self.settings.node_ips),
                       cluster_cidr=self.cluster.config.pod_cidr)


BACKENDS = {"iptables": IptablesProxier, "nftables": NftablesProxier, "ipvs": IpvsProxier}


def require_backend(backend: str, scheduler: str = "rr") -> None:
    """Fail at once, naming the missing kernel feature, when this kernel cannot run ``backend``."""
    if backend == "ipvs":
        from kproxy.kernel import ipvs
        ok, reason = ipvs.available(scheduler)
        if not ok:
            raise KernelError(f"IPVS mode cannot run here: {reason}")


def proxier_for(cluster, node, backend: Optional[str] = None):
    backend = backend or cluster.config.backend
    require_backend(backend, cluster.config.ipvs_scheduler)
    try:
        return BACKENDS[backend](cluster, node)
    except KeyError:
        raise KernelError(f"proxy backend {backend!r} is not available") from None
