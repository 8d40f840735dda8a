"""The Deployment controller's decisions, as pure functions: no kernel, no processes.

The daemon calls ``decide`` once per pass for each Deployment with what it knows of the
Deployment's pods (``PodView``), creates ``Decision.create`` pods of the current template
(``new_pod``) and deletes the pods named in ``Decision.delete``. ``status``,
``rollout_status`` and ``get_row`` give what ``kubectl describe``/``rollout status``/``get
deployments`` would show, and ``update_progress`` keeps the record that lets a stalled
rollout time out.

What is reproduced from Kubernetes' deployment controller (pkg/controller/deployment:
rolling.go, recreate.go, sync.go, progress.go and util/deployment_util.go) and the
ReplicaSet controller beneath it, in terms of pods instead of ReplicaSets (a ReplicaSet is
here the set of a Deployment's pods with one ``pod-template-hash``; the one with the
current template's hash is the *new* ReplicaSet, all others are *old*):

* A pod counts for the controller when it is neither terminating nor Failed (the
  ReplicaSet controller's "active" pods). It is *available* once it has been Ready for
  ``minReadySeconds`` (``PodView.ready_since``).
* RollingUpdate: ``maxSurge``/``maxUnavailable`` resolve against ``spec.replicas``
  (``resolve_fenceposts``). The new ReplicaSet grows while the active pods stay at most
  ``replicas + maxSurge``; old pods go first where they are unavailable (they cost no
  availability), then only while the available pods stay at least ``replicas -
  maxUnavailable``, oldest template first. Ready pods of the new template are only
  deleted when there are more of them than ``replicas`` (a scale-down).
* Recreate: every old pod is deleted at once; new pods are created only once no old pod
  is left running (terminating ones included).
* Scaling with the template unchanged is the same rule: create up to ``replicas`` or
  delete the surplus, not-ready pods first.
* Failed pods are replaced (they no longer count) and deleted, but for the newest Failed
  pod of the current template, which stays for inspection (``KEEP_FAILED``).

Kubernetes does one of these steps per sync and then waits for the next event; ``decide``
iterates them to a fixed point in one pass, which is what consecutive syncs would do
with nothing changing in between. Left out: proportional scaling of several active
ReplicaSets when ``replicas`` changes mid-rollout (here the new template gets the new
count and old pods go by the availability rule), ``paused``, ``revisionHistoryLimit``
and rollbacks by revision number.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from kproxy import render
from kproxy.model import objects as o

TEMPLATE_HASH_LABEL = "pod-template-hash"
OWNER_ANNOTATION = "kproxy.io/owner"
NAME_ALPHABET = render._ALPHABET          # Kubernetes' generated-name alphabet (no vowels)
NAME_SUFFIX_LENGTH = 5
MAX_GENERATE_NAME_PREFIX = 63 - NAME_SUFFIX_LENGTH   # apiserver cuts generateName to 58
KEEP_FAILED = 1                                      # Failed pods of the current template kept
NO_PROGRESS_DEADLINE = 2 ** 31 - 1                   # MaxInt32: "no deadline" to Kubernetes

# Reasons of the Deployment's Progressing condition (util/deployment_util.go).
NEW_RS_CREATED = "NewReplicaSetCreated"
RS_UPDATED = "ReplicaSetUpdated"
NEW_RS_AVAILABLE = "NewReplicaSetAvailable"
TIMED_OUT = "ProgressDeadlineExceeded"


# --------------------------------------------------------------------------- names


def template_hash(dep: o.Deployment) -> str:
    """The ``pod-template-hash`` of the Deployment's current template, the same value
    ``kproxy.render.replica_pods`` labels its pods with."""
    return render.pod_template_hash(dep)


def owner(dep: o.Deployment) -> str:
    """The ``kproxy.io/owner`` annotation value of the Deployment's pods."""
    return f"Deployment/{dep.name}"


def owned_by(pod: o.Pod, dep: o.Deployment) -> bool:
    """Whether ``pod`` is one of ``dep``'s (same namespace, owner annotation)."""
    return pod.namespace == dep.namespace and pod.metadata.annotations.get(OWNER_ANNOTATION) == owner(dep)


