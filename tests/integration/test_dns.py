"""Cluster DNS: a pod behind kube-dns at the service CIDR's .10, kept current, and pods that
resolve Services by short name through their resolv.conf, as in the course."""
from __future__ import annotations

import os
import time

import pytest

from tests.conftest import SEED
from tests.integration.test_services import Lab

pytestmark = pytest.mark.root


@pytest.fixture
def lab(make_cluster, tmp_path):
    c = make_cluster(nodes=2)
    lab = Lab(c, tmp_path)
    yield lab
    lab.store.close()


def run(lab, pod, *argv):
    return lab.c.exec(pod, list(argv), capture_output=True, text=True, timeout=20)


def resolve(lab, pod, name, tries=10):
    """`getent hosts NAME` in the pod, allowing the DNS server its 0.2 s to reload the zone."""
    for _ in range(tries):
        out = run(lab, pod, "getent", "hosts", name)
        if out.returncode == 0:
            return out.stdout.split()[0]
        time.sleep(0.2)
    return None


def test_short_names_resolve_from_pods(lab):
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "Ejercicios" / "Ejercicio1")
    lab.apply(path=SEED / "Sesion4-Kubernetes" / "Stateful-app")
    from kproxy.reconciler import current_view
    services, _ = current_view(lab.c, lab.store)
    dns = next(s for s in services if (s.namespace, s.name) == ("kube-system", "kube-dns"))
    assert dns.cluster_ip == "10.96.0.10"
    busybox = lab.c.pod("busybox")
    conf = run(lab, busybox, "cat", "/etc/resolv.conf").stdout
    assert "search default.svc.cluster.local svc.cluster.local cluster.local" in conf
    assert "nameserver 10.96.0.10" in conf and "options ndots:5" in conf
    # `kubectl exec busybox -- nslookup store-products` (this machine's busybox is newer
    # than the course's pinned 1.28.4: it also asks every search suffix and exits 1 when
    # one of them is NXDOMAIN, which is why the course pins 1.28.4; the answer is there)
    out = run(lab, busybox, "busybox", "nslookup", "store-products")
    vip = lab.svc("store-products").cluster_ip
    assert "Name:\tstore-products.default.svc.cluster.local" in out.stdout and f"Address: {vip}" in out.stdout
    # WordPress reaches MySQL through the headless name: the pod IP, no ClusterIP
    [mysql] = [p for p in lab.c.pods.values() if p.name.startswith("wordpress-mysql-")]
    assert resolve(lab, busybox, "wordpress-mysql") == mysql.ip
    # `wget -qO- store-products`: the name, the ClusterIP, the TRAP, a pod answers
    page = run(lab, busybox, "wget", "-qO-", "-T", "5", "http://store-products/")
    assert page.returncode == 0 and "store-products-" in page.stdout
    # other namespaces by <svc>.<ns>; unknown names fail
    assert resolve(lab, busybox, "kube-dns.kube-system") == "10.96.0.10"
    assert resolve(lab, busybox, "no-such-service", tries=1) is None


def test_dns_follows_the_store_and_cleanup_removes_resolv_conf(lab):
    from tests.integration.test_services import deployment, service
    client = lab.client
    lab.apply(deployment("early", 1) + service("early", 80))
    assert resolve(lab, client, "late", tries=1) is None
    lab.apply(deployment("early", 1) + service("early", 80) + "\n---" + deployment("late", 1) + service("late", 80))
    assert resolve(lab, client, "late") == lab.svc("late").cluster_ip
    path = f"/etc/netns/{client.netns}/resolv.conf"
    assert os.path.exists(path)
    lab.c.delete_pod("client")
    assert not os.path.exists(os.path.dirname(path))
