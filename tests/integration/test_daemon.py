"""`kproxy daemon` on a real emulated cluster: the CLI writes the store and waits, the
daemon converges, repairs drift, survives kill -9 and a reboot, rolls Deployments
without a failed request, and serves metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from kproxy.cluster import Cluster
from kproxy.kernel import process
from kproxy.metrics import parse_text
from tests.conftest import kproxy_cli
from tests.integration.test_services import deployment, probe, service

pytestmark = pytest.mark.root

FAST = ["--min-sync-period", "0.2", "--sync-period", "2", "--interval", "0.1",
        "--metrics-bind-address", "127.0.0.1:0", "--backoff", "0.5"]


class Daemon:
    """A `kproxy daemon` subprocess of one cluster, ended by its PID."""

    def __init__(self, name: str, tmp_path, args=FAST):
        self.name = name
        self.log = open(tmp_path / f"daemon-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "kproxy", "--cluster", name, "daemon", "-vv", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 30
        while self.meta("daemon", {}).get("pid") != self.proc.pid:
            assert self.proc.poll() is None, f"daemon exited: {self.output()}"
            assert time.monotonic() < deadline, f"daemon did not start: {self.output()}"
            time.sleep(0.1)

    def meta(self, key, default=None):
        import sqlite3
        from kproxy import state
        path = os.path.join(state.cluster_dir(self.name), "store.db")
        if not os.path.exists(path):
            return default
        db = sqlite3.connect(path, timeout=10)
        try:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return default
        finally:
            db.close()
        return json.loads(row[0]) if row else default

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict:
        url = self.meta("daemon")["metrics"]
        with urllib.request.urlopen(url, timeout=5) as r:
            return parse_text(r.read().decode())

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def cluster(make_cluster):
    return make_cluster(nodes=2)


@pytest.fixture
def daemon(cluster, tmp_path):
    d = Daemon(cluster.name, tmp_path)
    yield d
    d.stop()


def cli(cluster, *args, **kw):
    return kproxy_cli("--cluster", cluster.name, *args, **kw)


def apply_text(cluster, tmp_path, text, *extra, check=True):
    path = tmp_path / f"m{time.monotonic_ns()}.yaml"
    path.write_text(textwrap.dedent(text))
    return cli(cluster, "apply", "-f", str(path), *extra, check=check)


def fresh(cluster) -> Cluster:
    return Cluster.open(cluster.name)


def wait_for(what, fn, timeout=60.0, every=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def client_pod(cluster):
    c = fresh(cluster)
    return c, c.pods.get("default/client") or c.add_pod("client", node="node1")


def test_apply_waits_for_the_daemon_and_two_applies_both_land(cluster, daemon, tmp_path):
    out = apply_text(cluster, tmp_path, deployment("web", 2) + service("web", 8080, 80), "--wait")
    assert "deployment/web created" in out.stdout and "service/web created" in out.stdout
    c, client = client_pod(cluster)
    vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
    res = probe(c, client.netns, vip, 8080, n=20)
    assert not res["errors"] and len(res["pods"]) == 2

    # two applies at once from two "shells": both land, nothing half-written
    results = {}

    def run(name):
        results[name] = apply_text(cluster, tmp_path, deployment(name, 1) + service(name, 80, 80),
                                   "--wait", check=False)
    threads = [threading.Thread(target=run, args=(n,)) for n in ("left", "right")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values()), {n: r.stderr for n, r in results.items()}
    names = {s["metadata"]["name"] for s in _services(cluster)}
    assert {"left", "right", "web"} <= names
    c = fresh(cluster)
    for name in ("left", "right"):
        vip = next(s for s in _services(cluster) if s["metadata"]["name"] == name)["spec"]["clusterIP"]
        assert not probe(c, client.netns, vip, 80)["errors"]


def _services(cluster) -> list:
    return json.loads(cli(cluster, "get", "svc", "-A", "-o", "json", check=True).stdout)["items"]


def test_a_second_reconciler_is_refused(cluster, daemon, tmp_path):
    res = cli(cluster, "daemon", *FAST)
    assert res.returncode == 1
    assert "another reconciler holds the cluster" in res.stderr and str(daemon.proc.pid) in res.stderr
    res = cli(cluster, "proxy-mode", "set", "nftables")
    assert res.returncode == 1 and "another reconciler" in res.stderr
    res = cli(cluster, "down")
    assert res.returncode == 1 and "stop it first" in res.stderr
    assert os.path.exists(f"/run/netns/{cluster.nodes[0].netns}"), "down refused and left the cluster alone"


def test_drift_is_repaired_within_the_sync_period(cluster, daemon, tmp_path):
    apply_text(cluster, tmp_path, deployment("web", 2) + service("web", 8080, 80), "--wait")
    c, client = client_pod(cluster)
    vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
    assert not probe(c, client.netns, vip, 8080)["errors"]

    # 1. someone flushes node1's nat table: the periodic full sync puts the rules back
    c.exec_in(c.node("node1").netns, ["iptables", "-t", "nat", "-F"], check=True)
    assert probe(c, client.netns, vip, 8080, timeout=0.5)["errors"], "the flush took the rules away"
    wait_for("rules back", lambda: not probe(c, client.netns, vip, 8080, timeout=0.5)["errors"], timeout=20)
    assert "rules had changed behind kproxy's back" in daemon.output()

    # 2. a pod's process is killed: the kubelet restarts it (restartPolicy Always)
    pod = next(p for p in fresh(cluster).pods.values() if p.name.startswith("web-"))
    pid, started = next((x["pid"], x["started"]) for x in pod.status["containers"] if "pid" in x)
    os.kill(pid, signal.SIGKILL)
    wait_for("restart", lambda: fresh(cluster).pods[pod.key].status.get("restarts", 0) >= 1, timeout=30)
    wait_for("ready again", lambda: fresh(cluster).pods[pod.key].status.get("ready"), timeout=30)

    # 3. a pod's namespace is deleted: the pod is made again
    victim = next(p for p in fresh(cluster).pods.values() if p.name.startswith("web-"))
    for cpid, cstarted in c.processes_of(victim):
        process.stop(cpid, cstarted)
    subprocess.run(["ip", "netns", "delete", victim.netns], check=True)
    wait_for("two ready web pods again", lambda: sum(
        1 for p in fresh(cluster).pods.values()
        if p.name.startswith("web-") and p.status.get("ready") and p.key != victim.key
        and os.path.exists(f"/run/netns/{p.netns}")) == 2, timeout=30)
    wait_for("served by both", lambda: len(probe(c, client.netns, vip, 8080, n=20)["pods"]) == 2, timeout=20)
    assert "lost its namespace" in daemon.output()

    # 4. a pod's veth is deleted on its node: the pod is made again
    from cni.bridge import host_veth_name
    victim = next(p for p in fresh(cluster).pods.values() if p.name.startswith("web-"))
    c = fresh(cluster)
    c.exec_in(c.node(victim.node).netns, ["ip", "link", "del", host_veth_name(victim.container_id, "eth0")],
              check=True)
    wait_for("the pod replaced", lambda: victim.key not in fresh(cluster).pods, timeout=30)
    wait_for("served by two again", lambda: len(probe(c, client.netns, vip, 8080, n=20)["pods"]) == 2, timeout=30)
    assert "lost its interface" in daemon.output()


def assert_exactly_what_is_recorded(c: Cluster) -> None:
    """After recovery: the machine holds exactly the cluster's recorded namespaces (and
    the journal agrees), each managed pod one process per container, and no process the
    journal knows is alive unrecorded."""
    ours = {c.underlay_ns, c.external_ns} | {n.netns for n in c.nodes} | {p.netns for p in c.pods.values()}
    on_machine = {ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                  if ns.startswith(c.name + "-")}
    assert on_machine == ours, (sorted(on_machine - ours), sorted(ours - on_machine))
    assert set(c.journal.live_namespaces()) == ours, "the journal names no namespace nobody owns, misses none"
    for p in c.pods.values():
        if p.status.get("managed"):
            assert len(c.processes_of(p)) == len(p.status["containers"]), p.key
    recorded = {(x["pid"], x["started"]) for p in c.pods.values() for x in p.status.get("containers", [])
                if "pid" in x}
    stray = [pid for pid, started in c.journal.live_processes()
             if process.alive(pid, started) and (pid, started) not in recorded]
    assert not stray, f"processes nobody records: {stray}"


def test_kill_9_and_restart_adopt_without_duplicates(cluster, tmp_path):
    d = Daemon(cluster.name, tmp_path)
    try:
        apply_text(cluster, tmp_path, deployment("web", 6) + service("web", 8080, 80))
        time.sleep(0.4)                       # the daemon is creating pods now
        d.stop(signal.SIGKILL)
    finally:
        d.stop()
    d = Daemon(cluster.name, tmp_path)
    try:
        wait_for("6 ready", lambda: sum(1 for p in fresh(cluster).pods.values()
                                        if p.name.startswith("web-") and p.status.get("ready")) == 6, timeout=60)
        wait_for("settled on the apply", lambda: (d.meta("settled") or {}).get("revision", 0) >= 1)
        c = fresh(cluster)
        assert len([p for p in c.pods.values() if p.name.startswith("web-")]) == 6
        assert_exactly_what_is_recorded(c)
        _, client = client_pod(cluster)
        vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
        assert len(probe(fresh(cluster), client.netns, vip, 8080, n=60)["pods"]) == 6
    finally:
        d.stop()


def test_after_a_reboot_the_daemon_rebuilds_the_cluster(cluster, tmp_path):
    d = Daemon(cluster.name, tmp_path)
    apply_text(cluster, tmp_path, deployment("web", 2) + service("web", 8080, 80), "--wait")
    d.stop()
    # the reboot: every process and network namespace is gone, the disk is kept
    c = fresh(cluster)
    for pid, started in c.journal.live_processes():
        process.stop(pid, started)
    for ns in c.journal.live_namespaces():
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    d = Daemon(cluster.name, tmp_path)
    try:
        wait_for("the rebuild", lambda: "rebuilt the nodes" in d.output(), timeout=60)
        wait_for("2 ready web pods", lambda: sum(1 for p in fresh(cluster).pods.values()
                                                 if p.name.startswith("web-") and p.status.get("ready")
                                                 and os.path.exists(f"/run/netns/{p.netns}")) == 2,
                 timeout=60)
        c, client = client_pod(cluster)
        vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
        wait_for("service works", lambda: len(probe(c, client.netns, vip, 8080, n=20)["pods"]) == 2, timeout=20)
    finally:
        d.stop()


def test_rolling_update_serves_every_request(cluster, daemon, tmp_path):
    strategy = "  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 1}}\n"
    dep = deployment("web", 4).replace("  selector:", strategy + "  selector:", 1)
    apply_text(cluster, tmp_path, dep + service("web", 8080, 80), "--wait")
    c, client = client_pod(cluster)
    vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
    old = {p.name for p in fresh(cluster).pods.values() if p.name.startswith("web-")}

    # a client sending requests without pause through the rollout
    loop = textwrap.dedent("""
        import json, sys, time
        from kproxy.workload.client import http_get, parse_facts
        ok, failed, pods = 0, [], set()
        end = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < end:
            try:
                pods.add(parse_facts(http_get(sys.argv[1], int(sys.argv[2]), timeout=2)[2])["pod"])
                ok += 1
            except Exception as e:
                failed.append(f"{time.time():.3f} {e!r}")
        print(json.dumps({"ok": ok, "failed": failed, "pods": sorted(pods)}))
    """)
    runner = subprocess.Popen(["ip", "netns", "exec", client.netns, sys.executable, "-c", loop, vip, "8080", "25"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        apply_text(cluster, tmp_path, dep.replace("image: nginx", "image: nginx:1.25") + service("web", 8080, 80))
        status = cli(cluster, "rollout", "status", "deployment/web", "--timeout", "60")
        assert status.returncode == 0, status.stdout + status.stderr
        assert 'deployment "web" successfully rolled out' in status.stdout
        out, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    result = json.loads(out)
    assert result["ok"] > 100 and result["failed"] == [], (result["failed"][:5], daemon.output()[-4000:])
    new = {p.name for p in fresh(cluster).pods.values() if p.name.startswith("web-")}
    assert len(new) == 4 and not (new & old)
    assert set(result["pods"]) & old and set(result["pods"]) & new, "traffic moved from old pods to new"


def test_scale_readiness_and_metrics(cluster, daemon, tmp_path):
    apply_text(cluster, tmp_path, deployment("web", 2) + service("web", 8080, 80), "--wait")
    cli(cluster, "scale", "deployment/web", "--replicas", "4", "--wait", check=True)
    rows = cli(cluster, "get", "deployments", check=True).stdout
    assert "web" in rows and "4/4" in rows, rows
    cli(cluster, "scale", "deployment/web", "--replicas", "1", "--wait", check=True)
    wait_for("one pod", lambda: len([p for p in fresh(cluster).pods.values() if p.name.startswith("web-")]) == 1)

    # a readiness probe on a port nothing listens on: Running, never Ready, no endpoint
    apply_text(cluster, tmp_path, """
        apiVersion: v1
        kind: Pod
        metadata: {name: shy, labels: {app: shy}}
        spec:
          containers:
          - name: c
            image: nginx
            ports: [{containerPort: 80}]
            readinessProbe: {tcpSocket: {port: 81}, periodSeconds: 1}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: shy}
        spec: {selector: {app: shy}, ports: [{port: 80}]}
    """, "--wait")
    time.sleep(3)
    pods = cli(cluster, "get", "pods", check=True).stdout
    assert any(line.split()[:3] == ["shy", "0/1", "Running"] for line in pods.splitlines()), pods
    eps = cli(cluster, "describe", "svc", "shy", check=True).stdout
    assert "Endpoints:" in eps and "<none>" in eps.split("Endpoints:")[1].splitlines()[0], eps

    m = daemon.metrics()

    def samples(family, sample):
        return [v for name, labels, v in m.get(family, {}).get("samples", []) if name == sample]
    syncs = samples("kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_proxy_rules_duration_seconds_count")
    assert len(syncs) == 2 and min(syncs) >= 2, "both nodes' proxiers synced, more than once"
    programmed = samples("kubeproxy_network_programming_duration_seconds",
                         "kubeproxy_network_programming_duration_seconds_count")
    assert programmed and sum(programmed) > 0
    probes = [(labels, v) for name, labels, v in m["prober_probe_total"]["samples"]]
    assert any(labels == {"probe_type": "Readiness", "result": "failed"} and v >= 1 for labels, v in probes), probes
    assert samples("kproxy_pods_ready", "kproxy_pods_ready")[0] == 2     # web and the DNS pod; shy is not Ready


def test_namespaces_cascade_and_quota(cluster, daemon, tmp_path):
    apply_text(cluster, tmp_path, """
        apiVersion: v1
        kind: Namespace
        metadata: {name: team}
        ---
        apiVersion: v1
        kind: ResourceQuota
        metadata: {name: small, namespace: team}
        spec: {hard: {count/services: "1", services.nodeports: "0"}}
    """, "--wait")
    apply_text(cluster, tmp_path, deployment("web", 1) + service("web", 80, 80), "-n", "team", "--wait")
    res = apply_text(cluster, tmp_path, service("two", 80, 80), "-n", "team", check=False)
    assert res.returncode == 1
    assert 'services "two" is forbidden: exceeded quota: small' in res.stderr, res.stderr
    assert "two" not in {s["metadata"]["name"] for s in _services(cluster)}
    out = cli(cluster, "get", "pods", "-n", "team", check=True).stdout
    assert "web-" in out
    # a pods quota: the Deployment's third replica is not created (the ReplicaSet controller's refusal)
    apply_text(cluster, tmp_path, """
        apiVersion: v1
        kind: ResourceQuota
        metadata: {name: few-pods, namespace: team}
        spec: {hard: {pods: "2"}}
    """, "--wait")
    cli(cluster, "scale", "deployment/web", "--replicas", "3", "-n", "team", "--wait", check=True)
    wait_for("the refusal logged", lambda: "quota: could not create team: 1 pod(s)" in daemon.output())
    assert len([p for p in fresh(cluster).pods.values() if p.namespace == "team"]) == 2
    rows = cli(cluster, "get", "deployments", "-n", "team", check=True).stdout
    assert "2/3" in rows, rows
    res = cli(cluster, "delete", "namespace", "team", "--wait", check=True)
    assert 'namespace "team" deleted' in res.stdout
    wait_for("team's pods gone", lambda: not any(p.namespace == "team" for p in fresh(cluster).pods.values()))
    assert "web" not in {s["metadata"]["name"] for s in _services(cluster) if s["metadata"]["namespace"] == "team"}


def test_kill_9_at_random_moments_then_one_clean_convergence(cluster, tmp_path):
    """Kill the daemon at arbitrary moments of its work (creating pods, syncing rules,
    deleting pods) five times over; the sixth daemon converges to exactly the store:
    the right pods, one process per container, no namespace or process nobody owns."""
    import random
    rng = random.Random(11)
    replicas = [5, 2, 6, 3, 4]
    for i, n in enumerate(replicas):
        d = Daemon(cluster.name, tmp_path)
        try:
            apply_text(cluster, tmp_path, deployment("web", n) + service("web", 8080, 80) +
                       service(f"extra{i}", 80, 80, selector={"app": "web"}))
            time.sleep(rng.uniform(0.05, 1.5))
        finally:
            d.stop(signal.SIGKILL)
    d = Daemon(cluster.name, tmp_path)
    try:
        wait_for("settled on the last apply (one revision per apply)",
                 lambda: (d.meta("settled") or {}).get("revision", 0) >= len(replicas) and
                 sum(1 for p in fresh(cluster).pods.values() if p.name.startswith("web-")) == replicas[-1],
                 timeout=90)
        c = fresh(cluster)
        web = [p for p in c.pods.values() if p.name.startswith("web-")]
        assert len(web) == replicas[-1] and all(p.status.get("ready") for p in web), \
            [(p.name, p.status.get("reason")) for p in web]
        assert_exactly_what_is_recorded(c)
        _, client = client_pod(cluster)
        vip = next(s for s in _services(cluster) if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
        assert len(probe(fresh(cluster), client.netns, vip, 8080, n=40)["pods"]) == replicas[-1]
    finally:
        d.stop()


def test_a_pod_pinned_to_a_missing_node_is_refused_at_apply(cluster, tmp_path):
    res = apply_text(cluster, tmp_path, """
        apiVersion: v1
        kind: Pod
        metadata: {name: lost}
        spec: {nodeName: node9, containers: [{name: c, image: nginx}]}
    """, check=False)
    assert res.returncode == 1
    assert 'Pod default/lost: spec.nodeName: Invalid value: "node9"' in res.stderr, res.stderr
    assert "nodes: node1, node2" in res.stderr and "lost" not in cli(cluster, "get", "pods", check=True).stdout
