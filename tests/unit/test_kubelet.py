"""kproxy.kubelet without namespaces: fake clocks, fake processes and a fake prober.

Phase and STATUS tables, restart policies, the back-off schedule, probe thresholds
through the kubelet, stop, and adoption of recorded processes by a fresh Kubelet."""
from __future__ import annotations

import json
import os

import pytest

from kproxy import kubelet as kl
from kproxy import probes as pr
from kproxy.cluster import Pod
from kproxy.model import objects as o


# ---- fakes ---------------------------------------------------------------------------------------

class Clock:
    """Monotonic and wall clocks that move only when told."""

    def __init__(self):
        self.t = 500.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Procs:
    """Fake processes: each start gets a new PID that runs until the test ends it."""

    def __init__(self):
        self.next_pid = 1000
        self.codes = {}            # pid -> exit status (absent: running)
        self.argv = {}             # pid -> argv
        self.starts = []           # (pod key, argv) in order
        self.stopped = []          # (pid, grace, pod status reason and ready when asked)
        self.released = []
        self.on_stop = None

    def start(self, pod, argv, log):
        self.next_pid += 1
        pid = self.next_pid
        self.argv[pid] = argv
        self.starts.append((pod.key, argv))
        with open(log, "w"):
            pass
        return ("popen", pid), pid, pid * 10

    def poll(self, proc, pid, started):
        if pid not in self.codes:
            return None
        return self.codes[pid] if proc is not None else kl.EXIT_UNKNOWN

    def stop(self, proc, pid, started, grace):
        if self.on_stop:
            self.on_stop(pid)
        self.stopped.append((pid, grace))
        self.codes.setdefault(pid, 143)
        return self.codes[pid] if proc is not None else kl.EXIT_UNKNOWN

    def start_exec(self, pod, argv):
        raise AssertionError("exec probes are faked")

    def release(self, pid, started):
        self.released.append(pid)

    def exit(self, pid, code):
        self.codes[pid] = code


class Node:
    netns = "t-node1"


class FakeCluster:
    def __init__(self, directory):
        self.dir = directory
        self.touched = set()

    def node(self, name):
        return Node()

    def touch(self, key):
        self.touched.add(key)


class Prober:
    """Answers probes from a table the test sets: results[(probe handler port)] -> Outcome."""

    def __init__(self):
        self.answers = {}
        self.calls = []

    def __call__(self, spec, target, pod):
        self.calls.append((spec.action.get("port"), target.pod_ip, target.node_netns))
        return self.answers.get(spec.action.get("port"), pr.Outcome(pr.SUCCESS))


@pytest.fixture
def env(tmp_path):
    clock, procs, prober = Clock(), Procs(), Prober()
    cluster = FakeCluster(str(tmp_path))

    def make(**kw):
        kw.setdefault("backoff_base", 10.0)
        return kl.Kubelet(cluster, clock=clock.mono, wall=clock.wall, probe_workers=0, runtime=procs,
                          prober=prober, **kw)
    k = make()
    yield k, clock, procs, prober, make
    k.close()


def pod_object(name="p"):
    return Pod(name=name, namespace="default", node="node1", netns=f"t-default-{name}", ip="10.244.0.5",
               container_id="c" * 32)


def manifest(*containers, policy="Always", annotations=None):
    meta = {"name": "p", "namespace": "default", "labels": {"app": "x"}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"restartPolicy": policy, "containers": list(containers)}}


SLEEP = {"name": "main", "image": "debian", "command": ["sleep", "3600"]}
NGINX = {"name": "web", "image": "nginx", "ports": [{"containerPort": 80, "name": "http"}]}
FAIL = {"name": "broken", "image": "debian", "command": ["no-such-binary-kproxy"]}


def started(k, m, pod=None):
    pod = pod or pod_object()
    k.start(pod, kl.spec_from_manifest(m))
    return pod


def listen(pod, name="web", lines=1):
    entry = next(c for c in pod.status["containers"] if c["name"] == name)
    with open(entry["log"], "a") as f:
        f.write("listening tcp 0.0.0.0:80 http\n" * lines)


def entry_of(pod, name="main"):
    return next(c for c in pod.status["containers"] if c["name"] == name)


def current_pid(pod, name="main"):
    return entry_of(pod, name)["pid"]


