"""The Deployment controller's decisions (kproxy.deployments), against a fake world.

The fake world does what the daemon and the kubelet would: each pass the pods created at
the previous pass become Ready (unless their template is broken), pods deleted at the
previous pass disappear, then ``decide`` runs and its decision is applied: new pods
start not ready, deleted pods become terminating (endpoint removed first: not ready).
"""

from __future__ import annotations

import json
import random
import re
from typing import Dict, List, Optional, Set

import pytest
import yaml

from kproxy import deployments as d
from kproxy.model import ManifestError, loads
from kproxy.render import replica_pods


def make_dep(replicas: int = 4, image: str = "web:1", strategy: Optional[dict] = None,
             min_ready: int = 0, deadline: Optional[int] = None, name: str = "web"):
    spec = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": {"metadata": {"labels": {"app": name}, "annotations": {"note": "n"}},
                     "spec": {"containers": [{"name": "web", "image": image,
                                              "ports": [{"containerPort": 80}]}]}},
    }
    if strategy is not None:
        spec["strategy"] = strategy
    if min_ready:
        spec["minReadySeconds"] = min_ready
    if deadline is not None:
        spec["progressDeadlineSeconds"] = deadline
    doc = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}
    (lo,) = loads(yaml.safe_dump(doc))
    return lo.obj


def rolling(surge, unavailable) -> dict:
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}}


RECREATE = {"type": "Recreate"}


class World:
    """Pods as the daemon would report them, one ``step`` per daemon pass."""

    def __init__(self, dep, now: float = 1000.0, dt: float = 1.0, terminate_passes: int = 1):
        self.dep = dep
        self.now = now
        self.dt = dt
        self.terminate_passes = terminate_passes
        self.pods: Dict[str, d.PodView] = {}
        self.terminating_for: Dict[str, int] = {}
        self.broken: Set[str] = set()        # template hashes whose pods never get ready
        self.rng = random.Random(7)
        self.progress: Optional[dict] = None
        self.history: List[dict] = []

    # -- observation
    def views(self) -> List[d.PodView]:
        return list(self.pods.values())

    def active(self, h: Optional[str] = None) -> List[d.PodView]:
        return [p for p in self.pods.values() if p.active and (h is None or p.template_hash == h)]

    def available(self, h: Optional[str] = None) -> int:
        return sum(1 for p in self.active(h) if d.is_available(p, self.dep.min_ready_seconds, self.now))

    def old_running(self, current: str) -> List[d.PodView]:
        return [p for p in self.pods.values() if p.template_hash != current and not p.failed]

    # -- one pass
    def kubelet(self) -> None:
        self.now += self.dt
        for name in list(self.terminating_for):
            self.terminating_for[name] -= 1
            if self.terminating_for[name] <= 0:
                del self.terminating_for[name]
                del self.pods[name]
        for p in self.pods.values():
            if p.active and not p.ready and p.template_hash not in self.broken:
                p.ready, p.ready_since = True, self.now

    def step(self) -> d.Decision:
        self.kubelet()
        views = self.views()
        decision = d.decide(self.dep, views, self.now)
        self.progress = d.update_progress(self.dep, views, self.now, self.progress)
        self.apply(decision)
        return decision

    def apply(self, decision: d.Decision) -> None:
        before_active = len(self.active())
        for name in decision.delete:
            p = self.pods[name]
            assert not p.terminating, f"{name} deleted twice"
            p.terminating, p.ready, p.ready_since = True, False, None
            self.terminating_for[name] = self.terminate_passes
        for _ in range(decision.create):
            pod = d.new_pod(self.dep, set(self.pods), self.rng)
            self.pods[pod.name] = d.PodView(name=pod.name, template_hash=pod.labels["pod-template-hash"],
                                            ready=False, ready_since=None, terminating=False,
                                            created=self.now)
        self.history.append({"create": decision.create, "delete": list(decision.delete),
                             "active": len(self.active()), "before": before_active,
                             "available": self.available()})

    def set_dep(self, dep) -> None:
        self.dep = dep

    def rollout_status(self):
        return d.rollout_status(self.dep, self.views(), self.now, self.progress)

    def run_until_done(self, max_passes: int = 60, check=None) -> int:
        for n in range(1, max_passes + 1):
            self.step()
            if check:
                check(self)
            if self.rollout_status()[1] and not self.terminating_for:
                return n
        raise AssertionError(f"not done after {max_passes} passes: {self.rollout_status()[0]}")


