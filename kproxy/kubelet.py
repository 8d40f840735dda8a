"""kubelet-lite: start a pod's containers, keep them running as its restartPolicy says,
probe them, and report the pod's phase, STATUS and readiness as the kubelet does.

    Kubelet.start(pod, spec)  -> containers started (ip netns exec, journaled by PID)
    Kubelet.sync(pod)         -> one supervision pass (never waits: probes run on a pool)
    Kubelet.stop(pod)         -> Terminating, then SIGTERM / SIGKILL by PID + start time

What a container runs
---------------------
From :func:`kproxy.workload.images.plan` (images are never pulled):

* ``serve``: the built-in workload server on the image's ports; it counts as started
  once its log has one ``listening`` line per listener (this plays the part of a startup
  probe: probes begin after it). The cluster DNS pod (annotation
  ``kproxy.io/system: dns``) runs ``kproxy.dns.server`` on the zone file instead;
* ``exec``: the manifest's command, as user nobody (``setpriv``);
* ``idle``: ``sleep infinity``, a placeholder that never exits;
* ``exit``: a base image with no command, whose shell exits at once: ``true``, so under
  ``Always`` it ends in CrashLoopBackOff exactly as busybox without a command does;
* ``fail``: nothing can run (``curl`` in busybox): the container stays waiting with
  reason ``RunContainerError`` and is never ready; nothing is started or restarted.

Each process is started with :meth:`Cluster.start_process` (journaled), its output to
``<cluster>/logs/<ns>_<pod>_<container>.log`` (the previous run's log is kept as
``.log.previous``, what ``kubectl logs --previous`` shows), and ended only by its
recorded PID and start time.

Restarts (restartPolicy)
------------------------
An exited container is restarted under ``Always``, under ``OnFailure`` when it exited
non-zero, never under ``Never``; a container killed for failing its liveness probe is
restarted unless the policy is ``Never``. As in the kubelet, an exit is first seen
(STATUS ``Completed`` or ``Error``) and the restart is decided on the next sync, through
the per-container back-off of the kubelet's ``flowcontrol.Backoff``:

* the first restart is immediate and arms the back-off at ``backoff_base`` (10 s);
* each later exit waits the back-off, counted from the exit, as ``CrashLoopBackOff``,
  then restarts and doubles it, up to ``backoff_cap`` (300 s): waits 0, 10, 20, 40, 80,
  160, 300, 300 ... seconds;
* a container that ran more than ``backoff_reset`` (600 s) since its last restart starts
  over (immediate restart, 10 s).

Each restart adds one to the container's ``restarts`` (kubectl's RESTARTS is their sum).

Phase and STATUS
----------------
The phase is the kubelet's ``getPhase``: a container that never ran makes the pod
``Pending``; with one running it is ``Running``; with all stopped it is ``Running``
under ``Always`` (it is being restarted), ``Succeeded`` when all exited 0, ``Failed``
under ``Never`` otherwise, ``Running`` under ``OnFailure`` (a restart is coming).
A ``fail`` container (never runnable) is left out: the pod is ``Running`` when another
container runs, else ``Pending``.

``reason`` is the STATUS column as kubectl prints it: a container's waiting reason
(``ContainerCreating``, ``CrashLoopBackOff``, ``RunContainerError``) or terminated reason
(``Completed``, ``Error``, ``ContainerStatusUnknown``), the first container's winning,
else the phase; ``Completed`` next to a running container shows ``Running`` (or
``NotReady``); ``Terminating`` once :meth:`Kubelet.stop` began.

Readiness and probes
--------------------
A container is ready when it runs, has started (see ``serve``) and, with a
``readinessProbe``, once the probe succeeded ``successThreshold`` times in a row (it is not
ready again after ``failureThreshold`` failures in a row). The pod is Ready when every
container is. A ``livenessProbe`` failing ``failureThreshold`` times kills the container
(SIGTERM, SIGKILL after ``kill_grace``), which is then restarted per restartPolicy. See
:mod:`kproxy.probes` for timings and handlers. Probes run on a thread pool; ``sync``
launches the due ones and picks up results finished since the last sync.
``startupProbe`` is not emulated (it is accepted and ignored; the serve rule above
stands in for it).

Persisted state, and a restarted daemon
---------------------------------------
Everything the next process needs is in ``pod.status`` (JSON, saved with the cluster):
``managed``, ``uid`` (one per pod made: a pod deleted elsewhere and made again under the
same name is a new pod), ``spec`` (the pod's manifest), ``phase``, ``reason``, ``ready``,
``ready_count``, ``restarts``, ``ready_since`` and ``containers``, one dict each::

    name, kind, listeners, pid, started (the PID's start time), log,
    state (waiting|running|terminated), reason, message, exit_code,
    started_at, finished_at, restarts, backoff, backoff_updated, backoff_until,
    startup_done, ready, probes

Times (``*_at``, ``backoff_*``, ``ready_since``) are wall-clock ``time.time()`` values so
they mean something to another process; in memory the kubelet schedules on its
monotonic clock. A new Kubelet (after a daemon restart) *adopts* a pod on its first
``sync``: a container recorded as running whose PID still has the recorded start time
is kept, never started again. Its readiness carries over (no flap of the endpoints),
and its probes resume. Only a child's exit status can be read: an adopted process
that ended has an unknown exit status; it is reported as the kubelet reports a
container it lost track of, ``ContainerStatusUnknown`` with exit code 137, and counts
as a failure (restarted under Always and OnFailure, ``Failed`` under Never).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from kproxy import probes as pr
from kproxy.kernel import process
from kproxy.model import objects as o

SYSTEM_ANNOTATION = "kproxy.io/system"
DNS_POD = "coredns"
NOBODY = "65534"
KILL_GRACE = 2.0              # seconds between SIGTERM and SIGKILL for a liveness kill
EXIT_UNKNOWN = -1             # Processes.poll: it ended, with a status nobody can read
UNKNOWN_EXIT_CODE = 137       # what the kubelet reports for ContainerStatusUnknown
MESSAGE_MAX = 300             # a probe's message kept in the status (an exec probe's output)

RUNNING, WAITING, TERMINATED = "running", "waiting", "terminated"


def zone_path(cluster) -> str:
    """The cluster DNS zone file the DNS pod serves."""
    return os.path.join(cluster.dir, "dns", "zone.json")


def log_path(cluster, pod, container: str) -> str:
    d = os.path.join(cluster.dir, "logs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"{pod.namespace}_{pod.name}_{container}.log")


def container_dict(c: o.Container, raw: Optional[dict] = None) -> dict:
    """The container as a manifest would give it (what kproxy.workload.images reads);
    ``raw``, the container's own manifest map, adds ``stdin``/``tty`` when it has them."""
    out = {
        "name": c.name, "image": c.image, "command": list(c.command), "args": list(c.args),
        "env": list(c.env),
        "ports": [{"containerPort": p.container_port, "protocol": p.protocol,
                   **({"name": p.name} if p.name else {})} for p in c.ports],
    }
    for key in ("stdin", "tty"):
        if raw and raw.get(key):
            out[key] = True
    return out


