"""kproxy.probes without a cluster: probe specs and their defaults, port resolution, the
worker's thresholds and schedule, and the handlers' verdicts (HTTP and TCP against a
loopback server with the namespace switch stubbed out; exec with plain local commands)."""
from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import threading

import pytest

from kproxy import probes as pr
from kproxy.kernel import process


# ---- spec -------------------------------------------------------------------------------------

def test_spec_defaults_are_the_apis():
    s = pr.ProbeSpec.parse({"tcpSocket": {"port": 80}})
    assert (s.handler, s.initial_delay, s.period, s.timeout, s.success_threshold, s.failure_threshold) == \
        ("tcpSocket", 0, 10, 1, 1, 3)


def test_spec_reads_every_timing_and_the_handler():
    s = pr.ProbeSpec.parse({"httpGet": {"path": "/h", "port": "http"}, "initialDelaySeconds": 5,
                            "periodSeconds": 2, "timeoutSeconds": 3, "successThreshold": 2,
                            "failureThreshold": 4})
    assert s.handler == "httpGet" and s.action == {"path": "/h", "port": "http"}
    assert (s.initial_delay, s.period, s.timeout, s.success_threshold, s.failure_threshold) == (5, 2, 3, 2, 4)


@pytest.mark.parametrize("probe_type", [pr.LIVENESS, pr.STARTUP])
def test_liveness_and_startup_success_threshold_is_always_one(probe_type):
    assert pr.ProbeSpec.parse({"exec": {"command": ["true"]}, "successThreshold": 3}, probe_type).success_threshold == 1


def test_nonsense_timings_fall_back_to_defaults():
    s = pr.ProbeSpec.parse({"exec": {"command": ["true"]}, "periodSeconds": 0, "timeoutSeconds": "x",
                            "failureThreshold": -1})
    assert (s.period, s.timeout, s.failure_threshold) == (10, 1, 3)


@pytest.mark.parametrize("port, ports, want", [
    (8080, {}, 8080),
    ("http", {"http": 80}, 80),
    ("8081", {}, 8081),                  # a number written as a string, as upstream accepts
])
def test_resolve_port(port, ports, want):
    assert pr.resolve_port(port, ports) == want


@pytest.mark.parametrize("port", ["web", 0, 70000, True, None])
def test_resolve_port_refuses(port):
    with pytest.raises(pr.ProbeError):
        pr.resolve_port(port, {"http": 80})


# ---- the worker ------------------------------------------------------------------------------

def worker(probe_type=pr.READINESS, **timings):
    probe = {"tcpSocket": {"port": 80}}
    probe.update(timings)
    return pr.ProbeWorker(probe_type, pr.ProbeSpec.parse(probe, probe_type), started_at=100.0)


OK, BAD, ERR = pr.Outcome(pr.SUCCESS), pr.Outcome(pr.FAILURE, "refused"), pr.Outcome(pr.ERROR, "bad port")


def test_readiness_starts_failed_liveness_starts_succeeded():
    assert worker(pr.READINESS).result is False
    assert worker(pr.LIVENESS).result is True


def test_success_threshold_needs_consecutive_successes():
    w = worker(successThreshold=2, failureThreshold=3)
    assert [w.record(o) for o in (OK, BAD, OK)] == [False, False, False] and w.result is False
    assert w.record(OK) is True and w.result is True          # two in a row


def test_failure_threshold_needs_consecutive_failures():
    w = worker(failureThreshold=3)
    w.record(OK)
    assert w.result is True
    assert [w.record(o) for o in (BAD, BAD, OK, BAD, BAD)] == [False] * 5 and w.result is True
    assert w.record(BAD) is True and w.result is False         # the third in a row


def test_errors_move_no_threshold():
    w = worker(failureThreshold=2)
    w.record(OK)
    for o in (BAD, ERR, ERR, BAD):
        w.record(o)
    assert w.result is False
    w = worker(failureThreshold=2)
    w.record(OK)
    for o in (BAD, ERR, ERR):
        w.record(o)
    assert w.result is True


def test_a_liveness_failure_puts_the_worker_on_hold():
    w = worker(pr.LIVENESS, failureThreshold=1, periodSeconds=1)
    assert w.record(BAD) is True and w.result is False and w.on_hold
    assert not w.due(10_000.0)


def test_schedule_initial_delay_then_period_one_at_a_time():
    w = worker(initialDelaySeconds=5, periodSeconds=2)
    assert not w.due(104.9) and w.due(105.0)
    w.launched(105.0, future := object())
    assert w.pending is future and not w.due(200.0)          # one probe in flight at a time
    w.pending = None
    assert not w.due(106.9) and w.due(107.0)


# ---- handlers -------------------------------------------------------------------------------

@pytest.fixture
def no_netns(monkeypatch):
    """The handlers enter the node's namespace; here they stay where the test runs and
    talk to a loopback server only."""
    monkeypatch.setattr(pr.cni_netns, "entered", lambda ns: contextlib.nullcontext())


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):
        _Handler.seen.append((self.path, dict(self.headers)))
        code = int(self.path.strip("/").split("/")[0] or 200)
        self.send_response(code)
        if 300 <= code < 400:
            self.send_header("Location", "http://elsewhere.example/")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    _Handler.seen = []
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def target(**kw):
    return pr.ProbeTarget(pod_ip="127.0.0.1", node_netns="node-ns", pod_netns="pod-ns", **kw)


