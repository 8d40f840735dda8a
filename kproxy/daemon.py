"""`kproxy daemon`: the controllers of one cluster, running continuously.

    kproxy apply ──> store (SQLite) ──> daemon: a pass every --interval, or at once when the store changes
                                           workloads, kubelet-lite per node, endpoints, DNS,
                                           one proxier per node (synced at most every --min-sync-period),
                                           a full check every --sync-period that repairs drift
                     store meta "settled" <── the revision whose effects are in place (for --wait)

Only one reconciler may run per cluster: the daemon holds ``reconciler.lock`` in the
cluster's directory for its whole life, and a CLI command that would converge by
itself takes the same lock, or, finding a daemon holding it, only writes the store.

Stopping the daemon (SIGTERM, SIGINT) leaves the cluster running, as stopping kubelet
and kube-proxy leaves a node's containers and rules.  A new daemon adopts them (see
kproxy.recover).
"""
from __future__ import annotations

import errno
import faulthandler
import fcntl
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from cni import netns
from kproxy.cluster import Cluster
from kproxy.errors import KproxyError
from kproxy.kernel import links

log = logging.getLogger("kproxy.daemon")

LOCK_FILE = "reconciler.lock"
DEFAULT_INTERVAL = 0.2          # seconds between passes when nothing wakes the loop
DEFAULT_SYNC_PERIOD = 30.0      # kube-proxy's --iptables-sync-period default
DEFAULT_METRICS = "127.0.0.1:10249"   # kube-proxy's --metrics-bind-address default


class ReconcilerBusy(KproxyError):
    pass


def _lock_path(cluster_dir: str) -> str:
    return os.path.join(cluster_dir, LOCK_FILE)


