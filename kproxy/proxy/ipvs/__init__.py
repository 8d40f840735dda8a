"""kube-proxy's IPVS mode: the pure plan and render of what it programs on a node
(kube-ipvs0 addresses, ipsets, IPVS virtual and real servers, the iptables payload,
sysctls), and an offline walk of one packet through it.

    >>> from kproxy.proxy.ipvs import plan, render, explain
    >>> from kproxy.proxy.iptables import NodeSettings
    >>> settings = NodeSettings("node-1", ["192.168.5.11"], cluster_cidr="10.244.0.0/16")
    >>> p = plan(services, slices, settings, scheduler="rr")          # doctest: +SKIP
    >>> print(render(services, slices, settings))                     # doctest: +SKIP
    >>> explain(p, "10.244.0.7", "tcp", "10.96.0.2", 8080)             # doctest: +SKIP

``kproxy.render.render_manifests(..., backend="ipvs")`` finds ``render`` here.
Programming a node is ``kproxy.kernel.ipvs.apply(ns, plan)``.
"""

from kproxy.proxy.ipvs.explain import explain
from kproxy.proxy.ipvs.render import (SECTIONS, IPSet, IptablesPart, IpvsPlan, RealServer, VirtualServer,
                                      plan, render, split_sections, sysctls_for)

__all__ = ["IPSet", "IptablesPart", "IpvsPlan", "RealServer", "SECTIONS", "VirtualServer", "explain", "plan",
           "render", "split_sections", "sysctls_for"]