def assert_json(pod):
    assert json.loads(json.dumps(pod.status)) == pod.status


# ---- pure tables ---------------------------------------------------------------------------------

def c(state, exit_code=None, kind="exec", reason=None, ready=False):
    return {"state": state, "exit_code": exit_code, "kind": kind, "reason": reason, "ready": ready}


@pytest.mark.parametrize("containers, policy, phase", [
    ([], "Always", "Pending"),
    ([c("waiting", reason="ContainerCreating")], "Always", "Pending"),
    ([c("running")], "Never", "Running"),
    ([c("running"), c("waiting", reason="ContainerCreating")], "Always", "Pending"),
    ([c("terminated", 0)], "Always", "Running"),                    # about to be restarted
    ([c("waiting", 1, reason="CrashLoopBackOff")], "Always", "Running"),
    ([c("terminated", 0)], "OnFailure", "Succeeded"),
    ([c("terminated", 0), c("terminated", 0)], "Never", "Succeeded"),
    ([c("terminated", 1)], "Never", "Failed"),
    ([c("terminated", 0), c("terminated", 2)], "Never", "Failed"),
    ([c("terminated", 1)], "OnFailure", "Running"),
    ([c("terminated", 0), c("running")], "Never", "Running"),
    ([c("waiting", kind="fail", reason="RunContainerError")], "Always", "Pending"),
    ([c("waiting", kind="fail", reason="RunContainerError"), c("running")], "Always", "Running"),
    ([c("waiting", kind="fail", reason="RunContainerError"), c("terminated", 0)], "Never", "Pending"),
])
def test_pod_phase(containers, policy, phase):
    assert kl.pod_phase(containers, policy) == phase


@pytest.mark.parametrize("phase, containers, ready, terminating, want", [
    ("Pending", [c("waiting", reason="ContainerCreating")], False, False, "ContainerCreating"),
    ("Running", [c("running", ready=True)], True, False, "Running"),
    ("Running", [c("running")], False, False, "Running"),
    ("Running", [c("terminated", 0, reason="Completed")], False, False, "Completed"),
    ("Running", [c("terminated", 1, reason="Error")], False, False, "Error"),
    ("Running", [c("waiting", 1, reason="CrashLoopBackOff")], False, False, "CrashLoopBackOff"),
    ("Succeeded", [c("terminated", 0, reason="Completed")], False, False, "Completed"),
    ("Failed", [c("terminated", 3, reason="Error")], False, False, "Error"),
    ("Running", [c("terminated", 9)], False, False, "ExitCode:9"),
    # the first container's reason wins (kubectl walks them from the last)
    ("Running", [c("waiting", 1, reason="CrashLoopBackOff"), c("terminated", 1, reason="Error")], False, False,
     "CrashLoopBackOff"),
    # Completed beside a running, ready container: Running (pod Ready) or NotReady
    ("Running", [c("terminated", 0, reason="Completed"), c("running", ready=True)], True, False, "Running"),
    ("Running", [c("terminated", 0, reason="Completed"), c("running", ready=True)], False, False, "NotReady"),
    ("Running", [c("waiting", kind="fail", reason="RunContainerError"), c("running", ready=True)], False, False,
     "RunContainerError"),
    ("Running", [c("running", ready=True)], True, True, "Terminating"),
])
def test_status_reason(phase, containers, ready, terminating, want):
    assert kl.status_reason(phase, containers, ready, terminating) == want


@pytest.mark.parametrize("policy, code, killed, want", [
    ("Always", 0, False, True), ("Always", 1, False, True),
    ("OnFailure", 0, False, False), ("OnFailure", 2, False, True), ("OnFailure", 0, True, True),
    ("Never", 1, False, False), ("Never", 0, True, False),
])
def test_should_restart(policy, code, killed, want):
    assert kl.should_restart(policy, code, killed) is want


# ---- what runs -----------------------------------------------------------------------------------

