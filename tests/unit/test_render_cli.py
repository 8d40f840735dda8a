"""`kproxy render`: manifests to a node's iptables-restore payload, as a subprocess.

Needs no root and no cluster. Chain names are checked against upstream's hash computed
here independently: KUBE-SVC- + base32(sha256(ServicePortName + lower(protocol)))[:16],
where ServicePortName is ``namespace/name`` plus ``:portname`` for a named port.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from tests.conftest import SEED  # noqa: E402
EJERCICIO1 = SEED / "Sesion4-Kubernetes" / "Ejercicios" / "Ejercicio1"
HELM_EJERCICIO1 = SEED / "Sesion15-Introducción a Helm" / "Ejercicio1"
STATEFUL = SEED / "Sesion4-Kubernetes" / "Stateful-app"

needs_seed = pytest.mark.skipif(not EJERCICIO1.is_dir(), reason="seed course not available")


def svc_chain(service_port_name: str, protocol: str = "TCP") -> str:
    digest = hashlib.sha256((service_port_name + protocol.lower()).encode()).digest()
    return "KUBE-SVC-" + base64.b32encode(digest).decode()[:16]


def kproxy_render(*args: str, stdin: str = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kproxy", "render", *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=60)


def check_payload(out: str) -> None:
    assert out.startswith("*filter\n") and out.endswith("COMMIT\n")
    assert "\n*nat\n" in out
    assert out.count("COMMIT\n") == 2


APP = """\
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  selector: {app: one}
  ports:
  - {name: p80, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: one, namespace: ns1, labels: {app: one}}
spec:
  containers: [{name: c, image: nginx}]
"""


def test_hash_matches_an_upstream_chain_name():
    # proxier_test.go: ns1/svc1:p80 tcp is KUBE-SVC-XPGD46QRK7WJZT7O
    assert svc_chain("ns1/svc1:p80") == "KUBE-SVC-XPGD46QRK7WJZT7O"


@needs_seed
def test_seed_ejercicio1():
    res = kproxy_render("--backend", "iptables", "-f", str(EJERCICIO1), "--node-name", "node1",
                        "--node-ip", "192.168.5.11", "--cluster-cidr", "10.244.0.0/16")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    check_payload(out)
    chain = svc_chain("default/store-products")                 # unnamed port: no ":"
    assert f":{chain} - [0:0]" in out
    assert (f'-A KUBE-SERVICES -m comment --comment "default/store-products cluster IP" -m tcp -p tcp '
            f"-d 10.96.0.2 --dport 80 -j {chain}") in out
    # the Deployment's 4 replicas, all on node1, all endpoints
    jumps = [line for line in out.splitlines() if line.startswith(f"-A {chain} ") and "KUBE-SEP-" in line]
    assert len(jumps) == 4
    assert out.count("-j DNAT --to-destination 10.244.0.") == 4


@needs_seed
def test_seed_helm_ejercicio1_nodeport_to_the_written_target_port():
    res = kproxy_render("-f", str(HELM_EJERCICIO1))
    assert res.returncode == 0, res.stderr
    check_payload(res.stdout)
    assert "-A KUBE-NODEPORTS -m comment --comment default/blog -m tcp -p tcp --dport 30000" in res.stdout
    # the Service says targetPort 2326 while the container listens on 2368: rendered as written
    assert "-j DNAT --to-destination 10.244.0.2:2326" in res.stdout


@needs_seed
def test_lb_pool():
    res = kproxy_render("-f", str(STATEFUL), "--lb-pool", "192.168.5.240/28")
    assert res.returncode == 0, res.stderr
    assert ('--comment "default/wordpress loadbalancer IP" -m tcp -p tcp -d 192.168.5.241 --dport 8080'
            in res.stdout)
    pending = kproxy_render("-f", str(STATEFUL))
    assert pending.returncode == 0 and "loadbalancer IP" not in pending.stdout


def test_tmp_manifest_file_and_stdin(tmp_path):
    path = tmp_path / "app.yaml"
    path.write_text(APP)
    res = kproxy_render("-f", str(path), "--node-name", "n1", "--node-ip", "192.168.5.11",
                        "--cluster-cidr", "10.244.0.0/16", "--service-cidr", "10.100.0.0/16")
    assert res.returncode == 0, res.stderr
    check_payload(res.stdout)
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in res.stdout
    assert ('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
            "-d 10.100.0.2 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O") in res.stdout
    assert "-j DNAT --to-destination 10.244.0.2:8080" in res.stdout
    piped = kproxy_render("-f", "-", "--node-name", "n1", "--service-cidr", "10.100.0.0/16", stdin=APP)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == res.stdout


def test_bad_port_names_file_object_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
                   "spec:\n  selector: {app: web}\n  ports:\n  - {port: 70000, targetPort: 80}\n")
    res = kproxy_render("-f", str(bad))
    assert res.returncode == 1
    assert res.stdout == ""
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: ")
    assert str(bad) in first and "Service default/web" in first and "spec.ports[0].port" in first
    assert "70000" in first and "Traceback" not in res.stderr


def test_strict_validation(tmp_path):
    odd = tmp_path / "odd.yaml"
    odd.write_text(APP.replace("  selector: {app: one}", "  selector: {app: one}\n  bogus: 1", 1))
    strict = kproxy_render("-f", str(odd))
    assert strict.returncode == 1 and 'unknown field "spec.bogus"' in strict.stderr
    lax = kproxy_render("-f", str(odd), "--no-validate")
    assert lax.returncode == 0, lax.stderr
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" in lax.stdout


@pytest.mark.parametrize("args, message", [
    (["--cluster-cidr", "bogus"], "bogus"),
    (["--node-ip", "bogus"], "bogus"),
    (["--lb-pool", "10.0.0.9-10.0.0.1"], "invalid address range"),
    (["--node-port-range", "40000-30000"], "invalid port range"),
    (["--backend", "nope"], "unknown or unavailable proxier backend"),
])
def test_bad_settings(tmp_path, args, message):
    path = tmp_path / "app.yaml"
    path.write_text(APP)
    res = kproxy_render("-f", str(path), *args)
    assert res.returncode == 1, res.stdout
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_path_and_help():
    res = kproxy_render("-f", "/nonexistent/manifests")
    assert res.returncode == 1
    assert 'error: /nonexistent/manifests: the path "/nonexistent/manifests" does not exist' in res.stderr
    usage = kproxy_render()
    assert usage.returncode == 2 and "Missing option '-f'" in usage.stderr
    helped = kproxy_render("--help")
    assert helped.returncode == 0 and "Example:" in helped.stdout and "kproxy render -f" in helped.stdout


def test_cli_defaults_are_the_library_defaults():
    from kproxy import alloc, render
    from kproxy.cli import main
    params = {p.name: p.default for p in main.commands["render"].params}
    assert params["backend"] == "iptables"
    assert params["node_name"] == render.DEFAULT_NODE_NAME
    assert params["node_ip"] == render.DEFAULT_NODE_IP
    assert params["cluster_cidr"] == render.DEFAULT_CLUSTER_CIDR
    assert params["service_cidr"] == alloc.DEFAULT_SERVICE_CIDR
    assert params["node_port_range"] == alloc.DEFAULT_NODE_PORT_RANGE
