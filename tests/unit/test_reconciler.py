"""The reconciler's pure parts: the incremental endpoints controller against the plain one."""
from __future__ import annotations

import copy
import random

from kproxy.model import objects as o
from kproxy.model.loader import decode
from kproxy.reconciler import EndpointsController, services_and_slices


def service(name: str, app: str, ns: str = "default", port: int = 80, target="http") -> o.Service:
    return decode({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                   "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": target}],
                            "clusterIP": f"10.96.0.{random.randint(20, 250)}"}}).obj


def pod(name: str, app: str, ip: str, ns: str = "default", ready: bool = True, port: int = 80) -> o.Pod:
    p = decode({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "image": "nginx",
                                         "ports": [{"containerPort": port, "name": "http"}]}]}}).obj
    p.spec.node_name = "node1"
    p.status = o.PodStatus(phase="Running", pod_ip=ip, pod_ips=[ip],
                           conditions=[{"type": "Ready", "status": "True" if ready else "False"}])
    return p


def _view(slices):
    return sorted((s.namespace, s.name, tuple((e.addresses[0], e.conditions.ready, e.conditions.terminating)
                                               for e in s.endpoints), tuple(p.port for p in s.ports))
                  for s in slices)


def test_incremental_endpoints_match_a_full_computation_through_random_changes():
    rng = random.Random(7)
    apps = ["a", "b", "c"]
    services = {f"s{i}": service(f"s{i}", rng.choice(apps), ns=rng.choice(["default", "team"])) for i in range(30)}
    pods = {f"p{i}": pod(f"p{i}", rng.choice(apps), f"10.244.0.{i + 2}", ns=rng.choice(["default", "team"]))
            for i in range(20)}
    ctl = EndpointsController()
    for step in range(300):
        change = rng.randrange(7)
        if change == 0:                                   # a new or replaced Service object
            name = f"s{rng.randrange(40)}"
            services[name] = service(name, rng.choice(apps), ns=rng.choice(["default", "team"]))
        elif change == 1 and services:
            services.pop(rng.choice(sorted(services)))
        elif change == 2:                                 # readiness flips
            p = pods[rng.choice(sorted(pods))]
            p.status = copy.copy(p.status)
            ready = p.status.condition("Ready")
            p.status.conditions = [{"type": "Ready", "status": "False" if ready else "True"}]
        elif change == 3:                                 # relabelled
            p = pods[rng.choice(sorted(pods))]
            p.metadata = copy.copy(p.metadata)
            p.metadata.labels = {"app": rng.choice(apps)}
        elif change == 4:                                 # deleted, or being deleted
            name = rng.choice(sorted(pods))
            if rng.random() < 0.5:
                pods.pop(name)
            else:
                pods[name].metadata = copy.copy(pods[name].metadata)
                pods[name].metadata.deletion_timestamp = str(step)
        elif change == 5:                                 # a new pod
            i = rng.randrange(100, 250)
            pods[f"n{i}"] = pod(f"n{i}", rng.choice(apps), f"10.244.1.{i}", ns=rng.choice(["default", "team"]),
                                port=rng.choice([80, 8080]))
        objs = {"Service": list(services.values())}
        want = services_and_slices(objs, list(pods.values()))[1]
        got = ctl.compute(objs, list(pods.values()))[1]
        assert _view(got) == _view(want), f"step {step}, change {change}"


def test_an_unchanged_service_keeps_its_slices_and_a_new_one_is_computed_alone():
    svc_a, svc_b = service("a", "x"), service("b", "y")
    pods = [pod("p1", "x", "10.244.0.2"), pod("p2", "y", "10.244.0.3")]
    ctl = EndpointsController()
    first = {s.service_name: s for s in ctl.compute({"Service": [svc_a, svc_b]}, pods)[1]}
    svc_c = service("c", "x")
    second = {s.service_name: s for s in ctl.compute({"Service": [svc_a, svc_b, svc_c]}, pods)[1]}
    assert second["a"] is first["a"] and second["b"] is first["b"], "kept, not recomputed"
    assert [e.addresses for e in second["c"].endpoints] == [["10.244.0.2"]]
    pods[0].status.conditions = [{"type": "Ready", "status": "False"}]
    third = {s.service_name: s for s in ctl.compute({"Service": [svc_a, svc_b, svc_c]}, pods)[1]}
    assert third["b"] is first["b"], "b selects nothing that changed"
    assert third["a"] is not first["a"] and third["a"].endpoints[0].conditions.ready is False


def test_the_drift_check_runs_beside_the_passes_and_a_stale_answer_is_dropped():
    import threading
    from kproxy.reconciler import Reconciler

    r = Reconciler.__new__(Reconciler)          # only what the check needs
    r._check, r._checker, r.last_sync, r.services, r.slices = None, None, 1.0, [], []
    answers, release = [], threading.Event()

    def check(proxiers, services, slices):
        release.wait(10)
        release.clear()
        answers.append(r.last_sync)
        return True

    r._check_drift = check
    try:
        assert r._drift_result([]) is None                  # begun: the pass goes on
        assert r._drift_result([]) is None                  # still running
        release.set()
        r._check[1].result(timeout=10)
        assert r._drift_result([]) is True                  # answered, about the rules it read

        assert r._drift_result([]) is None                  # a second check begins...
        r.last_sync = 2.0                                   # ...and a sync changes the rules
        release.set()
        r._check[1].result(timeout=10)
        assert r._drift_result([]) is None                  # that answer is dropped; again
        release.set()
        r._check[1].result(timeout=10)
        assert r._drift_result([]) is True
        assert len(answers) == 3
    finally:
        release.set()
        r._checker.shutdown(wait=True)