def settled(dep, **kw) -> World:
    """A world where ``dep`` is fully rolled out and available."""
    w = World(dep, **kw)
    w.run_until_done()
    assert len(w.active()) == dep.replicas and w.available() == dep.replicas
    return w


# --------------------------------------------------------------------------- names, hash


def test_template_hash_is_renders_and_follows_the_template_only():
    dep = make_dep()
    assert d.template_hash(dep) == replica_pods(dep)[0].labels["pod-template-hash"]
    assert re.fullmatch(f"[{d.NAME_ALPHABET}]{{10}}", d.template_hash(dep))
    assert d.template_hash(make_dep(replicas=9, strategy=RECREATE, min_ready=5)) == d.template_hash(dep)
    assert d.template_hash(make_dep(image="web:2")) != d.template_hash(dep)


def test_new_pod():
    dep = make_dep()
    h = d.template_hash(dep)
    first = d.new_pod(dep, set(), random.Random(1))
    assert re.fullmatch(f"web-{h}-[{d.NAME_ALPHABET}]{{5}}", first.name)
    assert first.labels == {"app": "web", "pod-template-hash": h}
    assert first.metadata.annotations == {"note": "n", "kproxy.io/owner": "Deployment/web"}
    assert first.namespace == "default" and first.metadata.generate_name == f"web-{h}-"
    assert first.spec.containers[0].image == "web:1" and first.spec is not dep.template.spec
    assert d.owned_by(first, dep) and not d.owned_by(first, make_dep(name="other"))
    # a taken name is skipped: the same rng sequence gives another name
    again = d.new_pod(dep, {first.name}, random.Random(1))
    assert again.name != first.name and again.name.startswith(f"web-{h}-")
    # generateName is cut to 58 characters, the name is at most 63
    long = make_dep(name="a" * 60)
    pod = d.new_pod(long, set(), random.Random(1))
    assert len(pod.name) == 63 and pod.name.startswith("a" * 58)


# --------------------------------------------------------------------------- fenceposts


@pytest.mark.parametrize("surge,unavailable,replicas,expected", [
    ("25%", "25%", 4, (1, 1)),
    ("50%", "25%", 4, (2, 1)),
    ("25%", "25%", 3, (1, 0)),        # surge rounds up, unavailable down
    ("25%", "25%", 10, (3, 2)),
    ("25%", "25%", 1, (1, 0)),
    (3, 2, 10, (3, 2)),
    ("0%", "1%", 2, (0, 1)),          # both zero after rounding: unavailable 1
    (0, "10%", 5, (0, 1)),
    (0, 0, 0, (0, 1)),
    ("100%", "100%", 4, (4, 4)),
    ("33%", "33%", 10, (4, 3)),
])
def test_resolve_fenceposts(surge, unavailable, replicas, expected):
    assert d.resolve_fenceposts(surge, unavailable, replicas) == expected


@pytest.mark.parametrize("bad", ["10", "x%", "-5%", True])
def test_resolve_fenceposts_refuses_what_is_neither_int_nor_percent(bad):
    with pytest.raises(ValueError):
        d.resolve_fenceposts(bad, "25%", 4)


def test_fenceposts_of_a_deployment():
    assert d.fenceposts(make_dep()) == (1, 1)                      # defaults 25%/25%
    assert d.fenceposts(make_dep(strategy=rolling("50%", "25%"))) == (2, 1)
    assert d.fenceposts(make_dep(strategy=RECREATE)) == (0, 0)


# --------------------------------------------------------------------------- pods


def view(name, h="h", ready=True, since=0.0, terminating=False, failed=False, created=None):
    return d.PodView(name=name, template_hash=h, ready=ready, ready_since=since if ready else None,
                     terminating=terminating, failed=failed, created=created)


