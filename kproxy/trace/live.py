"""`kproxy trace`: send a real connection to a Service and collect what the kernel did.

For the length of one trace, and only for that flow:
  * every node's namespace gets a table of kproxy's own that sets `meta nftrace` on the
    flow (on the client's node: the client's address and source port; elsewhere: the
    Service's endpoints), read with `nft monitor trace`;
  * AF_PACKET sockets capture on each hop: the client, the client node's bridge and
    uplink, the other nodes' uplink and bridge, and every endpoint pod;
  * after the exchange, conntrack on the client's node gives the original and reply
    tuples: the rewrite, as the kernel recorded it.
Everything added is removed in a finally block; processes are stopped by their PID.
"""
from __future__ import annotations

import ipaddress
import json
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from kproxy.cluster import Cluster
from kproxy.errors import KproxyError, NotFound
from kproxy.kernel import process
from kproxy.proxier import proxier_for
from kproxy.model import objects as o
from kproxy.trace import kernel
from kproxy.trace.capture import Capture, Point, decode, write_pcap

PROBE = r"""
import json, socket, sys, time
from kproxy.workload.client import http_get, udp_ask
mode, ip, port, sport, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
out = []
for i in range(count):
    t = time.monotonic()
    r = {"sport": sport + i}
    try:
        if mode == "http":
            status, headers, body = http_get(ip, port, timeout=timeout, source_port=sport + i)
            r.update(ok=True, answer=body, status=status)
        elif mode == "udp":
            r.update(ok=True, answer=udp_ask(ip, port, b"kproxy trace", timeout=timeout, source_port=sport + i).decode(errors="replace"))
        else:
            s = socket.socket(); s.settimeout(timeout)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", sport + i)); s.connect((ip, port)); s.close()
            r.update(ok=True, answer="connected")
    except Exception as e:
        r.update(ok=False, error=type(e).__name__ + ": " + str(e))
    r["seconds"] = time.monotonic() - t
    out.append(r)
print(json.dumps(out))
"""


@dataclass
class Endpoint:
    ip: str
    port: int
    node: Optional[str]
    pod: Optional[str]
    ready: bool = True


@dataclass
class Target:
    ip: str
    port: int
    proto: str
    kind: str                                   # ClusterIP, NodePort, LoadBalancer, IP
    service: Optional[o.Service] = None
    service_port: Optional[o.ServicePort] = None
    endpoints: List[Endpoint] = field(default_factory=list)
    entry_node: Optional[str] = None            # where an outside packet enters


@dataclass
class Source:
    kind: str                                   # pod, external
    ns: str
    ip: str
    node: Optional[str]
    label: str


@dataclass
class LiveTrace:
    """Everything one trace collected; kproxy.trace.story tells it."""
    source: Source
    target: Target
    entry_node: str
    backend: str
    probes: List[dict]
    events: List[kernel.TraceEvent]
    conntrack: List[kernel.ConntrackEntry]
    packets: List[dict]
    rules: str                                   # iptables-save of the entry node (nat + filter)
    expected: dict = field(default_factory=dict)   # `explain` of the same flow on the entry node's rules
    capture_errors: List[str] = field(default_factory=list)
    pcap: Optional[str] = None
    seconds: float = 0.0


def resolve_source(cluster: Cluster, spec: str) -> Source:
    if spec == "external":
        return Source("external", cluster.external_ns, cluster.config.external_ip(), None, "external client")
    ns, _, name = spec.rpartition("/")
    pod = cluster.pod(name, ns or "default")
    return Source("pod", pod.netns, pod.ip, pod.node, f"pod {pod.namespace}/{pod.name}")


def _endpoints(slices, svc: o.Service, sp: o.ServicePort) -> List[Endpoint]:
    out = []
    for s in slices:
        if s.namespace != svc.namespace or s.service_name != svc.name:
            continue
        port = next((p.port for p in s.ports if (p.name or "") == (sp.name or "") and p.protocol == sp.protocol), None)
        if port is None:
            continue
        for ep in s.endpoints:
            ref = ep.target_ref or {}
            out.append(Endpoint(ep.addresses[0], port, ep.node_name, ref.get("name"),
                                ep.conditions.ready is not False))
    return out