def _raw_container(spec: o.Pod, name: str) -> Optional[dict]:
    for c in ((spec.raw or {}).get("spec") or {}).get("containers") or ():
        if isinstance(c, dict) and c.get("name") == name:
            return c
    return None


def pod_manifest(spec: o.Pod) -> dict:
    """The pod's manifest, to keep in its status: its raw document when it has one (a
    Pod from the store), else one written from the object (a Deployment's replica)."""
    if spec.raw and spec.raw.get("kind") == "Pod":
        return json.loads(json.dumps(spec.raw))
    meta: Dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)}
    if spec.metadata.annotations:
        meta["annotations"] = dict(spec.metadata.annotations)
    containers = []
    for c in spec.spec.containers:
        d: Dict[str, Any] = container_dict(c, _raw_container(spec, c.name))
        for key, value in (("readinessProbe", c.readiness_probe), ("livenessProbe", c.liveness_probe),
                           ("startupProbe", c.startup_probe), ("workingDir", c.working_dir)):
            if value:
                d[key] = value
        containers.append(d)
    body: Dict[str, Any] = {"containers": containers, "restartPolicy": spec.spec.restart_policy}
    if spec.spec.node_name:
        body["nodeName"] = spec.spec.node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def spec_from_manifest(manifest: dict) -> o.Pod:
    """The Pod object back from a manifest kept in a pod's status (as the store parses)."""
    from kproxy.model import loads
    return loads(json.dumps(manifest), source="pod status", strict=False, validate=False)[0].obj


