"""`kproxy rules SVC`: the rules that implement one Service, in each proxy mode, side by side.

Each mode's full render for a node is cut down to what concerns the Service, and every
line is labelled with the Service port or the endpoint it comes from, so a student can
see, for one port or one endpoint, what iptables, nftables and IPVS mode write for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from kproxy.model import objects as o
from kproxy.proxy.iptables.render import NodeSettings

MODES = ("iptables", "nftables", "ipvs")


@dataclass
class Facts:
    """What identifies the Service in any mode's text."""
    namespace: str
    name: str
    addresses: List[str]                         # ClusterIP, LB IPs, external IPs
    ports: List[o.ServicePort]
    endpoints: List[str] = field(default_factory=list)     # "ip:port"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def facts_for(svc: o.Service, slices: Sequence[o.EndpointSlice]) -> Facts:
    addrs = [a for a in [svc.cluster_ip if not svc.headless else ""] + [i.ip for i in svc.load_balancer_ingress]
             + list(svc.external_ips) if a]
    eps = sorted({f"{ep.addresses[0]}:{p.port}" for s in slices
                  if s.namespace == svc.namespace and s.service_name == svc.name
                  for ep in s.endpoints if ep.addresses for p in s.ports})
    return Facts(svc.namespace, svc.name, addrs, list(svc.ports), eps)


def _label(line: str, f: Facts) -> str:
    for ep in f.endpoints:
        ip, port = ep.rsplit(":", 1)
        if ep in line or f"__{ip}/{port}" in line or f"{ip},tcp:{port}" in line or f"{ip},udp:{port}" in line:
            return f"endpoint {ep}"
    for p in f.ports:
        proto = p.protocol.lower()
        marks = [f":{p.port} ", f" {p.port} ", f"--dport {p.port}", f"{proto}:{p.port}", f". {p.port} :",
                 f"/{proto}/{p.name}", f":{p.port}\n"]
        if p.node_port:
            marks += [f"--dport {p.node_port}", f". {p.node_port} :", f":{p.node_port} ", f"{proto}:{p.node_port}"]
        if p.name:
            marks.append(f"{f.key}:{p.name}")
        if any(m in line + "\n" for m in marks):
            return f"port {p.name + ' ' if p.name else ''}{p.port}/{p.protocol}"
    return "service"


# ---- iptables --------------------------------------------------------------------------

def _iptables_lines(text: str, f: Facts) -> List[Tuple[str, str]]:
    """The Service's rules: those whose comment names it, and every rule of the chains
    they lead to.  A KUBE-SEP chain's rules are labelled with its endpoint."""
    lines = [ln for ln in text.splitlines() if ln.startswith("-A ")]
    mine = re.compile(rf'--comment "?{re.escape(f.key)}([: "]|$)')
    chains: set = set()
    picked: set = set()
    changed = True
    while changed:
        changed = False
        for ln in lines:
            if ln in picked or not (mine.search(ln) or ln.split()[1] in chains):
                continue
            picked.add(ln)
            target = ln.split(" -j ")[-1].split()[0] if " -j " in ln else ""
            if target.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")) \
                    and target not in chains:
                chains.add(target)
                changed = True
    sep_endpoint = {ln.split()[1]: ln.split("--to-destination ")[1].split()[0]
                    for ln in lines if ln in picked and "--to-destination " in ln}
    out = []
    for ln in lines:
        if ln in picked:
            ep = sep_endpoint.get(ln.split()[1])
            out.append((ln, f"endpoint {ep}" if ep else _label(ln, f)))
    return out


# ---- nftables --------------------------------------------------------------------------