def test_available_needs_min_ready_seconds():
    p = view("a", since=100.0)
    assert d.is_available(p, 0, 100.0)
    assert not d.is_available(p, 5, 105.0) and d.is_available(p, 5, 105.5)
    assert not d.is_available(view("b", ready=False), 0, 100.0)
    assert not d.is_available(view("c", terminating=True), 0, 100.0)
    assert not d.is_available(d.PodView("e", "h", True, None, False), 5, 1e9)   # ready time unknown


def test_deletion_order_not_ready_then_shortest_ready_then_newest():
    pods = [view("ready-long", since=10.0, created=1.0), view("ready-short", since=50.0, created=2.0),
            view("pending", ready=False, created=3.0), view("pending-new", ready=False, created=9.0),
            view("ready-unknown", since=None)]
    pods[-1].ready_since = None
    assert [p.name for p in d.deletion_order(pods)] == [
        "pending-new", "pending", "ready-unknown", "ready-short", "ready-long"]


# --------------------------------------------------------------------------- rolling updates


ROLLOUTS = [
    # replicas, strategy, min_ready, max active pods, min available pods
    pytest.param(4, rolling("50%", "25%"), 0, 6, 3, id="course-4-50%-25%"),
    pytest.param(4, rolling("25%", "25%"), 0, 5, 3, id="course-4-25%-25%"),
    pytest.param(4, None, 0, 5, 3, id="defaults"),
    pytest.param(10, rolling("25%", "25%"), 0, 13, 8, id="10-25%-25%"),
    pytest.param(3, rolling(0, 1), 0, 3, 2, id="3-surge0"),
    pytest.param(3, rolling(1, 0), 0, 4, 3, id="3-unavailable0"),
    pytest.param(1, rolling("25%", "25%"), 0, 2, 1, id="1-replica"),
    pytest.param(2, rolling("0%", "1%"), 0, 2, 1, id="2-fencepost-1"),
    pytest.param(5, rolling("100%", 0), 0, 10, 5, id="5-blue-green-like"),
    pytest.param(4, rolling("25%", "25%"), 3, 5, 3, id="4-minReadySeconds-3"),
    pytest.param(6, rolling(2, 3), 0, 8, 3, id="6-surge2-unavailable3"),
]


@pytest.mark.parametrize("replicas,strategy,min_ready,max_active,min_available", ROLLOUTS)
def test_rolling_update_step_by_step(replicas, strategy, min_ready, max_active, min_available):
    v1 = make_dep(replicas, "web:1", strategy, min_ready)
    v2 = make_dep(replicas, "web:2", strategy, min_ready)
    surge, unavailable = d.fenceposts(v2)
    assert (replicas + surge, replicas - unavailable) == (max_active, min_available)
    w = settled(v1)
    w.set_dep(v2)
    new_hash = d.template_hash(v2)
    seen = {"max": 0, "min": replicas, "statuses": []}

    def check(world: World) -> None:
        h = world.history[-1]
        active = len(world.active())
        assert active <= replicas + surge, world.history
        assert world.available() >= replicas - unavailable, world.history
        # new ready pods are never deleted during the rollout
        assert not [n for n in h["delete"] if n in world.pods and world.pods[n].template_hash == new_hash
                    and n in ready_new]
        ready_new.update(p.name for p in world.active(new_hash) if p.ready)
        seen["max"] = max(seen["max"], active)
        seen["min"] = min(seen["min"], world.available())
        seen["statuses"].append(world.rollout_status()[0])

    ready_new: Set[str] = set()
    passes = w.run_until_done(check=check)
    assert seen["max"] == max_active and seen["min"] == min_available
    assert passes <= 4 * replicas + 4 * (min_ready + 1) + 2
    assert {p.template_hash for p in w.pods.values()} == {new_hash}
    assert len(w.pods) == replicas and w.available(new_hash) == replicas
    assert w.rollout_status() == ('deployment "web" successfully rolled out', True)
    assert seen["statuses"][0].startswith('Waiting for deployment "web" rollout to finish: ')
    assert w.progress["reason"] == d.NEW_RS_AVAILABLE


def test_course_4_replicas_50_25_first_pass():
    """The first pass of a rollout at 50%/25%: two surge pods, one old pod deleted,
    then one more new pod in the room that made: 6 pods, 3 available."""
    w = settled(make_dep(4, "web:1", rolling("50%", "25%")))
    w.set_dep(make_dep(4, "web:2", rolling("50%", "25%")))
    dec = w.step()
    assert dec.create == 3 and len(dec.delete) == 1
    assert len(w.active()) == 6 and w.available() == 3