@contextmanager
def reconciler_lock(cluster_dir: str, *, role: str, blocking: bool = False) -> Iterator[None]:
    """Hold the cluster's reconciler lock, or raise ReconcilerBusy naming the holder.
    ``blocking``: wait for another CLI command's converge, but never for a daemon."""
    os.makedirs(cluster_dir, exist_ok=True)
    fd = os.open(_lock_path(cluster_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            if blocking:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or daemon_running(cluster_dir):
                            raise
                        time.sleep(0.05)
            else:
                # a moment's grace: `holder()` in another command takes the lock shared
                # for an instant to look
                for attempt in range(20):
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or attempt == 19:
                            raise
                        time.sleep(0.05)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise ReconcilerBusy(f"another reconciler holds the cluster: {holder(cluster_dir) or 'unknown'}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {role}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(cluster_dir: str) -> Optional[str]:
    """"PID ROLE" of the reconciler holding the lock, or None when nobody holds it."""
    try:
        fd = os.open(_lock_path(cluster_dir), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            with open(_lock_path(cluster_dir)) as f:
                text = f.read().strip()
            return text or "a process that has not written its name yet"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def daemon_running(cluster_dir: str) -> bool:
    h = holder(cluster_dir)
    return bool(h) and h.endswith("daemon")


def wait_settled(store, revision: int, timeout: float) -> dict:
    """Wait until the daemon reports ``revision`` (or a later one) in effect."""
    deadline = time.monotonic() + timeout
    while True:
        settled = store.get_meta("settled") or {}
        if settled.get("revision", -1) >= revision:
            return settled
        if time.monotonic() > deadline:
            raise KproxyError(f"timed out after {timeout:.0f}s waiting for the daemon to put revision "
                              f"{revision} in effect (it has {settled.get('revision', 'none')}); "
                              "see its log")
        time.sleep(0.05)


class Daemon:
    """The loop; ``run()`` returns when ``stop()`` is called or a signal arrives."""

    def __init__(self, cluster_name: str, *, min_sync_period: float = 1.0,
                 sync_period: float = DEFAULT_SYNC_PERIOD, interval: float = DEFAULT_INTERVAL,
                 metrics_address: Optional[str] = DEFAULT_METRICS, backoff_base: float = 10.0):
        self.cluster_name = cluster_name
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.interval = interval
        self.metrics_address = metrics_address
        self.backoff_base = backoff_base
        self._stop = threading.Event()
        self.metrics = None
        self.metrics_server = None
        self.metrics_url = None
        self.passes = 0

    def stop(self, *_args) -> None:
        self._stop.set()

    def run(self, install_signals: bool = True) -> None:
        from kproxy.reconciler import Reconciler, open_store
        from kproxy import recover

        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
            faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1 PID`: where is it?
        cluster = Cluster.open(self.cluster_name)
        with reconciler_lock(cluster.dir, role="daemon"):
            cluster = Cluster.open(self.cluster_name)      # re-read under the lock
            cluster.reconciler = True
            store = open_store(cluster)
            self._setup_metrics(cluster)
            rec = Reconciler(cluster, store, kubelet_options={"backoff_base": self.backoff_base},
                             min_sync_period=self.min_sync_period,
                             on_sync=self._on_sync)
            store.set_meta("daemon", {"pid": os.getpid(), "started": time.time(), "metrics": self.metrics_url})
            try:
                for line in recover.adopt(cluster, rec.kubelet_for, rec.spec_of).lines():
                    log.warning("%s", line)
                # the predecessor may have died mid-sync: the first sync rewrites everything
                rec.owed = rec.want_full = True
                self._loop(cluster, store, rec)
            finally:
                cluster.save()
                rec.close()
                store.close()
                if self.metrics_server is not None:
                    self.metrics_server.stop()

    # ---- the loop --------------------------------------------------------------------------
    def _loop(self, cluster, store, rec) -> None:
        last_full = float("-inf")
        settled_rev = (store.get_meta("settled") or {}).get("revision")
        last_refused: list = []
        while not self._stop.is_set():
            started = time.monotonic()
            full = started - last_full >= self.sync_period
            if full:
                self._repair_sandboxes(cluster, rec)
            try:
                report = rec.pass_once(check=full)
            except KproxyError as e:
                log.error("pass failed: %s", e)
                self._count("kproxy_reconcile_errors_total")
                self._stop.wait(1.0)
                continue
            except Exception:              # a daemon keeps going; the next pass starts from what exists
                log.exception("pass failed")
                self._count("kproxy_reconcile_errors_total")
                self._stop.wait(1.0)
                continue
            if full:
                last_full = time.monotonic()
            self.passes += 1
            self._observe_pass(rec, report, time.monotonic() - started)
            for key in report.created:
                log.info("pod %s created", key)
            for key in report.deleted:
                log.info("pod %s deleting", key)
            if report.quota_refused != last_refused:       # said once, not every pass
                for line in report.quota_refused:
                    log.warning("quota: could not create %s", line)
                last_refused = report.quota_refused
            if not report.settled:
                log.debug("pass %d: not settled: %s", self.passes, ", ".join(report.busy))
            if report.settled and report.revision != settled_rev:
                settled_rev = report.revision
                store.set_meta("settled", {"revision": report.revision, "time": time.time(), "pid": os.getpid()})
            if report.drift:
                log.warning("a node's rules had changed behind kproxy's back: rewritten in full")
                self._count("kproxy_drift_repairs_total", what="rules")
            self._sleep(store, rec, report.settled)

    def _sleep(self, store, rec, settled: bool) -> None:
        """Until the next pass: the interval, cut short by a change to the store."""
        deadline = time.monotonic() + (self.interval if settled else min(self.interval, 0.05))
        version = rec.data_version        # what the pass read: a commit during the pass wakes at once
        while not self._stop.is_set() and time.monotonic() < deadline:
            if store.data_version() != version:
                return
            self._stop.wait(0.02)

    def _repair_sandboxes(self, cluster, rec) -> None:
        """The periodic check of what a user (or a test) may have broken by hand: a pod
        whose namespace or interface is gone is deleted, so that its controller makes
        it again (a bare Pod under the same name, a Deployment's replica as a new one)."""
        for pod in list(rec.managed()):
            if pod.status.get("deleting_at"):
                continue
            broken = None
            if not netns.exists(pod.netns):
                broken = "namespace"
            else:
                try:
                    with links.socket_in(pod.netns) as ipr:
                        if not ipr.link_lookup(ifname="eth0"):
                            broken = "interface"
                except Exception:
                    broken = "namespace"
            if broken:
                log.warning("pod %s lost its %s: recreating it", pod.key, broken)
                self._count("kproxy_drift_repairs_total", what=f"pod_{broken}")
                rec.kubelet_for(pod).stop(pod)
                try:
                    cluster.delete_pod(pod.name, pod.namespace)
                except Exception as e:          # what is left is for `kproxy clean`
                    log.error("removing broken pod %s: %s", pod.key, e)
                    cluster.pods.pop(pod.key, None)
                    cluster.touch(pod.key)
                rec.dirty = True

    # ---- metrics -----------------------------------------------------------------------------
    def _setup_metrics(self, cluster) -> None:
        from kproxy import metrics
        self.registry = metrics.Registry()
        self.metrics = DaemonMetrics(metrics.kube_proxy_metrics(self.registry, nodes=[n.name for n in cluster.nodes]),
                                     self.registry)
        if self.metrics_address:
            host, _, port = self.metrics_address.rpartition(":")
            self.metrics_server = metrics.serve(self.registry, host=host or "127.0.0.1", port=int(port))
            self.metrics_url = f"http://{host or '127.0.0.1'}:{self.metrics_server.port}/metrics"
            log.info("metrics on %s", self.metrics_url)

    def _on_sync(self, node: str, kind: str, seconds: float, pending_since: Optional[float]) -> None:
        if self.metrics is not None:
            self.metrics.sync(node, kind, seconds, pending_since)

    def _observe_pass(self, rec, report, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.reconcile_pass(rec, report)

    def _count(self, name: str, **labels) -> None:
        if self.metrics is not None:
            self.metrics.count(name, **labels)


class DaemonMetrics:
    """What the daemon feeds kproxy.metrics: kube-proxy's sync metrics per node (one
    proxier per node), and the pods, probes and passes of the controllers."""

    def __init__(self, m, registry):
        self.m = m
        self.errors = registry.counter("kproxy_reconcile_errors_total", "Passes that failed with an error.")
        self._probes: dict = {}
        self._restarts = 0
        self._nodes: dict = {}             # node -> its bound view of the kube-proxy metrics

    def _node(self, node: str):
        if node not in self._nodes:
            self._nodes[node] = self.m.for_node(node)
        return self._nodes[node]

    def sync(self, node: str, kind: str, seconds: float, pending_since: Optional[float]) -> None:
        n = self._node(node)
        n.sync_proxy_rules_duration_seconds.observe(seconds)
        if kind == "full":
            n.sync_full_proxy_rules_duration_seconds.observe(seconds)
        elif kind == "partial":
            n.sync_partial_proxy_rules_duration_seconds.observe(seconds)
        n.sync_proxy_rules_last_timestamp_seconds.set_to_current_time()
        if pending_since is not None:
            # kube-proxy measures from the endpoints' change trigger time; here, from the
            # store change (or pod readiness change) that made the sync necessary
            n.network_programming_duration_seconds.observe(max(0.0, time.time() - pending_since))

    def reconcile_pass(self, rec, report) -> None:
        m = self.m
        m.reconcile_passes_total.inc()
        pods = rec.managed()
        phases: dict = {}
        for p in pods:
            phase = p.status.get("phase") or "Pending"
            phases[phase] = phases.get(phase, 0) + 1
        for phase in ("Pending", "Running", "Succeeded", "Failed"):
            m.pods.set(phases.get(phase, 0), phase=phase)
        m.pods_ready.set(sum(1 for p in pods if p.status.get("ready")))
        restarts = sum(int(p.status.get("restarts", 0)) for p in pods)
        if restarts > self._restarts:
            m.container_restarts_total.inc(restarts - self._restarts)
        self._restarts = restarts
        counters = rec.probe_counters
        for key, value in counters.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                continue
            before = self._probes.get(key, 0)
            if value > before:
                m.prober_probe_total.inc(value - before, probe_type=key[0].capitalize(), result=key[1])
            self._probes[key] = value
        pending = 1 if rec.pending_since is not None else 0
        for node in rec.cluster.nodes:
            n = self._node(node.name)
            n.sync_proxy_rules_service_changes_pending.set(pending)
            n.sync_proxy_rules_endpoint_changes_pending.set(pending)
            if pending:
                n.sync_proxy_rules_last_queued_timestamp_seconds.set(rec.pending_since)

    def count(self, name: str, **labels) -> None:
        if name == "kproxy_drift_repairs_total":
            self.m.drift_repairs_total.inc(**labels)
        elif name == "kproxy_reconcile_errors_total":
            self.errors.inc()