def new_pod(dep: o.Deployment, taken: Iterable[str], rng: Any = random) -> o.Pod:
    """A Pod of the current template, named like the ReplicaSet controller names them:
    ``generateName`` ``<deployment>-<pod-template-hash>-`` (cut to 58 characters, as the
    apiserver does) plus 5 random characters of the generated-name alphabet, avoiding
    the names in ``taken`` (give the names of the namespace's pods).

    Labels are the template's plus ``pod-template-hash``; annotations are the template's
    plus ``kproxy.io/owner: Deployment/<name>`` (standing in for an ownerReference); the
    spec is a copy of the template's. ``rng`` needs ``choice`` (``random`` or a
    ``random.Random``)."""
    taken = set(taken)
    h = template_hash(dep)
    prefix = f"{dep.name}-{h}-"[:MAX_GENERATE_NAME_PREFIX]
    for _ in range(10000):
        name = prefix + "".join(rng.choice(NAME_ALPHABET) for _ in range(NAME_SUFFIX_LENGTH))
        if name not in taken:
            break
    else:                                   # 27**5 names: only a rigged rng gets here
        raise RuntimeError(f"no free pod name for {prefix}*")
    labels = dict(dep.template.metadata.labels, **{TEMPLATE_HASH_LABEL: h})
    annotations = dict(dep.template.metadata.annotations, **{OWNER_ANNOTATION: owner(dep)})
    return o.Pod(metadata=o.ObjectMeta(name=name, namespace=dep.namespace, labels=labels,
                                       annotations=annotations, generate_name=prefix),
                 spec=copy.deepcopy(dep.template.spec))


# --------------------------------------------------------------------------- pods


@dataclass
class PodView:
    """What the controller is told of one existing pod of the Deployment.

    ``ready_since`` is the wall time the pod last became Ready (the Ready condition's
    lastTransitionTime), None when not ready or unknown. ``created`` (wall time, optional)
    orders the deletion of pods and of old templates (oldest template first); without it
    ties fall back to names."""

    name: str
    template_hash: str
    ready: bool
    ready_since: Optional[float]
    terminating: bool
    failed: bool = False
    created: Optional[float] = None

    @property
    def active(self) -> bool:
        """Counted by the controller: neither terminating nor Failed."""
        return not self.terminating and not self.failed


def is_available(pod: PodView, min_ready_seconds: int, now: float) -> bool:
    """Ready, and for longer than ``minReadySeconds`` (podutil.IsPodAvailable: with 0
    Ready is enough; otherwise the Ready time plus minReadySeconds must be before now)."""
    if not pod.ready or not pod.active:
        return False
    if min_ready_seconds <= 0:
        return True
    return pod.ready_since is not None and pod.ready_since + min_ready_seconds < now


def _deletion_key(pod: PodView):
    """Which pod a ReplicaSet deletes first, a simplified ActivePods ranking: not ready
    before ready; among ready ones, the one Ready for the shortest time (unknown first);
    then the newest (unknown creation first); then by name."""
    since = pod.ready_since if pod.ready else None
    return (pod.ready,
            since is not None, -(since or 0.0),
            pod.created is not None, -(pod.created or 0.0),
            pod.name)


def deletion_order(pods: Iterable[PodView]) -> List[PodView]:
    """``pods`` in the order a ReplicaSet scaling down would delete them."""
    return sorted(pods, key=_deletion_key)


def _templates_oldest_first(pods: Iterable[PodView]) -> List[str]:
    """Template hashes, oldest first (a template's age: its earliest pod ``created``;
    unknown ages last, then by hash), as old ReplicaSets are sorted by creation time."""
    first: Dict[str, float] = {}
    for p in pods:
        t = p.created if p.created is not None else float("inf")
        first[p.template_hash] = min(first.get(p.template_hash, float("inf")), t)
    return sorted(first, key=lambda h: (first[h], h))


# --------------------------------------------------------------------------- fenceposts