def test_argv_per_kind(env):
    k, clock, procs, prober, make = env
    m = manifest(SLEEP, NGINX, FAIL, {"name": "idle", "image": "example.com/thing"},
                 {"name": "shell", "image": "debian"})
    pod = started(k, m)
    by_name = {e["name"]: e for e in pod.status["containers"]}
    assert {n: e["kind"] for n, e in by_name.items()} == {
        "main": "exec", "web": "serve", "broken": "fail", "idle": "idle", "shell": "exit"}
    argv = {procs.argv[e["pid"]][0] if e["kind"] != "serve" else "server": procs.argv[e["pid"]]
            for e in by_name.values() if e["pid"]}
    assert argv["setpriv"] == ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "sleep", "3600"]
    assert argv["sleep"] == ["sleep", "infinity"]
    assert argv["true"] == ["true"]
    assert "kproxy.workload.server" in argv["server"] and "tcp:80:http" in argv["server"]
    assert by_name["broken"]["pid"] is None and by_name["broken"]["reason"] == "RunContainerError"
    assert "executable file not found" in by_name["broken"]["message"]
    assert by_name["web"]["listeners"] == 1
    assert len(procs.starts) == 4
    assert_json(pod)


def test_dns_system_pod_runs_the_dns_server(env):
    k, clock, procs, prober, make = env
    m = manifest({"name": "coredns", "image": "kproxy/dns"}, annotations={kl.SYSTEM_ANNOTATION: "dns"})
    pod = started(k, m)
    e = entry_of(pod, "coredns")
    assert (e["kind"], e["listeners"]) == ("serve", 2)
    argv = procs.argv[e["pid"]]
    assert argv[1:] == ["-m", "kproxy.dns.server", "--zone-file", kl.zone_path(k.cluster), "--listen", "0.0.0.0:53"]
    assert kl.zone_path(k.cluster) == os.path.join(k.cluster.dir, "dns", "zone.json")


def test_container_dict_is_what_images_reads():
    cont = o.Container(name="c", image="nginx", command=["a"], args=["b"], env=[{"name": "X", "value": "1"}],
                       ports=[o.ContainerPort(container_port=80, name="http"), o.ContainerPort(container_port=53,
                                                                                                protocol="UDP")])
    assert kl.container_dict(cont) == {
        "name": "c", "image": "nginx", "command": ["a"], "args": ["b"], "env": [{"name": "X", "value": "1"}],
        "ports": [{"containerPort": 80, "protocol": "TCP", "name": "http"}, {"containerPort": 53, "protocol": "UDP"}]}
    assert kl.container_dict(cont, {"stdin": True})["stdin"] is True


def test_base_image_with_stdin_idles(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest({"name": "main", "image": "busybox", "stdin": True, "tty": True}))
    assert entry_of(pod)["kind"] == "idle"


def test_manifest_kept_for_a_replica_without_raw_round_trips():
    spec = o.Pod(metadata=o.ObjectMeta(name="d-abc", namespace="ns", labels={"a": "b"},
                                       annotations={"x": "y"}),
                 spec=o.PodSpec(restart_policy="OnFailure", containers=[o.Container(
                     name="c", image="nginx", ports=[o.ContainerPort(container_port=80, name="http")],
                     readiness_probe={"httpGet": {"port": "http"}, "periodSeconds": 2},
                     liveness_probe={"tcpSocket": {"port": 80}})]))
    m = kl.pod_manifest(spec)
    assert json.loads(json.dumps(m)) == m
    back = kl.spec_from_manifest(m)
    assert (back.name, back.namespace, back.labels, back.metadata.annotations) == ("d-abc", "ns", {"a": "b"}, {"x": "y"})
    assert back.spec.restart_policy == "OnFailure"
    assert back.spec.containers[0].readiness_probe == {"httpGet": {"port": "http"}, "periodSeconds": 2}
    assert back.spec.containers[0].liveness_probe == {"tcpSocket": {"port": 80}}
    assert back.spec.containers[0].ports[0].name == "http"
    # a Pod from a manifest keeps its own document
    raw = manifest(SLEEP)
    assert kl.pod_manifest(kl.spec_from_manifest(raw)) == raw


# ---- status through sync -------------------------------------------------------------------------

def test_start_records_status_and_keeps_other_keys(env):
    k, clock, procs, prober, make = env
    pod = pod_object()
    pod.status.update(owner="Deployment/d", created_at=1.0)
    m = manifest(SLEEP)
    k.start(pod, kl.spec_from_manifest(m))
    st = pod.status
    assert st["owner"] == "Deployment/d" and st["created_at"] == 1.0
    assert st["managed"] is True and st["spec"] == m
    assert (st["phase"], st["reason"], st["ready"], st["ready_count"], st["restarts"]) == \
        ("Running", "Running", True, "1/1", 0)
    assert st["ready_since"] == clock.wall()
    e = entry_of(pod)
    assert (e["state"], e["started_at"], e["started"]) == ("running", clock.wall(), e["pid"] * 10)
    assert pod.key in k.cluster.touched
    assert_json(pod)