def _nft_lines(text: str, f: Facts) -> List[Tuple[str, str]]:
    """The Service's chains (one line each) and its elements of the shared maps and sets.
    A chain is labelled by its name: `endpoint-...__ip/port` or `service-.../proto/port`."""
    out: List[Tuple[str, str]] = []
    needle = f"{f.key}/"
    block: List[str] = []

    def flush() -> None:
        if not block:
            return
        head = block[0].rstrip()
        body = [ln.strip() for ln in block[1:] if ln.strip() and ln.strip() != "}"]
        if head.endswith("{") and needle in head:
            name = head.split()[4] if head.startswith("add chain") else head
            label = _label(name, f) if "__" in name else _label(name.replace("__", " "), f)
            out.append((f"{head[:-1].strip()} {{ {'; '.join(body)} }}", label))
        elif head.endswith("{"):
            for ln in body:
                if needle in ln or f'"{f.key}' in ln or any(f"{a} . " in ln for a in f.addresses):
                    out.append((f"{head[:-1].strip()} {{ ... {ln.rstrip(',')} }}", _label(ln, f)))
        block.clear()

    for ln in text.splitlines():
        if ln and not ln[0].isspace() and not ln.startswith("}"):
            flush()
            block.append(ln)
            if not ln.rstrip().endswith("{"):
                block.clear()              # "add chain X" / "flush chain X" preambles: nothing to read
        elif block:
            block.append(ln)
    flush()
    return out


# ---- ipvs ------------------------------------------------------------------------------

def _ipvs_lines(text: str, f: Facts) -> List[Tuple[str, str]]:
    nodeports = [str(p.node_port) for p in f.ports if p.node_port]
    out = []
    for ln in text.splitlines():
        if ln.startswith("#"):
            continue
        if any(a in ln for a in f.addresses) or any(ep in ln for ep in f.endpoints) or \
                any(f":{np} " in ln + " " for np in nodeports) or \
                any(ln.startswith("add KUBE-NODE-PORT") and ln.endswith(f" {np}") for np in nodeports):
            label = _label(ln, f)
            if ln.startswith("-a ") and " -r " in ln:
                label = f"endpoint {ln.split(' -r ')[1].split()[0]}"
            out.append((ln, label))
    return out


_PICK = {"iptables": _iptables_lines, "nftables": _nft_lines, "ipvs": _ipvs_lines}


def rules_for(services, slices, svc: o.Service, settings: NodeSettings, modes: Sequence[str],
              service_cidr: str) -> Dict[str, Dict[str, List[str]]]:
    """{label: {mode: [lines]}} for ``svc``, labels ordered ports first, then endpoints."""
    from kproxy.proxy import ipvs, nftables
    from kproxy.proxy.iptables.render import render as ipt_render

    f = facts_for(svc, slices)
    texts = {}
    for mode in modes:
        if mode == "iptables":
            texts[mode] = ipt_render(services, slices, settings)
        elif mode == "nftables":
            texts[mode] = nftables.render(services, slices, settings, service_cidrs=service_cidr)
        elif mode == "ipvs":
            texts[mode] = ipvs.render(services, slices, settings)
        else:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    grouped: Dict[str, Dict[str, List[str]]] = {}
    single = _label(f" {svc.ports[0].port} ", f) if len(svc.ports) == 1 else None
    for mode, text in texts.items():
        for ln, label in _PICK[mode](text, f):
            if label == "service" and single:
                label = single          # with one port, what concerns the Service concerns that port
            grouped.setdefault(label, {}).setdefault(mode, []).append(ln)
    order = {"service": 0, "port": 1, "endpoint": 2}
    return dict(sorted(grouped.items(), key=lambda kv: (order[kv[0].split()[0]], kv[0])))


def text(svc: o.Service, grouped: Dict[str, Dict[str, List[str]]], modes: Sequence[str]) -> str:
    ip = "None (headless)" if svc.headless else svc.cluster_ip
    out = [f"Service {svc.namespace}/{svc.name} ({svc.type}, cluster IP {ip}) in {', '.join(modes)} mode"]
    if not grouped:
        out.append("  no rules in any mode (kube-proxy skips headless and ExternalName Services)")
    width = max(len(m) for m in modes) + 2
    for label, per_mode in grouped.items():
        out.append(f"== {label}")
        for mode in modes:
            for ln in per_mode.get(mode, []) or ["(nothing)"]:
                out.append(f"  {('[' + mode + ']').ljust(width)} {ln}")
    return "\n".join(out)