def _scaled_value(value: o.IntOrStr, total: int, round_up: bool, what: str) -> int:
    """An int-or-percent against ``total`` (intstr.GetScaledValueFromIntOrPercent)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid {what}: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        pct = int(value[:-1])
        return -(-pct * total // 100) if round_up else pct * total // 100
    raise ValueError(f"invalid {what}: {value!r} (an integer or a percentage like '25%')")


def resolve_fenceposts(max_surge: o.IntOrStr, max_unavailable: o.IntOrStr, replicas: int) -> Tuple[int, int]:
    """``(surge, unavailable)`` as pod counts for ``replicas``: percentages of ``replicas``,
    the surge rounded up and the unavailable rounded down (so 25% of 4 is 1 and 1, 50%
    of 4 is 2, 25% of 3 is 1 surge and 0 unavailable). Both zero (validation refuses two
    zeros, but rounding down can give one) makes unavailable 1, so a rollout can always
    move."""
    surge = _scaled_value(max_surge, replicas, True, "maxSurge")
    unavailable = _scaled_value(max_unavailable, replicas, False, "maxUnavailable")
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def fenceposts(dep: o.Deployment) -> Tuple[int, int]:
    """The Deployment's ``(maxSurge, maxUnavailable)`` in pods; ``(0, 0)`` for Recreate
    (MaxSurge/MaxUnavailable are zero for a strategy that is not RollingUpdate)."""
    if dep.strategy.type != "RollingUpdate":
        return 0, 0
    ru = dep.strategy.rolling_update or o.RollingUpdate()
    return resolve_fenceposts(ru.max_surge, ru.max_unavailable, dep.replicas)


# --------------------------------------------------------------------------- decide


@dataclass
class Decision:
    """What to do now: create ``create`` pods of the current template (``new_pod``) and
    delete the pods named in ``delete`` (remove their endpoints before stopping them)."""

    create: int = 0
    delete: List[str] = field(default_factory=list)


def decide(dep: o.Deployment, pods: List[PodView], now: float,
           progress: Optional[Dict[str, Any]] = None) -> Decision:
    """The pods to create and delete this pass for ``dep``, given all of its pods
    (terminating and Failed ones included: they matter to Recreate and to Failed-pod
    cleanup). Deterministic: the same inputs give the same decision.

    ``progress``, when given, is the daemon's progress record for ``dep`` (a dict, ``{}``
    the first time): it is brought up to date in place (``update_progress``) from the
    same pods, so passing the same dict every pass is all the daemon has to do to keep
    it; store it (JSON) and hand it to ``status``/``rollout_status``."""
    if progress is not None:
        updated = update_progress(dep, pods, now, progress or None)
        progress.clear()
        progress.update(updated)
    current = template_hash(dep)
    delete: List[str] = _failed_to_delete(pods, current)
    active = [p for p in pods if p.active]
    new = [p for p in active if p.template_hash == current]
    old = [p for p in active if p.template_hash != current]
    if dep.strategy.type == "Recreate":
        create, more = _recreate(dep, pods, new, old, current)
    else:
        create, more = _rolling(dep, new, old, now)
    return Decision(create=create, delete=delete + more)


def _failed_to_delete(pods: List[PodView], current: str) -> List[str]:
    """Failed pods are replaced (they are not active) and deleted, except the newest
    ``KEEP_FAILED`` of the current template, left for ``get pods``/logs."""
    failed = [p for p in pods if p.failed and not p.terminating]
    kept = sorted((p for p in failed if p.template_hash == current),
                  key=lambda p: (p.created if p.created is not None else float("-inf"), p.name))
    keep = {p.name for p in kept[len(kept) - KEEP_FAILED:]} if KEEP_FAILED > 0 else set()
    return sorted(p.name for p in failed if p.name not in keep)


def _recreate(dep: o.Deployment, pods: List[PodView], new: List[PodView], old: List[PodView],
              current: str) -> Tuple[int, List[str]]:
    """Recreate (recreate.go): scale every old ReplicaSet to 0; while any old pod is still
    running (terminating included, Failed excluded) create nothing; then bring the new
    template to ``replicas``."""
    delete = [p.name for p in deletion_order(old)]
    if any(p.template_hash != current and not p.failed for p in pods):
        return 0, delete
    if len(new) > dep.replicas:
        return 0, [p.name for p in deletion_order(new)[:len(new) - dep.replicas]]
    return dep.replicas - len(new), delete


def _rolling(dep: o.Deployment, new: List[PodView], old: List[PodView], now: float) -> Tuple[int, List[str]]:
    """RollingUpdate (rolling.go), repeated until nothing changes:

    1. more new pods than ``replicas``: delete the surplus (a scale-down);
    2. scale up (NewRSNewReplicas): create ``min(replicas + maxSurge - active pods,
       replicas - new pods)``;
    3. scale old down (reconcileOldReplicaSets): at most ``active - minAvailable -
       unavailable new pods`` where ``minAvailable = replicas - maxUnavailable``; first
       old pods that are not available (cleanupUnhealthyReplicas), then, while more
       than ``minAvailable`` pods are available, the surplus
       (scaleDownOldReplicaSetsForRollingUpdate); oldest template first, each template's
       pods in ``deletion_order``.
    """
    replicas = dep.replicas
    surge, unavailable = fenceposts(dep)
    min_available = replicas - unavailable

    def avail(p: PodView) -> bool:
        return is_available(p, dep.min_ready_seconds, now)

    delete: List[str] = []
    create = 0
    if len(new) > replicas:
        victims = deletion_order(new)[:len(new) - replicas]
        delete += [p.name for p in victims]
        new = [p for p in new if p not in victims]
    old = list(old)
    order = _templates_oldest_first(old)

    def remove_old(victims: List[PodView]) -> None:
        delete.extend(p.name for p in victims)
        for p in victims:
            old.remove(p)

    while True:
        changed = False
        up = min(replicas + surge - (len(new) + create + len(old)), replicas - (len(new) + create))
        if up > 0:
            create += up
            changed = True
        if old:
            new_count = len(new) + create
            new_available = sum(1 for p in new if avail(p))
            max_scaled_down = (new_count + len(old)) - min_available - (new_count - new_available)
            if max_scaled_down > 0:
                cleaned = 0
                for h in order:
                    if cleaned >= max_scaled_down:
                        break
                    unhealthy = [p for p in old if p.template_hash == h and not avail(p)]
                    victims = deletion_order(unhealthy)[:max_scaled_down - cleaned]
                    remove_old(victims)
                    cleaned += len(victims)
                    changed = changed or bool(victims)
                budget = new_available + sum(1 for p in old if avail(p)) - min_available
                for h in order:
                    if budget <= 0:
                        break
                    victims = deletion_order(p for p in old if p.template_hash == h)[:budget]
                    remove_old(victims)
                    budget -= len(victims)
                    changed = changed or bool(victims)
        if not changed:
            return create, delete


# --------------------------------------------------------------------------- status


@dataclass
class DeploymentStatus:
    """A Deployment's ``status`` as the controller computes it (calculateStatus).

    ``replicas``: active pods (not terminating, not Failed), every template;
    ``updated_replicas``: those of the current template; ``ready_replicas`` /
    ``available_replicas``: active pods Ready / available; ``unavailable_replicas``:
    ``max(replicas, spec.replicas) - available`` (never negative);
    ``terminating_replicas``: pods being deleted (status.terminatingReplicas of newer
    Kubernetes); ``failed_replicas``: Failed pods still present; ``progressing``: the
    Progressing condition's reason when a progress record was given."""

    replicas: int
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    unavailable_replicas: int
    terminating_replicas: int
    failed_replicas: int = 0
    desired: int = 0
    template_hash: str = ""
    progressing: Optional[str] = None

    @property
    def terminating(self) -> int:
        return self.terminating_replicas

    @property
    def old_replicas(self) -> int:
        """Active pods of old templates: kubectl's "old replicas pending termination"."""
        return self.replicas - self.updated_replicas


