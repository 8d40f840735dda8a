"""The controllers of one emulated cluster, as passes over the store and the running pods.

One pass does, in order, what each Kubernetes component would do with what it sees:

    store (desired objects)                    running pods (cluster state, kubelet status)
      -> workload controllers: bare Pods, and each Deployment's ReplicaSets
         (kproxy.deployments decides how many to create and which to delete)
      -> kubelet-lite: create pod sandboxes (CNI), start, supervise and probe
         containers; stop the containers of deleted pods
      -> endpoints: Service selector x pods -> EndpointSlices (Ready, serving,
         terminating conditions)
      -> DNS: the zone the cluster DNS pod serves
      -> proxier, one per node: kube-proxy's rules, synced at most once per
         min-sync-period (changes in between are batched into one sync)
      -> the outside world: a route per LoadBalancer IP towards a node

Nothing in a pass waits: pods become Ready over later passes.  ``converge_once`` runs
passes until the cluster has settled (what the CLI does when no daemon runs);
kproxy.daemon runs them forever.

A deleted pod is taken out of traffic before its processes end, as a well-behaved
Kubernetes pod with a preStop hook would be: it is marked terminating (its endpoints
turn not-ready, so kube-proxy stops sending new connections), every node's rules are
synced, and only after a short drain are its processes sent SIGTERM and its sandbox
removed.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from kproxy import deployments, quota
from kproxy.cluster import Cluster, Pod
from kproxy.dns import records as dns_records
from kproxy.errors import KproxyError
from kproxy.kernel import iptables, links
from kproxy.kubelet import DNS_POD, SYSTEM_ANNOTATION, Kubelet, zone_path
from kproxy.model import endpoint_slices_for
from kproxy.model.endpoints import selects
from kproxy.model import objects as o
from kproxy.model.loader import decode
from kproxy.proxier import fingerprints, proxier_for
from kproxy.store import Store

log = logging.getLogger("kproxy.reconciler")

# How long a converge waits for new pods to become Ready (a slow VM needs more).
READY_TIMEOUT = float(os.environ.get("KPROXY_READY_TIMEOUT", "10"))
# kube-proxy's --min-sync-period default.
DEFAULT_MIN_SYNC_PERIOD = 1.0
# Time between a deleted pod's last rules leaving every node and its SIGTERM (a preStop
# sleep): connections DNATed just before, still in flight or in the server's accept queue
# on a busy machine, are served.
DRAIN_SECONDS = 1.0
# how long the periodic drift check may stay unanswered while changes keep the nodes
# syncing (each sync throws the running check's answer away) before the next sync is
# made a full rewrite instead
CHECK_PATIENCE = 30.0
OWNER_ANNOTATION = "kproxy.io/owner"


def open_store(cluster: Cluster) -> Store:
    cfg = cluster.config
    return Store(os.path.join(cluster.dir, "store.db"), cfg.service_cidr, cfg.node_port_range, cfg.lb_pool)


# ---- the objects a cluster brings of its own -----------------------------------------------

def with_system_objects(cluster: Cluster, objs: Dict[str, list]) -> Dict[str, list]:
    """The store's objects plus the cluster DNS: a pod in kube-system behind the
    kube-dns Service at the service CIDR's .10."""
    out = {k: list(v) for k, v in objs.items()}
    if not any(s.namespace == "kube-system" and s.name == "kube-dns" for s in out.get("Service", [])):
        out.setdefault("Service", []).append(dns_records.kube_dns_service(cluster.config.dns_ip()))
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": DNS_POD, "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"},
                     "annotations": {SYSTEM_ANNOTATION: "dns"}},
        "spec": {"containers": [{"name": "coredns", "image": "kproxy/dns", "ports": [
            {"containerPort": 53, "protocol": "UDP", "name": "dns"},
            {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"}]}]},
    }
    out.setdefault("Pod", []).append(parse_pod(manifest))
    return out


def parse_pod(manifest: dict) -> o.Pod:
    """A Pod object from its manifest (as kept in a pod's status)."""
    return decode(copy.deepcopy(manifest), source="pod").obj


def pod_manifest(pod: o.Pod, spec_raw: Optional[dict] = None) -> dict:
    """The manifest of a pod to be created: what its status keeps, so that the kubelet
    can restart it and the endpoints controller read it even after its Deployment's
    template has moved on."""
    meta = {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.metadata.labels)}
    if pod.metadata.annotations:
        meta["annotations"] = dict(pod.metadata.annotations)
    spec = copy.deepcopy(spec_raw if spec_raw is not None else pod.raw.get("spec", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def zone_for(cluster: Cluster, services, slices, pods) -> "dns_records.Zone":
    return dns_records.records_for(services, slices, pods, dns_ip=cluster.config.dns_ip(),
                                   namespaces=sorted({p.namespace for p in pods} | {"default", "kube-system"}))


def write_zone_text(cluster: Cluster, text: str) -> str:
    """Replace the zone file the DNS pod serves (it reloads it within 0.2 s)."""
    path = zone_path(cluster)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


def write_zone(cluster: Cluster, services, slices, pods) -> str:
    return write_zone_text(cluster, zone_for(cluster, services, slices, pods).to_json())


# ---- the outside world ---------------------------------------------------------------------

def announce_load_balancers(cluster: Cluster, services, slices, force: bool = False) -> None:
    """Give the outside client a route to each LoadBalancer IP via a node that can serve
    it (with externalTrafficPolicy Local: a node with a local endpoint), as a cloud load
    balancer or MetalLB would; remove routes for IPs no longer in use.  ``force``
    rewrites every route (the periodic check repairs routes removed by hand)."""
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
    if wanted == current and not force:
        return
    with links.socket_in(cluster.external_ns) as ipr:
        for ip, via in current.items():
            if wanted.get(ip) != via:
                try:
                    ipr.route("del", dst=f"{ip}/32")
                except Exception:
                    pass
        for ip, via in wanted.items():
            if force or current.get(ip) != via:
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


# ---- a pass --------------------------------------------------------------------------------

@dataclass
class PassReport:
    created: List[str] = field(default_factory=list)
    deleted: List[str] = field(default_factory=list)
    syncs: Dict[str, str] = field(default_factory=dict)     # node -> "full", "partial" or "none"
    settled: bool = False
    busy: List[str] = field(default_factory=list)            # why it is not settled
    checked: bool = False              # the periodic drift check ran
    drift: bool = False                # and found a node's rules changed behind its back
    revision: int = 0                  # the store revision this pass worked from
    quota_refused: List[str] = field(default_factory=list)


@dataclass
class ConvergeReport:
    pods_created: List[str] = field(default_factory=list)
    pods_deleted: List[str] = field(default_factory=list)
    not_ready: List[str] = field(default_factory=list)
    syncs: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    settled: bool = True


class Reconciler:
    """Every controller of one cluster, run pass by pass (see the module docstring).

    ``on_sync(node, kind, seconds, pending_since)`` is called after each node's
    proxier sync (the daemon's metrics hook)."""

    def __init__(self, cluster: Cluster, store: Store, *, kubelet_options: Optional[dict] = None,
                 min_sync_period: float = 0.0, drain: float = DRAIN_SECONDS,
                 on_sync: Optional[Callable[[str, str, float, Optional[float]], None]] = None):
        self.cluster = cluster
        cluster.reconciler = True          # its records of managed pods win (Cluster.save)
        self.store = store
        # one kubelet-lite per node, as on a cluster: each supervises and probes its node's pods
        self.kubelets: Dict[str, Kubelet] = {
            n.name: Kubelet(cluster, probe_workers=4, **(kubelet_options or {})) for n in cluster.nodes}
        self.min_sync_period = min_sync_period
        self.drain = drain
        self.on_sync = on_sync
        self.objs: Dict[str, list] = {}
        self.data_version: Optional[Tuple[int, int]] = None     # the store version the objects are from
        self.revision = 0
        self.revision_time: Optional[float] = None      # wall time of the newest store change seen
        self.started = time.time()
        self.trigger_time: Optional[float] = None       # wall time of the change that needs a sync
        self._specs: Dict[str, Tuple[dict, o.Pod]] = {}   # pod key -> (manifest, parsed)
        self.dirty = True                  # endpoints/rules may be out of date
        self.pending_since: Optional[float] = None      # wall time a change first waited for a sync
        self.last_sync = float("-inf")     # monotonic time of the last proxier sync
        self.prints: Optional[Dict[str, str]] = None         # what the nodes' rules were last synced from
        self.prints_wanted: Dict[str, str] = {}              # what they should be synced from next
        self.want_full = False                               # the next sync rewrites everything
        self.owed = False                                    # a sync is due (batched by min_sync_period)
        self.check_due = False                               # the periodic drift check is due
        self.check_due_since = 0.0                           # monotonic time it became due
        self.check_patience = CHECK_PATIENCE                 # then a sync owed anyway is made full
        self.zone_text: Optional[str] = None
        self.services: List[o.Service] = []
        self.slices: List[o.EndpointSlice] = []
        self.endpoints = EndpointsController()
        self._pool: Optional[ThreadPoolExecutor] = None      # proxier syncs, one thread per node
        self._checker: Optional[ThreadPoolExecutor] = None   # the drift check, beside the passes
        self._check: Optional[Tuple[float, Future]] = None   # (last_sync when it began, its result)
        self.failed: Dict[str, str] = {}                     # pod key -> why it could not be created

    def close(self) -> None:
        """Stop the kubelet's probe threads and the proxiers' threads."""
        for kubelet in self.kubelets.values():
            kubelet.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._checker is not None:
            self._checker.shutdown(wait=True)
            self._checker = None

    def kubelet_for(self, pod: Pod) -> Kubelet:
        """The kubelet-lite of the pod's node."""
        return self.kubelets[pod.node]

    @property
    def probe_counters(self) -> Dict:
        """Probe results and restarts summed over the nodes' kubelets."""
        out: Dict = {}
        for kubelet in self.kubelets.values():
            for key, value in kubelet.counters.items():
                out[key] = out.get(key, 0) + value
        return out

    # ---- reading -----------------------------------------------------------------------
    def refresh_store(self) -> bool:
        """Re-read the store when it changed since the last pass; True if it did."""
        version = self.store.data_version()
        if version == self.data_version and self.objs:
            return False
        self.data_version = version
        self.objs = with_system_objects(self.cluster, self.store.objects())
        self.revision, self.revision_time = self.store.revision()
        if self.revision_time is not None and self.revision_time >= self.started and self.trigger_time is None:
            self.trigger_time = self.revision_time
        self.dirty = True
        return True

    def spec_of(self, pod: Pod) -> o.Pod:
        """The pod's own manifest as an object (parsed once per change)."""
        return _spec_of(pod, self._specs)

    def model_pod(self, pod: Pod) -> o.Pod:
        return _model_pod(pod, self.spec_of(pod))

    def managed(self) -> List[Pod]:
        return [p for p in self.cluster.pods.values() if p.status.get("managed")]

    # ---- workload controllers ------------------------------------------------------------
    def _wanted(self) -> Tuple[Dict[str, o.Pod], List[str], Dict[str, int]]:
        """(pods to create by key, keys to delete, quota refusals by namespace)."""
        now = time.time()
        create: Dict[str, o.Pod] = {}
        delete: List[str] = []
        live = {p.key: p for p in self.managed() if not p.status.get("deleting_at")}
        bare = {f"{p.namespace}/{p.name}": p for p in self.objs.get("Pod", [])}
        for key, spec in bare.items():
            if key not in self.cluster.pods:
                create[key] = spec
        deps = {f"{d.namespace}/{d.name}": d for d in self.objs.get("Deployment", [])}
        owned: Dict[str, List[Pod]] = {}
        for key, pod in live.items():
            owner = pod.status.get("owner")
            if owner is None:
                if key not in bare:
                    delete.append(key)
            elif owner not in deps:
                delete.append(key)
            else:
                owned.setdefault(owner, []).append(pod)
        terminating = {}
        for pod in self.managed():
            if pod.status.get("deleting_at") and pod.status.get("owner"):
                terminating.setdefault(pod.status["owner"], []).append(pod)

        refused: Dict[str, int] = {}
        pods_in_ns: Dict[str, int] = {}
        for pod in self.cluster.pods.values():
            if not pod.status.get("deleting_at") and pod.status.get("phase") not in ("Succeeded", "Failed"):
                pods_in_ns[pod.namespace] = pods_in_ns.get(pod.namespace, 0) + 1
        for key, spec in create.items():
            pods_in_ns[spec.namespace] = pods_in_ns.get(spec.namespace, 0) + 1
        taken = set(self.cluster.pods) | set(create)
        for key, dep in sorted(deps.items()):
            views = [pod_view(p) for p in owned.get(key, []) + terminating.get(key, [])]
            # the progress record (for progressDeadlineSeconds) lives with the cluster's records
            progress = self.cluster.proxy_state.setdefault("deployments", {}).setdefault(key, {})
            decision = deployments.decide(dep, views, now, progress=progress)
            delete.extend(f"{dep.namespace}/{name}" for name in decision.delete)
            count = decision.create
            headroom = quota.pod_headroom(self.objs, dep.namespace, pods_in_ns.get(dep.namespace, 0))
            if headroom is not None and count > headroom:
                refused[dep.namespace] = refused.get(dep.namespace, 0) + count - max(headroom, 0)
                count = max(headroom, 0)
            for _ in range(count):
                pod = deployments.new_pod(dep, {k.split("/", 1)[1] for k in taken if k.startswith(dep.namespace + "/")})
                manifest = pod_manifest(pod, dep.raw.get("spec", {}).get("template", {}).get("spec", {}))
                manifest["metadata"].setdefault("annotations", {})[OWNER_ANNOTATION] = key
                spec = parse_pod(manifest)
                create[f"{pod.namespace}/{pod.name}"] = spec
                taken.add(f"{pod.namespace}/{pod.name}")
                pods_in_ns[dep.namespace] = pods_in_ns.get(dep.namespace, 0) + 1
        progress_of = self.cluster.proxy_state.get("deployments", {})
        for key in [k for k in progress_of if k not in deps]:     # a deleted Deployment's record goes too
            del progress_of[key]
        return create, delete, refused

    def _create(self, create: Dict[str, o.Pod], report: PassReport) -> None:
        specs, manifests = [], {}
        for key, p in create.items():
            manifests[key] = pod_manifest(p, p.raw.get("spec", {}))
            # the first record of the pod already says it is managed, and by whom: a
            # reconciler killed before it saves again still finds it (kproxy.recover)
            status = {"managed": True, "owner": p.metadata.annotations.get(OWNER_ANNOTATION),
                      "created_at": time.time(), "spec": manifests[key]}
            specs.append((p.name, p.namespace, p.spec.node_name or None, dict(p.labels), status))
        try:
            made = self.cluster.add_pods(specs)
        except KproxyError:
            # one bad pod (a nodeName that does not exist...) must not stop the others
            made = []
            for spec in specs:
                key = spec[4].get("owner") or f"{spec[1]}/{spec[0]}"      # a Deployment's, or the Pod's
                try:
                    made += self.cluster.add_pods([spec])
                    self.failed.pop(key, None)
                except KproxyError as e:
                    reason = str(e).replace(spec[0], "<pod>")
                    if self.failed.get(key) != reason:        # said once, not every pass
                        log.error("a pod of %s cannot be created: %s", key, e)
                    self.failed[key] = reason
        for pod in made:
            self.kubelet_for(pod).start(pod, parse_pod(manifests[pod.key]))
            pod.status["spec"] = manifests[pod.key]
            report.created.append(pod.key)
        if made:
            self.dirty = True

    def mark_deleting(self, keys: List[str], report: Optional[PassReport] = None) -> None:
        """Begin deleting these pods (terminating, drained, then gone over later passes)."""
        report = report if report is not None else PassReport()
        for key in keys:
            pod = self.cluster.pods.get(key)
            if pod is None or pod.status.get("deleting_at"):
                continue
            pod.status["deleting_at"] = time.time()
            pod.status["reason"] = "Terminating"
            pod.status.pop("drained_at", None)
            report.deleted.append(key)
            self.dirty = True

    def _finish_deletions(self) -> bool:
        """End the processes and sandboxes of deleted pods whose endpoints have left
        every node's rules for at least the drain time.  True if any is still waiting,
        or went now (a controller may act on its absence: Recreate, a bare Pod applied
        again)."""
        waiting = False
        now = time.time()
        for pod in [p for p in self.managed() if p.status.get("deleting_at")]:
            drained = pod.status.get("drained_at")
            if drained is None or now - drained < self.drain:
                waiting = True
                continue
            self.kubelet_for(pod).stop(pod)
            self.cluster.delete_pod(pod.name, pod.namespace)
            for node in self.cluster.nodes:
                iptables.forget_endpoint_udp_conntrack(node.netns, pod.ip)
            self._specs.pop(pod.key, None)
            self.dirty = waiting = True
        return waiting

    # ---- endpoints, DNS, proxier ----------------------------------------------------------
    def _sync_rules(self, report: PassReport, check: bool) -> bool:
        """Recompute endpoints and DNS; sync the nodes' rules when they changed and the
        min-sync-period allows.  True if a sync is still owed."""
        zone_due = self.dirty
        pods: List[o.Pod] = []
        if self.dirty or check:
            pods = [self.model_pod(p) for p in self.managed()]
            self.services, self.slices = self.endpoints.compute(self.objs, pods)
            prints = fingerprints(self.services, self.slices)
            if prints != self.prints:
                self.owed = True
                if self.pending_since is None:
                    # network programming latency counts from the change that asked for it:
                    # a store write, else now (a pod turned Ready or went away)
                    self.pending_since = self.trigger_time or time.time()
            if check and not self.check_due:
                self.check_due, self.check_due_since = True, time.monotonic()
            self.trigger_time = None
            self.prints_wanted = prints
            self.dirty = False
        owed = self._sync_proxiers(report)
        if zone_due:            # after the rules: kube-proxy's work is not held up by the DNS zone
            serving = [p for p in pods if p.metadata.deletion_timestamp is None]
            zone = zone_for(self.cluster, self.services, self.slices, serving).to_json()
            if zone != self.zone_text:
                self.zone_text = write_zone_text(self.cluster, zone)
        elif check and self.zone_text is not None and _read(zone_path(self.cluster)) != self.zone_text:
            self.zone_text = write_zone_text(self.cluster, self.zone_text)     # the file was changed by hand
        return owed

    def _check_drift(self, proxiers, services, slices) -> bool:
        """The periodic check: does any node's kernel state differ from what it should
        hold?  (A mode without a cheap check answers yes: its check is a full resync.)
        Runs on the checker thread, one node after the other."""
        found = []
        for proxier in proxiers:
            try:
                why = proxier.drifted(services, slices)
            except KproxyError as e:
                why = f"the check failed: {e}"
            if why:
                found.append(f"{proxier.node.name} ({why})")
        if found:
            log.info("rules to rewrite in full on %s", ", ".join(found))
        return bool(found)

    def _drift_result(self, proxiers) -> Optional[bool]:
        """The periodic check's answer once it has one, else None.  The check reads every
        node's tables, which takes a while with thousands of rules, so it runs beside the
        passes and never holds up a sync.  An answer about rules that a sync has changed
        since the check began is thrown away, and the check begins again."""
        if self._check is not None and self._check[1].done():
            began, future = self._check
            self._check = None
            if began == self.last_sync:
                return future.result()
        if self._check is None:
            if self._checker is None:
                self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-check")
            self._check = (self.last_sync, self._checker.submit(
                self._check_drift, proxiers, list(self.services), list(self.slices)))
        return None

    def _map(self, fn, items):
        """fn over items: side by side when there are several (one thread per node)."""
        if len(items) < 2:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(items)), thread_name_prefix="proxier")
        return list(self._pool.map(fn, items))

    def _sync_proxiers(self, report: PassReport) -> bool:
        proxiers = [proxier_for(self.cluster, node) for node in self.cluster.nodes]
        if self.check_due and not self.owed and (drift := self._drift_result(proxiers)) is not None:
            self.check_due = False
            report.checked = True
            if drift:
                self.owed = self.want_full = True
                report.drift = True
            else:
                announce_load_balancers(self.cluster, self.services, self.slices, force=True)
        if not self.owed:
            # the rules are what they should be: a pod being deleted that changed nothing
            # in them (it was not Ready) has no traffic to drain
            self._mark_drained()
            return False
        if time.monotonic() - self.last_sync < self.min_sync_period:
            return True
        prints = self.prints_wanted
        full = self.want_full
        if self.check_due and time.monotonic() - self.check_due_since > self.check_patience:
            # changes keep coming before the check can answer: the sync owed anyway is made
            # the full one, so that drift is repaired even on a cluster that never rests
            full, self.check_due = True, False
            report.checked = True

        def sync(proxier):
            t = time.monotonic()
            kind = proxier.sync(self.services, self.slices, prints, force_full=full)
            return proxier.node.name, kind, time.monotonic() - t
        # one kube-proxy per node, as on a cluster: the nodes sync side by side (each
        # proxier works in its own node's namespace and keeps its own state).  The
        # min-sync-period counts from the start of a sync, as kube-proxy's runner does.
        self.last_sync = time.monotonic()
        results = self._map(sync, proxiers)
        for node, kind, seconds in results:
            report.syncs[node] = kind
            if self.on_sync:
                self.on_sync(node, kind, seconds, self.pending_since)
        self.prints = prints
        self.pending_since = None
        self.owed = self.want_full = False

        udp_now = _udp_endpoints(self.services, self.slices)
        for vip_port, before in self.cluster.proxy_state.get("udp_endpoints", {}).items():
            gone = set(before) - set(udp_now.get(vip_port, []))
            vip, port = vip_port.rsplit(":", 1)
            for ep in gone:
                for node in self.cluster.nodes:
                    iptables.flush_udp_conntrack(node.netns, vip, int(port), ep)
        self.cluster.proxy_state["udp_endpoints"] = udp_now
        announce_load_balancers(self.cluster, self.services, self.slices, force=full)
        self.cluster.proxy_state["slices"] = len(self.slices)
        self._mark_drained()
        return False

    def _mark_drained(self) -> None:
        """Every node's rules are in line with the pods being deleted: their drain starts."""
        now = time.time()
        for pod in self.managed():
            if pod.status.get("deleting_at") and pod.status.get("drained_at") is None:
                pod.status["drained_at"] = now

    # ---- the pass ------------------------------------------------------------------------
    def pass_once(self, check: bool = False) -> PassReport:
        """One pass of every controller; ``check``: also the periodic drift check (the
        nodes' rules against what they should be, the LoadBalancer routes, the zone file)."""
        report = PassReport()
        self.refresh_store()
        report.revision = self.revision
        if not os.path.exists(zone_path(self.cluster)):
            self.zone_text = write_zone(self.cluster, [], [], [])   # the DNS pod starts on an empty zone

        asked = [k for k in self.store.take_pod_deletions() if k in self.cluster.pods]
        self.mark_deleting(asked, report)
        create, delete, refused = self._wanted()
        report.quota_refused = [f"{ns}: {n} pod(s)" for ns, n in refused.items()]
        self.mark_deleting(delete, report)
        if create:
            self._create(create, report)

        starting = changed = False
        now = time.time()
        for pod in self.managed():
            if pod.status.get("deleting_at"):
                continue
            if "containers" not in pod.status:          # recorded, but its start was cut short
                self.kubelet_for(pod).start(pod, self.spec_of(pod))
            if self.kubelet_for(pod).sync(pod):
                self.dirty = changed = True
            if not pod.status.get("ready") and _may_become_ready(pod, now):
                starting = True
        owed = self._sync_rules(report, check)
        waiting = self._finish_deletions()
        if report.created or report.deleted or report.syncs or changed:
            self.cluster.save()
        # settled: nothing was done or is on its way (a readiness change may let a
        # rollout take its next step, so it needs one more pass to tell)
        report.busy = [what for what, flag in (("creating pods", report.created), ("deleting pods", delete),
                                               ("pod status changed", changed), ("pods starting", starting),
                                               ("sync owed", owed), ("pods terminating", waiting)) if flag]
        report.settled = not report.busy
        return report

    def converge_once(self, timeout: float = READY_TIMEOUT, poll: float = 0.02) -> ConvergeReport:
        """Passes until the cluster settles (or ``timeout`` seconds pass without it):
        what the CLI does when no daemon runs."""
        started = time.monotonic()
        out = ConvergeReport()
        deadline = started + timeout
        while True:
            report = self.pass_once()
            out.pods_created += report.created
            out.pods_deleted += report.deleted
            for node, kind in report.syncs.items():
                if kind != "none" or node not in out.syncs:
                    out.syncs[node] = kind
            if report.settled:
                break
            if time.monotonic() > deadline:
                out.settled = False
                break
            time.sleep(poll)
        if self.owed:                               # never leave rules behind the pods
            self.min_sync_period = 0
            self._sync_rules(PassReport(), False)
        self.cluster.save()
        out.not_ready = sorted(p.key for p in self.managed() if not p.status.get("ready"))
        out.seconds = time.monotonic() - started
        return out


def _spec_of(pod: Pod, cache: Dict[str, Tuple[dict, o.Pod]]) -> o.Pod:
    manifest = pod.status.get("spec") or {}
    cached = cache.get(pod.key)
    if cached is None or (cached[0] is not manifest and cached[0] != manifest):
        cached = (manifest, parse_pod(manifest) if manifest else o.Pod(metadata=o.ObjectMeta(
            name=pod.name, namespace=pod.namespace, labels=dict(pod.labels))))
        cache[pod.key] = cached
    return cached[1]


def _model_pod(pod: Pod, spec: o.Pod) -> o.Pod:
    """The Pod as the API server would show it now: spec, node, IP, phase, Ready, and a
    deletion timestamp once it is being deleted (a shallow copy: the cached spec stays)."""
    out = copy.copy(spec)
    out.metadata = copy.copy(spec.metadata)
    out.spec = copy.copy(spec.spec)
    out.spec.node_name = pod.node
    out.metadata.deletion_timestamp = str(pod.status["deleting_at"]) if pod.status.get("deleting_at") else None
    out.status = o.PodStatus(phase=pod.status.get("phase", "Running"), pod_ip=pod.ip, pod_ips=[pod.ip],
                             conditions=[{"type": "Ready", "status": "True" if pod.status.get("ready") else "False"}])
    return out


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def pod_view(pod: Pod) -> "deployments.PodView":
    """What the Deployment controller sees of one of its pods."""
    return deployments.PodView(
        name=pod.name, template_hash=pod.labels.get("pod-template-hash", ""),
        ready=bool(pod.status.get("ready")) and not pod.status.get("deleting_at"),
        ready_since=pod.status.get("ready_since"),
        terminating=bool(pod.status.get("deleting_at")),
        failed=pod.status.get("phase") == "Failed",
        created=pod.status.get("created_at"))


def _may_become_ready(pod: Pod, now: float) -> bool:
    """A pod not Ready yet that still may be soon: a process runs and the pod is young."""
    if now - pod.status.get("created_at", 0) > READY_TIMEOUT:
        return False
    return any(c.get("state") == "running" or ("pid" in c and c.get("state") is None)
               for c in pod.status.get("containers", []))


# ---- the API the CLI and tests use -----------------------------------------------------------

def converge(cluster: Cluster, store: Store, timeout: float = READY_TIMEOUT) -> ConvergeReport:
    """Converge the running cluster to the store, once (no daemon)."""
    rec = Reconciler(cluster, store)
    try:
        return rec.converge_once(timeout)
    finally:
        rec.close()


def services_and_slices(objs: Dict[str, list], pods: List[o.Pod]) -> Tuple[List[o.Service], List[o.EndpointSlice]]:
    """The endpoints controller: the Services, and the EndpointSlices it keeps for them
    from ``pods`` (with their Ready condition and deletion timestamp), plus slices and
    Endpoints applied by hand (a controller with no memory computes every Service)."""
    return EndpointsController().compute(objs, pods)


class EndpointsController:
    """services_and_slices, keeping each Service's slices from one pass to the next and
    recomputing only those of Services that changed (a new object from the store) or
    that select a pod that changed (added, removed, relabelled, readiness, deletion):
    with 1,000 Services, one new Service costs one computation, not 1,000."""

    def __init__(self):
        self._pods: Dict[str, tuple] = {}                        # pod key -> signature
        self._slices: Dict[Tuple[str, str], Tuple[o.Service, List[o.EndpointSlice]]] = {}

    @staticmethod
    def _signature(p: o.Pod) -> tuple:
        ports = tuple((cp.name, cp.container_port, cp.protocol) for c in p.spec.containers for cp in c.ports)
        return (p.namespace, tuple(sorted(p.labels.items())), tuple(p.pod_ips), p.status.phase,
                p.status.condition("Ready"), p.metadata.deletion_timestamp, p.spec.node_name, ports)

    def compute(self, objs: Dict[str, list], pods: List[o.Pod]) -> Tuple[List[o.Service], List[o.EndpointSlice]]:
        sigs = {f"{p.namespace}/{p.name}": self._signature(p) for p in pods}
        touched: List[Tuple[str, Dict[str, str]]] = []          # (namespace, labels) of changed pods
        for key in set(sigs) | set(self._pods):
            if sigs.get(key) != self._pods.get(key):
                for sig in (sigs.get(key), self._pods.get(key)):
                    if sig is not None:
                        touched.append((sig[0], dict(sig[1])))
        self._pods = sigs
        services = objs.get("Service", [])
        slices: List[o.EndpointSlice] = list(objs.get("EndpointSlice", []))
        for eps in objs.get("Endpoints", []):
            slices.extend(eps.to_endpoint_slices())
        by_ns: Dict[str, List[o.Pod]] = {}
        for p in pods:
            by_ns.setdefault(p.namespace, []).append(p)
        kept: Dict[Tuple[str, str], Tuple[o.Service, List[o.EndpointSlice]]] = {}
        for svc in services:
            if not svc.selector:
                continue
            key = (svc.namespace, svc.name)
            cached = self._slices.get(key)
            if cached is None or cached[0] is not svc or any(
                    ns == svc.namespace and selects(svc.selector, labels) for ns, labels in touched):
                cached = (svc, endpoint_slices_for(svc, by_ns.get(svc.namespace, []), None))
            kept[key] = cached
            slices.extend(cached[1])
        self._slices = kept
        return services, slices


def current_view(cluster: Cluster, store: Store):
    """(services, endpoint slices) as they stand: for `get svc`, `describe`, `rules`."""
    objs = with_system_objects(cluster, store.objects())
    specs: Dict[str, Tuple[dict, o.Pod]] = {}
    pods = [_model_pod(p, _spec_of(p, specs)) for p in cluster.pods.values() if p.status.get("managed")]
    return services_and_slices(objs, pods)


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