# ---- phase and STATUS (pure, table-tested) ---------------------------------------------------

def should_restart(policy: str, exit_code: Optional[int], liveness_killed: bool = False) -> bool:
    """Whether an exited container is started again (restartPolicy)."""
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return liveness_killed or exit_code != 0
    return True


def pod_phase(containers: Sequence[dict], restart_policy: str) -> str:
    """The pod phase from its containers, as the kubelet's getPhase (module docstring)."""
    if not containers:
        return "Pending"
    running = waiting = stopped = succeeded = 0
    blocked = False
    for c in containers:
        state = c.get("state")
        if c.get("kind") == "fail":
            blocked = True
        elif state == RUNNING:
            running += 1
        elif state == TERMINATED:
            stopped += 1
            succeeded += c.get("exit_code") == 0
        elif c.get("exit_code") is not None:       # waiting to be restarted after a run
            stopped += 1
        else:                                      # never ran yet
            waiting += 1
    if blocked:
        return "Running" if running else "Pending"
    if waiting:
        return "Pending"
    if running:
        return "Running"
    if restart_policy == "Always":
        return "Running"
    if stopped == succeeded:
        return "Succeeded"
    if restart_policy == "Never":
        return "Failed"
    return "Running"


def status_reason(phase: str, containers: Sequence[dict], ready: bool, terminating: bool = False) -> str:
    """kubectl's STATUS column (its printPod): the phase, overridden by a container's
    waiting or terminated reason (the first container's wins), ``Completed`` beside a
    running container shown as ``Running``/``NotReady``, ``Terminating`` when deleted."""
    reason = phase
    has_running = False
    for c in reversed(list(containers)):
        state = c.get("state")
        if state == WAITING and c.get("reason"):
            reason = c["reason"]
        elif state == TERMINATED and c.get("reason"):
            reason = c["reason"]
        elif state == TERMINATED:
            reason = f"ExitCode:{c.get('exit_code')}"
        elif state == RUNNING and c.get("ready"):
            has_running = True
    if reason == "Completed" and has_running:
        reason = "Running" if ready else "NotReady"
    if terminating:
        reason = "Terminating"
    return reason


# ---- processes (the seam unit tests replace) -------------------------------------------------