def status(dep: o.Deployment, pods: List[PodView], now: float,
           progress: Optional[Dict[str, Any]] = None) -> DeploymentStatus:
    """The Deployment's status from its pods (``progress``: the record kept by
    ``update_progress``, for the Progressing reason)."""
    current = template_hash(dep)
    active = [p for p in pods if p.active]
    available = sum(1 for p in active if is_available(p, dep.min_ready_seconds, now))
    reason = None
    if progress and progress.get("template_hash") == current:
        reason = progress.get("reason")
    return DeploymentStatus(
        replicas=len(active),
        updated_replicas=sum(1 for p in active if p.template_hash == current),
        ready_replicas=sum(1 for p in active if p.ready),
        available_replicas=available,
        unavailable_replicas=max(0, max(len(active), dep.replicas) - available),
        terminating_replicas=sum(1 for p in pods if p.terminating),
        failed_replicas=sum(1 for p in pods if p.failed and not p.terminating),
        desired=dep.replicas,
        template_hash=current,
        progressing=reason,
    )


def complete(dep: o.Deployment, st: DeploymentStatus) -> bool:
    """DeploymentComplete: every replica updated, no old one left, and at least
    ``replicas - maxUnavailable`` available (not necessarily all)."""
    return (st.updated_replicas == dep.replicas and st.replicas == dep.replicas
            and st.available_replicas >= dep.replicas - fenceposts(dep)[1])


# --------------------------------------------------------------------------- progress