def test_course_4_replicas_25_25_first_pass():
    w = settled(make_dep(4, "web:1", rolling("25%", "25%")))
    w.set_dep(make_dep(4, "web:2", rolling("25%", "25%")))
    dec = w.step()
    assert dec.create == 2 and len(dec.delete) == 1
    assert len(w.active()) == 5 and w.available() == 3


def test_unavailable_old_pods_go_first():
    dep = make_dep(4, "web:2")                    # surge 1, unavailable 1
    old_hash = d.template_hash(make_dep(4, "web:1"))
    pods = [view("old-ok-1", old_hash, since=1.0, created=1.0), view("old-ok-2", old_hash, since=1.0, created=1.0),
            view("old-ok-3", old_hash, since=1.0, created=1.0), view("old-sick", old_hash, ready=False, created=1.0)]
    dec = d.decide(dep, pods, 100.0)
    # 3 available = minAvailable: only the sick one may go, and a new pod may take its place
    assert dec.delete == ["old-sick"] and dec.create == 2


def test_oldest_template_scaled_down_first():
    dep = make_dep(4, "web:3", rolling(0, 2))
    h1, h2 = d.template_hash(make_dep(4, "web:1")), d.template_hash(make_dep(4, "web:2"))
    pods = [view("v2-a", h2, since=5.0, created=50.0), view("v2-b", h2, since=5.0, created=50.0),
            view("v1-a", h1, since=5.0, created=10.0), view("v1-b", h1, since=5.0, created=10.0)]
    dec = d.decide(dep, pods, 100.0)
    assert sorted(dec.delete) == ["v1-a", "v1-b"] and dec.create == 2


def test_min_ready_seconds_holds_old_pods_until_new_ones_are_available():
    w = settled(make_dep(2, "web:1", rolling(1, 0), min_ready=5))
    w.set_dep(make_dep(2, "web:2", rolling(1, 0), min_ready=5))
    w.step()                                              # one surge pod
    assert w.history[-1] == {"create": 1, "delete": [], "active": 3, "before": 2, "available": 2}
    w.step()                                              # Ready at t
    ready_at = w.now
    for _ in range(5):                                    # t+1 .. t+5: not yet available
        assert w.step().delete == []                      # (Ready time + 5 must be before now)
    assert len(w.step().delete) == 1 and w.now == ready_at + 6


def test_scale_during_rollout_keeps_the_invariants_and_finishes():
    w = settled(make_dep(6, "web:1"))
    w.set_dep(make_dep(6, "web:2"))
    w.step()
    w.set_dep(make_dep(3, "web:2"))                       # scaled down mid-rollout
    surge, unavailable = d.fenceposts(w.dep)

    def check(world):
        assert len(world.active()) <= max(3 + surge, world.history[-1]["before"])
    w.run_until_done(check=check)
    assert len(w.pods) == 3 and w.available(d.template_hash(w.dep)) == 3


def test_rollback_to_the_previous_template_mid_rollout():
    v1, v2 = make_dep(4, "web:1"), make_dep(4, "web:2")
    w = settled(v1)
    w.set_dep(v2)
    w.step()
    w.step()
    w.set_dep(v1)
    w.run_until_done(check=lambda world: (len(world.active()) <= 5 and world.available() >= 3) or
                     pytest.fail(str(world.history)))
    assert {p.template_hash for p in w.pods.values()} == {d.template_hash(v1)}


# --------------------------------------------------------------------------- a broken template


