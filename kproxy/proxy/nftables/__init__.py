"""kube-proxy's nftables mode: names, the pure ``nft -f`` render, an in-memory table
model (read from text or ``nft -j``) and an offline packet walk.

    >>> from kproxy.proxy.nftables import render
    >>> from kproxy.proxy.iptables import NodeSettings
    >>> text = render(services, slices, NodeSettings("node-1", ["192.168.5.11"],
    ...                                              cluster_cidr="10.244.0.0/16"),
    ...               service_cidrs="10.96.0.0/12")          # doctest: +SKIP

``kproxy.render.render_manifests(..., backend="nftables")`` finds ``render`` here.
"""

from kproxy.proxy.nftables.flow import FlowResult, trace_packet
from kproxy.proxy.nftables.render import NftPayload, render, render_payload
from kproxy.proxy.nftables.ruleset import NftError, Table, parse_statements, sort_like_upstream

__all__ = ["FlowResult", "NftError", "NftPayload", "Table", "parse_statements", "render",
           "render_payload", "sort_like_upstream", "trace_packet"]