def resolve_target(cluster: Cluster, services, slices, spec: str, source: Source, udp: bool) -> Target:
    proto = "UDP" if udp else "TCP"
    if spec.startswith("node/"):
        name, _, port = spec[5:].partition(":")
        node = cluster.node(name)
        if not port.isdigit():
            raise KproxyError(f"{spec!r}: give node/NAME:NODEPORT")
        port_i = int(port)
        for svc in services:
            for sp in svc.ports:
                if sp.node_port == port_i and sp.protocol == proto:
                    return Target(node.ip, port_i, proto, "NodePort", svc, sp, _endpoints(slices, svc, sp), name)
        return Target(node.ip, port_i, proto, "IP", entry_node=name)
    head, _, port = spec.rpartition(":")
    try:
        ipaddress.ip_address(head)
        ip, port_i = head, int(port)
        for svc in services:
            for sp in svc.ports:
                if sp.protocol != proto:
                    continue
                if svc.cluster_ip == ip and sp.port == port_i:
                    return Target(ip, port_i, proto, "ClusterIP", svc, sp, _endpoints(slices, svc, sp))
                if sp.port == port_i and ip in [i.ip for i in svc.load_balancer_ingress] + list(svc.external_ips):
                    via = cluster.proxy_state.get("lb_routes", {}).get(ip)
                    entry = next((n.name for n in cluster.nodes if n.ip == via), None)
                    return Target(ip, port_i, proto, "LoadBalancer", svc, sp, _endpoints(slices, svc, sp), entry)
        entry = next((n.name for n in cluster.nodes if n.ip == ip), None)
        return Target(ip, port_i, proto, "IP", entry_node=entry)
    except ValueError:
        pass
    name_part = spec if not port or not head else head
    port_part = port if head else ""
    ns, _, name = name_part.rpartition("/")
    ns = ns or "default"
    svc = next((s for s in services if s.name == name and s.namespace == ns), None)
    if svc is None:
        raise NotFound(f'services "{name}" not found in namespace {ns}')
    ports = [p for p in svc.ports if p.protocol == proto]
    if port_part:
        ports = [p for p in ports if p.name == port_part or str(p.port) == port_part]
    if not ports:
        raise NotFound(f"service {ns}/{name} has no {proto} port {port_part or ''}".rstrip())
    sp = ports[0]
    eps = _endpoints(slices, svc, sp)
    if svc.headless:
        # no ClusterIP: clients get pod IPs from DNS and connect to them directly
        ready = [e for e in eps if e.ready]
        if not ready:
            raise KproxyError(f"service {ns}/{name} is headless and has no ready endpoint to connect to")
        e = ready[0]
        return Target(e.ip, e.port, proto, "Headless", svc, sp, eps)
    if source.kind == "external":
        if svc.load_balancer_ingress:
            lb = svc.load_balancer_ingress[0].ip
            via = cluster.proxy_state.get("lb_routes", {}).get(lb)
            entry = next((n.name for n in cluster.nodes if n.ip == via), cluster.nodes[0].name)
            return Target(lb, sp.port, proto, "LoadBalancer", svc, sp, eps, entry)
        if sp.node_port:
            node = cluster.nodes[0]
            return Target(node.ip, sp.node_port, proto, "NodePort", svc, sp, eps, node.name)
        raise KproxyError(f"service {ns}/{name} is not reachable from outside (type {svc.type}); "
                          "trace it from a pod, or give node/NAME:NODEPORT")
    return Target(svc.cluster_ip, sp.port, proto, "ClusterIP", svc, sp, eps)


def _points(cluster: Cluster, source: Source, target: Target, entry: str) -> List[Point]:
    pts = []
    if source.kind == "pod":
        pts.append(Point(f"{source.label} eth0", source.ns, "eth0", "client"))
    else:
        pts.append(Point("external client eth0", source.ns, "eth0", "client"))
    for node in cluster.nodes:
        role = "client-node" if node.name == entry else "node"
        pts.append(Point(f"node {node.name} eth0", node.netns, "eth0", role))
        pts.append(Point(f"node {node.name} cni0", node.netns, "cni0", role))
    seen = set()
    for ep in target.endpoints[:32]:
        if ep.pod and ep.ip not in seen:
            seen.add(ep.ip)
            pod = next((p for p in cluster.pods.values() if p.ip == ep.ip), None)
            if pod is not None and pod.netns != source.ns:
                pts.append(Point(f"pod {pod.namespace}/{pod.name} eth0", pod.netns, "eth0", "endpoint"))
    return pts


