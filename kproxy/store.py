"""The desired state: objects applied with `kproxy apply`, in SQLite, with their allocations.

One row per object (kind, namespace, name) holding the manifest as applied, and one
row holding the allocators' state (ClusterIPs, NodePorts, LoadBalancer IPs).  An
apply is one IMMEDIATE transaction: every object of the apply lands, with its
allocations, or none does; two applies at once are serialised by SQLite's lock.
"""
from __future__ import annotations

import copy
import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from kproxy.alloc import Allocators, AllocationError
from kproxy.errors import KproxyError
from kproxy.model import LoadedObject
from kproxy.model.loader import decode
from kproxy.model import objects as o

Key = Tuple[str, str, str]          # (kind, namespace or "", name)
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ORDER = {"Namespace": 0, "EndpointSlice": 1, "Endpoints": 1, "Service": 2, "Deployment": 3, "Pod": 4}

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    manifest TEXT NOT NULL, allocated TEXT NOT NULL DEFAULT '{}', source TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class ApplyError(KproxyError):
    pass


@dataclass
class ApplyResult:
    created: List[str] = field(default_factory=list)
    configured: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    not_emulated: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"{r} created" for r in self.created] + [f"{r} configured" for r in self.configured]
        out += [f"{r} unchanged" for r in self.unchanged]
        out += [f"{r} accepted, not emulated (kproxy emulates the service network only)" for r in self.not_emulated]
        return out + [f"Warning: {w}" for w in self.warnings]


def _ref(kind: str, ns: str, name: str) -> str:
    return f"{kind.lower()}/{name}" if not ns or ns == "default" else f"{kind.lower()}/{name} -n {ns}"


