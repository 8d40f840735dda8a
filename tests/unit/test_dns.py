"""kproxy.dns: the records CoreDNS's kubernetes plugin would serve, the server that
serves them over UDP and TCP (as a subprocess on 127.0.0.1), and the pods' resolv.conf.

No root needed: the server listens on 127.0.0.1 with a port the kernel picks."""
from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from kproxy.dns import records_for, resolv_conf
from kproxy.dns import resolv as resolv_mod
from kproxy.dns.records import Record, Zone, dashed, reverse_name
from kproxy.model import objects as o
from kproxy.model.endpoints import endpoint_slices_for
from kproxy.render import resolve_manifests
from tests.conftest import REPO, SEED, needs_seed

STATEFUL = SEED / "Sesion4-Kubernetes" / "Stateful-app"
EJERCICIO1 = SEED / "Sesion4-Kubernetes" / "Ejercicios" / "Ejercicio1"
D = "cluster.local"


# --------------------------------------------------------------------------- helpers


def _svc(view, name, ns="default") -> o.Service:
    return next(s for s in view.services if s.name == name and s.namespace == ns)


def _pods(view, deployment) -> list:
    """A Deployment's Pods: <deployment>-<template hash>-<5 chars>."""
    return [p for p in view.pods if p.name.rsplit("-", 2)[0] == deployment]


@pytest.fixture(scope="module")
def stateful():
    if not STATEFUL.is_dir():
        pytest.skip(f"the course manifests are not at {SEED}")
    return resolve_manifests(str(STATEFUL))


@pytest.fixture(scope="module")
def zone(stateful) -> Zone:
    return records_for(stateful.services, stateful.endpoint_slices, stateful.pods)


def _variant(view, renames=None, headless=(), extra=()):
    """The Stateful-app with some Services changed (port names, headless), its
    EndpointSlices recomputed as the controller would, plus extra Services."""
    services = copy.deepcopy(view.services)
    for s in services:
        for port_index, name in (renames or {}).get(s.name, {}).items():
            s.ports[port_index].name = name
        if s.name in headless:
            s.cluster_ip, s.cluster_ips = "None", []
    services += list(extra)
    slices = [sl for s in services for sl in endpoint_slices_for(s, view.pods, lambda p: True)]
    return services, slices


# --------------------------------------------------------------------------- records


@needs_seed
def test_seed_clusterip_service_a_is_its_cluster_ip(stateful, zone):
    wp = _svc(stateful, "wordpress")
    assert wp.cluster_ip and wp.cluster_ip != "None"
    ans = zone.lookup(f"wordpress.default.svc.{D}", "A")
    assert ans.rcode == "NOERROR" and ans.authoritative
    assert ans.values("A") == [wp.cluster_ip]
    assert all(r.ttl == 30 for r in ans.answer)


@needs_seed
def test_seed_headless_service_a_is_the_mysql_pod_ip(stateful, zone):
    (mysql,) = _pods(stateful, "wordpress-mysql")
    assert _svc(stateful, "wordpress-mysql").headless
    assert zone.values(f"wordpress-mysql.default.svc.{D}", "A") == [mysql.pod_ip]
    # and one name per endpoint: its IP with dashes
    ep = f"{dashed(mysql.pod_ip)}.wordpress-mysql.default.svc.{D}"
    assert zone.lookup(ep, "A").values() == [mysql.pod_ip]
    # the unnamed port still gives SRV at the service name, to the endpoint's name
    assert zone.values(f"wordpress-mysql.default.svc.{D}", "SRV") == [f"0 100 3306 {ep}."]


@needs_seed
def test_seed_headless_lists_every_ready_endpoint(stateful):
    services, slices = _variant(stateful, headless=("wordpress",))
    z = records_for(services, slices, stateful.pods)
    ips = sorted(p.pod_ip for p in _pods(stateful, "wordpress"))
    assert len(ips) == 4
    assert sorted(z.values(f"wordpress.default.svc.{D}", "A")) == ips
    srv = z.values(f"wordpress.default.svc.{D}", "SRV")
    # CoreDNS's weight: floor(100 / 4 records); the headless port is the endpoint's (80)
    assert sorted(srv) == sorted(f"0 25 80 {dashed(ip)}.wordpress.default.svc.{D}." for ip in ips)


