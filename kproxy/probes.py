"""Container probes as the kubelet runs them: the probe spec with the API's defaults, the
three handlers (httpGet, tcpSocket, exec) and the per-container worker that turns single
results into the settled result through the thresholds.

Spec (:class:`ProbeSpec`, from a container's ``readinessProbe``/``livenessProbe`` map)
------------------------------------------------------------------------------------
=======================  =======  ===============================================
field                    default  meaning
=======================  =======  ===============================================
initialDelaySeconds      0        no probe before the container ran this long
periodSeconds            10       one probe every period
timeoutSeconds           1        a probe that takes longer has failed
successThreshold         1        consecutive successes that make it succeed
                                  (the API requires 1 for liveness and startup)
failureThreshold         3        consecutive failures that make it fail
=======================  =======  ===============================================

Handlers (:func:`run_probe`)
----------------------------
* ``httpGet``: ``GET scheme://host:port/path``; ``host`` defaults to the pod IP, ``scheme``
  to HTTP (HTTPS does not verify the certificate, as the kubelet does not), ``httpHeaders``
  are sent (a ``Host`` header replaces the Host), with ``User-Agent: kube-probe/1.30`` and
  ``Accept: */*`` unless given. Any status from 200 to 399 is a success; redirects are
  not followed (a 3xx is already a success, which is what the kubelet reports for a
  redirect off the pod too).
* ``tcpSocket``: a TCP connect to ``host`` (default the pod IP) and the port; connected is
  success.
* ``exec``: the command runs in the pod's network namespace as user nobody (``setpriv``),
  as the kubelet runs it inside the container; exit 0 is success, and a command still
  running at ``timeoutSeconds`` is killed and fails. The command is resolved the way
  :func:`kproxy.workload.images.runs_command` resolves a container's (a busybox image
  gets busybox applets); a command that cannot run here fails the probe, as an
  ``executable file not found`` does under a real runtime. Note that the command sees
  this machine's files: pods share one filesystem here.

``port`` is a number or the name of one of the container's ``ports`` (a string of digits
is taken as a number, as upstream's ``ResolveContainerPort`` does).  The kubelet probes
from the node, not from inside the pod: httpGet and tcpSocket connect from the pod's
*node* network namespace (a pool thread enters it with ``setns``; the machine's own
namespace is never used).

A probe either succeeds, fails, or *errors* when it cannot even be tried (a port name
the container does not declare, a handler kproxy does not emulate such as ``grpc``): as
in the kubelet's worker, an error is thrown away and moves no threshold; it is counted
under ``unknown``.

The worker (:class:`ProbeWorker`)
---------------------------------
One per container and probe type, as the kubelet's prober worker:

* the first probe is due ``initialDelaySeconds`` after the container started (for the
  kubelet, the first periodic tick after that; here exactly then), then every
  ``periodSeconds``; one probe at a time;
* a result counts towards a run of equal results; the settled result changes only when
  the run reaches ``successThreshold`` (success) or ``failureThreshold`` (failure);
* the settled result starts as failure for readiness (not Ready until the probe says so)
  and success for liveness;
* a liveness (or startup) failure puts the worker on hold: nothing more is probed until
  the container is restarted, which gives a new worker.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from cni import netns as cni_netns
from kproxy.kernel import process

READINESS = "readiness"
LIVENESS = "liveness"
STARTUP = "startup"

SUCCESS = "success"
FAILURE = "failure"
ERROR = "error"

#: prober_probe_total's ``result`` label for each outcome.
METRIC_RESULT = {SUCCESS: "successful", FAILURE: "failed", ERROR: "unknown"}

USER_AGENT = "kube-probe/1.30"
MAX_BODY = 10 * 1024
NOBODY = "65534"


class ProbeError(ValueError):
    """A probe that cannot be tried (bad port name, unsupported handler)."""


@dataclass(frozen=True)
class ProbeSpec:
    """A probe with the API's defaults applied (see the module docstring)."""

    handler: str                       # "httpGet", "tcpSocket", "exec", or another (unsupported)
    action: Mapping[str, Any]
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def parse(cls, probe: Mapping[str, Any], probe_type: str = READINESS) -> "ProbeSpec":
        handler, action = "", {}
        for name in ("exec", "httpGet", "tcpSocket", "grpc"):
            if isinstance(probe.get(name), Mapping):
                handler, action = name, probe[name]
                break

        def num(key: str, default: float, least: float) -> float:
            try:
                value = float(probe.get(key, default))
            except (TypeError, ValueError):
                return default
            return value if value >= least else default

        success = int(num("successThreshold", 1, 1))
        if probe_type in (LIVENESS, STARTUP):
            success = 1                 # the API rejects anything else for these
        return cls(handler=handler, action=dict(action),
                   initial_delay=num("initialDelaySeconds", 0, 0), period=num("periodSeconds", 10, 1),
                   timeout=num("timeoutSeconds", 1, 1), success_threshold=success,
                   failure_threshold=int(num("failureThreshold", 3, 1)))


