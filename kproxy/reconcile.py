"""Converge the running cluster to the store, once: what the Deployment controller, the
kubelet, the EndpointSlice controller and kube-proxy would each do.

    store (desired objects)
      -> pods wanted: bare Pods + each Deployment's replicas
      -> kubelet-lite: create/delete pod namespaces (CNI), start their containers
      -> endpoints: Service selector x Ready pods -> EndpointSlices
      -> proxier, per node: render kube-proxy's rules, apply them in the node's namespace
      -> the outside world: a route per LoadBalancer IP towards a node
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

from kproxy.cluster import Cluster, Pod
from kproxy.dns import records as dns_records
from kproxy.kernel import iptables, links, process
from kproxy.model import endpoint_slices_for
from kproxy.model import objects as o
from kproxy.proxier import fingerprints, proxier_for
from kproxy.render import replica_pods
from kproxy.store import Store
from kproxy.workload import images
from kproxy.workload.server import server_argv

# How long a converge waits for new pods' containers to listen (a slow VM needs more).
READY_TIMEOUT = float(os.environ.get("KPROXY_READY_TIMEOUT", "10"))
NOBODY = "65534"


@dataclass
class ConvergeReport:
    pods_created: List[str] = field(default_factory=list)
    pods_deleted: List[str] = field(default_factory=list)
    not_ready: List[str] = field(default_factory=list)
    syncs: Dict[str, str] = field(default_factory=dict)      # node -> "full", "partial" or "none"
    seconds: float = 0.0


def open_store(cluster: Cluster) -> Store:
    cfg = cluster.config
    return Store(os.path.join(cluster.dir, "store.db"), cfg.service_cidr, cfg.node_port_range, cfg.lb_pool)


DNS_POD = "coredns"
SYSTEM_ANNOTATION = "kproxy.io/system"


def with_system_objects(cluster: Cluster, objs: Dict[str, list]) -> Dict[str, list]:
    """The store's objects plus what a cluster brings of its own: the cluster DNS, a pod
    in kube-system behind the kube-dns Service at the service CIDR's .10."""
    out = {k: list(v) for k, v in objs.items()}
    if not any(s.namespace == "kube-system" and s.name == "kube-dns" for s in out.get("Service", [])):
        out.setdefault("Service", []).append(dns_records.kube_dns_service(cluster.config.dns_ip()))
    out.setdefault("Pod", []).append(o.Pod(
        metadata=o.ObjectMeta(name=DNS_POD, namespace="kube-system", labels={"k8s-app": "kube-dns"},
                              annotations={SYSTEM_ANNOTATION: "dns"}),
        spec=o.PodSpec(containers=[o.Container(
            name="coredns", image="kproxy/dns",
            ports=[o.ContainerPort(container_port=53, protocol="UDP", name="dns"),
                   o.ContainerPort(container_port=53, protocol="TCP", name="dns-tcp")])])))
    return out


def zone_path(cluster: Cluster) -> str:
    return os.path.join(cluster.dir, "dns", "zone.json")


def write_zone(cluster: Cluster, services, slices, pods) -> None:
    zone = dns_records.records_for(services, slices, pods, dns_ip=cluster.config.dns_ip(),
                                   namespaces=sorted({p.namespace for p in pods} | {"default", "kube-system"}))
    os.makedirs(os.path.dirname(zone_path(cluster)), exist_ok=True)
    tmp = zone_path(cluster) + ".tmp"
    with open(tmp, "w") as f:
        f.write(zone.to_json())
    os.replace(tmp, zone_path(cluster))


def desired_pods(objs: Dict[str, list]) -> Dict[str, o.Pod]:
    pods = {f"{p.namespace}/{p.name}": p for p in objs.get("Pod", [])}
    for dep in objs.get("Deployment", []):
        for p in replica_pods(dep):
            pods[f"{p.namespace}/{p.name}"] = p
    return pods


def container_dict(c: o.Container) -> dict:
    """The container as a manifest would give it (what kproxy.workload.images reads)."""
    return {
        "name": c.name, "image": c.image, "command": list(c.command), "args": list(c.args),
        "env": list(c.env),
        "ports": [{"containerPort": p.container_port, "protocol": p.protocol,
                   **({"name": p.name} if p.name else {})} for p in c.ports],
    }


# ---- kubelet-lite --------------------------------------------------------------------------

def _log_path(cluster: Cluster, pod: Pod, container: str) -> str:
    d = os.path.join(cluster.dir, "logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{pod.namespace}_{pod.name}_{container}.log")