class Processes:
    """How the kubelet starts, watches and ends a container's process, for real."""

    def __init__(self, cluster):
        self.cluster = cluster

    def start(self, pod, argv: List[str], log: str) -> Tuple[Any, int, int]:
        """Start ``argv`` in the pod, output to ``log``: (Popen, pid, start time)."""
        with open(log, "wb") as out:
            proc = self.cluster.start_process(pod, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        started = process.start_time(proc.pid)    # a zombie child still has it
        return proc, proc.pid, started if started is not None else -1

    def poll(self, proc, pid: int, started: int) -> Optional[int]:
        """None while it runs; else its exit status, or EXIT_UNKNOWN for a process we did
        not start (adopted: not our child, so nobody can read its status)."""
        if proc is not None:
            rc = proc.poll()                          # reaps: a zombie never counts as running
            code = None if rc is None else process.exit_status(rc)
        else:
            code = None if process.alive(pid, started) else EXIT_UNKNOWN
        if code is not None:
            # the container ended with its main process: so does what it left running
            # (a runtime ends the container's every process), or a restart would meet it
            process.end_leftovers(pid, started)
        return code

    def stop(self, proc, pid: int, started: int, grace: float) -> Optional[int]:
        """SIGTERM, SIGKILL after ``grace``: the recorded PID + start time and its group."""
        if proc is not None:
            return process.stop_child(proc, started, grace)
        process.stop(pid, started, grace)
        return EXIT_UNKNOWN

    def start_exec(self, pod, argv: List[str]) -> Tuple[subprocess.Popen, int]:
        """An exec probe's command in the pod, its output piped back."""
        proc = self.cluster.start_process(pod, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        started = process.start_time(proc.pid)
        return proc, started if started is not None else -1

    def release(self, pid: int, started: int) -> None:
        """Journal that a recorded process is gone."""
        self.cluster.journal.record("release-process", pid=pid, started=started)


class _Inline:
    """An executor that runs each task at once (probe_workers=0: deterministic tests)."""

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:      # noqa: BLE001 - handed to whoever reads the future
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


# ---- in-memory state -------------------------------------------------------------------------

@dataclass
class _Run:
    """What the kubelet remembers of one container beyond pod.status (monotonic times)."""
    proc: Any = None                          # Popen of a process this Kubelet started
    started: float = 0.0                      # when the current run started
    finished: Optional[float] = None          # when the last run's exit was seen
    backoff_updated: Optional[float] = None   # the back-off entry's lastUpdate
    exit_pass: int = -1                       # the sync pass that saw the last exit
    readiness: Optional[pr.ProbeWorker] = None
    liveness: Optional[pr.ProbeWorker] = None
    killing: Optional[concurrent.futures.Future] = None
    liveness_killed: bool = False


@dataclass
class _PodRun:
    spec: o.Pod
    runs: Dict[str, _Run]
    uid: str = ""                 # the pod's status["uid"]: a pod re-made under the same name differs
    passes: int = 0


class Kubelet:
    """Supervises the pods of one cluster (see the module docstring).

    ``clock`` is the monotonic clock schedules run on and ``wall`` the clock stored
    times come from (tests pass fakes for both); ``probe_workers=0`` runs probes inline
    in ``sync`` (tests). ``runtime`` replaces :class:`Processes` and ``prober`` replaces
    :func:`kproxy.probes.run_probe` (``prober(spec, target, pod)``), for unit tests.
    ``counters`` counts probe results by (probe type, result), as the kubelet's
    ``prober_probe_total``, and ``"container_restarts"``."""

    def __init__(self, cluster, *, backoff_base: float = 10.0, backoff_cap: float = 300.0,
                 backoff_reset: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 probe_workers: int = 8, wall: Callable[[], float] = time.time,
                 runtime: Optional[Processes] = None, prober: Optional[Callable] = None,
                 kill_grace: float = KILL_GRACE):
        self.cluster = cluster
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.backoff_reset = backoff_reset
        self.clock = clock
        self.wall = wall
        self.kill_grace = kill_grace
        self.runtime = runtime if runtime is not None else Processes(cluster)
        self.prober = prober if prober is not None else self._run_probe
        self._pool = (concurrent.futures.ThreadPoolExecutor(probe_workers, thread_name_prefix="kproxy-probe")
                      if probe_workers > 0 else _Inline())
        self._lock = threading.Lock()          # journal writes from the pool and the caller
        self._pods: Dict[str, _PodRun] = {}
        self.counters: Dict[Any, int] = {"container_restarts": 0}

    # ---- the API ---------------------------------------------------------------------------
    def start(self, pod, spec: o.Pod) -> None:
        """Record the pod's spec and start its containers.  A pod whose status already
        names containers (started by another process) is adopted instead."""
        if pod.status.get("containers"):
            if self._current(pod) is None:
                self._adopt(pod, spec)
            return
        containers = []
        for c in spec.spec.containers:
            plan = self._plan(spec, c)
            entry = {"name": c.name, "kind": plan[0], "listeners": plan[1], "pid": None, "started": None,
                     "log": log_path(self.cluster, pod, c.name), "state": WAITING,
                     "reason": "ContainerCreating", "message": "", "exit_code": None, "started_at": None,
                     "finished_at": None, "restarts": 0, "backoff": 0, "backoff_updated": None,
                     "backoff_until": None, "startup_done": False, "ready": False, "probes": {}}
            if plan[0] == "fail":
                entry.update(reason="RunContainerError", message=plan[2])
            containers.append(entry)
        pod.status.update(managed=True, uid=uuid.uuid4().hex, spec=pod.status.get("spec") or pod_manifest(spec),
                          phase="Pending",
                          reason="ContainerCreating", ready=False, ready_count=f"0/{len(containers)}",
                          restarts=0, ready_since=None, containers=containers)
        prun = _PodRun(spec=spec, runs={c["name"]: _Run() for c in containers}, uid=pod.status["uid"])
        self._pods[pod.key] = prun
        for entry in containers:
            if entry["kind"] != "fail":
                self._start_container(pod, prun, entry, restart=False)
        self._refresh(pod, prun)
        self._touch(pod)

    def sync(self, pod) -> bool:
        """One supervision pass over the pod: see exits, restart what is due, run due
        probes and take in finished ones, and derive the status.  Never waits on a
        probe or a kill.  True when the phase, Ready, the running containers (by PID),
        the STATUS reason or the restart count changed."""
        if not pod.status.get("managed") or pod.status.get("deleting_at") or pod.status.get("terminating"):
            return False
        prun = self._current(pod) or self._adopt(pod)
        if prun is None:
            return False
        before = self._fingerprint(pod)
        prun.passes += 1
        now = self.clock()
        for entry in pod.status["containers"]:
            run = prun.runs.setdefault(entry["name"], _Run())
            if entry.get("kind") == "fail":
                continue
            self._collect_probes(pod, prun, entry, run)
            if entry["state"] == RUNNING:
                self._check_exit(prun, entry, run, now)
            elif run.exit_pass != prun.passes:
                self._maybe_restart(pod, prun, entry, run, now)
            if entry["state"] == RUNNING:
                self._check_startup(entry, run, now)
                self._launch_probes(pod, prun, entry, run, now)
        self._refresh(pod, prun)
        changed = self._fingerprint(pod) != before
        if changed:
            self._touch(pod)
        return changed

    def stop(self, pod, grace: float = 2.0) -> None:
        """Stop the pod: Terminating and not ready first, then each running container's
        process ends (SIGTERM, SIGKILL after ``grace``), by its recorded PID and start time."""
        st = pod.status
        containers = st.get("containers", [])
        st.update(terminating=True, reason="Terminating", ready=False, ready_since=None,
                  ready_count=f"0/{len(containers)}")
        for entry in containers:
            _normalise(entry)
            entry["ready"] = False
        prun = self._current(pod)
        self._pods.pop(pod.key, None)
        for entry in containers:
            if not entry.get("pid") or entry.get("state") != RUNNING:
                continue
            run = prun.runs.get(entry["name"]) if prun else None
            proc = run.proc if run else None
            code = self.runtime.stop(proc, entry["pid"], entry["started"], grace)
            self._exited(entry, code, self.wall(), killed=True)
            if run:
                run.proc = None
            self._release(entry)
        self._touch(pod)

    def wait_ready(self, pods, timeout: float) -> None:
        """Sync until each pod is Ready, or cannot become Ready without a restart or a
        back-off (terminated for good, CrashLoopBackOff, RunContainerError), or
        ``timeout`` seconds have passed (the converge-once path)."""
        deadline = time.monotonic() + timeout
        pending = list(pods)
        while pending:
            for p in pending:
                self.sync(p)
            pending = [p for p in pending if not p.status.get("ready") and not self.hopeless(p)]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.02)

    def hopeless(self, pod) -> bool:
        """Whether waiting for the pod to become Ready is pointless for now: it ended or is
        ending, a container cannot run, waits out a CrashLoopBackOff, or exited for good."""
        st = pod.status
        if st.get("phase") in ("Succeeded", "Failed") or st.get("terminating") or st.get("deleting_at"):
            return True
        policy = self._policy(pod)
        for c in st.get("containers", []):
            if c.get("kind") == "fail" or (c.get("state") == WAITING and c.get("reason") == "CrashLoopBackOff"):
                return True
            if c.get("state") == TERMINATED and not should_restart(policy, c.get("exit_code")):
                return True
        return False

    def close(self) -> None:
        """Shut the probe pool (waits for the probes and kills in flight)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- starting ----------------------------------------------------------------------------
    def _plan(self, spec: o.Pod, c: o.Container) -> Tuple[str, int, str]:
        """(kind, listeners, reason) for a container."""
        from kproxy.workload import images
        if spec.metadata.annotations.get(SYSTEM_ANNOTATION) == "dns":
            return "serve", 2, "cluster DNS"         # it logs "listening udp" and "listening tcp"
        plan = images.plan(container_dict(c, _raw_container(spec, c.name)))
        return plan.kind, len(plan.listeners), plan.reason

    def _argv(self, pod, spec: o.Pod, c: o.Container) -> Optional[List[str]]:
        from kproxy.workload import images
        from kproxy.workload.server import server_argv
        if spec.metadata.annotations.get(SYSTEM_ANNOTATION) == "dns":
            return [sys.executable, "-m", "kproxy.dns.server", "--zone-file", zone_path(self.cluster),
                    "--listen", "0.0.0.0:53"]
        plan = images.plan(container_dict(c, _raw_container(spec, c.name)))
        if plan.kind == "serve":
            return server_argv(pod.name, pod.namespace, pod.node, plan.listeners, text=plan.text)
        if plan.kind == "exec":
            # a manifest's command runs as nobody: it gets the pod's network, not the machine's files
            return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *plan.argv]
        if plan.kind == "idle":
            return ["sleep", "infinity"]
        if plan.kind == "exit":
            return ["true"]                 # the base image's shell, exiting at once without a TTY
        return None

    def _container(self, prun: _PodRun, name: str) -> Optional[o.Container]:
        return next((c for c in prun.spec.spec.containers if c.name == name), None)

    def _start_container(self, pod, prun: _PodRun, entry: dict, restart: bool) -> None:
        """Start (or restart) one container and reset what belongs to a run."""
        c = self._container(prun, entry["name"])
        argv = self._argv(pod, prun.spec, c) if c is not None else None
        run = prun.runs[entry["name"]]
        now, wnow = self.clock(), self.wall()
        if argv is None:
            entry.update(state=WAITING, reason="RunContainerError",
                         message="the container's spec is not known to this kubelet")
            return
        log = entry.get("log") or log_path(self.cluster, pod, entry["name"])
        if restart and os.path.exists(log):
            os.replace(log, log + ".previous")
        try:
            with self._lock:
                proc, pid, started = self.runtime.start(pod, argv, log)
        except OSError as e:
            # a start that fails is a run that ended at once (containerd: StartError, 128)
            entry.update(state=TERMINATED, reason="StartError", message=str(e), exit_code=128,
                         started_at=wnow, finished_at=wnow, ready=False)
            run.started, run.finished, run.exit_pass = now, now, prun.passes
            return
        entry.update(pid=pid, started=started, log=log, state=RUNNING, reason=None, message="",
                     started_at=wnow, backoff_until=None, startup_done=entry["kind"] != "serve",
                     ready=False, probes={})
        run.proc, run.started, run.killing, run.liveness_killed = proc, now, None, False
        run.readiness = self._worker(pr.READINESS, c.readiness_probe, now)
        run.liveness = self._worker(pr.LIVENESS, c.liveness_probe, now)

    def _worker(self, probe_type: str, probe: Optional[dict], started: float,
                initial: Optional[bool] = None) -> Optional[pr.ProbeWorker]:
        if not probe:
            return None
        return pr.ProbeWorker(probe_type, pr.ProbeSpec.parse(probe, probe_type), started, initial)

    # ---- exits and restarts --------------------------------------------------------------
    def _check_exit(self, prun: _PodRun, entry: dict, run: _Run, now: float) -> None:
        code = self.runtime.poll(run.proc, entry["pid"], entry["started"])
        if code is None:
            return
        self._exited(entry, code, self.wall(), killed=run.liveness_killed)
        if run.liveness_killed:
            entry["message"] = f"Container {entry['name']} failed liveness probe"
        run.proc, run.finished, run.exit_pass = None, now, prun.passes
        run.readiness = run.liveness = None
        self._release(entry)

    def _exited(self, entry: dict, code: Optional[int], wnow: float, killed: bool = False) -> None:
        """Record a run's end.  An unreadable status is ContainerStatusUnknown (137),
        unless the kubelet itself ended the process: then it is an Error (137)."""
        if code is None or code == EXIT_UNKNOWN:
            reason, code = ("Error" if killed else "ContainerStatusUnknown"), UNKNOWN_EXIT_CODE
        else:
            reason = "Completed" if code == 0 else "Error"
        entry.update(state=TERMINATED, reason=reason, exit_code=code, finished_at=wnow, ready=False)

    def _maybe_restart(self, pod, prun: _PodRun, entry: dict, run: _Run, now: float) -> None:
        """The kubelet's doBackOff + start for a container that is not running."""
        if entry["state"] == WAITING and entry.get("exit_code") is None:
            return                       # never ran (ContainerCreating / RunContainerError)
        if not should_restart(prun.spec.spec.restart_policy, entry.get("exit_code"), run.liveness_killed):
            return
        finished = run.finished if run.finished is not None else now
        backoff = float(entry.get("backoff") or 0)
        fresh = (not backoff or run.backoff_updated is None
                 or finished - run.backoff_updated > self.backoff_reset)
        if not fresh and now - finished < backoff:
            entry.update(state=WAITING, reason="CrashLoopBackOff",
                         backoff_until=self._wall_of(finished + backoff),
                         message=f"back-off {backoff:g}s restarting failed container={entry['name']} "
                                 f"pod={pod.name}_{pod.namespace}")
            return
        backoff = self.backoff_base if fresh else min(backoff * 2, self.backoff_cap)
        entry.update(backoff=backoff, backoff_updated=self.wall())
        run.backoff_updated = now
        entry["restarts"] = int(entry.get("restarts") or 0) + 1
        self.counters["container_restarts"] += 1
        self._start_container(pod, prun, entry, restart=True)

    def _release(self, entry: dict) -> None:
        if entry.get("pid"):
            with self._lock:
                self.runtime.release(entry["pid"], entry["started"])

    # ---- started and probes ----------------------------------------------------------------
    def _check_startup(self, entry: dict, run: _Run, now: float) -> None:
        """A serve container has started once its log has one "listening " line per listener."""
        if entry.get("startup_done"):
            return
        try:
            with open(entry["log"], errors="replace") as f:
                done = f.read().count("listening ") >= int(entry.get("listeners") or 0)
        except OSError:
            done = False
        if done:
            entry["startup_done"] = True
            for w in (run.readiness, run.liveness):       # probes start from here
                if w is not None:
                    w.next_at = max(w.next_at, now)

    def _target(self, pod, c: o.Container) -> pr.ProbeTarget:
        return pr.ProbeTarget(pod_ip=pod.ip, node_netns=self.cluster.node(pod.node).netns, pod_netns=pod.netns,
                              ports={p.name: p.container_port for p in c.ports if p.name}, image=c.image)

    def _run_probe(self, spec: pr.ProbeSpec, target: pr.ProbeTarget, pod) -> pr.Outcome:
        def start(argv):
            with self._lock:
                return self.runtime.start_exec(pod, argv)

        def finished(proc, started):
            with self._lock:
                self.runtime.release(proc.pid, started)
        return pr.run_probe(spec, target, start, finished)

    def _launch_probes(self, pod, prun: _PodRun, entry: dict, run: _Run, now: float) -> None:
        if not entry.get("startup_done") or run.killing is not None:
            return
        c = self._container(prun, entry["name"])
        for w in (run.liveness, run.readiness):
            if w is not None and w.due(now):
                w.launched(now, self._pool.submit(self.prober, w.spec, self._target(pod, c), pod))

    def _collect_probes(self, pod, prun: _PodRun, entry: dict, run: _Run) -> None:
        """Take in finished probes; a settled liveness failure kills the container."""
        for w in (run.liveness, run.readiness):
            if w is None or w.pending is None or not w.pending.done():
                continue
            fut, w.pending = w.pending, None
            try:
                outcome = fut.result()
            except Exception as e:          # noqa: BLE001 - a broken probe is an error, not a crash
                outcome = pr.Outcome(pr.ERROR, f"probe raised {e!r}")
            key = (w.probe_type, pr.METRIC_RESULT[outcome.result])
            self.counters[key] = self.counters.get(key, 0) + 1
            w.record(outcome)
            entry.setdefault("probes", {})[w.probe_type] = {"ok": w.result, "message": outcome.message[:MESSAGE_MAX]}
        live = run.liveness
        if (live is not None and not live.result and run.killing is None and entry["state"] == RUNNING
                and run.exit_pass != prun.passes):
            run.liveness_killed = True
            entry["message"] = f"Container {entry['name']} failed liveness probe, will be killed"
            run.killing = self._pool.submit(self.runtime.stop, run.proc, entry["pid"], entry["started"],
                                            self.kill_grace)

    # ---- status ------------------------------------------------------------------------------
    def _refresh(self, pod, prun: _PodRun) -> None:
        st = pod.status
        containers = st["containers"]
        for entry in containers:
            run = prun.runs.get(entry["name"])
            ready = (entry.get("state") == RUNNING and bool(entry.get("startup_done"))
                     and run is not None and run.killing is None)
            if ready and run.readiness is not None:
                ready = run.readiness.result
            entry["ready"] = ready
        phase = pod_phase(containers, prun.spec.spec.restart_policy)
        ready = phase == "Running" and bool(containers) and all(c["ready"] for c in containers)
        if ready and not st.get("ready"):
            st["ready_since"] = self.wall()
        elif not ready:
            st["ready_since"] = None
        st.update(phase=phase, ready=ready, ready_count=f"{sum(c['ready'] for c in containers)}/{len(containers)}",
                  restarts=sum(int(c.get("restarts") or 0) for c in containers),
                  reason=status_reason(phase, containers, ready, bool(st.get("terminating"))))

    @staticmethod
    def _fingerprint(pod) -> tuple:
        st = pod.status
        running = frozenset((c["name"], c.get("pid")) for c in st.get("containers", []) if c.get("state") == RUNNING)
        return st.get("phase"), st.get("ready"), running, st.get("reason"), st.get("restarts")

    def _touch(self, pod) -> None:
        touch = getattr(self.cluster, "touch", None)      # a Cluster that merges saves wants to know
        if touch is not None:
            touch(pod.key)

    def _policy(self, pod) -> str:
        prun = self._pods.get(pod.key)
        if prun is not None:
            return prun.spec.spec.restart_policy
        return ((pod.status.get("spec") or {}).get("spec") or {}).get("restartPolicy") or "Always"

    # ---- clocks ------------------------------------------------------------------------------
    def _wall_of(self, t: float) -> float:
        return self.wall() - (self.clock() - t)

    def _mono_of(self, w: Optional[float]) -> Optional[float]:
        return None if w is None else self.clock() - (self.wall() - w)

    # ---- adoption ----------------------------------------------------------------------------
    def _current(self, pod) -> Optional[_PodRun]:
        """This Kubelet's record of the pod, if it is about this very pod (same uid)."""
        prun = self._pods.get(pod.key)
        return prun if prun is not None and prun.uid == pod.status.get("uid") else None

    def _adopt(self, pod, spec: Optional[o.Pod] = None) -> Optional[_PodRun]:
        """Take over a pod another process (or an earlier Kubelet) started: keep each
        container whose recorded PID still has its start time; never start duplicates."""
        st = pod.status
        if not st.get("managed") or "containers" not in st:
            return None
        if spec is None:
            manifest = st.get("spec")
            if manifest:
                spec = spec_from_manifest(manifest)
            else:            # recorded before specs were kept: nothing can be restarted
                spec = o.Pod(metadata=o.ObjectMeta(name=pod.name, namespace=pod.namespace),
                             spec=o.PodSpec(containers=[], restart_policy="Never"))
        now = self.clock()
        prun = _PodRun(spec=spec, runs={}, uid=st.setdefault("uid", uuid.uuid4().hex))
        for entry in st["containers"]:
            _normalise(entry)
            c = self._container(prun, entry["name"])
            run = _Run(started=self._mono_of(entry.get("started_at")) or now,
                       finished=self._mono_of(entry.get("finished_at")),
                       backoff_updated=self._mono_of(entry.get("backoff_updated")))
            if entry["state"] == RUNNING and c is not None:
                run.readiness = self._worker(pr.READINESS, c.readiness_probe, run.started,
                                             initial=bool(entry.get("ready")))
                run.liveness = self._worker(pr.LIVENESS, c.liveness_probe, run.started)
            prun.runs[entry["name"]] = run
        self._pods[pod.key] = prun
        return prun


def _normalise(entry: dict) -> None:
    """Fill in the keys of a container entry recorded by an older kproxy (kind, pid,
    started, log only) or by a process that died half-way."""
    if "state" not in entry:
        if entry.get("pid"):
            entry["state"], entry["reason"] = RUNNING, None
        elif entry.get("kind") == "fail":
            entry["state"], entry["reason"], entry["message"] = WAITING, "RunContainerError", entry.get("reason", "")
        else:
            entry.update(state=TERMINATED, reason="Completed", exit_code=0)
        entry["startup_done"] = entry.get("kind") != "serve"
    for key, default in (("pid", None), ("started", None), ("message", ""), ("exit_code", None),
                         ("started_at", None), ("finished_at", None), ("restarts", 0), ("backoff", 0),
                         ("backoff_updated", None), ("backoff_until", None), ("startup_done", False),
                         ("ready", False), ("probes", {}), ("listeners", 0)):
        entry.setdefault(key, default)