@dataclass(frozen=True)
class Outcome:
    result: str              # SUCCESS, FAILURE or ERROR
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


@dataclass(frozen=True)
class ProbeTarget:
    """Where a probe goes: the pod (IP, network namespace), its node's namespace, and
    the container's declared ports and image (for named ports and exec commands)."""

    pod_ip: str
    node_netns: str
    pod_netns: str
    ports: Mapping[str, int] = field(default_factory=dict)     # container port name -> number
    image: str = ""


def resolve_port(port: Any, ports: Mapping[str, int]) -> int:
    """A probe's ``port``: a number, or the name of one of the container's ports."""
    if isinstance(port, bool):
        raise ProbeError(f"invalid port {port!r}")
    if isinstance(port, int):
        number = port
    else:
        name = str(port)
        if name in ports:
            number = ports[name]
        else:
            try:
                number = int(name)
            except ValueError:
                raise ProbeError(f"port {name!r} is not a container port name") from None
    if not 0 < number < 65536:
        raise ProbeError(f"invalid port number: {number}")
    return number


# ---- handlers -----------------------------------------------------------------------------

def tcp_probe(node_netns: str, host: str, port: int, timeout: float) -> Outcome:
    """Connect from the node's namespace; connected is success."""
    try:
        with cni_netns.entered(node_netns):
            sock = socket.create_connection((host, port), timeout=timeout)
        sock.close()
    except OSError as e:
        return Outcome(FAILURE, f"dial tcp {host}:{port}: {e.strerror or e}")
    return Outcome(SUCCESS)


def http_probe(node_netns: str, scheme: str, host: str, port: int, path: str,
               headers: Sequence[Mapping[str, Any]], timeout: float) -> Outcome:
    """GET from the node's namespace; a 200-399 status is success."""
    if not path.startswith("/"):
        path = "/" + path
    send: Dict[str, str] = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    for h in headers or ():
        if isinstance(h, Mapping) and h.get("name"):
            send[str(h["name"])] = str(h.get("value", ""))
    url = f"{scheme.lower()}://{host}:{port}{path}"
    try:
        if scheme.upper() == "HTTPS":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            with cni_netns.entered(node_netns):
                conn.connect()            # the socket is made, and stays, in the node's namespace
            conn.putrequest("GET", path, skip_host="Host" in send, skip_accept_encoding=True)
            for k, v in send.items():
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read(MAX_BODY)
            status = resp.status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:
        return Outcome(FAILURE, f"Get {url!r}: {getattr(e, 'strerror', None) or e}")
    if 200 <= status < 400:
        return Outcome(SUCCESS, f"HTTP probe succeeded with statuscode: {status}")
    return Outcome(FAILURE, f"HTTP probe failed with statuscode: {status}")


def exec_probe(start: Callable[[List[str]], "tuple[subprocess.Popen, int]"], argv: List[str],
               timeout: float, finished: Optional[Callable[[subprocess.Popen, int], None]] = None) -> Outcome:
    """Run ``argv`` with ``start`` (which returns the Popen and its recorded start time),
    wait up to ``timeout``; exit 0 is success; a command still running is killed."""
    try:
        proc, started = start(argv)
    except OSError as e:
        return Outcome(FAILURE, f"exec {argv[0]!r}: {e}")
    try:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if proc.poll() is None:
                process.stop_child(proc, started, grace=0.0)
                _drain(proc)
                return Outcome(FAILURE, f"command {argv!r} timed out after {timeout:g}s")
            out = _drain(proc)          # it exited; something it started still holds the pipe
    finally:
        if finished is not None:
            finished(proc, started)
    text = (out or b"")[:MAX_BODY].decode(errors="replace").strip()
    if proc.returncode == 0:
        return Outcome(SUCCESS, text)
    return Outcome(FAILURE, f"command {argv!r} exited with {process.exit_status(proc.returncode)}: {text}")