@pytest.mark.parametrize("strategy,old_left,new_made", [
    (rolling("25%", "25%"), 3, 2),
    (rolling("50%", "25%"), 3, 3),
    (rolling(0, 1), 3, 1),
])
def test_broken_template_stalls_with_old_pods_serving(strategy, old_left, new_made):
    v1 = make_dep(4, "web:1", strategy)
    w = settled(v1)
    broken = make_dep(4, "web:broken", strategy)
    w.set_dep(broken)
    w.broken.add(d.template_hash(broken))
    for _ in range(30):
        w.step()
        assert w.available() >= 3
        msg, done = w.rollout_status()
        assert not done and msg.startswith('Waiting for deployment "web" rollout to finish: ')
    assert len(w.active(d.template_hash(v1))) == old_left and w.available() == old_left
    assert len(w.active(d.template_hash(broken))) == new_made
    assert w.rollout_status()[0] == ('Waiting for deployment "web" rollout to finish: '
                                    f"{new_made} out of 4 new replicas have been updated...")
    assert w.history[-1]["create"] == 0 and w.history[-1]["delete"] == []   # nothing churns
    # kubectl rollout undo: back to v1, the broken pods are the unhealthy old ones now
    w.set_dep(v1)
    w.run_until_done(check=lambda world: world.available() >= 3 or pytest.fail(str(world.history)))
    assert {p.template_hash for p in w.pods.values()} == {d.template_hash(v1)}


def test_stalled_rollout_keeps_an_old_pod_that_turns_unready():
    """rolling.go's case 1: with the new pods unavailable, an old pod that stops being
    ready is not cleaned up (maxScaledDown = 5 - 3 - 2 = 0): deleting it would only
    make room for one more broken pod."""
    w = settled(make_dep(4, "web:1"))
    w.set_dep(make_dep(4, "web:broken"))
    w.broken.add(d.template_hash(w.dep))
    for _ in range(3):
        w.step()
    old = w.active(d.template_hash(make_dep(4, "web:1")))
    assert len(old) == 3
    old[0].ready, old[0].ready_since = False, None
    assert d.decide(w.dep, w.views(), w.now + 1) == d.Decision(0, [])


def test_broken_template_exceeds_its_progress_deadline():
    v1 = make_dep(4, "web:1", deadline=10)
    w = settled(v1)
    broken = make_dep(4, "web:broken", deadline=10)
    w.set_dep(broken)
    w.broken.add(d.template_hash(broken))
    messages, times = [], []
    for _ in range(15):
        w.step()
        messages.append(w.rollout_status())
        times.append(w.now)
    assert messages[0][0].startswith('Waiting for deployment "web" rollout to finish: ')
    assert messages[-1] == ('error: deployment "web" exceeded its progress deadline', False)
    assert w.progress["reason"] == d.TIMED_OUT
    assert d.status(broken, w.views(), w.now, w.progress).progressing == d.TIMED_OUT
    # the last progress is seen at the second pass (the pods the first one made and
    # deleted); the deadline is exceeded at the first pass more than 10s after it
    assert w.progress["last_update"] == times[1]
    first_error = next(i for i, (m, _) in enumerate(messages) if m.startswith("error:"))
    assert times[first_error] == times[1] + 11
    json.loads(json.dumps(w.progress))                  # JSON-serialisable
    # with the default deadline (600s) the same rollout is still waiting
    w2 = settled(make_dep(4, "web:1"))
    w2.set_dep(make_dep(4, "web:broken"))
    w2.broken.add(d.template_hash(w2.dep))
    for _ in range(15):
        w2.step()
    assert w2.rollout_status()[0].startswith("Waiting for deployment")
    # a fixed template restarts the clock and finishes
    w.set_dep(make_dep(4, "web:3", deadline=10))
    w.run_until_done()
    assert w.rollout_status() == ('deployment "web" successfully rolled out', True)


# --------------------------------------------------------------------------- recreate


@pytest.mark.parametrize("replicas", [1, 4])
@pytest.mark.parametrize("terminate_passes", [1, 3])
def test_recreate(replicas, terminate_passes):
    v1 = make_dep(replicas, "web:1", RECREATE)
    w = settled(v1, terminate_passes=terminate_passes)
    v2 = make_dep(replicas, "web:2", RECREATE)
    w.set_dep(v2)
    h2 = d.template_hash(v2)

    def check(world):
        h = world.history[-1]
        if h["create"]:
            assert not world.old_running(h2) or all(p.template_hash == h2 for p in world.active()), world.history
        assert not (world.active(h2) and [p for p in world.active() if p.template_hash != h2])

    first = w.step()
    assert first.create == 0 and len(first.delete) == replicas          # all old pods at once
    for _ in range(terminate_passes - 1):                                # waiting for them to go
        assert w.step() == d.Decision(create=0, delete=[])
        assert w.rollout_status()[0] == ('Waiting for deployment "web" rollout to finish: '
                                         f"0 out of {replicas} new replicas have been updated...")
    assert w.step().create == replicas                                   # old ones gone
    w.run_until_done(check=check)
    assert len(w.pods) == replicas and w.available(h2) == replicas