def update_progress(dep: o.Deployment, pods: List[PodView], now: float,
                    previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The Progressing condition, kept between passes (progress.go, syncRolloutStatus).

    The daemon stores the returned dict per Deployment (it is JSON-serialisable) and
    passes it back the next pass, then to ``status``/``rollout_status``. Call it once per
    pass with the pods as observed (the same list given to ``decide``), or let
    ``decide(..., progress=record)`` do it in place. Fields:

    ``template_hash``: the template the record is about (a new template restarts the
    clock with reason NewReplicaSetCreated); ``reason``: NewReplicaSetCreated,
    ReplicaSetUpdated, NewReplicaSetAvailable or ProgressDeadlineExceeded;
    ``last_update``: wall time of the last progress; ``updated``, ``old``,
    ``available``: the counts at the previous pass.

    Progress is: more updated pods, fewer old pods, or more available pods than at the
    previous pass (DeploymentProgressing). Without progress for
    ``progressDeadlineSeconds`` an unfinished rollout times out; progress later clears
    it. A finished rollout (reason NewReplicaSetAvailable with no old pods) is not
    re-estimated, so a scale-up that never gets ready does not time out, as in
    Kubernetes.
    """
    st = status(dep, pods, now)
    counts = {"updated": st.updated_replicas, "old": st.old_replicas, "available": st.available_replicas}
    if previous and previous.get("template_hash") == st.template_hash:
        rec = dict(previous)
    else:
        base = previous if previous else counts
        rec = {"template_hash": st.template_hash, "reason": NEW_RS_CREATED, "last_update": now,
               **{k: base.get(k, 0) for k in counts}}
    rec.setdefault("reason", NEW_RS_CREATED)
    rec.setdefault("last_update", now)
    for k, v in counts.items():
        rec.setdefault(k, v)
    deadline = dep.progress_deadline_seconds
    finished = st.replicas == st.updated_replicas and rec["reason"] == NEW_RS_AVAILABLE
    if deadline != NO_PROGRESS_DEADLINE and not finished:
        if complete(dep, st):
            rec.update(reason=NEW_RS_AVAILABLE, last_update=now)
        elif (counts["updated"] > rec["updated"] or counts["old"] < rec["old"]
              or counts["available"] > rec["available"]):
            rec.update(reason=RS_UPDATED, last_update=now)
        elif rec["reason"] == TIMED_OUT or rec["last_update"] + deadline < now:
            rec["reason"] = TIMED_OUT
    rec.update(counts)
    return rec


def timed_out(dep: o.Deployment, progress: Optional[Dict[str, Any]]) -> bool:
    """Whether the record says the current template's rollout exceeded its deadline."""
    return bool(progress) and progress.get("template_hash") == template_hash(dep) \
        and progress.get("reason") == TIMED_OUT


# --------------------------------------------------------------------------- kubectl


def rollout_status(dep: o.Deployment, pods: List[PodView], now: float,
                   progress: Optional[Dict[str, Any]] = None) -> Tuple[str, bool]:
    """``kubectl rollout status deployment/NAME``: its message (without the trailing
    newline) and whether the rollout is done, checked in kubectl's order.

    A message starting with ``error: `` (the progress deadline was exceeded, known only
    from a ``progress`` record) is kubectl's error exit: stop waiting, exit 1. Like
    kubectl, "done" does not wait for pods already terminating."""
    name = dep.name
    if timed_out(dep, progress):
        return f'error: deployment "{name}" exceeded its progress deadline', False
    st = status(dep, pods, now, progress)
    waiting = f'Waiting for deployment "{name}" rollout to finish: '
    if st.updated_replicas < dep.replicas:
        return waiting + f"{st.updated_replicas} out of {dep.replicas} new replicas have been updated...", False
    if st.replicas > st.updated_replicas:
        return waiting + f"{st.old_replicas} old replicas are pending termination...", False
    if st.available_replicas < st.updated_replicas:
        return waiting + f"{st.available_replicas} of {st.updated_replicas} updated replicas are available...", False
    return f'deployment "{name}" successfully rolled out', True


def get_row(dep: o.Deployment, st: DeploymentStatus) -> Dict[str, Any]:
    """A ``kubectl get deployments`` row: NAME, READY (ready/spec.replicas), UP-TO-DATE,
    AVAILABLE (AGE is the caller's: nothing here knows when the Deployment was made)."""
    return {"NAME": dep.name, "READY": f"{st.ready_replicas}/{dep.replicas}",
            "UP-TO-DATE": st.updated_replicas, "AVAILABLE": st.available_replicas}