class Store:
    def __init__(self, path: str, service_cidr: str, node_port_range: str, lb_pool: Optional[str]):
        self.path = path
        self._alloc_args = (service_cidr, node_port_range, lb_pool)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._parsed: Dict[Key, tuple] = {}      # (kind, ns, name) -> (manifest, allocated, object)

    def close(self) -> None:
        self.db.close()

    # ---- revisions ---------------------------------------------------------------------
    def _bump(self) -> None:
        """Inside a write transaction: one more revision of the desired state, stamped
        with the time (the start of network programming latency)."""
        rev, _ = self.revision()
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)",
                        (json.dumps([rev + 1, time.time()]),))

    def revision(self) -> Tuple[int, Optional[float]]:
        """(revision, wall time of the change that made it): grows by one per apply,
        delete or scale that changed something."""
        row = self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        if not row:
            return 0, None
        rev, when = json.loads(row[0])
        return int(rev), float(when)

    def data_version(self) -> Tuple[int, int]:
        """Changes whenever any connection commits a change (cheap to poll)."""
        return (self.db.execute("PRAGMA data_version").fetchone()[0], self.revision()[0])

    def get_meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def request_pod_deletions(self, keys: List[str]) -> None:
        """Ask the reconciler to delete these pods ("ns/name") that a controller owns
        (`kproxy delete pod` of a Deployment's replica): they are not store objects."""
        self._begin()
        try:
            pending = self.get_meta("delete_pods", [])
            self.set_meta("delete_pods", sorted(set(pending) | set(keys)))
            self._bump()
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def take_pod_deletions(self) -> List[str]:
        """The pod deletions asked for, removed from the store as they are handed over."""
        if not self.get_meta("delete_pods"):
            return []
        self._begin()
        try:
            pending = self.get_meta("delete_pods", [])
            self.db.execute("DELETE FROM meta WHERE key='delete_pods'")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return pending

    # ---- allocators --------------------------------------------------------------------
    def _allocators(self) -> Allocators:
        row = self.db.execute("SELECT value FROM meta WHERE key='allocators'").fetchone()
        return Allocators.from_json(row[0]) if row else Allocators(*self._alloc_args)

    def _allocate(self, svc: o.Service, alloc: Allocators, previous: dict, where: str) -> dict:
        """Fill in the Service's ClusterIP, NodePorts and LB IP; keep what it had before."""
        owner = svc.namespaced_name
        alloc.release(owner)
        if svc.type == "ExternalName":
            return {}
        got: dict = {}
        try:
            if not svc.headless:
                svc.cluster_ip = alloc.cluster_ips.allocate(owner, svc.cluster_ip or previous.get("clusterIP", ""))
                svc.cluster_ips = [svc.cluster_ip]
                got["clusterIP"] = svc.cluster_ip
            if svc.type in ("NodePort", "LoadBalancer"):
                prev_ports = previous.get("nodePorts", {})
                got["nodePorts"] = {}
                for i, port in enumerate(svc.ports):
                    if svc.type == "NodePort" or svc.allocate_load_balancer_node_ports or port.node_port:
                        key = f"{port.name}/{port.protocol}/{port.port}"
                        want = port.node_port or prev_ports.get(key, 0)
                        port.node_port = alloc.node_ports.allocate(owner, want, f"spec.ports[{i}].nodePort")
                        got["nodePorts"][key] = port.node_port
            if svc.type == "LoadBalancer" and svc.external_traffic_policy == "Local":
                svc.health_check_node_port = alloc.node_ports.allocate(
                    owner, svc.health_check_node_port or previous.get("healthCheckNodePort", 0),
                    "spec.healthCheckNodePort")
                got["healthCheckNodePort"] = svc.health_check_node_port
            if svc.type == "LoadBalancer" and alloc.load_balancers is not None and not svc.load_balancer_ingress:
                ip = alloc.load_balancers.allocate(owner, svc.load_balancer_ip or previous.get("loadBalancerIP", ""))
                svc.load_balancer_ingress = [o.LoadBalancerIngress(ip=ip, ip_mode="VIP")]
                got["loadBalancerIP"] = ip
        except AllocationError as e:
            raise ApplyError(f"{where}: Service {owner}: {e}") from None
        for i, port in enumerate(svc.ports):
            if port.node_port and svc.type not in ("NodePort", "LoadBalancer"):
                raise ApplyError(f"{where}: Service {owner}: spec.ports[{i}].nodePort: Forbidden: "
                                 f"may not be used when `type` is '{svc.type}'")
        return got

    # ---- apply / delete ------------------------------------------------------------------
    def apply(self, loaded: List[LoadedObject]) -> ApplyResult:
        """Create or update every object, all or nothing (kubectl apply semantics)."""
        result = ApplyResult(warnings=[w for lo in loaded if lo.emulated for w in lo.warnings])
        latest: Dict[Key, LoadedObject] = {}
        for lo in loaded:
            if not lo.emulated:
                result.not_emulated.append(_ref(lo.kind, lo.namespace or "", lo.name))
                continue
            latest[(lo.kind, lo.namespace or "", lo.name)] = lo
        db = self.db
        self._begin()
        try:
            self._check_quota([lo for lo in latest.values()])
            alloc = self._allocators()
            namespaces = set(BUILTIN_NAMESPACES) | {
                r[0] for r in db.execute("SELECT name FROM objects WHERE kind='Namespace'")}
            namespaces |= {k[2] for k in latest if k[0] == "Namespace"}
            for key, lo in sorted(latest.items(), key=lambda kv: ORDER.get(kv[0][0], 9)):
                kind, ns, name = key
                where = f"{lo.source}: document {lo.doc_index}"
                if kind != "Namespace" and ns and ns not in namespaces:
                    raise ApplyError(f'{where}: {kind} {ns}/{name}: namespaces "{ns}" not found '
                                     f"(apply the Namespace first, or in the same apply)")
                row = db.execute("SELECT manifest, allocated FROM objects WHERE kind=? AND namespace=? AND name=?",
                                 key).fetchone()
                obj = copy.deepcopy(lo.obj)
                allocated = {}
                if isinstance(obj, o.Service):
                    allocated = self._allocate(obj, alloc, json.loads(row[1]) if row else {}, where)
                raw = lo.obj.raw
                if ns and raw.get("metadata", {}).get("namespace") != ns:
                    # applied with -n (or the default namespace): the stored manifest says where it lives
                    raw = dict(raw, metadata=dict(raw.get("metadata", {}), namespace=ns))
                manifest = json.dumps(raw, sort_keys=True)
                alloc_text = json.dumps(allocated, sort_keys=True)
                ref = _ref(kind, ns, name)
                if row is None:
                    db.execute("INSERT INTO objects (kind, namespace, name, manifest, allocated, source) "
                               "VALUES (?,?,?,?,?,?)", (kind, ns, name, manifest, alloc_text, lo.source))
                    result.created.append(ref)
                elif row[0] != manifest or row[1] != alloc_text:
                    db.execute("UPDATE objects SET manifest=?, allocated=?, source=?, generation=generation+1 "
                               "WHERE kind=? AND namespace=? AND name=?",
                               (manifest, alloc_text, lo.source, kind, ns, name))
                    result.configured.append(ref)
                else:
                    result.unchanged.append(ref)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('allocators', ?)", (alloc.to_json(),))
            if result.created or result.configured:
                self._bump()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _begin(self) -> None:
        """Start a write transaction; another writer holding the store longer than the
        timeout is a clear conflict, not a half-written store."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise ApplyError(f"the store {self.path} is busy ({e}): another apply or delete is "
                             "writing it; nothing was changed, try again") from None

    def _check_quota(self, incoming: List[LoadedObject]) -> None:
        """ResourceQuota admission, inside the write transaction (two applies cannot
        both take the last unit of a quota)."""
        if not incoming:
            return
        from kproxy import quota
        stored = self.objects()
        if not stored.get("ResourceQuota") and not any(lo.kind == "ResourceQuota" for lo in incoming):
            return
        sources = {id(lo.obj): lo.source for lo in incoming}
        quota.check_apply(stored, [lo.obj for lo in incoming], source_of=lambda obj: sources.get(id(obj), "-"))

    def delete(self, loaded: List[LoadedObject]) -> List[str]:
        """Delete the objects these manifests name (kubectl delete -f); a Namespace takes its objects."""
        return self.delete_keys([(lo.kind, lo.namespace or "", lo.name) for lo in loaded if lo.emulated])

    def delete_keys(self, keys: List[Key]) -> List[str]:
        """Delete objects by (kind, namespace, name); a Namespace takes its objects.
        Returns kubectl's lines ('service "x" deleted')."""
        gone = []
        db = self.db
        self._begin()
        try:
            alloc = self._allocators()
            for key in keys:
                victims = [key]
                if key[0] == "Namespace":
                    victims += [tuple(r) for r in db.execute(
                        "SELECT kind, namespace, name FROM objects WHERE namespace=?", (key[2],))]
                for kind, ns, name in victims:
                    cur = db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", (kind, ns, name))
                    if cur.rowcount:
                        gone.append(f'{kind.lower()} "{name}" deleted')
                        if kind == "Service":
                            alloc.release(f"{ns}/{name}")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('allocators', ?)", (alloc.to_json(),))
            if gone:
                self._bump()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return gone

    def delete_names(self, kind: str, namespace: str, names: List[str]) -> List[str]:
        """`kproxy delete KIND NAME...` (a Namespace takes its objects); every name must exist."""
        ns = "" if kind == "Namespace" else namespace
        for n in names:
            if not self.db.execute("SELECT 1 FROM objects WHERE kind=? AND namespace=? AND name=?",
                                   (kind, ns, n)).fetchone():
                where = "" if kind == "Namespace" else f" in namespace {namespace!r}"
                raise ApplyError(f'{kind.lower()}s "{n}" not found{where}')
        return self.delete_keys([(kind, ns, n) for n in names])

    def scale(self, kind: str, namespace: str, name: str, replicas: int) -> bool:
        """Set a Deployment's spec.replicas (kubectl scale); False if it already had it."""
        if replicas < 0:
            raise ApplyError(f"--replicas must be 0 or more, not {replicas}")
        self._begin()
        try:
            row = self.db.execute("SELECT manifest FROM objects WHERE kind=? AND namespace=? AND name=?",
                                  (kind, namespace, name)).fetchone()
            if row is None:
                raise ApplyError(f'{kind.lower()}s.apps "{name}" not found in namespace {namespace!r}')
            manifest = json.loads(row[0])
            if manifest.get("spec", {}).get("replicas", 1) == replicas:
                self.db.execute("COMMIT")
                return False
            manifest.setdefault("spec", {})["replicas"] = replicas
            self.db.execute("UPDATE objects SET manifest=?, generation=generation+1 "
                            "WHERE kind=? AND namespace=? AND name=?",
                            (json.dumps(manifest, sort_keys=True), kind, namespace, name))
            self._bump()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return True

    # ---- reading -------------------------------------------------------------------------
    def objects(self) -> Dict[str, list]:
        """Every stored object as model dataclasses, by kind, allocations filled in.

        Rows are parsed once per change and the objects cached: callers share them and
        must not change them (deep-copy to modify)."""
        rows = self.db.execute("SELECT kind, namespace, name, manifest, allocated FROM objects "
                               "ORDER BY kind, namespace, name").fetchall()
        out: Dict[str, list] = {}
        cache: Dict[Key, tuple] = {}
        for kind, ns, name, manifest, allocated in rows:
            key = (kind, ns, name)
            hit = self._parsed.get(key)
            if hit is None or hit[0] != manifest or hit[1] != allocated:
                obj = decode(json.loads(manifest), source="store").obj
                if isinstance(obj, o.Service):
                    _fill_allocations(obj, json.loads(allocated))
                hit = (manifest, allocated, obj)
            cache[key] = hit
            out.setdefault(kind, []).append(hit[2])
        self._parsed = cache
        return out

    def generation(self) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(generation), 0) + COUNT(*) FROM objects").fetchone()
        return int(row[0])


def _fill_allocations(svc: o.Service, allocated: dict) -> None:
    if "clusterIP" in allocated:
        svc.cluster_ip = allocated["clusterIP"]
        svc.cluster_ips = [svc.cluster_ip]
    ports = allocated.get("nodePorts", {})
    for port in svc.ports:
        key = f"{port.name}/{port.protocol}/{port.port}"
        if key in ports:
            port.node_port = ports[key]
    if "healthCheckNodePort" in allocated:
        svc.health_check_node_port = allocated["healthCheckNodePort"]
    if "loadBalancerIP" in allocated:
        svc.load_balancer_ingress = [o.LoadBalancerIngress(ip=allocated["loadBalancerIP"], ip_mode="VIP")]