def test_recreate_ignores_failed_old_pods():
    dep = make_dep(2, "web:2", RECREATE)
    h1 = d.template_hash(make_dep(2, "web:1"))
    dec = d.decide(dep, [view("old-failed", h1, ready=False, failed=True)], 0.0)
    assert dec == d.Decision(create=2, delete=["old-failed"])


# --------------------------------------------------------------------------- scaling


def test_scale_4_to_10_to_2():
    w = settled(make_dep(4))
    w.set_dep(make_dep(10))
    assert w.step().create == 6
    assert w.rollout_status()[0] == ('Waiting for deployment "web" rollout to finish: '
                                     "4 of 10 updated replicas are available...")
    w.run_until_done()
    assert len(w.pods) == 10
    w.set_dep(make_dep(2))
    dec = w.step()
    assert dec.create == 0 and len(dec.delete) == 8
    w.run_until_done()
    assert len(w.pods) == 2 and w.rollout_status() == ('deployment "web" successfully rolled out', True)


def test_scale_down_before_new_pods_are_ready_deletes_those_first():
    w = settled(make_dep(4))
    ready = {p.name for p in w.active()}
    w.set_dep(make_dep(10))
    w.step()                                      # 6 new pods, not ready yet
    dec = d.decide(make_dep(5), w.views(), w.now)
    assert dec.create == 0 and len(dec.delete) == 5 and not set(dec.delete) & ready
    dec = d.decide(make_dep(2), w.views(), w.now)
    assert len(dec.delete) == 8 and len(ready - set(dec.delete)) == 2


def test_scale_to_zero_and_back():
    w = settled(make_dep(3))
    w.set_dep(make_dep(0))
    w.run_until_done()
    assert not w.pods
    w.set_dep(make_dep(3))
    assert w.step().create == 3


# --------------------------------------------------------------------------- failed pods


def test_failed_pods_are_replaced_and_cleaned_up():
    w = settled(make_dep(3))
    names = sorted(w.pods)
    w.pods[names[0]].failed = True
    w.pods[names[0]].ready = False
    dec = w.step()
    assert dec.create == 1 and dec.delete == []              # the newest failed pod is kept
    assert d.status(w.dep, w.views(), w.now).failed_replicas == 1
    w.pods[names[1]].failed = True
    w.pods[names[1]].ready = False
    w.pods[names[1]].created = w.now                         # failed later: the one kept
    dec = w.step()
    assert dec.create == 1 and dec.delete == [names[0]]


def test_terminating_pods_are_not_deleted_twice_nor_counted():
    dep = make_dep(2)
    h = d.template_hash(dep)
    pods = [view("a", h), view("b", h), view("gone", h, ready=False, terminating=True)]
    assert d.decide(dep, pods, 10.0) == d.Decision(0, [])
    st = d.status(dep, pods, 10.0)
    assert (st.replicas, st.terminating_replicas, st.terminating) == (2, 1, 1)


# --------------------------------------------------------------------------- status, kubectl


def test_status_and_get_row():
    dep = make_dep(4, "web:2", min_ready=10)
    h, old = d.template_hash(dep), d.template_hash(make_dep(4, "web:1"))
    pods = [view("n1", h, since=0.0), view("n2", h, since=95.0), view("n3", h, ready=False),
            view("o1", old, since=0.0), view("o2", old, ready=False, terminating=True)]
    st = d.status(dep, pods, 100.0)
    assert (st.replicas, st.updated_replicas, st.ready_replicas, st.available_replicas,
            st.unavailable_replicas, st.terminating_replicas, st.old_replicas) == (4, 3, 3, 2, 2, 1, 1)
    assert d.get_row(dep, st) == {"NAME": "web", "READY": "3/4", "UP-TO-DATE": 3, "AVAILABLE": 2}
    assert list(d.get_row(dep, st)) == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE"]