def start_containers(cluster: Cluster, pod: Pod, spec: o.Pod) -> None:
    """Start each container as the workload table says; record what was started."""
    containers = []
    for c in spec.spec.containers:
        plan = images.plan(container_dict(c))
        entry = {"name": c.name, "kind": plan.kind, "reason": plan.reason, "listeners": len(plan.listeners)}
        if spec.metadata.annotations.get(SYSTEM_ANNOTATION) == "dns":
            argv = [sys.executable, "-m", "kproxy.dns.server", "--zone-file", zone_path(cluster),
                    "--listen", "0.0.0.0:53"]
            entry.update(kind="serve", listeners=2)          # it logs "listening udp" and "listening tcp"
        elif plan.kind == "serve":
            argv = server_argv(pod.name, pod.namespace, pod.node, plan.listeners, text=plan.text)
        elif plan.kind == "exec":
            # a manifest's command runs as nobody: it gets the pod's network, not the machine's files
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *plan.argv]
        elif plan.kind == "idle":
            argv = ["sleep", "infinity"]
        else:
            containers.append(entry)
            continue
        log = _log_path(cluster, pod, c.name)
        with open(log, "wb") as out:
            proc = cluster.start_process(pod, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        entry.update(pid=proc.pid, started=process.start_time(proc.pid), log=log)
        containers.append(entry)
    pod.status.update(managed=True, containers=containers, restarts=0)


def _container_ready(entry: dict) -> bool:
    if "pid" not in entry or not process.alive(entry["pid"], entry["started"]):
        return False
    if entry["kind"] != "serve":
        return True
    try:
        with open(entry["log"]) as f:
            return f.read().count("listening ") >= entry["listeners"]
    except FileNotFoundError:
        return False


def update_pod_status(pod: Pod) -> None:
    containers = pod.status.get("containers", [])
    ready = [_container_ready(c) for c in containers]
    running = [c for c in containers if "pid" in c and process.alive(c["pid"], c["started"])]
    pod.status["ready"] = bool(containers) and all(ready)
    pod.status["ready_count"] = f"{sum(ready)}/{len(containers)}"
    if pod.status["ready"] or running:
        pod.status["phase"] = "Running"
        pod.status["reason"] = "Running"
    else:
        failed = [c for c in containers if c["kind"] == "fail"]
        exited = [c for c in containers if c["kind"] == "exit"]
        pod.status["phase"] = "Failed" if failed else ("Succeeded" if exited else "Pending")
        pod.status["reason"] = ("RunContainerError" if failed else
                                "Completed" if exited else "ContainerCreating")


def wait_ready(pods: List[Pod], timeout: float = READY_TIMEOUT) -> None:
    """Wait until each pod is Ready, or has no running process left that could make it so."""
    deadline = time.monotonic() + timeout
    pending = list(pods)
    while pending and time.monotonic() < deadline:
        for p in pending:
            update_pod_status(p)
        pending = [p for p in pending if not p.status["ready"] and
                   any(process.alive(c["pid"], c["started"]) for c in p.status["containers"] if "pid" in c)]
        if pending:
            time.sleep(0.02)
    for p in pods:
        update_pod_status(p)


def model_pod(pod: Pod, spec: o.Pod) -> o.Pod:
    """The Pod as the API server would show it now: its spec plus node, IP and Ready."""
    spec.spec.node_name = pod.node
    spec.status.pod_ip = pod.ip
    spec.status.pod_ips = [pod.ip]
    spec.status.phase = pod.status.get("phase", "Running")
    return spec


# ---- proxier -------------------------------------------------------------------------------

def announce_load_balancers(cluster: Cluster, services, slices) -> None:
    """Give the outside client a route to each LoadBalancer IP via a node that can serve
    it (with externalTrafficPolicy Local: a node with a local endpoint), as a cloud load
    balancer or MetalLB would; remove routes for IPs no longer in use."""
    local_nodes: Dict[str, List[str]] = {}
    for s in slices:
        key = f"{s.namespace}/{s.service_name}"
        for ep in s.endpoints:
            if ep.conditions.ready is not False and ep.node_name:
                local_nodes.setdefault(key, []).append(ep.node_name)
    wanted: Dict[str, str] = {}
    for svc in services:
        for ing in svc.load_balancer_ingress:
            if not ing.ip:
                continue
            node = cluster.nodes[0]
            if svc.external_traffic_policy == "Local":
                names = local_nodes.get(svc.namespaced_name, [])
                node = next((n for n in cluster.nodes if n.name in names), node)
            wanted[ing.ip] = node.ip
    current: Dict[str, str] = cluster.proxy_state.get("lb_routes", {})
    with links.socket_in(cluster.external_ns) as ipr:
        for ip, via in current.items():
            if wanted.get(ip) != via:
                try:
                    ipr.route("del", dst=f"{ip}/32")
                except Exception:
                    pass
        for ip, via in wanted.items():
            if current.get(ip) != via:
                ipr.route("replace", dst=f"{ip}/32", gateway=via)
    cluster.proxy_state["lb_routes"] = wanted


def _udp_endpoints(services, slices) -> Dict[str, List[str]]:
    """For each UDP Service IP:port, the endpoint IPs traffic may go to."""
    by_svc: Dict[str, List[o.EndpointSlice]] = {}
    for s in slices:
        by_svc.setdefault(f"{s.namespace}/{s.service_name}", []).append(s)
    out: Dict[str, List[str]] = {}
    for svc in services:
        if svc.headless or not svc.cluster_ip:
            continue
        for port in svc.ports:
            if port.protocol != "UDP":
                continue
            ips = sorted({ep.addresses[0] for s in by_svc.get(svc.namespaced_name, []) for ep in s.endpoints
                          if ep.addresses and ep.conditions.ready is not False})
            out[f"{svc.cluster_ip}:{port.port}"] = ips
    return out


# ---- converge ------------------------------------------------------------------------------

def converge(cluster: Cluster, store: Store) -> ConvergeReport:
    started = time.monotonic()
    report = ConvergeReport()
    objs = with_system_objects(cluster, store.objects())
    wanted = desired_pods(objs)
    if not os.path.exists(zone_path(cluster)):
        write_zone(cluster, [], [], [])      # the DNS pod starts with an empty zone, then follows the store

    for key, pod in list(cluster.pods.items()):
        if pod.status.get("managed") and key not in wanted:
            cluster.delete_pod(pod.name, pod.namespace)
            report.pods_deleted.append(key)

    new_specs = [(p.name, p.namespace, p.spec.node_name or None, dict(p.labels))
                 for key, p in wanted.items() if key not in cluster.pods]
    made = cluster.add_pods(new_specs) if new_specs else []
    for pod in made:
        start_containers(cluster, pod, wanted[pod.key])
        report.pods_created.append(pod.key)
    wait_ready(made)
    for key, pod in cluster.pods.items():
        if pod.status.get("managed"):
            update_pod_status(pod)
            if not pod.status["ready"]:
                report.not_ready.append(key)
    cluster.save()

    services, slices = _services_and_slices(cluster, objs, wanted)
    write_zone(cluster, services, slices,
               [model_pod(cluster.pods[k], p) for k, p in wanted.items() if k in cluster.pods])

    prints = fingerprints(services, slices)
    for node in cluster.nodes:
        kind = proxier_for(cluster, node).sync(services, slices, prints)
        report.syncs[node.name] = kind

    udp_now = _udp_endpoints(services, slices)
    for vip_port, before in cluster.proxy_state.get("udp_endpoints", {}).items():
        gone = set(before) - set(udp_now.get(vip_port, []))
        vip, port = vip_port.rsplit(":", 1)
        for ep in gone:
            for node in cluster.nodes:
                iptables.flush_udp_conntrack(node.netns, vip, int(port), ep)
    cluster.proxy_state["udp_endpoints"] = udp_now

    announce_load_balancers(cluster, services, slices)
    cluster.proxy_state["slices"] = len(slices)
    cluster.save()
    report.seconds = time.monotonic() - started
    return report


def _services_and_slices(cluster: Cluster, objs: Dict[str, list], wanted: Dict[str, o.Pod]):
    """The Services, and the EndpointSlices the controller keeps for them: Ready pods
    selected in the Service's namespace, plus slices and Endpoints applied by hand."""
    running = [model_pod(cluster.pods[k], p) for k, p in wanted.items() if k in cluster.pods]
    ready = {f"{p.namespace}/{p.name}": bool(cluster.pods[f"{p.namespace}/{p.name}"].status.get("ready"))
             for p in running}
    services = objs.get("Service", [])
    slices: List[o.EndpointSlice] = list(objs.get("EndpointSlice", []))
    for eps in objs.get("Endpoints", []):
        slices.extend(eps.to_endpoint_slices())
    for svc in services:
        if svc.selector:
            slices.extend(endpoint_slices_for(svc, running, lambda p: ready[f"{p.namespace}/{p.name}"]))
    return services, slices


def current_view(cluster: Cluster, store: Store):
    """(services, endpoint slices) as they stand: for `get svc`, `describe`, `rules`."""
    objs = with_system_objects(cluster, store.objects())
    return _services_and_slices(cluster, objs, desired_pods(objs))


def switch_mode(cluster: Cluster, store: Store, mode: str) -> Dict[str, float]:
    """Move every node to proxy mode ``mode``: the old mode's objects are removed
    completely, the new mode's programmed from the same Services and endpoints.  Pods
    keep their addresses; connections already NATed keep their conntrack entries.
    Returns, per node, how long new connections through it had no rules (seconds)."""
    from kproxy.proxier import require_backend
    old = cluster.config.backend
    if mode == old:
        return {}
    require_backend(mode, cluster.config.ipvs_scheduler)
    services, slices = current_view(cluster, store)
    prints = fingerprints(services, slices)
    gaps: Dict[str, float] = {}
    for node in cluster.nodes:
        before = proxier_for(cluster, node, old)
        after = proxier_for(cluster, node, mode)
        t = time.monotonic()
        before.cleanup()
        after.sync(services, slices, prints, force_full=True)
        gaps[node.name] = time.monotonic() - t
    cluster.config.backend = mode
    cluster.save()
    return gaps