@pytest.mark.parametrize("path, result", [("/200", pr.SUCCESS), ("/302", pr.SUCCESS), ("/399", pr.SUCCESS),
                                          ("/404", pr.FAILURE), ("/500", pr.FAILURE)])
def test_http_status_ranges(no_netns, http_server, path, result):
    spec = pr.ProbeSpec.parse({"httpGet": {"path": path, "port": "web"}, "timeoutSeconds": 5})
    assert pr.run_probe(spec, target(ports={"web": http_server})).result == result


def test_http_sends_headers_and_a_host_header_replaces_the_host(no_netns, http_server):
    spec = pr.ProbeSpec.parse({"httpGet": {"path": "200", "port": http_server, "httpHeaders": [
        {"name": "Host", "value": "example.test"}, {"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 5})
    assert pr.run_probe(spec, target()).ok
    path, headers = _Handler.seen[-1]
    assert path == "/200"
    assert headers["Host"] == "example.test" and headers["X-Probe"] == "1"
    assert headers["User-Agent"].startswith("kube-probe/") and headers["Accept"] == "*/*"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_refused_connections_fail(no_netns):
    port = _closed_port()
    for probe in ({"httpGet": {"port": port}}, {"tcpSocket": {"port": port}}):
        out = pr.run_probe(pr.ProbeSpec.parse(probe), target())
        assert out.result == pr.FAILURE, out


def test_tcp_connect_succeeds(no_netns):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        out = pr.run_probe(pr.ProbeSpec.parse({"tcpSocket": {"port": srv.getsockname()[1]}, "timeoutSeconds": 5}),
                           target())
        assert out.ok, out
    finally:
        srv.close()


def test_http_that_never_answers_times_out(no_netns):
    srv = socket.socket()                       # accepts (backlog) but never answers
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        out = pr.run_probe(pr.ProbeSpec.parse({"httpGet": {"port": srv.getsockname()[1]}, "timeoutSeconds": 1}),
                           target())
        assert out.result == pr.FAILURE
    finally:
        srv.close()


@pytest.mark.parametrize("probe", [{"grpc": {"port": 9000}}, {"httpGet": {"port": "nope"}},
                                   {"tcpSocket": {"port": "nope"}}, {"exec": {"command": []}}, {}])
def test_probes_that_cannot_be_tried_are_errors(probe):
    assert pr.run_probe(pr.ProbeSpec.parse(probe), target()).result == pr.ERROR


def test_exec_command_that_cannot_run_here_fails_without_starting_anything():
    started = []
    out = pr.run_probe(pr.ProbeSpec.parse({"exec": {"command": ["no-such-command-kproxy"]}}), target(image="debian"),
                       start_exec=lambda argv: started.append(argv))
    assert out.result == pr.FAILURE and "executable file not found" in out.message and not started


def test_exec_runs_as_nobody_with_setpriv():
    argv = pr.exec_argv(["cat", "/tmp/healthy"], "debian")
    assert argv[:5] == ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    assert argv[5:] == ["cat", "/tmp/healthy"]


def _local_start(log):
    """An exec-probe starter that runs the command here, without setpriv (no root)."""
    def start(argv):
        argv = argv[5:]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        log.append(("start", proc.pid))
        return proc, process.start_time(proc.pid)
    return start


@pytest.mark.parametrize("command, result", [(["true"], pr.SUCCESS), (["sh", "-c", "echo no; exit 3"], pr.FAILURE)])
def test_exec_exit_status(command, result):
    log = []
    out = pr.run_probe(pr.ProbeSpec.parse({"exec": {"command": command}, "timeoutSeconds": 30}), target(image="debian"),
                       start_exec=_local_start(log), exec_finished=lambda p, s: log.append(("end", p.pid)))
    assert out.result == result, out
    assert [k for k, _ in log] == ["start", "end"]
    if result == pr.FAILURE:
        assert "exited with 3" in out.message and "no" in out.message


def test_exec_still_running_at_the_timeout_is_killed():
    log = []
    out = pr.run_probe(pr.ProbeSpec.parse({"exec": {"command": ["sleep", "60"]}, "timeoutSeconds": 1}),
                       target(image="debian"), start_exec=_local_start(log),
                       exec_finished=lambda p, s: log.append(("end", p.pid)))
    assert out.result == pr.FAILURE and "timed out" in out.message
    pid = log[0][1]
    assert log[-1] == ("end", pid) and process.start_time(pid) is None      # ended and reaped


def test_exec_that_exits_but_leaves_a_child_on_the_pipe_does_not_hang(tmp_path):
    log, pidfile = [], tmp_path / "child.pid"
    out = pr.run_probe(pr.ProbeSpec.parse({"exec": {"command": ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; exit 0"]},
                                           "timeoutSeconds": 1}),
                       target(image="debian"), start_exec=_local_start(log),
                       exec_finished=lambda p, s: log.append(("end", p.pid)))
    child = int(pidfile.read_text())
    started = process.start_time(child)
    if started is not None:
        process.stop(child, started, grace=1.0)        # the child this test made, by PID + start time
    assert out.ok, out
    assert log[-1][0] == "end"