@needs_seed
def test_not_ready_endpoints_are_left_out_and_none_ready_is_nxdomain(stateful):
    slices = copy.deepcopy(stateful.endpoint_slices)
    for sl in slices:
        for ep in sl.endpoints:
            ep.conditions.ready = False
    z = records_for(stateful.services, slices, stateful.pods)
    assert z.lookup(f"wordpress-mysql.default.svc.{D}", "A").rcode == "NXDOMAIN"
    # a ClusterIP keeps its A record whatever the endpoints
    assert z.lookup(f"wordpress.default.svc.{D}", "A").values() == [_svc(stateful, "wordpress").cluster_ip]


@needs_seed
def test_srv_for_named_ports(stateful):
    services, slices = _variant(stateful, renames={"wordpress": {0: "http"}, "wordpress-mysql": {0: "mysql"}})
    z = records_for(services, slices, stateful.pods)
    (mysql,) = _pods(stateful, "wordpress-mysql")
    wp_ip = _svc(stateful, "wordpress").cluster_ip

    ans = z.lookup(f"_http._tcp.wordpress.default.svc.{D}", "SRV")
    assert ans.rcode == "NOERROR"
    assert ans.values("SRV") == [f"0 100 8080 wordpress.default.svc.{D}."]
    assert [(r.name, r.data) for r in ans.additional] == [(f"wordpress.default.svc.{D}", wp_ip)]

    target = f"{dashed(mysql.pod_ip)}.wordpress-mysql.default.svc.{D}"
    ans = z.lookup(f"_mysql._tcp.wordpress-mysql.default.svc.{D}", "SRV")
    assert ans.values("SRV") == [f"0 100 3306 {target}."]
    assert [(r.name, r.type, r.data) for r in ans.additional] == [(target, "A", mysql.pod_ip)]

    # the wrong protocol or port name is no name at all
    assert z.lookup(f"_http._udp.wordpress.default.svc.{D}", "SRV").rcode == "NXDOMAIN"
    assert z.lookup(f"_https._tcp.wordpress.default.svc.{D}", "SRV").rcode == "NXDOMAIN"
    # an A question on the SRV name gets the address, as CoreDNS answers it
    assert z.lookup(f"_http._tcp.wordpress.default.svc.{D}", "A").values() == [wp_ip]


def test_kube_dns_service_and_weights_over_three_ports():
    z = records_for([], [], [])
    base = f"kube-dns.kube-system.svc.{D}"
    assert z.values(base, "A") == ["10.96.0.10"]
    assert z.values(f"_dns._udp.{base}", "SRV") == [f"0 100 53 {base}."]
    assert z.values(f"_dns-tcp._tcp.{base}", "SRV") == [f"0 100 53 {base}."]
    assert z.values(f"_metrics._tcp.{base}", "SRV") == [f"0 100 9153 {base}."]
    # three ports answer at the bare name: floor(100/3) each, duplicates (53) dropped
    assert z.values(base, "SRV") == [f"0 33 53 {base}.", f"0 33 9153 {base}."]
    assert z.lookup(reverse_name("10.96.0.10"), "PTR").values() == [f"{base}."]
    # a kube-dns in the Services wins over the built-in one
    own = o.Service(metadata=o.ObjectMeta(name="kube-dns", namespace="kube-system"), cluster_ip="10.96.0.99",
                    ports=[o.ServicePort(port=53, name="dns", protocol="UDP")])
    assert records_for([own], [], []).values(base, "A") == ["10.96.0.99"]
    assert records_for([], [], [], dns_ip=None).lookup(base, "A").rcode == "NXDOMAIN"


def test_externalname_is_a_cname_and_its_target_is_not_chased_outside():
    ext = o.Service(metadata=o.ObjectMeta(name="db", namespace="prod"), type="ExternalName",
                    external_name="Database.Example.com.")
    inner = o.Service(metadata=o.ObjectMeta(name="alias", namespace="prod"), type="ExternalName",
                      external_name=f"kube-dns.kube-system.svc.{D}")
    z = records_for([ext, inner], [], [])
    assert z.lookup(f"db.prod.svc.{D}", "CNAME").values() == ["database.example.com."]
    a = z.lookup(f"db.prod.svc.{D}", "A")
    assert a.rcode == "NOERROR" and [(r.type, r.data) for r in a.answer] == [("CNAME", "database.example.com.")]
    assert z.lookup("database.example.com", "A").rcode == "REFUSED"
    # a target inside the cluster domain is followed
    a = z.lookup(f"alias.prod.svc.{D}", "A")
    assert [(r.type, r.data) for r in a.answer] == [("CNAME", f"kube-dns.kube-system.svc.{D}."), ("A", "10.96.0.10")]