def _stop(proc: subprocess.Popen) -> str:
    """End a monitor we started (by its PID) and return what it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def run(cluster: Cluster, services, slices, source_spec: str, target_spec: str, *, udp: bool = False,
        http: bool = False, count: int = 1, timeout: float = 2.0, pcap: Optional[str] = None) -> LiveTrace:
    started = time.monotonic()
    source = resolve_source(cluster, source_spec)
    target = resolve_target(cluster, services, slices, target_spec, source, udp)
    entry = source.node or target.entry_node
    if entry is None:
        raise KproxyError(f"no node receives traffic for {target.ip} from outside: "
                          "use a node IP, a NodePort (node/NAME:PORT) or a LoadBalancer IP")
    proto = target.proto.lower()
    sport = random.randint(20000, 29999)
    table = f"kproxy-trace-{secrets.token_hex(3)}"
    ep_ips = sorted({e.ip for e in target.endpoints}) or [target.ip]
    matches = {}
    for node in cluster.nodes:
        if node.name == entry:
            matches[node.name] = (f"ct original ip saddr {source.ip} ct original protocol {proto} "
                                  f"ct original proto-src {sport}-{sport + count - 1}")
        else:
            matches[node.name] = f"ct original ip daddr {{ {', '.join(ep_ips)} }}"
    monitors = {}
    ct_monitors = {}
    capture = Capture(_points(cluster, source, target, entry))
    try:
        for node in cluster.nodes:
            kernel.nft(node.netns, kernel.trace_table(table, matches[node.name]))
            monitors[node.name] = subprocess.Popen(process.exec_argv(node.netns, ["nft", "monitor", "trace"]),
                                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            ct_monitors[node.name] = kernel.conntrack_events(node.netns, proto)
        capture.start()
        time.sleep(0.15)       # let `nft monitor` subscribe before the first packet
        mode = "udp" if udp else ("http" if http else "tcp")
        res = subprocess.run(process.exec_argv(source.ns, [sys.executable, "-c", PROBE, mode, target.ip,
                                                           str(target.port), str(sport), str(count), str(timeout)]),
                             capture_output=True, text=True, timeout=30 + count * timeout)
        if res.returncode != 0:
            raise KproxyError(f"the probe failed in {source.label}: {res.stderr.strip()[-400:]}")
        probes = json.loads(res.stdout)
        time.sleep(0.1)
    finally:
        capture.stop()
        events, ct = [], []
        for name in monitors:
            events += kernel.parse_trace(name, _stop(monitors[name]))
            if name in ct_monitors:
                ct += kernel.parse_conntrack(name, proto, _stop(ct_monitors[name]))
        for node in cluster.nodes:
            kernel.delete_table(node.netns, table)
    entry_node = cluster.node(entry)
    flavour = cluster.config.iptables_flavour
    proxier = proxier_for(cluster, entry_node)
    rules = proxier.ruleset()
    expected = proxier.explain(services, slices, source.ip, proto, target.ip, target.port)
    ours = [e for e in ct if (e.original.src == source.ip and sport <= e.original.sport < sport + count)
            or e.original.dst in ep_ips or e.reply.src in ep_ips]
    packets = [p for p in (decode(f) for f in capture.frames) if p is not None and p["proto"] in (proto, "icmp")]
    if pcap:
        write_pcap(capture.frames, pcap)
    if flavour == "legacy" and cluster.config.backend == "iptables":
        capture.errors.append("this cluster uses iptables-legacy, whose rules nftables tracing cannot see: "
                              "`kproxy up --iptables nft` shows every rule the packet met")
    return LiveTrace(source, target, entry, cluster.config.backend, probes, events, ours, packets, rules,
                     expected, capture.errors, pcap, time.monotonic() - started)