def _drain(proc: subprocess.Popen) -> bytes:
    """What is left of a probe's output, without waiting on a child it left behind."""
    try:
        out, _ = proc.communicate(timeout=1.0)
        return out or b""
    except subprocess.TimeoutExpired:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()
        return b""


def exec_argv(command: Sequence[Any], image: str) -> Optional[List[str]]:
    """The argv an exec probe runs here (as nobody), or None when it cannot run."""
    from kproxy.workload import images
    argv = images.runs_command({"image": image, "command": [str(c) for c in command]})
    if argv is None:
        return None
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]


def run_probe(spec: ProbeSpec, target: ProbeTarget,
              start_exec: Optional[Callable[[List[str]], "tuple[subprocess.Popen, int]"]] = None,
              exec_finished: Optional[Callable[[subprocess.Popen, int], None]] = None) -> Outcome:
    """Run one probe and say how it went (never raises for a probe's own failure).

    ``start_exec(argv)`` starts an exec probe's command in the pod (the kubelet passes
    one that goes through Cluster.start_process, so it is journaled); ``exec_finished``
    is told when it has ended."""
    a = spec.action
    try:
        if spec.handler == "tcpSocket":
            port = resolve_port(a.get("port"), target.ports)
            return tcp_probe(target.node_netns, str(a.get("host") or target.pod_ip), port, spec.timeout)
        if spec.handler == "httpGet":
            port = resolve_port(a.get("port"), target.ports)
            scheme = str(a.get("scheme") or "HTTP")
            if scheme.upper() not in ("HTTP", "HTTPS"):
                raise ProbeError(f"unsupported scheme {scheme!r}")
            return http_probe(target.node_netns, scheme, str(a.get("host") or target.pod_ip), port,
                              str(a.get("path") or "/"), a.get("httpHeaders") or [], spec.timeout)
        if spec.handler == "exec":
            command = a.get("command") or []
            if not command:
                raise ProbeError("exec probe without a command")
            argv = exec_argv(command, target.image)
            if argv is None:
                return Outcome(FAILURE, f'exec: "{command[0]}": executable file not found in $PATH')
            if start_exec is None:
                raise ProbeError("no way to run an exec probe")
            return exec_probe(start_exec, argv, spec.timeout, exec_finished)
        raise ProbeError(f"{spec.handler or 'a probe without a handler'} is not emulated")
    except ProbeError as e:
        return Outcome(ERROR, str(e))


# ---- the worker ---------------------------------------------------------------------------

class ProbeWorker:
    """The thresholds and schedule of one probe of one container run (module docstring).

    Times are the kubelet's clock (monotonic seconds).  ``result`` is the settled result."""

    def __init__(self, probe_type: str, spec: ProbeSpec, started_at: float,
                 initial: Optional[bool] = None):
        self.probe_type = probe_type
        self.spec = spec
        self.result: bool = (probe_type != READINESS) if initial is None else initial
        self.next_at = started_at + spec.initial_delay
        self.last_ok: Optional[bool] = None     # the run: its value and length
        self.run = 0
        self.on_hold = False
        self.pending = None                     # a Future while a probe is in flight
        self.message = ""

    def due(self, now: float) -> bool:
        return not self.on_hold and self.pending is None and now >= self.next_at

    def launched(self, now: float, future) -> None:
        self.pending = future
        self.next_at = now + self.spec.period

    def record(self, outcome: Outcome) -> bool:
        """Count one finished probe; returns True when the settled result changed."""
        self.message = outcome.message
        if outcome.result == ERROR:
            return False
        ok = outcome.ok
        if ok == self.last_ok:
            self.run += 1
        else:
            self.last_ok, self.run = ok, 1
        needed = self.spec.success_threshold if ok else self.spec.failure_threshold
        if self.run < needed:
            return False
        changed = ok != self.result
        self.result = ok
        if not ok and self.probe_type in (LIVENESS, STARTUP):
            self.on_hold = True
            self.run = 0
        return changed