@needs_seed
def test_nxdomain_nodata_and_names_outside(zone):
    soa_owner = lambda ans: [(r.name, r.type) for r in ans.authority]   # noqa: E731
    for name in (f"nope.default.svc.{D}", f"wordpress.nosuchns.svc.{D}", f"wordpress.default.{D}",
                 f"foo.{D}", f"a.b.c.wordpress.default.svc.{D}", f"10-244-0-5.nosuchns.pod.{D}",
                 f"not-an-ip.default.pod.{D}"):
        ans = zone.lookup(name, "A")
        assert ans.rcode == "NXDOMAIN", name
        assert soa_owner(ans) == [(D, "SOA")]
    # existing names, other types: NOERROR and nothing, the SOA for negative caching
    for name, qtype in ((f"wordpress.default.svc.{D}", "AAAA"), (f"wordpress.default.svc.{D}", "TXT"),
                        (f"wordpress.default.svc.{D}", "CNAME"), (f"default.svc.{D}", "A"),
                        (f"svc.{D}", "A"), (f"kube-system.svc.{D}", "A"),
                        (D, "A"), (f"default.pod.{D}", "A")):
        ans = zone.lookup(name, qtype)
        assert (ans.rcode, ans.answer) == ("NOERROR", []), (name, qtype)
        assert soa_owner(ans) == [(D, "SOA")]
    # no upstream resolver: anything outside the domain is refused, not forwarded
    for name in ("example.com", "wordpress", "wordpress.default", "wordpress.default.svc", "local",
                 reverse_name("8.8.8.8")):
        ans = zone.lookup(name, "A")
        assert ans.rcode == "REFUSED" and not ans.authoritative and not ans.answer, name


@needs_seed
def test_apex_pods_ptr_version_and_case(stateful, zone):
    soa = zone.lookup(D, "SOA").answer[0]
    assert soa.data.split()[:2] == [f"ns.dns.{D}.", f"hostmaster.{D}."]
    assert soa.data.split()[3:] == ["7200", "1800", "86400", "30"]
    ns = zone.lookup(D, "NS")
    assert ns.values() == [f"ns.dns.{D}."] and [r.data for r in ns.additional] == ["10.96.0.10"]
    assert zone.lookup(f"dns-version.{D}", "TXT").answer == [Record(f"dns-version.{D}", "TXT", '"1.1.0"', 28800)]
    # pods insecure (kubeadm's Corefile): any well-formed address in an existing namespace
    assert zone.lookup(f"10-244-0-250.default.pod.{D}", "A").values() == ["10.244.0.250"]
    (mysql,) = _pods(stateful, "wordpress-mysql")
    assert zone.values(f"{dashed(mysql.pod_ip)}.default.pod.{D}", "A") == [mysql.pod_ip]
    verified = records_for(stateful.services, stateful.endpoint_slices, stateful.pods, pods_mode="verified")
    assert verified.lookup(f"10-244-0-250.default.pod.{D}", "A").rcode == "NXDOMAIN"
    assert verified.values(f"{dashed(mysql.pod_ip)}.default.pod.{D}", "A") == [mysql.pod_ip]
    # PTR: a ClusterIP names its Service, an endpoint address its endpoint name
    wp = _svc(stateful, "wordpress")
    assert zone.lookup(reverse_name(wp.cluster_ip), "PTR").values() == [f"wordpress.default.svc.{D}."]
    assert zone.lookup(reverse_name(mysql.pod_ip), "PTR").values() == [
        f"{dashed(mysql.pod_ip)}.wordpress-mysql.default.svc.{D}."]
    # names match whatever their case; the answer keeps the question's spelling
    ans = zone.lookup("WordPress.Default.SVC.Cluster.Local.", "A")
    assert ans.values() == [wp.cluster_ip] and ans.answer[0].name == "WordPress.Default.SVC.Cluster.Local"
    assert {r.ttl for r in zone.records if r.type != "TXT"} == {30}


