"""What ``kproxy explain`` needs before the walk: the ruleset (rendered from manifests,
or read from a file) and the packet's ends, given as addresses or by name.

    --from  IP | node | external | POD | NAMESPACE/POD      (a Deployment name: its first replica)
    --to    IP:PORT | [IPv6]:PORT | node:PORT | SERVICE[:PORT] | NAMESPACE/SERVICE[:PORT]

Names are looked up in the manifests (``-f``), so they only work with them; a Service
name means its ClusterIP, and its port by number or name (the only or first port when
none is given).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from kproxy.explain.report import Report

EXTERNAL_CLIENT = "192.168.5.100"      # kproxy's external namespace (the world outside the cluster)


@dataclass
class Inputs:
    ruleset: object                   # text, or a parsed Ruleset
    source: str                       # report source: kproxy-render / iptables-save / nft
    node: Optional[str]
    node_ips: List[str]
    cluster_cidr: Optional[str]
    resolved: object = None           # kproxy.render.ResolvedManifests for -f
    notes: List[str] = field(default_factory=list)
    hint_ips: List[str] = field(default_factory=list)    # node IPs the ruleset names (nft nodeport-ips)

    @property
    def local_ips(self) -> List[str]:
        return self.node_ips or self.hint_ips


def from_manifests(paths: Sequence[str], node: str, node_ips: Sequence[str], cluster_cidr: str,
                   service_cidr: str, node_port_range: str, lb_pool: Optional[str], strict: bool,
                   stdin=None) -> Inputs:
    """Render kube-proxy's iptables rules for ``node`` from manifests, as ``kproxy render``."""
    from kproxy.proxy.iptables.render import NodeSettings, render
    from kproxy.render import resolve_manifests
    resolved = resolve_manifests(list(paths), node_name=node, cluster_cidr=cluster_cidr,
                                 service_cidr=service_cidr, node_port_range=node_port_range, lb_pool=lb_pool,
                                 strict=strict, stdin=stdin)
    settings = NodeSettings(node_name=node, node_ips=list(node_ips), cluster_cidr=cluster_cidr)
    payload = render(resolved.services, resolved.endpoint_slices, settings)
    return Inputs(payload, "kproxy-render", node, list(node_ips), cluster_cidr, resolved,
                  list(resolved.warnings))


def from_file(text: str, node: Optional[str], node_ips: Sequence[str], cluster_cidr: Optional[str]) -> Inputs:
    """A ruleset saved from a node (any format parse_ruleset reads), parsed once."""
    from kproxy.explain import parse_ruleset
    rs = parse_ruleset(text)
    return Inputs(rs, "", node, list(node_ips), cluster_cidr, hint_ips=list(rs.node_ip_hints()))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def resolve_source(spec: str, inp: Inputs) -> Tuple[str, bool]:
    """(address, from_node) for ``--from``."""
    if spec == "node":
        if not inp.local_ips:
            raise ValueError("--from node needs the node's address (--node-ip)")
        return inp.local_ips[0], True
    if spec == "external":
        return EXTERNAL_CLIENT, False
    if _is_ip(spec):
        return str(ipaddress.ip_address(spec)), False
    pod = _find_pod(spec, inp)
    if pod is None:
        raise ValueError(f"--from {spec!r} is not an address, node, external, or a Pod of the manifests")
    ip = pod.status.pod_ip
    inp.notes.append(f"--from {spec}: Pod {pod.metadata.namespace}/{pod.metadata.name} on "
                     f"{pod.spec.node_name}, {ip}")
    return ip, False


def _find_pod(spec: str, inp: Inputs):
    if inp.resolved is None:
        return None
    ns, _, name = spec.rpartition("/")
    pods = [p for p in inp.resolved.pods if not ns or p.metadata.namespace == ns]
    for p in pods:
        if p.metadata.name == name:
            return p
    for p in pods:
        if p.metadata.name.startswith(name + "-"):
            return p
    return None


def resolve_destination(spec: str, inp: Inputs, proto: Optional[str]) -> Tuple[str, int, Optional[str]]:
    """(address, port, protocol or None) for ``--to``."""
    if spec.startswith("["):
        host, _, port = spec[1:].partition("]:")
        return str(ipaddress.ip_address(host)), _port(port, spec), None
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = spec, ""
    if host == "node":
        if not inp.local_ips:
            raise ValueError("--to node:PORT needs the node's address (--node-ip)")
        return inp.local_ips[0], _port(port, spec), None
    if _is_ip(host):
        return str(ipaddress.ip_address(host)), _port(port, spec), None
    if _is_ip(spec) and ":" in spec:
        raise ValueError(f"--to {spec!r}: write an IPv6 destination as [ADDRESS]:PORT")
    return _service_destination(host, port, spec, inp, proto)


def _port(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"--to {spec!r} needs a port: ADDRESS:PORT")
    return int(text)


def _service_destination(name: str, port: str, spec: str, inp: Inputs, proto: Optional[str]):
    if inp.resolved is None:
        raise ValueError(f"--to {spec!r}: Service names need the manifests (-f); with --rules give ADDRESS:PORT")
    ns, _, svc_name = name.rpartition("/")
    matches = [s for s in inp.resolved.services if s.name == svc_name and (not ns or s.namespace == ns)]
    if not matches:
        raise ValueError(f"--to {spec!r}: no Service {name!r} in the manifests")
    svc = matches[0]
    if not svc.cluster_ip or svc.cluster_ip == "None":
        raise ValueError(f"--to {spec!r}: Service {svc.namespace}/{svc.name} has no ClusterIP (headless or "
                         "ExternalName): kube-proxy writes no rules for it")
    ports = [p for p in svc.ports if proto is None or p.protocol.lower() == proto]
    if port:
        chosen = [p for p in ports if str(p.port) == port or (p.name and p.name == port)]
    else:
        chosen = ports[:1]
    if not chosen:
        raise ValueError(f"--to {spec!r}: Service {svc.namespace}/{svc.name} has no port {port or '(any)'}"
                         + (f"/{proto}" if proto else ""))
    p = chosen[0]
    inp.notes.append(f"--to {spec}: Service {svc.namespace}/{svc.name}, ClusterIP {svc.cluster_ip} port {p.port}/"
                     f"{p.protocol.lower()}")
    return svc.cluster_ip, int(p.port), p.protocol.lower()


def explain_inputs(inp: Inputs, src_spec: str, dst_spec: str, proto: Optional[str]) -> Report:
    """Resolve ``--from``/``--to`` and walk the packet."""
    from kproxy.explain import explain
    base = list(inp.notes)
    try:
        src, from_node = resolve_source(src_spec, inp)
        dst, dport, svc_proto = resolve_destination(dst_spec, inp, proto)
        notes = list(inp.notes)
    finally:
        inp.notes = base
    report = explain(inp.ruleset, src, proto or svc_proto or "tcp", dst, dport, inp.node_ips, inp.cluster_cidr,
                     from_node, node=inp.node, source=inp.source or None)
    report.notes[:0] = notes
    return report