def test_sync_reports_changes_only(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    assert k.sync(pod) is False
    procs.exit(current_pid(pod), 1)
    assert k.sync(pod) is True              # not ready, not running
    assert k.sync(pod) is True              # restarted: running again, with a new PID
    assert k.sync(pod) is False


def test_a_serve_container_is_ready_once_listening(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(NGINX))
    assert k.sync(pod) is False and pod.status["ready"] is False
    assert entry_of(pod, "web")["state"] == "running" and pod.status["reason"] == "Running"
    listen(pod)
    assert k.sync(pod) is True and pod.status["ready"] is True and pod.status["ready_count"] == "1/1"


def test_never_completed_and_error(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP, policy="Never"))
    procs.exit(current_pid(pod), 0)
    for _ in range(3):
        k.sync(pod)
    assert (pod.status["phase"], pod.status["reason"], pod.status["restarts"]) == ("Succeeded", "Completed", 0)
    assert len(procs.starts) == 1
    assert procs.released == [current_pid(pod)]

    pod = started(k, manifest(SLEEP, policy="Never"), pod_object("q"))
    procs.exit(current_pid(pod), 3)
    for _ in range(3):
        k.sync(pod)
    assert (pod.status["phase"], pod.status["reason"]) == ("Failed", "Error")
    assert entry_of(pod)["exit_code"] == 3
    assert k.hopeless(pod)


def test_on_failure_restarts_only_failures(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP, policy="OnFailure"))
    procs.exit(current_pid(pod), 2)
    k.sync(pod)
    assert pod.status["reason"] == "Error"
    k.sync(pod)
    assert (pod.status["reason"], pod.status["restarts"], len(procs.starts)) == ("Running", 1, 2)
    procs.exit(current_pid(pod), 0)
    k.sync(pod)
    k.sync(pod)
    assert (pod.status["phase"], pod.status["reason"], pod.status["restarts"]) == ("Succeeded", "Completed", 1)


