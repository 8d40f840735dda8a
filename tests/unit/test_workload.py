"""kproxy.workload: the image table, command detection, the built-in server and its client.

No root needed. Every socket here is on 127.0.0.1, with ports chosen by the OS.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from kproxy.workload import images
from kproxy.workload.client import http_get, parse_facts, tcp_banner, tcp_echo, udp_ask
from kproxy.workload.images import (Listener, image_name, listeners_for, lookup, plan,
                                    runs_command)
from kproxy.workload.server import server_argv

from tests.conftest import SEED  # noqa: E402
LOCAL = "127.0.0.1"


def ports(container):
    return [(l.port, l.protocol, l.http) for l in listeners_for(container)]


# -- image names and the table --------------------------------------------------------

@pytest.mark.parametrize("ref, name", [
    ("nginx", "nginx"),
    ("nginx:1.21.6", "nginx"),
    ("docker.io/library/nginx:1.21", "nginx"),
    ("library/nginx", "nginx"),
    ("nginx@sha256:0123abcd", "nginx"),
    ("docker.io/library/nginx:1.21@sha256:0123abcd", "nginx"),
    ("quay.io/bitnami/wordpress", "bitnami/wordpress"),
    ("docker.io/bitnami/nginx:1.25", "bitnami/nginx"),
    ("localhost:5000/team/app:v1", "team/app"),
    ("localhost/app", "app"),
    ("registry.example.com:5000/team/app:v1", "team/app"),
    ("hashicorp/http-echo", "hashicorp/http-echo"),
    ("Docker.io/Library/Nginx:Latest", "nginx"),
])
def test_image_name_strips_registry_tag_digest(ref, name):
    assert image_name(ref) == name


@pytest.mark.parametrize("image, expected", [
    ("nginx", [(80, "TCP", True)]),
    ("httpd:2.4", [(80, "TCP", True)]),
    ("bitnami/nginx", [(8080, "TCP", True), (8443, "TCP", False)]),
    ("quay.io/bitnami/wordpress", [(8080, "TCP", True), (8443, "TCP", False)]),
    ("bitnami/mariadb:latest", [(3306, "TCP", False)]),
    ("ghost:2.6-alpine", [(2368, "TCP", True)]),
    ("wordpress:5.9-apache", [(80, "TCP", True)]),
    ("mysql:5.6", [(3306, "TCP", False)]),
    ("docker.io/library/mariadb:latest", [(3306, "TCP", False)]),
    ("postgres:16", [(5432, "TCP", False)]),
    ("redis", [(6379, "TCP", False)]),
    ("memcached", [(11211, "TCP", False)]),
    ("mongo:7", [(27017, "TCP", False)]),
    ("hashicorp/http-echo", [(5678, "TCP", True)]),
    ("nicholasjackson/fake-service:vm-v1.10.7-v0.22.7", [(9090, "TCP", True)]),
    ("linuxacademycontent/store-products:1.0.0", [(80, "TCP", True)]),
    ("scottsbaldwin/docker-hello-world:latest", [(80, "TCP", True)]),
    ("strm/helloworld-http:latest", [(80, "TCP", True)]),
    ("openshift/hello-openshift:latest", [(8080, "TCP", True), (8888, "TCP", True)]),
    ("busybox:1.28.4", []),
    ("debian", []),
    ("alpine:3.19", []),
    ("ubuntu:22.04", []),
])
def test_table_listeners(image, expected):
    assert ports({"image": image}) == expected
    assert lookup(image) is not None


def test_declared_port_does_not_open_what_the_image_does_not_listen_on():
    # UltimaSesion/NodePort: bitnami/nginx declared on 80, listens on 8080 (and 8443) only.
    c = {"image": "bitnami/nginx", "ports": [{"containerPort": 80}]}
    got = [l.port for l in listeners_for(c)]
    assert got == [8080, 8443]
    assert 80 not in got
    # Sesion3-Podman: the mariadb container carries containerPort 80; mariadb listens on 3306.
    c = {"image": "docker.io/library/mariadb:latest", "args": ["mariadbd"],
         "ports": [{"containerPort": 80, "hostPort": 8080}]}
    assert ports(c) == [(3306, "TCP", False)]


def test_unknown_image_listens_on_declared_ports():
    c = {"image": "example.com/acme/thing:1.0", "ports": [
        {"containerPort": 8080},                                  # number says http
        {"containerPort": 9000, "name": "http-api"},              # name says http
        {"containerPort": 9001, "name": "metrics"},               # banner
        {"containerPort": 7000, "appProtocol": "http"},           # appProtocol says http
        {"containerPort": 8443, "name": "https"},                 # TLS: banner
        {"containerPort": 80, "name": "https"},                   # name wins over number
        {"containerPort": 53, "protocol": "UDP", "name": "dns"},
        {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"},
        {"containerPort": 8080},                                  # duplicate, dropped
        {"containerPort": "<Port>"},                              # the course's template
    ]}
    assert ports(c) == [(8080, "TCP", True), (9000, "TCP", True), (9001, "TCP", False),
                        (7000, "TCP", True), (8443, "TCP", False), (80, "TCP", False),
                        (53, "UDP", False), (53, "TCP", False)]
    assert listeners_for({"image": "acme/none"}) == []


def test_port_settings_in_env_and_args():
    c = {"image": "bitnami/nginx", "env": [{"name": "NGINX_HTTP_PORT_NUMBER", "value": "80"}]}
    assert ports(c) == [(80, "TCP", True), (8443, "TCP", False)]
    c = {"image": "openshift/hello-openshift", "env": [{"name": "PORT", "value": "9000"}]}
    assert ports(c) == [(9000, "TCP", True), (8888, "TCP", True)]
    c = {"image": "nicholasjackson/fake-service", "env": [{"name": "LISTEN_ADDR", "value": "0.0.0.0:9191"}]}
    assert ports(c) == [(9191, "TCP", True)]
    c = {"image": "hashicorp/http-echo", "args": ["-listen=:8080", "-text=hi"]}
    assert ports(c) == [(8080, "TCP", True)]
    # valueFrom is not resolved: the default stays.
    c = {"image": "bitnami/mariadb", "env": [{"name": "MARIADB_PORT_NUMBER",
                                               "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}]}
    assert ports(c) == [(3306, "TCP", False)]


def test_listener_spec_round_trip():
    for l in [Listener(80, "TCP", True), Listener(3306), Listener(53, "UDP"), Listener(9, "SCTP")]:
        assert Listener.parse(l.spec) == Listener(l.port, l.protocol, l.http)
    assert Listener(80, "TCP", True).spec == "tcp:80:http"
    assert Listener(53, "UDP").spec == "udp:53"
    for bad in ["tcp", "icmp:1", "tcp:x", "tcp:80:tls", "udp:53:http", "tcp:70000"]:
        with pytest.raises(ValueError):
            Listener.parse(bad)


# -- commands -------------------------------------------------------------------------

def test_command_runs_as_given_and_the_image_then_serves_nothing():
    c = {"image": "nginx", "command": ["sleep", "3600"]}
    assert runs_command(c) == ["sleep", "3600"]
    assert listeners_for(c) == []
    c = {"image": "debian", "command": ["/bin/sh"], "args": ["-c", "echo hi > /dev/null"]}
    assert runs_command(c) == ["/bin/sh", "-c", "echo hi > /dev/null"]
    c = {"image": "busybox", "args": ["echo", "hello"]}  # args alone replace the CMD
    assert runs_command(c) == ["echo", "hello"]


def test_http_echo_args_are_flags_not_a_command():
    c = {"image": "hashicorp/http-echo", "args": ["-text=apple"]}
    assert runs_command(c) is None
    assert images.http_echo_text(c) == "apple"
    assert images.http_echo_text({"image": "hashicorp/http-echo", "args": ["--text", "two words"]}) == "two words"
    assert images.http_echo_text({"image": "nginx", "args": ["-text=x"]}) is None
    p = plan(c)
    assert (p.kind, p.text, [l.spec for l in p.listeners]) == ("serve", "apple", ["tcp:5678:http"])


def test_the_images_own_server_command_is_emulated_not_run():
    for c in [{"image": "docker.io/library/wordpress:latest", "args": ["apache2-foreground"]},
              {"image": "docker.io/library/mariadb:latest", "args": ["mariadbd"]},
              {"image": "nginx", "command": ["nginx", "-g", "daemon off;"]},
              {"image": "redis", "command": ["redis-server", "--appendonly", "yes"]}]:
        assert runs_command(c) is None, c
        assert plan(c).kind == "serve"
    # A command that does not exist here, on a server image: the image is emulated.
    c = {"image": "nginx", "command": ["/no/such/entrypoint"]}
    assert runs_command(c) is None
    assert ports(c) == [(80, "TCP", True)]


@pytest.mark.skipif(not shutil.which("busybox"), reason="no busybox on this machine")
def test_busybox_userland():
    # busybox has wget but no curl (the course notes' `kubectl exec busybox -- curl` fails).
    c = {"image": "busybox:1.28.4", "command": ["curl", "-s", "store-products"]}
    assert runs_command(c) is None
    p = plan(c)
    assert p.kind == "fail" and "curl" in p.reason
    w = runs_command({"image": "busybox", "command": ["wget", "-qO-", "apple-service:5678"]})
    expect = ["wget", "-qO-", "apple-service:5678"]
    assert w == (expect if shutil.which("wget") else ["busybox"] + expect)
    # An applet that this machine has no program for runs through busybox.
    missing = sorted(a for a in images._busybox_applets() if not shutil.which(a) and a.isalpha())
    if missing:
        applet = missing[0]
        assert runs_command({"image": "debian", "command": [applet, "x"]}) == ["busybox", applet, "x"]
        assert runs_command({"image": "busybox", "command": [applet]}) == ["busybox", applet]


def test_unresolvable_commands_and_plans():
    assert runs_command({"image": "debian", "command": ["/definitely/not/here"]}) is None
    assert plan({"image": "debian", "command": ["/definitely/not/here"]}).kind == "fail"
    assert plan({"image": "busybox"}).kind == "exit"
    assert plan({"image": "busybox", "stdin": True, "tty": True}).kind == "idle"
    assert plan({"image": "acme/unknown"}).kind == "idle"
    assert plan({"image": "acme/unknown", "command": ["/app/run"], "ports": [{"containerPort": 8080}]}).kind == "serve"
    assert plan({"image": "nginx", "command": ["sleep", "1"]}).argv == ["sleep", "1"]


def _seed_containers():
    """(relative path, pod or deployment name, container) for every container in the seed."""
    out = []
    for path in sorted(SEED.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec") or {}
            if doc.get("kind") == "Deployment":
                spec = ((spec.get("template") or {}).get("spec")) or {}
            elif doc.get("kind") != "Pod":
                continue
            for c in spec.get("containers") or ():
                out.append((str(path.relative_to(SEED)), doc["metadata"]["name"], c))
    return out


@pytest.mark.skipif(not SEED.is_dir(), reason="seed exercise not present")
def test_every_seed_container():
    expected = {
        ("wordpress-mysql", "mysql"): ("serve", ["tcp:3306"]),
        ("wordpress", "wordpress"): ("serve", ["tcp:80:http"]),            # Stateful-app, Kubernetes II
        ("store-products", "store-products"): ("serve", ["tcp:80:http"]),
        ("busybox", "busybox"): ("exec", None),
        ("nginx", "nginx"): ("exec", None),                                # command: sleep 3600
        ("busybox-sleep", "busybox"): ("exec", None),
        ("busybox-sleep-less", "busybox"): ("exec", None),
        ("two-containers", "nginx-container"): ("serve", ["tcp:80:http"]),
        ("two-containers", "debian-container"): ("exec", None),
        ("docker-hello-world", "docker-hello-world"): ("serve", ["tcp:80:http"]),
        ("hello-world-http", "hello-world-http"): ("serve", ["tcp:80:http"]),
        ("fake-service", "fake-service"): ("serve", ["tcp:9090:http"]),
        ("myapp", "myapp"): ("idle", None),                                 # <Image>, <Port>
        ("apple-app", "apple-app"): ("serve", ["tcp:5678:http"]),
        ("banana-app", "banana-app"): ("serve", ["tcp:5678:http"]),
        ("my-nginx", "my-nginx"): ("serve", ["tcp:8080:http", "tcp:8443"]),
        ("blog", "blog"): ("serve", ["tcp:2368:http"]),
        ("wordpress-pod2", "wp-db"): ("serve", ["tcp:3306"]),
        ("wordpress-pod2", "wp-web"): ("serve", ["tcp:80:http"]),
        ("wordpress-mariadb", "mariadb"): ("serve", ["tcp:3306"]),
        ("hello-openshift", "hello-openshift"): ("serve", ["tcp:8080:http", "tcp:8888:http"]),
    }
    seen = set()
    for path, owner, c in _seed_containers():
        key = (owner, c["name"])
        if key == ("wordpress", "wordpress") and "OpenShift" in path:
            kind, specs = "serve", ["tcp:8080:http", "tcp:8443"]           # quay.io/bitnami/wordpress
        else:
            assert key in expected, (path, key)
            kind, specs = expected[key]
        p = plan(c)
        assert p.kind == kind, (path, key, p)
        if specs is not None:
            assert [l.spec for l in p.listeners] == specs, (path, key)
        seen.add(key)
    assert seen == set(expected)
    texts = {owner: plan(c).text for _, owner, c in _seed_containers() if owner in ("apple-app", "banana-app")}
    assert texts == {"apple-app": "apple", "banana-app": "banana"}


@pytest.mark.skipif(not SEED.is_dir(), reason="seed exercise not present")
@pytest.mark.parametrize("rel, service, answers", [
    ("UltimaSesion/NodePort/nodeport.yaml", "my-nginx", False),                 # 80 vs 8080
    ("Sesion15-Introducción a Helm/Ejercicio1", "blog", False),                  # 2326 vs 2368
    ("Sesion4-Kubernetes/test/apple.yaml", "apple-service", True),
    ("Sesion4-Kubernetes/Ejercicios/Ejercicio1", "store-products", True),
    ("Sesion4-Kubernetes/Stateful-app", "wordpress", True),                     # 8080 -> 80
    ("Sesion4-Kubernetes/Kubernetes II/rollingupdate/beebox-web.yaml", "fake-service-svc", True),
    ("Sesion4-Kubernetes/Kubernetes II/ingress/app.yaml", "docker-hello-world-svc", True),
])
def test_seed_service_target_ports(rel, service, answers):
    """A Service's targetPort against what its selected pods listen on."""
    root = SEED / rel
    files = [root] if root.is_file() else sorted(root.glob("*.yaml"))
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == service)
    sel = svc["spec"]["selector"]
    pods = []
    for d in docs:
        if d["kind"] == "Deployment":
            meta, spec = d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            meta, spec = d["metadata"], d["spec"]
        else:
            continue
        if all((meta.get("labels") or {}).get(k) == v for k, v in sel.items()):
            pods.append(spec)
    assert pods
    for sp in svc["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        listening = {l.port for c in pods[0]["containers"] for l in listeners_for(c)}
        assert (target in listening) is answers, (service, target, listening)


# -- the server ----------------------------------------------------------------------

class Running:
    def __init__(self, proc, ports, errpath):
        self.proc, self.ports, self.errpath = proc, ports, errpath

    def stderr(self):
        return pathlib.Path(self.errpath).read_text()


@pytest.fixture
def start_server(tmp_path):
    procs = []

    def start(*listen, extra=(), wait=True):
        errpath = tmp_path / f"server{len(procs)}.err"
        argv = [sys.executable, "-m", "kproxy.workload.server", "--pod", "web-1", "--namespace", "shop",
                "--node", "node-a", "--bind", LOCAL, *[a for l in listen for a in ("--listen", l)], *extra]
        with open(errpath, "w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err,
                                    cwd=str(pathlib.Path(__file__).resolve().parents[2]))
        procs.append(proc)
        if not wait:
            return Running(proc, [], errpath)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [l for l in errpath.read_text().splitlines() if l.startswith("listening ")]
            if len(lines) == len(listen):
                ports = [int(l.split()[2].rsplit(":", 1)[1]) for l in lines]
                return Running(proc, ports, errpath)
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {errpath.read_text()}")
            time.sleep(0.02)
        raise AssertionError("server did not start: " + errpath.read_text())

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _bound_client(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind((LOCAL, 0))
    return s, s.getsockname()[1]


def _http_exchange(sock, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_http_facts_show_pod_and_the_client_port(start_server):
    srv = start_server("tcp:0:http")
    port = srv.ports[0]
    s, cport = _bound_client()
    try:
        s.settimeout(3)
        s.connect((LOCAL, port))
        raw = _http_exchange(s, b"GET /hello?x=1 HTTP/1.1\r\nHost: svc.example\r\nConnection: close\r\n\r\n")
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" in head
    facts = parse_facts(body)
    assert facts["pod"] == "web-1" and facts["ns"] == "shop" and facts["node"] == "node-a"
    assert facts["ip"] == LOCAL and facts["port"] == port
    assert facts["client"] == f"{LOCAL}:{cport}"
    assert (facts["client_ip"], facts["client_port"]) == (LOCAL, cport)
    assert facts["path"] == "/hello?x=1" and facts["method"] == "GET" and facts["host"] == "svc.example"
    header = [l for l in head.decode().split("\r\n") if l.lower().startswith("x-kproxy-facts:")][0]
    assert parse_facts(header.split(":", 1)[1]) == {k: facts[k] for k in
                                                    ("pod", "ns", "ip", "node", "port", "client", "client_ip", "client_port")}


def test_http_client_helper_and_json(start_server):
    srv = start_server("tcp:0:http")
    port = srv.ports[0]
    s, cport = _bound_client()  # a port the OS just handed out, released for http_get to bind
    s.close()
    status, headers, body = http_get(LOCAL, port, "/json", source_port=cport)
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["client_port"] == cport and doc["port"] == port and doc["namespace"] == "shop"
    assert parse_facts(body)["client_port"] == cport
    status, headers, body = http_get(LOCAL, port, "/", headers={"Accept": "application/json"})
    assert headers["content-type"] == "application/json" and json.loads(body)["pod"] == "web-1"
    status, headers, body = http_get(LOCAL, port, "/")
    assert headers["content-type"].startswith("text/plain") and parse_facts(body)["pod"] == "web-1"
    assert http_get(LOCAL, port, "/healthz")[2] == "ok\n"
    status, headers, body = http_get(LOCAL, port, "/", method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 0


def test_http_keep_alive_pipelining_and_bodies(start_server):
    srv = start_server("tcp:0:http")
    s = socket.create_connection((LOCAL, srv.ports[0]), timeout=3)
    try:
        cport = s.getsockname()[1]
        # Two pipelined requests, the first with a body to be discarded; then a third that closes.
        s.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
        raw = _http_exchange(s, b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        s.close()
    responses = raw.split(b"HTTP/1.1 200 OK")[1:]
    assert len(responses) == 3
    paths = [parse_facts(r.partition(b"\r\n\r\n")[2])["path"] for r in responses]
    assert paths == ["/a", "/b", "/c"]
    assert all(parse_facts(r.partition(b"\r\n\r\n")[2])["client_port"] == cport for r in responses)
    assert b"Connection: keep-alive" in responses[0] and b"Connection: close" in responses[2]


def test_http_bad_request(start_server):
    srv = start_server("tcp:0:http")
    s = socket.create_connection((LOCAL, srv.ports[0]), timeout=3)
    try:
        raw = _http_exchange(s, b"NONSENSE\r\n\r\n")
    finally:
        s.close()
    assert raw.startswith(b"HTTP/1.1 400 ")


def test_http_echo_text_mode(start_server):
    srv = start_server("tcp:0:http", extra=("--text", "apple"))
    port = srv.ports[0]
    status, headers, body = http_get(LOCAL, port, "/anything")
    assert (status, body) == (200, "apple\n")
    assert parse_facts(headers["x-kproxy-facts"])["pod"] == "web-1"
    assert http_get(LOCAL, port, "/json")[2] == "apple\n"
    assert http_get(LOCAL, port, "/healthz")[2] == "ok\n"
    with pytest.raises(ValueError):
        parse_facts(body)


def test_tcp_banner_and_echo(start_server):
    srv = start_server("tcp:0", "tcp:0:http")
    port = srv.ports[0]
    s, cport = _bound_client()
    try:
        s.settimeout(3)
        s.connect((LOCAL, port))
        f = s.makefile("rwb")
        banner = f.readline().decode()
        f.write(b"first line\nsecond\n")
        f.flush()
        assert f.readline() == b"first line\n" and f.readline() == b"second\n"
        s.shutdown(socket.SHUT_WR)
        assert f.read() == b""  # the server closes after the client does
    finally:
        s.close()
    assert banner == f"pod=web-1 ns=shop ip={LOCAL} node=node-a port={port} client={LOCAL}:{cport}\n"
    facts = parse_facts(banner)
    assert (facts["port"], facts["client_port"]) == (port, cport)
    assert parse_facts(tcp_banner(LOCAL, port))["pod"] == "web-1"
    banner, echoed = tcp_echo(LOCAL, port, "ping\n")
    assert echoed == b"ping\n" and parse_facts(banner)["ns"] == "shop"


def test_udp_echo(start_server):
    srv = start_server("udp:0")
    port = srv.ports[0]
    s, cport = _bound_client(socket.SOCK_DGRAM)
    try:
        s.settimeout(3)
        s.sendto(b"hello\npod=evil", (LOCAL, port))
        reply, src = s.recvfrom(65535)
    finally:
        s.close()
    assert src == (LOCAL, port)
    line, _, payload = reply.partition(b"\n")
    assert payload == b"hello\npod=evil"
    facts = parse_facts(reply)
    assert (facts["pod"], facts["ip"], facts["port"], facts["client_port"]) == ("web-1", LOCAL, port, cport)
    assert udp_ask(LOCAL, port, "x").endswith(b"\nx")


def test_sigterm_exits_zero_within_one_second(start_server):
    srv = start_server("tcp:0:http", "tcp:0", "udp:0")
    held = [socket.create_connection((LOCAL, p), timeout=3) for p in srv.ports[:2]]
    try:
        held[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive connection left open
        held[1].recv(200)                                        # banner read, connection left open
        time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        rc = srv.proc.wait(timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        assert rc == 0
    finally:
        for s in held:
            s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCAL, srv.ports[0]), timeout=1).close()


def test_burst_of_300_sequential_connections(start_server):
    srv = start_server("tcp:0:http", "tcp:0")
    http_port, tcp_port = srv.ports
    t0 = time.monotonic()
    answered = set()
    for i in range(300):
        status, _, body = http_get(LOCAL, http_port, f"/n{i}")
        facts = parse_facts(body)
        assert status == 200 and facts["path"] == f"/n{i}"
        answered.add(facts["client_port"])
    elapsed = time.monotonic() - t0
    assert len(answered) == 300  # 300 distinct connections
    assert elapsed < 15, elapsed  # generous for CI; ~0.1 s on a 2-core VM
    for _ in range(300):
        assert parse_facts(tcp_banner(LOCAL, tcp_port))["port"] == tcp_port


def test_many_concurrent_clients(start_server):
    srv = start_server("tcp:0")
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection((LOCAL, srv.ports[0]), timeout=5))
        ports = set()
        for s in socks:
            f = s.makefile("rb")
            ports.add(parse_facts(f.readline())["client_port"])
            f.close()
        assert len(ports) == 300
        for s in socks:
            s.sendall(b"x\n")
        assert all(s.recv(10) == b"x\n" for s in socks)
    finally:
        for s in socks:
            s.close()


def test_bind_failure_exits_one_without_listening(start_server):
    taken = socket.socket()
    taken.bind((LOCAL, 0))
    taken.listen(1)
    try:
        srv = start_server("tcp:0:http", f"tcp:{taken.getsockname()[1]}", wait=False)
        assert srv.proc.wait(timeout=10) == 1
        err = srv.stderr()
        assert "error: cannot listen tcp" in err and "listening" not in err
    finally:
        taken.close()


def test_bad_listen_option_exits_two(start_server):
    srv = start_server("tcp:http", wait=False)
    assert srv.proc.wait(timeout=10) == 2


def test_server_argv():
    argv = server_argv("p", "ns", "n1", [Listener(80, "TCP", True), Listener(53, "UDP")], text="apple")
    assert argv[1:3] == ["-m", "kproxy.workload.server"]
    assert argv[3:] == ["--pod", "p", "--namespace", "ns", "--node", "n1", "--bind", "0.0.0.0",
                        "--listen", "tcp:80:http", "--listen", "udp:53", "--text", "apple"]


def test_client_cli(start_server):
    srv = start_server("tcp:0")
    out = subprocess.run([sys.executable, "-m", "kproxy.workload.client", "tcp", LOCAL, str(srv.ports[0])],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["facts"]["pod"] == "web-1"
    closed, port = _bound_client()  # bound, never listening: connections are refused
    try:
        out = subprocess.run([sys.executable, "-m", "kproxy.workload.client", "tcp", LOCAL, str(port)],
                             capture_output=True, text=True, timeout=10)
    finally:
        closed.close()
    assert out.returncode == 1 and json.loads(out.stdout)["error"].startswith("ConnectionRefusedError")


def test_parse_facts_forms():
    line = "pod=a ns=b ip=10.244.1.5 node=n port=80 client=10.244.2.3:4000"
    f = parse_facts(line)
    assert f == {"pod": "a", "ns": "b", "ip": "10.244.1.5", "node": "n", "port": 80,
                 "client": "10.244.2.3:4000", "client_ip": "10.244.2.3", "client_port": 4000}
    f = parse_facts(b"pod=a ns=b ip=fd00::5 node=n port=80 client=[fd00::3]:4000\npayload")
    assert (f["client_ip"], f["client_port"]) == ("fd00::3", 4000)
    block = "pod: a\nnamespace: b\nip: 1.2.3.4\nnode: n\nport: 80\nclient: 5.6.7.8:9\nhost: svc:8080\n"
    f = parse_facts(block)
    assert f["ns"] == "b" and f["host"] == "svc:8080" and f["client_port"] == 9
    with pytest.raises(ValueError):
        parse_facts("apple\n")