@pytest.mark.parametrize("pods,message,done", [
    ([("new", True), ("old", True), ("old", True)], "1 out of 2 new replicas have been updated...", False),
    ([("new", True), ("new", False), ("old", True)], "1 old replicas are pending termination...", False),
    ([("new", True), ("new", False)], "1 of 2 updated replicas are available...", False),
    ([("new", True), ("new", True), ("old-terminating", False)], None, True),
])
def test_rollout_status_messages_in_kubectl_order(pods, message, done):
    dep = make_dep(2, "web:2")
    h, old = d.template_hash(dep), d.template_hash(make_dep(2, "web:1"))
    views = [view(f"p{i}", h if kind == "new" else old, ready=ready, terminating=kind.endswith("terminating"))
             for i, (kind, ready) in enumerate(pods)]
    msg, is_done = d.rollout_status(dep, views, 10.0)
    if message is None:
        assert msg == 'deployment "web" successfully rolled out'
    else:
        assert msg == f'Waiting for deployment "web" rollout to finish: {message}'
    assert is_done is done


def test_progress_record():
    dep = make_dep(2, "web:1", deadline=30)
    h = d.template_hash(dep)
    rec = d.update_progress(dep, [], 100.0, None)
    assert rec == {"template_hash": h, "reason": d.NEW_RS_CREATED, "last_update": 100.0,
                   "updated": 0, "old": 0, "available": 0}
    pending = [view("a", h, ready=False), view("b", h, ready=False)]
    rec = d.update_progress(dep, pending, 105.0, rec)
    assert rec["reason"] == d.RS_UPDATED and rec["last_update"] == 105.0          # 2 updated
    rec = d.update_progress(dep, pending, 135.0, rec)
    assert rec["reason"] == d.RS_UPDATED                                            # exactly 30s: not yet
    rec = d.update_progress(dep, pending, 135.5, rec)
    assert rec["reason"] == d.TIMED_OUT and d.timed_out(dep, rec)
    half = [view("a", h, since=136.0), view("b", h, ready=False)]
    rec = d.update_progress(dep, half, 137.0, rec)                                  # progress clears it
    assert rec["reason"] == d.RS_UPDATED and rec["last_update"] == 137.0
    rec = d.update_progress(dep, [view("a", h), view("b", h)], 138.0, rec)
    assert rec["reason"] == d.NEW_RS_AVAILABLE
    # a finished Deployment is not re-estimated: a stuck scale-up does not time out
    bigger = make_dep(3, "web:1", deadline=30)
    stuck = [view("a", h), view("b", h), view("c", h, ready=False)]
    rec = d.update_progress(bigger, stuck, 500.0, rec)
    assert rec["reason"] == d.NEW_RS_AVAILABLE
    # a new template restarts the clock
    v2 = make_dep(2, "web:2", deadline=30)
    rec2 = d.update_progress(v2, [view("a", h), view("b", h)], 600.0, rec)
    assert rec2["template_hash"] == d.template_hash(v2) and rec2["reason"] == d.NEW_RS_CREATED
    assert rec2["last_update"] == 600.0
    assert not d.timed_out(v2, rec) and json.loads(json.dumps(rec2)) == rec2


def test_decide_keeps_the_progress_record_in_place():
    dep = make_dep(2, "web:1", deadline=30)
    h = d.template_hash(dep)
    record: dict = {}
    pending = [view("a", h, ready=False), view("b", h, ready=False)]
    d.decide(dep, pending, 100.0, progress=record)
    assert record == d.update_progress(dep, pending, 100.0, None)
    d.decide(dep, pending, 131.0, progress=record)
    assert record["reason"] == d.TIMED_OUT
    assert d.rollout_status(dep, pending, 131.0, progress=record) == (
        'error: deployment "web" exceeded its progress deadline', False)
    assert d.rollout_status(dep, pending, 131.0) == (
        'Waiting for deployment "web" rollout to finish: 0 of 2 updated replicas are available...', False)


