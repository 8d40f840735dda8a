"""The DNS server inside a network namespace, asked by the machine's own resolvers
(glibc's getent, busybox nslookup) through a pod's resolv.conf: search list and ndots
included. Needs root (a network namespace, a private mount namespace).

The real /etc is never touched: instead of /etc/netns/<name>/resolv.conf (which is
what `ip netns exec` would mount), the resolv.conf is bind-mounted over /etc/resolv.conf
in a private mount namespace that ends with the command."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from kproxy.dns import records_for, resolv_conf
from kproxy.render import resolve_manifests
from tests.conftest import REPO, SEED, unique

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not (SEED / "Sesion4-Kubernetes" / "Stateful-app").is_dir(),
                                 reason=f"the course manifests are not at {SEED}"),
              pytest.mark.skipif(not (shutil.which("ip") and shutil.which("unshare") and shutil.which("getent")),
                                 reason="needs ip, unshare and getent")]


@pytest.fixture
def dns_netns(tmp_path):
    """A namespace with lo up and the server on 127.0.0.1:53 in it, the Stateful-app zone,
    and a resolv.conf for namespace `default` pointing at it."""
    from cni import netns
    view = resolve_manifests(str(SEED / "Sesion4-Kubernetes" / "Stateful-app"))
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(records_for(view.services, view.endpoint_slices, view.pods).to_json())
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf("default", nameserver="127.0.0.1"))
    name = unique("dns")
    netns.create(name)
    proc = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        # `ip netns exec` execs the command: proc.pid is the server's own PID
        proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-m", "kproxy.dns.server",
                                 "--zone-file", str(zone_file), "--listen", "127.0.0.1:53"],
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        lines: list = []
        reader = threading.Thread(target=lambda: lines.extend(l.rstrip() for l in proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while sum(l.startswith("listening") for l in lines) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        assert sum(l.startswith("listening") for l in lines) == 2, lines

        def run(*argv):
            script = f'mount --bind "$0" /etc/resolv.conf && exec ip netns exec {name} "$@"'
            return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                                   str(conf), *argv], capture_output=True, text=True, timeout=30)

        yield view, run
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        netns.delete(name)


def test_getent_resolves_short_names_through_the_search_list(dns_netns):
    view, run = dns_netns
    mysql = next(p for p in view.pods if p.name.rsplit("-", 2)[0] == "wordpress-mysql")
    wp = next(s for s in view.services if s.name == "wordpress")
    res = run("getent", "hosts", "wordpress-mysql")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [mysql.pod_ip, "wordpress-mysql.default.svc.cluster.local"]
    res = run("getent", "hosts", "wordpress.default")
    assert res.stdout.split() == [wp.cluster_ip, "wordpress.default.svc.cluster.local"]
    res = run("getent", "hosts", "wordpress.default.svc.cluster.local")
    assert res.stdout.split() == [wp.cluster_ip, "wordpress.default.svc.cluster.local"]
    # nothing outside the cluster: no upstream resolver
    assert run("getent", "hosts", "example.com").returncode == 2
    assert run("getent", "hosts", "no-such-service").returncode == 2


@pytest.mark.skipif(not shutil.which("busybox"), reason="needs busybox")
def test_busybox_nslookup_as_students_run_it(dns_netns):
    view, run = dns_netns
    mysql = next(p for p in view.pods if p.name.rsplit("-", 2)[0] == "wordpress-mysql")
    res = run("busybox", "nslookup", "wordpress-mysql")
    assert "Name:\twordpress-mysql.default.svc.cluster.local" in res.stdout, res.stdout + res.stderr
    assert f"Address: {mysql.pod_ip}" in res.stdout
    res = run("busybox", "nslookup", "google.com")
    assert "REFUSED" in res.stdout + res.stderr
