"""examples/trap: the course slide's TRAP, run as its README says, checked against the kernel."""
import json

import pytest

from tests.conftest import REPO, kproxy_cli, unique

pytestmark = pytest.mark.root


def test_trap_example_readme_steps(state_dir):
    env = {"KPROXY_CLUSTER": unique("trap")}
    try:
        kproxy_cli("up", "--node", "node1", "--pod-cidr", "10.0.5.0/24", "--service-cidr", "172.11.240.0/20",
                   "--first-pod-host", "6", env=env, check=True)
        out = kproxy_cli("apply", "-f", f"{REPO}/examples/trap", env=env, check=True).stdout
        assert "service/my-svc created" in out
        kproxy_cli("run", "client", env=env, check=True)
        pods = json.loads(kproxy_cli("get", "pods", "-o", "json", env=env, check=True).stdout)
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods["items"]}
        assert ips["my-pod"] == "10.0.5.6" and ips["client"].startswith("10.0.5.")
        text = kproxy_cli("trace", "client", "my-svc", "--http", env=env, check=True).stdout
        assert "TRAP: 172.11.240.5:80 -> 10.0.5.6:80" in text
        assert "No interface anywhere owns 172.11.240.5" in text
        assert "pod: my-pod" in text               # the answer, from the workload server
        report = json.loads(kproxy_cli("trace", "client", "my-svc", "-o", "json", env=env, check=True).stdout)
        assert report["trap"] == {"before": "172.11.240.5:80", "after": "10.0.5.6:80"}
        ct = next(c for c in report["conntrack"] if c["original"]["sport"] == report["flow"]["sport"])
        assert ct["original"]["dst"] == "172.11.240.5" and ct["reply"]["src"] == "10.0.5.6"
        assert report["masquerade"]["applied"] is False
        diagram = kproxy_cli("trace", "client", "my-svc", "-o", "mermaid", env=env, check=True).stdout
        assert diagram.startswith("sequenceDiagram") and "DNAT 172.11.240.5:80 -> 10.0.5.6:80" in diagram
    finally:
        down = kproxy_cli("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr


def test_make_demo_story(state_dir):
    res = kproxy_cli("demo", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TRAP: 172.11.240.5:80 -> 10.0.5.6:80" in res.stdout
    assert res.stdout.count("verified") == 2