def test_no_progress_deadline_with_maxint():
    dep = make_dep(1, deadline=2 ** 31 - 1)
    h = d.template_hash(dep)
    rec = d.update_progress(dep, [view("a", h, ready=False)], 0.0, None)
    rec = d.update_progress(dep, [view("a", h, ready=False)], 1e9, rec)
    assert rec["reason"] == d.NEW_RS_CREATED


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("extra,field,reason", [
    ({"progressDeadlineSeconds": 0}, "spec.progressDeadlineSeconds", "must be greater than minReadySeconds"),
    ({"minReadySeconds": 600}, "spec.progressDeadlineSeconds", "must be greater than minReadySeconds"),
    ({"minReadySeconds": 5, "progressDeadlineSeconds": 5}, "spec.progressDeadlineSeconds", "minReadySeconds"),
    ({"progressDeadlineSeconds": "ten"}, "spec.progressDeadlineSeconds", "must be an integer"),
    ({"minReadySeconds": -1}, "spec.minReadySeconds", "greater than or equal to 0"),
])
def test_deployment_timing_validation(extra, field, reason):
    doc = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
           "spec": dict({"selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}, **extra)}
    with pytest.raises(ManifestError) as exc:
        loads(yaml.safe_dump(doc))
    assert exc.value.field == field and reason in exc.value.reason


def test_progress_deadline_seconds_default_and_value():
    assert make_dep().progress_deadline_seconds == 600
    assert make_dep(deadline=30, min_ready=5).progress_deadline_seconds == 30


# --------------------------------------------------------------------------- randomised


class ChaosWorld(World):
    """Pods get Ready after a random number of passes, some fail, deletions take 1-3
    passes."""

    fail_rate = 0.02

    def kubelet(self) -> None:
        self.terminate_passes = self.rng.randint(1, 3)
        self.now += self.dt
        for name in list(self.terminating_for):
            self.terminating_for[name] -= 1
            if self.terminating_for[name] <= 0:
                del self.terminating_for[name]
                del self.pods[name]
        for p in self.pods.values():
            if not p.active:
                continue
            if self.rng.random() < self.fail_rate:
                p.failed, p.ready, p.ready_since = True, False, None
            elif not p.ready and p.template_hash not in self.broken and self.rng.random() < 0.5:
                p.ready, p.ready_since = True, self.now


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("strategy", [None, rolling("50%", "25%"), rolling(0, 1), rolling(2, 0),
                                      rolling("100%", "100%")])
def test_random_changes_keep_the_rolling_invariants(seed, strategy):
    """Random template changes (some broken), scaling and minReadySeconds, with pods
    failing at random: each pass, a creation never takes the active pods above
    replicas + maxSurge, deletions never take the available pods below
    replicas - maxUnavailable (or below what was available), and the decision is
    deterministic. Then a working template with no more failures finishes."""
    rng = random.Random(seed)
    w = ChaosWorld(make_dep(4, "web:0", strategy))
    w.rng = random.Random(seed + 100)
    for _ in range(150):
        if rng.random() < 0.08:
            image = rng.choice(["web:1", "web:2", "web:3", "web:broken"])
            w.set_dep(make_dep(rng.choice([0, 1, 3, 4, 7]), image, strategy, rng.choice([0, 0, 2])))
            if image == "web:broken":
                w.broken.add(d.template_hash(w.dep))
        surge, unavailable = d.fenceposts(w.dep)
        w.kubelet()
        views = w.views()
        decision = d.decide(w.dep, views, w.now)
        assert decision == d.decide(w.dep, list(reversed(views)), w.now)    # order-independent
        assert len(set(decision.delete)) == len(decision.delete)
        assert not [n for n in decision.delete if w.pods[n].terminating]
        active = {p.name for p in views if p.active}
        if decision.create:
            assert len(active - set(decision.delete)) + decision.create <= w.dep.replicas + surge
        available = w.available()
        lost = sum(1 for p in views if p.name in decision.delete
                   and d.is_available(p, w.dep.min_ready_seconds, w.now))
        assert available - lost >= min(available, w.dep.replicas - unavailable)
        w.apply(decision)
    w.fail_rate = 0.0
    w.set_dep(make_dep(3, "web:final", strategy))
    w.run_until_done(max_passes=80)
    assert {p.template_hash for p in w.pods.values() if not p.failed} == {d.template_hash(w.dep)}