def test_pod_hostname_and_subdomain_name_the_endpoint():
    pod = o.Pod(metadata=o.ObjectMeta(name="web-0", namespace="default", labels={"app": "web"}),
                spec=o.PodSpec(hostname="web-0", subdomain="web"),
                status=o.PodStatus(pod_ip="10.244.1.7", pod_ips=["10.244.1.7"], phase="Running"))
    svc = o.Service(metadata=o.ObjectMeta(name="web", namespace="default"), cluster_ip="None",
                    selector={"app": "web"}, ports=[o.ServicePort(port=80, name="http", target_port=80)])
    z = records_for([svc], endpoint_slices_for(svc, [pod], lambda p: True), [pod])
    assert z.values(f"web-0.web.default.svc.{D}", "A") == ["10.244.1.7"]
    assert z.values(f"_http._tcp.web.default.svc.{D}", "SRV") == [f"0 100 80 web-0.web.default.svc.{D}."]
    assert z.lookup(f"10-244-1-7.web.default.svc.{D}", "A").rcode == "NXDOMAIN"


@needs_seed
def test_zone_json_round_trip(stateful, zone):
    again = Zone.from_json(zone.to_json())
    assert again == zone and again.serial == zone.serial
    assert again.to_json() == zone.to_json()
    for name in (f"wordpress-mysql.default.svc.{D}", f"nope.default.svc.{D}", "example.com"):
        assert again.lookup(name, "A") == zone.lookup(name, "A")
    # the serial follows the content; a pure function gives the same zone twice
    assert records_for(stateful.services, stateful.endpoint_slices, stateful.pods).to_json() == zone.to_json()
    assert records_for(stateful.services, [], stateful.pods).serial != zone.serial
    with pytest.raises(ValueError):
        Zone.from_json('{"format": "something else", "version": 1}')


@needs_seed
def test_store_products_from_ejercicio1():
    view = resolve_manifests(str(EJERCICIO1))
    z = records_for(view.services, view.endpoint_slices, view.pods)
    assert z.values(f"store-products.default.svc.{D}", "A") == [_svc(view, "store-products").cluster_ip]


# --------------------------------------------------------------------------- resolv.conf


def test_resolv_conf_text():
    assert resolv_conf("default") == (
        "search default.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n")
    assert resolv_conf("curso", nameserver="10.100.0.10", domain="example.local.") == (
        "search curso.svc.example.local svc.example.local example.local\n"
        "nameserver 10.100.0.10\n"
        "options ndots:5\n")
    assert resolv_conf("default", host_search=["lan"]).splitlines()[0].endswith(" cluster.local lan")


def test_install_and_uninstall_under_a_temporary_base(tmp_path):
    base = tmp_path / "etc" / "netns"          # not there yet: install makes it
    other = base / "lab-default-other"
    path = resolv_mod.install("lab-default-busybox", resolv_conf("default"), base=str(base))
    assert path == str(base / "lab-default-busybox" / "resolv.conf")
    assert Path(path).read_text() == resolv_conf("default")
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    # a second install replaces the file, leaving no temporary file behind
    resolv_mod.install("lab-default-busybox", resolv_conf("curso"), base=str(base))
    assert os.listdir(base / "lab-default-busybox") == ["resolv.conf"]
    assert Path(path).read_text() == resolv_conf("curso")

    other.mkdir()
    (other / "resolv.conf").write_text("keep me\n")
    assert resolv_mod.uninstall("lab-default-busybox", base=str(base)) is True
    assert not (base / "lab-default-busybox").exists()
    assert (other / "resolv.conf").read_text() == "keep me\n" and base.is_dir()
    assert resolv_mod.uninstall("lab-default-busybox", base=str(base)) is False
    for bad in ("", ".", "..", "a/b", "../x"):
        with pytest.raises(ValueError):
            resolv_mod.install(bad, "x", base=str(base))
        with pytest.raises(ValueError):
            resolv_mod.uninstall(bad, base=str(base))
    assert (other / "resolv.conf").exists()


# --------------------------------------------------------------------------- the server


class DNSServer:
    """The server subprocess; a thread collects its stderr lines."""

    def __init__(self, proc: subprocess.Popen, zone_file: Path):
        self.proc, self.port, self.zone_file = proc, 0, zone_file
        self.lines: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def query(self, name, qtype="A", tcp=False, **kw):
        q = dns.message.make_query(name, qtype, **kw)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(q, "127.0.0.1", port=self.port, timeout=3)

    def write_zone(self, zone: Zone) -> None:
        """As the reconciler would: a temporary file renamed over the zone file."""
        tmp = self.zone_file.with_suffix(".tmp")
        tmp.write_text(zone.to_json())
        os.replace(tmp, self.zone_file)

    def wait_lines(self, pred, timeout=10.0) -> list:
        deadline = time.monotonic() + timeout
        while not pred(self.lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.lines)


