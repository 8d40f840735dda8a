"""The kubelet on a real one-node cluster: restarts and CrashLoopBackOff, Completed and
Error, readiness and liveness probes (tcpSocket, httpGet, exec) from the node's
namespace, a killed process restarted, and a fresh Kubelet adopting running containers.

Every wait polls with a generous deadline (a loaded 2-core machine is slow, never
wrong); back-offs are made small through the constructor. Each test stops its pods
and the probe pool, and checks that no process is left in any pod namespace, before
the cluster itself is cleaned."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kproxy import kubelet as kl
from kproxy.cluster import Cluster
from kproxy.dns import records as dns_records

pytestmark = pytest.mark.root

DEADLINE = 90.0

# A TCP server for an exec container: one line per connection with the peer's address.
PEER_LOG_SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen(16)\n"
    "while True:\n"
    "    c, a = s.accept(); print('peer=%s' % a[0], flush=True); c.close()\n"
)


def pids_in(ns: str) -> list:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Env:
    def __init__(self, cluster, kubelet):
        self.cluster = cluster
        self.k = kubelet
        self.pods = []

    def pod(self, name, *containers, policy="Always", namespace="default", annotations=None):
        meta = {"name": name, "namespace": namespace}
        if annotations:
            meta["annotations"] = annotations
        manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                    "spec": {"restartPolicy": policy, "containers": list(containers)}}
        pod = self.cluster.add_pod(name, namespace, "node1")
        self.pods.append(pod)
        self.k.start(pod, kl.spec_from_manifest(manifest))
        return pod

    def until(self, what, pred, pods=None, timeout=DEADLINE):
        """Sync the pods until ``pred()`` holds; fail with their statuses at the deadline."""
        pods = self.pods if pods is None else pods
        deadline = time.monotonic() + timeout
        while True:
            for p in pods:
                self.k.sync(p)
            if pred():
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout}s; " + "; ".join(
                    f"{p.key}: {p.status.get('reason')} ready={p.status.get('ready')} "
                    f"restarts={p.status.get('restarts')} {p.status.get('containers')}" for p in pods))
            time.sleep(0.05)


@pytest.fixture
def env(make_cluster):
    cluster = make_cluster(nodes=1)
    k = kl.Kubelet(cluster, backoff_base=0.5, backoff_cap=2.0, probe_workers=4)
    e = Env(cluster, k)
    try:
        yield e
    finally:
        try:
            for pod in e.pods:
                k.stop(pod, grace=1.0)
        finally:
            k.close()
        left = {p.netns: pids_in(p.netns) for p in e.pods if pids_in(p.netns)}
        assert not left, f"processes left in pod namespaces: {left}"


def entry(pod, name="main"):
    return next(c for c in pod.status["containers"] if c["name"] == name)


SLEEP = {"name": "main", "image": "debian", "command": ["sleep", "3600"]}
NGINX = {"name": "web", "image": "nginx", "ports": [{"containerPort": 80, "name": "http"}]}


def test_always_with_a_short_sleep_crash_loops_with_rising_restarts(env):
    pod = env.pod("loop", {"name": "main", "image": "debian", "command": ["sleep", "1"]})
    seen = set()

    def crash_looped():
        seen.add(pod.status["reason"])
        return pod.status["restarts"] >= 3 and "CrashLoopBackOff" in seen

    env.until("restarts and CrashLoopBackOff", crash_looped)
    assert "Completed" in seen and "Running" in seen
    assert pod.status["phase"] == "Running" and entry(pod)["exit_code"] == 0
    assert len(pids_in(pod.netns)) <= 1            # never two runs of one container at once


def test_never_ends_completed_or_error(env):
    ok = env.pod("done", {"name": "main", "image": "debian", "command": ["sleep", "0.2"]}, policy="Never")
    bad = env.pod("bad", {"name": "main", "image": "debian", "command": ["sh", "-c", "exit 3"]}, policy="Never")
    env.until("both finished", lambda: ok.status["phase"] == "Succeeded" and bad.status["phase"] == "Failed")
    assert (ok.status["reason"], ok.status["restarts"], entry(ok)["exit_code"]) == ("Completed", 0, 0)
    assert (bad.status["reason"], bad.status["restarts"], entry(bad)["exit_code"]) == ("Error", 0, 3)
    assert not ok.status["ready"] and not bad.status["ready"]


def test_tcp_and_http_readiness_on_a_served_port_and_a_closed_one(env):
    tcp = env.pod("tcp", dict(NGINX, readinessProbe={"tcpSocket": {"port": 80}, "periodSeconds": 1,
                                                     "timeoutSeconds": 5}))
    http = env.pod("http", dict(NGINX, readinessProbe={"httpGet": {"path": "/healthz", "port": "http"},
                                                       "periodSeconds": 1, "timeoutSeconds": 5}))
    closed = env.pod("closed", dict(NGINX, readinessProbe={"tcpSocket": {"port": 81}, "periodSeconds": 1,
                                                           "timeoutSeconds": 5}))
    env.until("probed pods Ready", lambda: tcp.status["ready"] and http.status["ready"])
    assert entry(http, "web")["probes"]["readiness"]["ok"] is True
    assert "200" in entry(http, "web")["probes"]["readiness"]["message"]
    env.until("three failed probes on the closed port",
              lambda: env.k.counters.get(("readiness", "failed"), 0) >= 3)
    assert closed.status["ready"] is False and closed.status["ready_count"] == "0/1"
    assert closed.status["phase"] == "Running" and entry(closed, "web")["state"] == "running"
    assert "refused" in entry(closed, "web")["probes"]["readiness"]["message"].lower()


SYSTEM_PYTHON = "/usr/bin/python3"        # one user nobody can run (not a pyenv shim under /root)


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_probes_come_from_the_node(env):
    pod = env.pod("peer", {"name": "main", "image": "debian", "command": [SYSTEM_PYTHON, "-c", PEER_LOG_SERVER],
                           "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1,
                                              "timeoutSeconds": 5}})
    env.until("Ready", lambda: pod.status["ready"])
    with open(entry(pod)["log"]) as f:
        peers = {line.strip() for line in f if line.startswith("peer=")}
    assert peers == {f"peer={env.cluster.node('node1').gateway}"}     # the node's cni0 address


def test_failing_liveness_probe_restarts_the_container(env):
    pod = env.pod("live", dict(SLEEP, livenessProbe={"tcpSocket": {"port": 81}, "periodSeconds": 1,
                                                     "failureThreshold": 2}))
    first = entry(pod)["pid"]
    env.until("restarted by liveness", lambda: pod.status["restarts"] >= 1 and entry(pod)["state"] == "running")
    assert entry(pod)["pid"] != first
    assert env.k.counters[("liveness", "failed")] >= 2
    assert not os.path.exists(f"/proc/{first}") or not kl.process.alive(first, entry(pod)["started"])


def test_exec_probes(env):
    ready = env.pod("execready", dict(SLEEP, readinessProbe={"exec": {"command": ["true"]}, "periodSeconds": 1,
                                                             "timeoutSeconds": 10}))
    dying = env.pod("execlive", dict(SLEEP, livenessProbe={"exec": {"command": ["sh", "-c", "exit 1"]},
                                                           "periodSeconds": 1, "timeoutSeconds": 10,
                                                           "failureThreshold": 1}))
    env.until("exec readiness Ready and exec liveness restarting",
              lambda: ready.status["ready"] and dying.status["restarts"] >= 1)
    assert env.k.counters[("readiness", "successful")] >= 1
    # every probe command was journaled, and released once it ended
    probes = [(e.data["pid"], e.data["started"]) for e in env.cluster.journal.entries()
              if e.op == "process" and "setpriv" in e.data["argv"] and "sleep" not in e.data["argv"]]
    assert probes
    containers = {(c["pid"], c["started"]) for p in (ready, dying) for c in p.status["containers"]}
    still = [p for p in env.cluster.journal.live_processes() if p in probes and p not in containers]
    assert still == [] or all(not kl.process.alive(*p) for p in still)


def test_a_killed_process_is_restarted(env):
    pod = env.pod("idle", {"name": "main", "image": "example.com/thing"})
    env.until("running", lambda: pod.status["ready"])
    pid = entry(pod)["pid"]
    assert kl.process.alive(pid, entry(pod)["started"])
    os.kill(pid, signal.SIGKILL)                   # by its recorded PID, checked just above
    seen = []
    env.until("restarted", lambda: seen.append(entry(pod).get("exit_code")) or
              (pod.status["restarts"] == 1 and pod.status["ready"]))
    assert 137 in seen and entry(pod)["pid"] != pid
    assert pids_in(pod.netns) == [entry(pod)["pid"]]


def test_a_fresh_kubelet_adopts_without_starting_duplicates(env):
    pod = env.pod("adopt", SLEEP, NGINX)
    env.until("Ready", lambda: pod.status["ready"])
    env.cluster.save()
    before = sorted(pids_in(pod.netns))
    assert len(before) == 2
    recorded = len(env.cluster.processes_of(pod))

    again = Cluster.open(env.cluster.name)
    k2 = kl.Kubelet(again, backoff_base=0.5, backoff_cap=2.0, probe_workers=2)
    try:
        adopted = again.pod("adopt")
        assert k2.sync(adopted) is False
        assert adopted.status["ready"] and sorted(pids_in(pod.netns)) == before
        assert len(again.processes_of(adopted)) == recorded

        # the adopted process dies: it is restarted, reported as a status nobody could read
        victim = entry(adopted)["pid"]
        os.kill(victim, signal.SIGKILL)
        reasons = set()
        deadline = time.monotonic() + DEADLINE
        while not (adopted.status["restarts"] == 1 and adopted.status["ready"]):
            assert time.monotonic() < deadline, adopted.status
            k2.sync(adopted)
            reasons.add(entry(adopted).get("reason"))
            time.sleep(0.05)
        assert "ContainerStatusUnknown" in reasons
        assert len(pids_in(pod.netns)) == 2 and victim not in pids_in(pod.netns)
    finally:
        k2.stop(again.pod("adopt"), grace=1.0)
        k2.close()
        again.journal.close()


def test_the_dns_pod_is_ready_once_both_listeners_are_up(env):
    os.makedirs(os.path.dirname(kl.zone_path(env.cluster)), exist_ok=True)
    zone = dns_records.records_for([], [], [], dns_ip=env.cluster.config.dns_ip(), namespaces=["default"])
    with open(kl.zone_path(env.cluster), "w") as f:
        f.write(zone.to_json())
    pod = env.pod(kl.DNS_POD, {"name": "coredns", "image": "kproxy/dns"}, namespace="kube-system",
                  annotations={kl.SYSTEM_ANNOTATION: "dns"})
    env.until("DNS Ready", lambda: pod.status["ready"])
    with open(entry(pod, "coredns")["log"]) as f:
        assert f.read().count("listening ") == 2


def test_stop_leaves_no_process(env):
    pod = env.pod("stopme", SLEEP, NGINX)
    env.until("Ready", lambda: pod.status["ready"])
    assert len(pids_in(pod.netns)) == 2
    env.k.stop(pod, grace=1.0)
    assert pod.status["reason"] == "Terminating" and not pod.status["ready"]
    assert pids_in(pod.netns) == []
    assert all(c["state"] == "terminated" for c in pod.status["containers"])
    assert entry(pod, "web")["exit_code"] == 0              # the server exits 0 on SIGTERM
    alive = [p for p in env.cluster.processes_of(pod) if kl.process.alive(*p)]
    assert alive == []


def test_stop_ends_what_a_container_forked(env):
    # the shell leaves two children running: a runtime would end them with the container
    pod = env.pod("forks", {"name": "main", "image": "debian",
                            "command": ["sh", "-c", "sleep 3600 & sleep 3600 & wait"]})
    env.until("both children running", lambda: pod.status["ready"] and len(pids_in(pod.netns)) == 3)
    env.k.stop(pod, grace=1.0)
    assert pids_in(pod.netns) == []


def test_an_ended_container_leaves_nothing_running(env):
    # each run leaves a sleep behind and exits 1; a restart must not find the last one's
    pod = env.pod("leaver", {"name": "main", "image": "debian",
                             "command": ["sh", "-c", "sleep 3600 & sleep 0.3; exit 1"]})
    most = []

    def restarted_twice():
        most.append(len(pids_in(pod.netns)))
        return pod.status["restarts"] >= 2

    env.until("two restarts", restarted_twice)
    assert max(most) <= 3, most                # this run's sh, its sleep 3600 and its sleep 0.3
    assert entry(pod)["exit_code"] == 1                 # the last run's own status, kept
