"""kube-proxy's iptables mode: names, the pure payload render, the built-in jump
rules, and offline tools to read and walk a payload.

    >>> from kproxy.proxy.iptables import NodeSettings, render
    >>> text = render(services, slices, NodeSettings("node-1", ["192.168.5.11"],
    ...                                              cluster_cidr="10.244.0.0/16"))  # doctest: +SKIP
"""

from kproxy.proxy.iptables.dump import Dump, parse_dump, sort_like_upstream
from kproxy.proxy.iptables.flow import FlowResult, trace_packet
from kproxy.proxy.iptables.jumps import JUMP_RULES, KUBELET_JUMP_RULES, JumpRule, all_jump_rules
from kproxy.proxy.iptables.render import NodeSettings, Payload, render, render_payload

__all__ = [
    "Dump", "FlowResult", "JUMP_RULES", "JumpRule", "KUBELET_JUMP_RULES", "NodeSettings", "Payload",
    "all_jump_rules", "parse_dump", "render", "render_payload", "sort_like_upstream", "trace_packet",
]
