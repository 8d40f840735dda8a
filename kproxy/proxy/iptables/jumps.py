"""The jump rules from the built-in chains into kube-proxy's chains.

kube-proxy does not write these through iptables-restore: on every full sync it checks
each one with ``iptables -t <table> -C <chain> <args>`` and, when missing, prepends it
with ``iptables -t <table> -I <chain> <args>``, in the order of ``JUMP_RULES`` (so a later
rule ends up above an earlier one in the same built-in chain). The target chain itself
must exist first (``iptables -t <table> -N <target>`` if missing). ``KUBELET_JUMP_RULES``
are kubelet's KUBE-FIREWALL hooks, which kube-proxy ensures too but never deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from kproxy.proxy.iptables import names as n


@dataclass(frozen=True)
class JumpRule:
    table: str            # "filter" or "nat"
    chain: str            # the built-in chain: INPUT, FORWARD, OUTPUT, PREROUTING, POSTROUTING
    target: str           # the kube-proxy chain jumped to
    comment: str = ""
    extra_args: Tuple[str, ...] = ()

    def args(self) -> List[str]:
        """The rule's argv after ``-t <table> -C|-I|-D <chain>`` (comment unquoted: it
        is one argv element)."""
        out = list(self.extra_args)
        if self.comment:
            out += ["-m", "comment", "--comment", self.comment]
        return out + ["-j", self.target]

    def check_argv(self) -> List[str]:
        return ["-t", self.table, "-C", self.chain] + self.args()

    def insert_argv(self) -> List[str]:
        return ["-t", self.table, "-I", self.chain] + self.args()

    def delete_argv(self) -> List[str]:
        return ["-t", self.table, "-D", self.chain] + self.args()


_NEW = ("-m", "conntrack", "--ctstate", "NEW")

JUMP_RULES: Tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", n.KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "FORWARD", n.KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "INPUT", n.KUBE_NODEPORTS, "kubernetes health check service ports"),
    JumpRule("filter", "FORWARD", n.KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "OUTPUT", n.KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "FORWARD", n.KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", n.KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "OUTPUT", n.KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "FORWARD", n.KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("nat", "OUTPUT", n.KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", n.KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", n.KUBE_POSTROUTING, "kubernetes postrouting rules"),
)

KUBELET_JUMP_RULES: Tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", n.KUBE_FIREWALL),
    JumpRule("filter", "OUTPUT", n.KUBE_FIREWALL),
)

# Chains CleanupLeftovers flushes and deletes (besides every KUBE-(SVC|SVL|EXT|FW|SEP)-*
# chain in nat). KUBE-FIREWALL is kubelet's and stays.
CLEANUP_CHAINS = {
    "nat": (n.KUBE_SERVICES, n.KUBE_NODEPORTS, n.KUBE_POSTROUTING, n.KUBE_MARK_MASQ, n.KUBE_PROXY_CANARY),
    "filter": (n.KUBE_SERVICES, n.KUBE_EXTERNAL_SERVICES, n.KUBE_FORWARD, n.KUBE_NODEPORTS,
               n.KUBE_PROXY_FIREWALL, n.KUBE_PROXY_CANARY),
}
CANARY_TABLES = ("mangle", "nat", "filter")


def all_jump_rules() -> Tuple[JumpRule, ...]:
    """Every rule a full sync ensures, in the order it ensures them."""
    return JUMP_RULES + KUBELET_JUMP_RULES
