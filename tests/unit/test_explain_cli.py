"""`kproxy explain` as a subprocess: no root, no cluster, nothing sent.

The JSON output is validated against the JSON Schema in kproxy/explain/schema.md (a
small validator below covers the keywords that schema uses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SEED

REPO = Path(__file__).resolve().parents[2]
FIX = Path(__file__).parent / "explain_fixtures"
EJERCICIO1 = SEED / "Sesion4-Kubernetes" / "Ejercicios" / "Ejercicio1"

needs_seed = pytest.mark.skipif(not EJERCICIO1.is_dir(), reason="seed course not available")


def kproxy(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kproxy", "explain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


from tests.report_schema import schema, validate  # noqa: E402


def test_schema_block_documents_the_report_keys():
    from kproxy.explain.report import (Candidate, Flow, Hop, Masquerade, Report, Verdict)
    sch = schema()
    r = Report(Flow("10.0.0.1", "tcp", "10.96.0.1", 80), None, [Hop("nat", "C", "-A C", "continue")],
               [Candidate("10.0.0.2:80", 1.0)], Masquerade(False, "x"), Verdict("DNAT", "y"), "nft")
    d = r.to_dict()
    assert set(sch["required"]) == set(d)
    assert set(sch["properties"]["flow"]["required"]) == set(d["flow"])
    assert set(sch["properties"]["candidates"]["items"]["required"]) == set(d["candidates"][0])
    assert set(sch["$defs"]["hop"]["required"]) == set(d["hops"][0])
    validate(d, sch, sch)


@needs_seed
def test_seed_exercise_text():
    res = kproxy("-f", str(EJERCICIO1), "--from", "busybox", "--to", "store-products:80")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "candidates (4)" in out
    assert out.count("25.00% (1/4)") == 4
    assert "service: default/store-products (cluster IP)" in out
    assert "verdict: DNAT - DNAT to one of 4 endpoints of default/store-products" in out
    assert "\x1b[" not in out


@needs_seed
def test_seed_exercise_json_validates():
    res = kproxy("-f", str(EJERCICIO1), "--from", "busybox", "--to", "store-products:80", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    sch = schema()
    validate(doc, sch, sch)
    assert doc["source"] == "kproxy-render"
    assert len(doc["candidates"]) == 4
    for c in doc["candidates"]:
        assert c["probability"] == pytest.approx(0.25, abs=1e-9)
        assert c["chains"][:2] == ["PREROUTING", "KUBE-SERVICES"] and c["chains"][-1].startswith("KUBE-SEP-")
    assert sum(c["probability"] for c in doc["candidates"]) == pytest.approx(1.0)
    assert doc["service"] == {"namespace": "default", "name": "store-products", "port": "", "address": "cluster IP"}
    assert doc["verdict"]["action"] == "DNAT"
    assert doc["masquerade"]["applied"] is False
    assert doc["flow"]["node"] == "node-1" and doc["flow"]["dport"] == 80


@needs_seed
def test_seed_exercise_addresses_and_names_agree():
    by_name = kproxy("-f", str(EJERCICIO1), "--from", "external", "--to", "store-products", "-o", "json")
    clusterip = json.loads(by_name.stdout)["flow"]["dst"]
    by_ip = kproxy("-f", str(EJERCICIO1), "--from", "192.168.5.100", "--to", f"{clusterip}:80", "-o", "json")
    a, b = json.loads(by_name.stdout), json.loads(by_ip.stdout)
    assert a["candidates"] == b["candidates"] and a["verdict"] == b["verdict"]
    assert a["masquerade"]["applied"] is True and "outside the cluster CIDR" in a["masquerade"]["reason"]


def test_saved_rules_iptables_and_nft():
    res = kproxy("--rules", str(FIX / "flows.iptables-save.txt"), "--node", "test-node", "--node-ip", "192.168.0.2",
                 "--from", "203.0.113.2", "--to", "192.168.0.2:30080", "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    sch = schema()
    validate(doc, sch, sch)
    assert doc["source"] == "iptables-save"
    assert [c["endpoint"] for c in doc["candidates"]] == ["10.0.1.4:80", "10.0.2.4:80"]
    assert doc["masquerade"]["applied"] is True

    res = kproxy("--rules", str(FIX / "upstream_overall.nft.json"), "--from", "10.0.0.2", "--to", "172.30.0.46:80")
    assert res.returncode == 0, res.stderr
    assert "verdict: REJECT - ns6/svc6:p80 has no endpoints" in res.stdout

    res = kproxy("--rules", str(FIX / "flows.iptables-save.txt"), "--node-ip", "192.168.0.2",
                 "--from", "10.0.1.99", "--to", "172.30.1.10:53", "--udp", "-o", "json")
    doc = json.loads(res.stdout)
    assert doc["flow"]["proto"] == "udp" and [c["endpoint"] for c in doc["candidates"]] == ["10.0.1.10:53"]


def test_usage_errors():
    res = kproxy("--from", "node", "--to", "10.96.0.1:443")
    assert res.returncode == 2 and "-f" in res.stderr
    res = kproxy("--rules", str(FIX / "flows.iptables-save.txt"), "--from", "10.0.0.1", "--to", "web:80")
    assert res.returncode == 1 and "Service names need the manifests" in res.stderr
    res = kproxy("--rules", str(FIX / "flows.yaml"), "--from", "10.0.0.1", "--to", "10.96.0.1:80")
    assert res.returncode == 1 and "unrecognised ruleset" in res.stderr