def test_killed_container_is_restarted_with_137(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    old = current_pid(pod)
    procs.exit(old, 137)                    # kill -9: 128 + 9
    k.sync(pod)
    assert entry_of(pod)["exit_code"] == 137 and pod.status["reason"] == "Error"
    k.sync(pod)
    assert current_pid(pod) != old and pod.status["restarts"] == 1 and pod.status["ready"]
    assert k.counters["container_restarts"] == 1


def test_fail_kind_is_run_container_error_and_never_ready(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(FAIL))
    for _ in range(3):
        clock.advance(100)
        k.sync(pod)
    assert (pod.status["phase"], pod.status["reason"], pod.status["ready"]) == ("Pending", "RunContainerError", False)
    assert procs.starts == [] and pod.status["restarts"] == 0 and k.hopeless(pod)

    pod = started(k, manifest(FAIL, SLEEP), pod_object("q"))
    k.sync(pod)
    assert (pod.status["phase"], pod.status["reason"], pod.status["ready"], pod.status["ready_count"]) == \
        ("Running", "RunContainerError", False, "1/2")


def test_backoff_schedule_doubles_to_the_cap(env):
    """Exits every time: restarts after 0, 10, 20, 40, 80, 160, 300, 300 s, and the
    STATUS goes Error -> CrashLoopBackOff -> Running, restarts rising."""
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    waits, statuses = [], []
    for n in range(1, 9):
        clock.advance(1)                           # it ran a second
        procs.exit(current_pid(pod), 1)
        k.sync(pod)
        statuses.append(pod.status["reason"])
        exited = clock.mono()
        k.sync(pod)
        if pod.status["reason"] == "CrashLoopBackOff":
            statuses.append("CrashLoopBackOff")
            e = entry_of(pod)
            wait = e["backoff_until"] - clock.wall()
            assert e["state"] == "waiting" and pod.status["phase"] == "Running"
            clock.advance(wait - 0.01)
            k.sync(pod)
            assert pod.status["reason"] == "CrashLoopBackOff", "restarted before its back-off"
            clock.advance(0.01)
            k.sync(pod)
        assert pod.status["restarts"] == n and entry_of(pod)["state"] == "running"
        waits.append(round(clock.mono() - exited, 6))
    assert waits == [0, 10, 20, 40, 80, 160, 300, 300]
    assert statuses[:4] == ["Error", "Error", "CrashLoopBackOff", "Error"]
    assert_json(pod)


def test_backoff_values_come_from_the_constructor(env):
    k, clock, procs, prober, make = env
    k = make(backoff_base=0.5, backoff_cap=1.0)
    pod = started(k, manifest(SLEEP))
    waits = []
    for _ in range(4):
        procs.exit(current_pid(pod), 1)
        k.sync(pod)
        exited = clock.mono()
        while k.sync(pod) is not None and entry_of(pod)["state"] != "running":
            clock.advance(0.25)
        waits.append(clock.mono() - exited)
    assert waits == [0, 0.5, 1.0, 1.0]


def test_backoff_resets_after_ten_minutes_of_running(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    for _ in range(3):                              # back-off now 40 s
        procs.exit(current_pid(pod), 1)
        k.sync(pod)
        while entry_of(pod)["state"] != "running":
            clock.advance(1)
            k.sync(pod)
    assert entry_of(pod)["backoff"] == 40
    clock.advance(601)
    procs.exit(current_pid(pod), 1)
    k.sync(pod)
    k.sync(pod)
    assert entry_of(pod)["state"] == "running" and entry_of(pod)["backoff"] == 10     # immediate, then 10 s


def test_exit_kind_under_always_crash_loops(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest({"name": "main", "image": "busybox"}))
    seen = set()
    for _ in range(40):
        if entry_of(pod)["state"] == "running":
            procs.exit(current_pid(pod), 0)
        k.sync(pod)
        seen.add(pod.status["reason"])
        clock.advance(1)
    assert {"Completed", "CrashLoopBackOff"} <= seen
    assert pod.status["restarts"] >= 3


# ---- probes through the kubelet -------------------------------------------------------------------

def with_probe(container, kind, **probe):
    out = dict(container)
    out[kind] = probe
    return out


def test_readiness_probe_gates_ready_with_thresholds(env):
    k, clock, procs, prober, make = env
    probe = {"tcpSocket": {"port": 80}, "periodSeconds": 5, "successThreshold": 2, "failureThreshold": 2}
    pod = started(k, manifest(with_probe(NGINX, "readinessProbe", **probe)))
    k.sync(pod)
    assert prober.calls == []                       # not before the server listens
    listen(pod)
    k.sync(pod)                                     # launches the first probe
    assert prober.calls == [(80, "10.244.0.5", "t-node1")]     # to the pod IP, from the node's namespace
    k.sync(pod)                                     # takes its result in: one success of two
    assert pod.status["ready"] is False
    clock.advance(5)
    k.sync(pod)
    k.sync(pod)
    assert pod.status["ready"] is True and entry_of(pod, "web")["probes"]["readiness"]["ok"] is True
    prober.answers[80] = pr.Outcome(pr.FAILURE, "connection refused")
    for _ in range(2):
        clock.advance(5)
        assert pod.status["ready"] is True
        k.sync(pod)
        k.sync(pod)
    assert pod.status["ready"] is False and pod.status["reason"] == "Running"
    assert pod.status["ready_since"] is None
    assert k.counters[("readiness", "successful")] == 2 and k.counters[("readiness", "failed")] == 2


def test_probes_wait_for_the_initial_delay_and_the_period(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(with_probe(SLEEP, "readinessProbe", exec={"command": ["true"]},
                                         initialDelaySeconds=30, periodSeconds=10)))
    k.sync(pod)
    clock.advance(29)
    k.sync(pod)
    assert prober.calls == [] and pod.status["ready"] is False
    clock.advance(1)
    k.sync(pod)
    k.sync(pod)
    assert len(prober.calls) == 1 and pod.status["ready"] is True
    clock.advance(9)
    k.sync(pod)
    assert len(prober.calls) == 1
    clock.advance(1)
    k.sync(pod)
    assert len(prober.calls) == 2


def test_probe_errors_are_counted_unknown_and_change_nothing(env):
    k, clock, procs, prober, make = env
    prober.answers["nope"] = pr.Outcome(pr.ERROR, "no such port")
    pod = started(k, manifest(with_probe(SLEEP, "readinessProbe", tcpSocket={"port": "nope"}, periodSeconds=1)))
    for _ in range(5):
        k.sync(pod)
        clock.advance(1)
    assert pod.status["ready"] is False and k.counters[("readiness", "unknown")] >= 4


def test_liveness_failure_kills_and_restarts(env):
    k, clock, procs, prober, make = env
    prober.answers[81] = pr.Outcome(pr.FAILURE, "refused")
    pod = started(k, manifest(with_probe(SLEEP, "livenessProbe", tcpSocket={"port": 81}, periodSeconds=1,
                                         failureThreshold=3)))
    old = current_pid(pod)
    for _ in range(3):
        k.sync(pod)
        assert procs.stopped == []
        clock.advance(1)
    k.sync(pod)             # the third failure is taken in: killed (inline here), the exit seen
    assert procs.stopped == [(old, k.kill_grace)]
    assert pod.status["ready"] is False and pod.status["reason"] == "Error"
    assert entry_of(pod)["exit_code"] == 143 and "failed liveness probe" in entry_of(pod)["message"]
    k.sync(pod)                                     # restarted (the first restart is immediate)
    assert current_pid(pod) != old and pod.status["restarts"] == 1
    assert k.counters[("liveness", "failed")] == 3


def test_liveness_kill_restarts_even_a_clean_exit_under_on_failure(env):
    k, clock, procs, prober, make = env
    prober.answers[81] = pr.Outcome(pr.FAILURE, "refused")
    pod = started(k, manifest(with_probe(SLEEP, "livenessProbe", tcpSocket={"port": 81}, periodSeconds=1,
                                         failureThreshold=1), policy="OnFailure"))
    procs.on_stop = lambda pid: procs.exit(pid, 0)
    k.sync(pod)                                     # probe
    k.sync(pod)                                     # failed: killed, exited 0
    assert entry_of(pod)["reason"] == "Completed"
    prober.answers[81] = pr.Outcome(pr.SUCCESS)
    k.sync(pod)
    assert pod.status["restarts"] == 1 and entry_of(pod)["state"] == "running"


def test_liveness_kill_under_never_is_final(env):
    k, clock, procs, prober, make = env
    prober.answers[81] = pr.Outcome(pr.FAILURE, "refused")
    pod = started(k, manifest(with_probe(SLEEP, "livenessProbe", tcpSocket={"port": 81}, periodSeconds=1,
                                         failureThreshold=1), policy="Never"))
    for _ in range(5):
        k.sync(pod)
        clock.advance(1)
    assert (pod.status["phase"], pod.status["reason"], pod.status["restarts"]) == ("Failed", "Error", 0)


# ---- stop and adoption -----------------------------------------------------------------------------

def test_stop_marks_terminating_before_ending_processes(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP, {"name": "b", "image": "example.com/thing"}))
    seen = []
    procs.on_stop = lambda pid: seen.append((pod.status["reason"], pod.status["ready"]))
    pids = [e["pid"] for e in pod.status["containers"]]
    k.stop(pod, grace=1.5)
    assert seen == [("Terminating", False)] * 2
    assert procs.stopped == [(pids[0], 1.5), (pids[1], 1.5)] and sorted(procs.released) == sorted(pids)
    assert all(e["state"] == "terminated" for e in pod.status["containers"])
    assert pod.status["reason"] == "Terminating" and pod.status["ready"] is False
    assert k.sync(pod) is False and len(procs.starts) == 2          # nothing restarts a stopped pod


def test_a_fresh_kubelet_adopts_recorded_processes(env):
    k, clock, procs, prober, make = env
    probe = {"tcpSocket": {"port": 80}, "periodSeconds": 5}
    pod = started(k, manifest(with_probe(NGINX, "readinessProbe", **probe), SLEEP))
    listen(pod)
    for _ in range(3):
        k.sync(pod)
    assert pod.status["ready"] is True
    stored = json.loads(json.dumps(pod.status))       # as state.json keeps it

    clock.advance(3)
    again = pod_object()
    again.status = stored
    k2 = make()
    assert k2.sync(again) is False                    # adopted: nothing changed, nothing started
    assert len(procs.starts) == 2 and again.status["ready"] is True
    k2.sync(again)
    assert again.status["ready"] is True              # readiness carried over, probes resume
    assert prober.calls[-1][0] == 80

    # the adopted process dies: its status cannot be read
    old = current_pid(again)
    procs.exit(old, 0)
    k2.sync(again)
    e = entry_of(again)
    assert (e["state"], e["reason"], e["exit_code"]) == ("terminated", "ContainerStatusUnknown", 137)
    k2.sync(again)
    assert current_pid(again) != old and again.status["restarts"] == 1 and len(procs.starts) == 3
    k2.close()


def test_start_on_a_recorded_pod_adopts_instead_of_starting(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    k2 = make()
    k2.start(pod, kl.spec_from_manifest(pod.status["spec"]))
    k2.sync(pod)
    assert len(procs.starts) == 1 and pod.status["ready"]
    k2.close()


def test_backoff_survives_a_restart_in_wall_clock_time(env):
    k, clock, procs, prober, make = env
    pod = started(k, manifest(SLEEP))
    for _ in range(2):
        procs.exit(current_pid(pod), 1)
        k.sync(pod)
        k.sync(pod)
    assert pod.status["reason"] == "CrashLoopBackOff"
    until = entry_of(pod)["backoff_until"]
    assert until == clock.wall() + 10
    stored = pod_object()
    stored.status = json.loads(json.dumps(pod.status))
    k2 = make()
    clock.advance(5)
    k2.sync(stored)
    assert stored.status["reason"] == "CrashLoopBackOff"
    clock.advance(5)
    k2.sync(stored)
    assert stored.status["reason"] == "Running" and stored.status["restarts"] == 2
    k2.close()


def test_adopts_entries_recorded_by_the_converge_once_code(env):
    """Pods started before this module (kind, pid, started, log only; no spec)."""
    k, clock, procs, prober, make = env
    pod = pod_object()
    log = os.path.join(k.cluster.dir, "old.log")
    with open(log, "w") as f:
        f.write("listening tcp 0.0.0.0:80 http\n")
    procs.codes[77] = 0                                # that one ended
    pod.status = {"managed": True, "restarts": 0, "containers": [
        {"name": "web", "kind": "serve", "reason": "", "listeners": 1, "pid": 55, "started": 550, "log": log},
        {"name": "gone", "kind": "exec", "reason": "", "listeners": 0, "pid": 77, "started": 770, "log": log},
        {"name": "x", "kind": "fail", "reason": "exec: \"curl\": not found", "listeners": 0}]}
    k.sync(pod)
    by = {e["name"]: e for e in pod.status["containers"]}
    assert by["web"]["state"] == "running" and by["web"]["ready"] is True
    assert by["gone"]["reason"] == "ContainerStatusUnknown"
    assert by["x"]["reason"] == "RunContainerError"
    k.sync(pod)
    assert procs.starts == []                          # nothing it could restart without a spec
    assert_json(pod)


def test_wait_ready_returns_for_ready_and_hopeless_pods(env):
    k, clock, procs, prober, make = env
    ready = started(k, manifest(SLEEP))
    broken = started(k, manifest(FAIL), pod_object("q"))
    k.wait_ready([ready, broken], timeout=60)        # returns at once: one Ready, one hopeless
    assert ready.status["ready"] and not broken.status["ready"]


def test_stop_ends_processes_recorded_by_the_converge_once_code(env):
    k, clock, procs, prober, make = env
    pod = pod_object()
    pod.status = {"managed": True, "containers": [
        {"name": "main", "kind": "exec", "reason": "", "listeners": 0, "pid": 55, "started": 550, "log": "x"}]}
    k.stop(pod)
    assert procs.stopped == [(55, 2.0)] and procs.released == [55]
    assert entry_of(pod)["state"] == "terminated"


def test_a_pod_made_again_under_the_same_name_is_a_new_pod(env):
    """Deleted by another process (this Kubelet never stopped it) and made again."""
    k, clock, procs, prober, make = env
    first = started(k, manifest(SLEEP))
    old = current_pid(first)
    procs.exit(old, 0)                       # ended with its pod elsewhere
    again = started(k, manifest(SLEEP))      # same key, fresh status
    assert len(procs.starts) == 2 and again.status["uid"] != first.status["uid"]
    k.sync(again)
    k.sync(again)
    assert entry_of(again)["state"] == "running" and current_pid(again) != old
    assert again.status["restarts"] == 0