def _start(zone_file: Path, extra=()) -> DNSServer:
    proc = subprocess.Popen([sys.executable, "-m", "kproxy.dns.server", "--zone-file", str(zone_file),
                             "--listen", "127.0.0.1:0", *extra],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    srv = DNSServer(proc, zone_file)
    lines = srv.wait_lines(lambda ls: sum(l.startswith("listening ") for l in ls) >= 2 or proc.poll() is not None,
                           timeout=20)
    listening = [l for l in lines if l.startswith("listening ")]
    if len(listening) < 2:
        _stop(srv)
        raise AssertionError(f"the DNS server did not start: {lines}")
    ports = {l.split()[1]: int(l.rsplit(":", 1)[1]) for l in listening}
    assert set(ports) == {"udp", "tcp"} and ports["udp"] == ports["tcp"]
    srv.port = ports["udp"]
    return srv


def _stop(srv: DNSServer) -> int:
    if srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGTERM)          # this server's PID, nothing else
        try:
            srv.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
    srv._reader.join(timeout=5)
    return srv.proc.returncode


@pytest.fixture
def server(tmp_path, zone):
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(zone.to_json())
    srv = _start(zone_file)
    try:
        yield srv
    finally:
        _stop(srv)


@needs_seed
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_server_answers_full_names(server, stateful, tcp):
    (mysql,) = _pods(stateful, "wordpress-mysql")
    r = server.query(f"wordpress-mysql.default.svc.{D}", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.RA
    assert [(rr.name.to_text(), rr.ttl, [x.to_text() for x in rr]) for rr in r.answer] == [
        (f"wordpress-mysql.default.svc.{D}.", 30, [mysql.pod_ip])]
    r = server.query(f"wordpress.default.svc.{D}", tcp=tcp)
    assert [x.to_text() for rr in r.answer for x in rr] == [_svc(stateful, "wordpress").cluster_ip]
    r = server.query(f"wordpress-mysql.default.svc.{D}", "SRV", tcp=tcp)
    ep = f"{dashed(mysql.pod_ip)}.wordpress-mysql.default.svc.{D}."
    assert [x.to_text() for rr in r.answer for x in rr] == [f"0 100 3306 {ep}"]
    assert [(rr.name.to_text(), [x.to_text() for x in rr]) for rr in r.additional] == [(ep, [mysql.pod_ip])]
    r = server.query(f"nope.default.svc.{D}", tcp=tcp)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert [rr.name.to_text() for rr in r.authority] == [f"{D}."]
    r = server.query(f"wordpress.default.svc.{D}", "AAAA", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    r = server.query("example.com", tcp=tcp)
    assert r.rcode() == dns.rcode.REFUSED and not r.answer and not r.flags & dns.flags.AA
    r = server.query(reverse_name(_svc(stateful, "wordpress").cluster_ip), "PTR", tcp=tcp)
    assert [x.to_text() for rr in r.answer for x in rr] == [f"wordpress.default.svc.{D}."]


@needs_seed
def test_short_names_through_the_pods_search_list(server, stateful, tmp_path):
    """What a pod's resolver does with resolv.conf (search list, ndots:5), done by the
    library's stub resolver against the server."""
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf("default", nameserver="127.0.0.1"))
    res = dns.resolver.Resolver(filename=str(conf))
    res.port, res.lifetime = server.port, 5
    assert res.ndots == 5 and [str(s) for s in res.search] == [f"default.svc.{D}.", f"svc.{D}.", f"{D}."]
    (mysql,) = _pods(stateful, "wordpress-mysql")
    for short in ("wordpress-mysql", "wordpress-mysql.default", "wordpress-mysql.default.svc"):
        ans = res.resolve(short, "A", search=True)
        assert [a.to_text() for a in ans] == [mysql.pod_ip]
        assert ans.qname.to_text() == f"wordpress-mysql.default.svc.{D}."
    with pytest.raises((dns.resolver.NoNameservers, dns.resolver.NXDOMAIN)):
        res.resolve("example.com", "A", search=True)


@needs_seed
def test_large_answer_truncates_over_udp_and_comes_whole_over_tcp(tmp_path, stateful):
    pods = [o.Pod(metadata=o.ObjectMeta(name=f"big-{i}", namespace="default", labels={"app": "big"}),
                  status=o.PodStatus(pod_ip=f"10.244.3.{i + 2}", pod_ips=[f"10.244.3.{i + 2}"], phase="Running"))
            for i in range(60)]
    svc = o.Service(metadata=o.ObjectMeta(name="big", namespace="default"), cluster_ip="None",
                    selector={"app": "big"}, ports=[o.ServicePort(port=80, target_port=80)])
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(records_for([svc], endpoint_slices_for(svc, pods, lambda p: True), pods).to_json())
    srv = _start(zone_file)
    try:
        r = srv.query(f"big.default.svc.{D}")
        assert r.flags & dns.flags.TC and not r.answer
        q = dns.message.make_query(f"big.default.svc.{D}", "A")
        r, used_tcp = dns.query.udp_with_fallback(q, "127.0.0.1", port=srv.port, timeout=3)
        assert used_tcp and len([x for rr in r.answer for x in rr]) == 60
        # EDNS with a large buffer fits it in one datagram
        r = srv.query(f"big.default.svc.{D}", use_edns=0, payload=4096)
        assert not r.flags & dns.flags.TC and len([x for rr in r.answer for x in rr]) == 60
    finally:
        assert _stop(srv) == 0


@needs_seed
def test_reload_when_the_zone_file_changes(server, stateful):
    extra = o.Service(metadata=o.ObjectMeta(name="store-products", namespace="default"),
                      cluster_ip="10.96.0.77", ports=[o.ServicePort(port=80, target_port=80)])
    name = f"store-products.default.svc.{D}"
    assert server.query(name).rcode() == dns.rcode.NXDOMAIN
    server.write_zone(records_for(stateful.services + [extra], stateful.endpoint_slices, stateful.pods))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = server.query(name)
        if r.rcode() == dns.rcode.NOERROR:
            break
        time.sleep(0.05)
    assert [x.to_text() for rr in r.answer for x in rr] == ["10.96.0.77"]
    # a broken file is reported and the zone loaded before is kept
    server.zone_file.write_text("{not json")
    time.sleep(0.6)
    assert server.query(name).rcode() == dns.rcode.NOERROR
    lines = server.wait_lines(lambda ls: any("not loaded" in l for l in ls))
    assert sum(l.startswith("loaded zone cluster.local") for l in lines) == 2
    assert any("not loaded" in l for l in lines)


def test_server_without_a_zone_yet_then_with_one(tmp_path):
    zone_file = tmp_path / "zone.json"
    srv = _start(zone_file)
    try:
        assert srv.query(f"kube-dns.kube-system.svc.{D}").rcode() == dns.rcode.SERVFAIL
        assert srv.query("example.com").rcode() == dns.rcode.REFUSED
        srv.write_zone(records_for([], [], []))
        deadline = time.monotonic() + 5
        while srv.query(f"kube-dns.kube-system.svc.{D}").rcode() != dns.rcode.NOERROR:
            assert time.monotonic() < deadline, srv.lines
            time.sleep(0.05)
        # garbage and a zone for another domain do not hurt it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            # a header announcing one question, then a name that runs off the end
            s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fgarbage", ("127.0.0.1", srv.port))
            s.settimeout(2)
            reply = s.recv(512)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
        srv.write_zone(records_for([], [], [], cluster_domain="other.local"))
        time.sleep(0.6)
        assert srv.query(f"kube-dns.kube-system.svc.{D}", tcp=True).rcode() == dns.rcode.NOERROR
        assert any("for domain other.local, not cluster.local" in l
                   for l in srv.wait_lines(lambda ls: any("other.local" in l for l in ls)))
    finally:
        assert _stop(srv) == 0


@needs_seed
def test_sigterm_exits_zero_and_says_so(tmp_path, zone):
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(zone.to_json())
    srv = _start(zone_file)
    try:
        assert srv.query(f"wordpress.default.svc.{D}", tcp=True).rcode() == dns.rcode.NOERROR
        assert [l.split()[0:2] for l in srv.lines if l.startswith("listening")] == [
            ["listening", "udp"], ["listening", "tcp"]]
    finally:
        code = _stop(srv)
    assert code == 0
    assert srv.lines[-1] == "stopped"
