"""The fast and the incremental iptables render against the plain one, on random clusters.

* ``render`` is byte for byte what it was before it was made faster: a digest of its
  output over a corpus of random clusters and node settings, taken with the plain
  render of commit 629b317 (``bench/render.py`` loads that one from git).
* ``IncrementalRenderer`` equals ``render_payload`` on random sequences of changes,
  full and partial syncs, with its own fingerprints and with given ones; large-cluster
  mode switches as the endpoint total crosses 1000.

``RandomCluster(seed)`` holds Services and slices as model objects and changes them
(``step()``): Services come and go, get ports, NodePorts, external IPs, load-balancer
ingress and source ranges, session affinity, eTP/iTP Local; slices gain and lose
endpoints (ready, serving, terminating, local or not, with topology hints), duplicates
across slices, slices without the service-name label or of the FQDN type, core/v1
Endpoints; IPs with leading zeros and of the other family. Changes are made both by
replacing objects and by editing them in place. ``SETTINGS`` are node settings that
together reach every branch of the render.
"""

from __future__ import annotations

import copy
import random
from typing import Dict, List, Optional, Set, Tuple

import hashlib
import pytest

from kproxy.model import objects as o
from kproxy.proxy.iptables import NodeSettings, names, render_payload
from kproxy.proxy.iptables.render import IncrementalRenderer, Payload, shared_renderer
from kproxy.proxy.types import (EndpointInfo, ServicePortInfo, ServicePortName, endpoints_map, service_fingerprints,
                                service_port_infos)

NODE = "test-node"
NODE_IPS = ["192.168.0.2", "192.168.1.2", "2001:db8::1"]

SETTINGS = {
    "upstream-test": NodeSettings(node_name=NODE, node_ips=NODE_IPS, cluster_cidr="10.0.0.0/8",
                                  masquerade_mark="0x4000", random_fully=False, nfacct=True),
    "default": NodeSettings(node_name=NODE, node_ips=NODE_IPS, cluster_cidr="10.244.0.0/16"),
    "masquerade-all-zone": NodeSettings(node_name=NODE, node_ips=NODE_IPS, masquerade_all=True, zone="zone-a",
                                        nodeport_addresses=["192.168.0.0/24", "127.0.0.0/8"],
                                        conntrack_tcp_be_liberal=True),
    "no-detector": NodeSettings(node_name=NODE, node_ips=NODE_IPS, localhost_nodeports=False,
                                nodeport_addresses=["192.168.1.0/24"]),
    "bridge": NodeSettings(node_name=NODE, node_ips=NODE_IPS, local_bridge="cbr0", zone="zone-b", nfacct=True),
    "ipv6": NodeSettings(node_name=NODE, node_ips=NODE_IPS, ip_family="IPv6",
                         cluster_cidr="10.0.0.0/8,fd00:10::/64", local_interface_prefix="veth"),
}

NAMESPACES = ["default", "ns1", "a", "a-b", "kube-system"]
NAMES = ["svc", "web", "web-x", "dns", "s1", "s10", "s2"]
PORTS = [("", "TCP", 80), ("p80", "TCP", 80), ("dns", "UDP", 53), ("dns-tcp", "TCP", 53),
         ("https", "TCP", 443), ("sctp", "SCTP", 7777)]


class RandomCluster:
    def __init__(self, seed: int, services: int = 12, max_endpoints: int = 5):
        self.rng = random.Random(seed)
        self.max_endpoints = max_endpoints
        self.services: Dict[Tuple[str, str], o.Service] = {}
        self.slices: Dict[Tuple[str, str], object] = {}      # (namespace, slice name) -> slice / Endpoints
        self.touched: Set[str] = set()                       # "ns/name" changed since the last take
        for _ in range(services):
            self.add_service()
        for _ in range(self.rng.randint(0, 2)):
            self.add_orphan_slice()
        self.touched.clear()

    # ------------------------------------------------------------------ the inputs

    def objects(self) -> Tuple[List[object], List[object]]:
        services = list(self.services.values())
        slices = list(self.slices.values())
        self.rng.shuffle(services)
        self.rng.shuffle(slices)
        return services, slices

    def take_touched(self) -> Set[str]:
        out, self.touched = self.touched, set()
        return out

    # ------------------------------------------------------------------ random values

    def ip(self, v6: Optional[bool] = None) -> str:
        r = self.rng
        if v6 is None:
            v6 = r.random() < 0.1
        if v6:
            return f"fd00:10::{r.randint(1, 40):x}"
        a, b = r.choice([(10, 96), (10, 0), (172, 30)]), r.randint(0, 3)
        text = f"{a[0]}.{a[1]}.{b}.{r.randint(1, 40)}"
        if r.random() < 0.05:
            text = ".".join(p.zfill(3) for p in text.split("."))      # leading zeros
        return text

    def endpoint_ip(self) -> str:
        r = self.rng
        if r.random() < 0.08:
            return f"fd00:20::{r.randint(1, 30):x}"
        ip = f"10.180.{r.randint(0, 2)}.{r.randint(1, 30)}"
        return "010." + ip[3:] if r.random() < 0.03 else ip

    def service_object(self, ns: str, name: str) -> o.Service:
        r = self.rng
        kind = r.choices(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "headless"],
                         [6, 2, 3, 0.3, 0.4])[0]
        ports = []
        for pname, proto, number in r.sample(PORTS, r.choice([1, 1, 1, 2, 3])):
            node_port = 30000 + r.randint(0, 500) if kind in ("NodePort", "LoadBalancer") else 0
            ports.append(o.ServicePort(port=number, name=pname, protocol=proto, target_port=number + 8000,
                                       node_port=node_port))
        if len(ports) > 1 and any(p.name == "" for p in ports):
            ports = [p for p in ports if p.name] or ports[:1]
        cluster_ip = "None" if kind == "headless" else ("" if kind == "ExternalName" else self.ip(False))
        cluster_ips = [cluster_ip] if cluster_ip not in ("", "None") else []
        if cluster_ips and r.random() < 0.3:
            cluster_ips.append(self.ip(True))
            if r.random() < 0.3:
                cluster_ips.reverse()
                cluster_ip = cluster_ips[0]
        svc = o.Service(metadata=o.ObjectMeta(name=name, namespace=None if ns == "default" and r.random() < 0.5
                                              else ns),
                        type="ClusterIP" if kind == "headless" else kind, cluster_ip=cluster_ip,
                        cluster_ips=cluster_ips, ports=ports, selector={"app": name})
        if kind == "ExternalName":
            svc.external_name = "example.com"
        if kind == "LoadBalancer":
            if r.random() < 0.6:
                self.mutate_service(svc, only="lb")
            if r.random() < 0.4:
                self.mutate_service(svc, only="ranges")
        self.mutate_service(svc, fields=r.randint(0, 4))
        return svc

    def mutate_service(self, svc: o.Service, fields: int = 1, only: Optional[str] = None) -> None:
        r = self.rng
        for _ in range(fields):
            what = only or r.choice(["external_ips", "lb", "ranges", "affinity", "etp", "itp", "health", "port",
                                     "node_port", "cluster_ip"])
            if what == "external_ips":
                svc.external_ips = [self.ip() for _ in range(r.randint(0, 2))]
            elif what == "lb" and svc.type == "LoadBalancer":
                svc.load_balancer_ingress = [
                    o.LoadBalancerIngress(ip=self.ip() if r.random() < 0.9 else "", hostname="lb.example.com",
                                          ip_mode=r.choice([None, None, "VIP", "Proxy", ""]))
                    for _ in range(r.randint(0, 2))]
            elif what == "ranges":
                svc.load_balancer_source_ranges = r.sample(
                    ["203.0.113.0/25", "192.168.0.0/16", " 10.0.0.0/8 ", "fd00::/8", "0198.51.100.0/24",
                     "bogus"], r.randint(0, 2))
            elif what == "affinity":
                svc.session_affinity = r.choice(["None", "ClientIP"])
                svc.session_affinity_timeout = r.choice([10800, 60, 3600])
            elif what == "etp":
                svc.external_traffic_policy = r.choice(["Cluster", "Local"])
            elif what == "itp":
                svc.internal_traffic_policy = r.choice(["Cluster", "Local"])
            elif what == "health":
                svc.health_check_node_port = r.choice([0, 32001, 32002])
            elif what == "port" and svc.ports:
                p = r.choice(svc.ports)
                p.port = r.choice([80, 81, 8080, 53])
            elif what == "node_port" and svc.ports and svc.type in ("NodePort", "LoadBalancer"):
                r.choice(svc.ports).node_port = 30000 + r.randint(0, 500)
            elif what == "cluster_ip" and svc.cluster_ip not in ("", "None"):
                svc.cluster_ip = self.ip(False)
                svc.cluster_ips = [svc.cluster_ip] + svc.cluster_ips[1:]

    def endpoint(self) -> o.Endpoint:
        r = self.rng
        ready = r.choice([True, True, True, False, None])
        terminating = r.random() < 0.2
        ep = o.Endpoint(addresses=[self.endpoint_ip()],
                        conditions=o.EndpointConditions(ready=ready, serving=r.choice([True, True, False, None]),
                                                        terminating=terminating if r.random() < 0.9 else None),
                        node_name=r.choice([NODE, NODE, "node-2", "node-3", None]),
                        zone=r.choice(["zone-a", "zone-b", None]))
        if r.random() < 0.15:
            ep.hints_for_zones = r.sample(["zone-a", "zone-b"], r.randint(1, 2))
        if r.random() < 0.1:
            ep.hints_for_nodes = r.sample([NODE, "node-2"], r.randint(1, 2))
        return ep

    def slice_object(self, svc: o.Service, name: str) -> object:
        r = self.rng
        ports = [o.EndpointPort(port=p.port + 8000 if r.random() < 0.95 else None, name=p.name,
                                protocol=p.protocol) for p in svc.ports if r.random() < 0.9]
        if r.random() < 0.05:
            ports.append(o.EndpointPort(port=9999, name="unknown", protocol="TCP"))
        eps = [self.endpoint() for _ in range(r.randint(0, self.max_endpoints))]
        if r.random() < 0.07:                         # core/v1 Endpoints instead
            subset = o.EndpointSubset(
                addresses=[o.EndpointAddress(ip=e.addresses[0], node_name=e.node_name) for e in eps
                           if e.conditions.ready is not False],
                not_ready_addresses=[o.EndpointAddress(ip=e.addresses[0]) for e in eps
                                     if e.conditions.ready is False],
                ports=ports)
            return o.Endpoints(metadata=o.ObjectMeta(name=svc.name, namespace=svc.namespace), subsets=[subset])
        labels = {o.SERVICE_NAME_LABEL: svc.name} if r.random() < 0.97 else {}
        return o.EndpointSlice(metadata=o.ObjectMeta(name=name, namespace=svc.metadata.namespace, labels=labels),
                               address_type=r.choices(["IPv4", "IPv6", "FQDN"], [8, 1, 0.3])[0],
                               endpoints=eps, ports=ports)

    # ------------------------------------------------------------------ changes

    def _key(self, svc: o.Service) -> str:
        return f"{svc.namespace}/{svc.name}"

    def add_service(self) -> None:
        r = self.rng
        for _ in range(20):
            ns, name = r.choice(NAMESPACES), f"{r.choice(NAMES)}{r.randint(0, 30)}"
            if (ns, name) not in self.services:
                break
        else:
            return
        svc = self.service_object(ns, name)
        self.services[(ns, name)] = svc
        for i in range(r.choice([0, 1, 1, 1, 2])):
            s = self.slice_object(svc, f"{name}-x{i}")
            self.slices[(ns, getattr(s, "name"))] = s
        self.touched.add(self._key(svc))

    def add_orphan_slice(self) -> None:
        svc = self.service_object(self.rng.choice(NAMESPACES), "orphan")
        s = self.slice_object(svc, f"orphan-{self.rng.randint(0, 99)}")
        self.slices[(svc.namespace, getattr(s, "name"))] = s

    def slices_of(self, svc: o.Service) -> List[Tuple[str, str]]:
        out = []
        for key, s in self.slices.items():
            if isinstance(s, o.Endpoints):
                if (s.namespace, s.name) == (svc.namespace, svc.name):
                    out.append(key)
            elif s.namespace == svc.namespace and s.service_name == svc.name:
                out.append(key)
        return out

    def step(self) -> None:
        """One random change (sometimes a few)."""
        r = self.rng
        for _ in range(r.choice([1, 1, 1, 2, 3])):
            if not self.services:
                self.add_service()
                continue
            key = r.choice(sorted(self.services))
            svc = self.services[key]
            what = r.choices(["add", "remove", "replace-svc", "edit-svc", "edit-endpoints", "replace-slice",
                              "add-slice", "remove-slice", "noop"], [2, 1.5, 1, 2, 4, 2, 1, 1, 0.5])[0]
            if what == "add":
                self.add_service()
                continue
            if what == "remove":
                del self.services[key]
                if r.random() < 0.7:
                    for sk in self.slices_of(svc):
                        del self.slices[sk]
            elif what == "replace-svc":
                new = copy.deepcopy(svc)
                self.mutate_service(new, r.randint(1, 3))
                self.services[key] = new
            elif what == "edit-svc":
                self.mutate_service(svc, r.randint(1, 2))          # in place
            elif what == "edit-endpoints":
                keys = self.slices_of(svc)
                if not keys:
                    continue
                s = self.slices[r.choice(keys)]
                if isinstance(s, o.Endpoints):
                    if s.subsets:
                        s.subsets[0].addresses.append(o.EndpointAddress(ip=self.endpoint_ip()))
                elif s.endpoints and r.random() < 0.5:
                    ep = r.choice(s.endpoints)
                    change = r.choice(["ready", "terminating", "node", "ip", "remove", "hints"])
                    if change == "ready":
                        ep.conditions.ready = not ep.conditions.ready
                    elif change == "terminating":
                        ep.conditions.terminating = not ep.conditions.terminating
                    elif change == "node":
                        ep.node_name = r.choice([NODE, "node-2", None])
                    elif change == "ip":
                        ep.addresses[0] = self.endpoint_ip()
                    elif change == "hints":
                        ep.hints_for_zones = [] if ep.hints_for_zones else ["zone-a"]
                    else:
                        s.endpoints.remove(ep)
                else:
                    s.endpoints.append(self.endpoint())
            elif what == "replace-slice":
                for sk in self.slices_of(svc)[:1]:
                    self.slices[sk] = self.slice_object(svc, sk[1])
            elif what == "add-slice":
                s = self.slice_object(svc, f"{svc.name}-x{r.randint(2, 9)}")
                self.slices[(svc.namespace, getattr(s, "name"))] = s
            elif what == "remove-slice":
                keys = self.slices_of(svc)
                if keys:
                    del self.slices[r.choice(keys)]
            self.touched.add(self._key(svc))


# --------------------------------------------------------------------------- the full render


def corpus(render, settings_of=lambda s: s, seeds: int = 30, steps: int = 3):
    """(label, text, sorted active chains) of ``render`` over random clusters: full and
    partial syncs, with and without existing chains."""
    for seed in range(seeds):
        for label, settings in SETTINGS.items():
            cluster = RandomCluster(seed, services=(3, 12, 30)[seed % 3])
            for step in range(steps):
                services, slices = cluster.objects()
                changed = cluster.take_touched() if step else None
                existing = {"KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "MY-CHAIN"} if step == 1 else None
                payload = render(services, slices, settings_of(settings), changed, existing)
                yield (f"{seed}/{label}/{step}", payload.text, sorted(payload.active_nat_chains),
                       payload.deleted_chains, payload.large_cluster_mode)
                cluster.step()


def corpus_digest(render, settings_of=lambda s: s) -> str:
    h = hashlib.sha256()
    for item in corpus(render, settings_of):
        h.update(repr(item).encode())
    return h.hexdigest()


# Taken with the plain render of 629b317:
#   base = bench.render.load_baseline("629b317")
#   corpus_digest(base.render_payload, lambda s: base.NodeSettings(**vars(s)))
PLAIN_RENDER_DIGEST = "77542e3fd1d62e2038ed48e6b07931c318ed059a2f1f69e5fa9c6f19965bc6ed"


def test_render_is_byte_identical_to_the_plain_render_of_before():
    assert corpus_digest(render_payload) == PLAIN_RENDER_DIGEST


def test_corpus_reaches_every_kind_of_rule():
    texts = "\n".join(text for _, text, *_ in corpus(render_payload, seeds=12, steps=2))
    for needle in ("KUBE-FW-", "KUBE-EXT-", "KUBE-SVL-", "--probability", "--rcheck", "has no local endpoints",
                   "has no endpoints", "health check node port", "nfacct", "-X KUBE-S", "external IP",
                   "loadbalancer IP", "-A KUBE-PROXY-FIREWALL", "pod traffic for", "[fd00:20::", "-i cbr0",
                   "-i veth+", "KUBE-NODEPORTS -m comment", "-j REJECT", "-j DROP", 'IP" -s 10.'):
        assert needle in texts, needle


def test_fast_made_dataclasses_equal_constructed_ones():
    """endpoints_map and service_port_infos fill the frozen dataclasses through __dict__:
    every field is set, equality/hash/repr see only fields, str() is IP:port."""
    cluster = RandomCluster(5, services=30)
    services, slices = cluster.objects()
    seen = 0
    for family in ("IPv4", "IPv6"):
        for eps in endpoints_map(slices, NODE, family).values():
            for ep in eps:
                copy_ = EndpointInfo(**{f: getattr(ep, f) for f in EndpointInfo.__dataclass_fields__})
                assert ep == copy_ and hash(ep) == hash(copy_) and repr(ep) == repr(copy_)
                assert str(ep) == str(copy_) == (f"[{ep.ip}]:{ep.port}" if ":" in ep.ip else f"{ep.ip}:{ep.port}")
                seen += 1
        for svc in services:
            if isinstance(svc, o.Service):
                for spn, info in service_port_infos(svc, family).items():
                    copy_ = ServicePortInfo(**{f: getattr(info, f) for f in ServicePortInfo.__dataclass_fields__})
                    assert info == copy_ and hash(info) == hash(copy_) and repr(info) == repr(copy_)
                    made = ServicePortName(spn.namespace, spn.name, spn.port, spn.protocol)
                    assert spn == info.name == made and hash(spn) == hash(made) and str(spn) == str(made)
                    seen += 1
    assert seen > 50


def test_payload_parts_are_lines_and_text_follows_edits_to_them():
    cluster = RandomCluster(3, services=12)
    payload = render_payload(*cluster.objects(), SETTINGS["default"])
    text = payload.text
    lines = ["*filter", *payload.filter_chains, *payload.filter_rules, "COMMIT",
             "*nat", *payload.nat_chains, *payload.nat_rules, "COMMIT"]
    assert "\n".join(lines) + "\n" == text and all("\n" not in line for line in lines)
    payload.nat_rules.append("-A KUBE-SERVICES -j RETURN")
    assert payload.text == text[:-len("COMMIT\n")] + "-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
    assert Payload(filter_chains=[":A - [0:0]"], nat_rules=["-X A"]).text == "*filter\n:A - [0:0]\nCOMMIT\n*nat\n-X A\nCOMMIT\n"


# --------------------------------------------------------------------------- incremental


def _check_sequence(settings: NodeSettings, seed: int, steps: int, given: bool, services: int = 12,
                    max_endpoints: int = 5) -> List[Tuple[Payload, int]]:
    """Random changes; at each sync the incremental payload equals the plain one."""
    rng = random.Random(seed)
    cluster = RandomCluster(seed, services=services, max_endpoints=max_endpoints)
    inc = IncrementalRenderer(settings)
    existing: Optional[Set[str]] = None
    out = []
    for step in range(steps):
        services_, slices = cluster.objects()
        touched = cluster.take_touched()
        if step == 0 or rng.random() < 0.15:
            changed = None
        else:
            changed = touched | ({"ns1/web3", "nowhere/none"} if rng.random() < 0.3 else set())
        prints = service_fingerprints(services_, slices) if given else None
        want = render_payload(services_, slices, settings, changed, existing)
        got = inc.render_payload(services_, slices, changed, existing, fingerprints=prints)
        assert got.text == want.text, (seed, step, changed)
        assert (got.active_nat_chains, got.deleted_chains, got.large_cluster_mode, got.full_sync) == (
            want.active_nat_chains, want.deleted_chains, want.large_cluster_mode, want.full_sync)
        if changed is not None:
            # only what changed was rendered again (and what is written kept from the other mode)
            assert inc.last_rendered <= len(changed), (inc.last_rendered, changed)
        out.append((got, inc.last_rendered))
        existing = set(want.active_nat_chains) | ({"KUBE-SVC-GONEGONEGONEGONE"} if rng.random() < 0.2 else set())
        cluster.step()
    return out


@pytest.mark.parametrize("label", sorted(SETTINGS))
@pytest.mark.parametrize("given", [False, True], ids=["own-fingerprints", "given-fingerprints"])
def test_incremental_equals_render_on_random_changes(label, given):
    for seed in range(8):
        _check_sequence(SETTINGS[label], seed, steps=10, given=given, services=(3, 12, 30)[seed % 3])


def test_incremental_large_cluster_mode_switches_both_ways():
    """Services with ~100 endpoints each: the total crosses 1000 up and down; pieces
    kept from the other mode are rendered again when their chains are written."""
    modes = set()
    for seed in range(4):
        for given in (False, True):
            for payload, _ in _check_sequence(SETTINGS["upstream-test"], seed, steps=25, given=given,
                                              services=10, max_endpoints=200):
                modes.add(payload.large_cluster_mode)
    assert modes == {False, True}


def _big_slice(ns: str, name: str, count: int, start: int = 0) -> o.EndpointSlice:
    return o.EndpointSlice(
        metadata=o.ObjectMeta(name=f"{name}-1", namespace=ns, labels={o.SERVICE_NAME_LABEL: name}),
        endpoints=[o.Endpoint(addresses=[f"10.1.{i // 200}.{i % 200 + 1}"], node_name=NODE)
                   for i in range(start, start + count)],
        ports=[o.EndpointPort(port=8080, name="p", protocol="TCP")])


def _svc(ns: str, name: str, ip: str) -> o.Service:
    return o.Service(metadata=o.ObjectMeta(name=name, namespace=ns), cluster_ip=ip, cluster_ips=[ip],
                     ports=[o.ServicePort(port=80, name="p", protocol="TCP", target_port=8080)])


def test_incremental_large_cluster_mode_at_the_threshold():
    settings = SETTINGS["upstream-test"]
    services = [_svc("ns", f"s{i}", f"172.30.0.{i + 1}") for i in range(3)]
    limit = names.LARGE_CLUSTER_ENDPOINTS_THRESHOLD
    slices = [_big_slice("ns", "s0", 500), _big_slice("ns", "s1", limit - 500, start=500)]
    inc = IncrementalRenderer(settings)

    def sync(changed, expect_large):
        got = inc.render_payload(services, slices, changed)
        want = render_payload(services, slices, settings, changed)
        assert got == want and got.large_cluster_mode is expect_large
        return got

    sync(None, False)                                   # exactly 1000: not large
    slices.append(_big_slice("ns", "s2", 1, start=2000))
    out = sync({"ns/s2"}, True)                         # 1001: large; only s2's chains written
    assert inc.last_rendered == 1
    assert '--comment "ns/s0:p -> ' not in out.text and "-A KUBE-SEP-" in out.text
    out = sync({"ns/s0"}, True)                         # s0 was rendered with comments: again
    assert inc.last_rendered == 1 and "--comment ns/s0:p" not in out.text
    del slices[2]
    sync({"ns/s2"}, False)                              # back to 1000
    out = sync(None, False)                             # a full sync: s0 back in the other mode
    assert '--comment "ns/s0:p -> ' in out.text and "--comment ns/s1:p" in out.text


def test_incremental_rerenders_only_the_changed_service_and_sees_edits_in_place():
    settings = SETTINGS["default"]
    services = [_svc("ns", f"s{i}", f"172.30.0.{i + 1}") for i in range(50)]
    slices = [_big_slice("ns", f"s{i}", 2, start=2 * i) for i in range(50)]
    inc = IncrementalRenderer(settings)
    assert inc.render(services, slices) == render_payload(services, slices, settings).text
    assert inc.last_rendered == 50 and len(inc) == 50
    assert inc.render(services, slices, set()) == render_payload(services, slices, settings, set()).text
    assert inc.last_rendered == 0
    slices[7].endpoints[0].conditions.ready = False                     # in place
    assert inc.render(services, slices, {"ns/s7"}) == render_payload(services, slices, settings, {"ns/s7"}).text
    assert inc.last_rendered == 1
    services[9].ports[0].port = 81                                      # in place
    del services[3]                                                     # a Service goes
    services.append(_svc("ns", "new", "172.30.1.1"))                    # one comes
    changed = {"ns/s9", "ns/s3", "ns/new"}
    payload = inc.render_payload(services, slices, changed, existing_chains={"KUBE-SVC-ZZZZZZZZZZZZZZZZ"})
    assert payload == render_payload(services, slices, settings, changed, {"KUBE-SVC-ZZZZZZZZZZZZZZZZ"})
    assert inc.last_rendered == 2 and len(inc) == 50


def test_given_fingerprints_decide_what_is_rendered_again():
    settings = SETTINGS["default"]
    services = [_svc("ns", f"s{i}", f"172.30.0.{i + 1}") for i in range(20)]
    slices = [_big_slice("ns", f"s{i}", 2, start=2 * i) for i in range(20)]
    inc = IncrementalRenderer(settings)
    prints = service_fingerprints(services, slices)
    inc.render(services, slices, fingerprints=prints)
    slices[4] = _big_slice("ns", "s4", 3, start=100)
    prints = dict(prints, **{"ns/s4": service_fingerprints(services[4:5], slices[4:5])["ns/s4"]})
    got = inc.render(services, slices, {"ns/s4"}, fingerprints=prints)
    assert got == render_payload(services, slices, settings, {"ns/s4"}).text and inc.last_rendered == 1
    # a fingerprint missing from the mapping: the renderer takes its own
    del prints["ns/s5"]
    slices[5] = _big_slice("ns", "s5", 1, start=300)
    got = inc.render(services, slices, {"ns/s5"}, fingerprints=prints)
    assert got == render_payload(services, slices, settings, {"ns/s5"}).text and inc.last_rendered == 1


def test_service_fingerprints_change_with_everything_that_shapes_rules():
    cluster = RandomCluster(11, services=30)
    for _ in range(60):
        services, slices = cluster.objects()
        before = service_fingerprints(services, slices)
        settings = SETTINGS["upstream-test"]
        cluster.step()
        touched = cluster.take_touched()
        services2, slices2 = cluster.objects()
        after = service_fingerprints(services2, slices2)
        for key in set(before) & set(after) - touched:
            assert before[key] == after[key], key
        # Services whose fingerprint did not move render the same
        same = {k for k in set(before) & set(after) if before[k] == after[k]}
        a = {line for line in render_payload(services, slices, settings).text.splitlines()
             if any(f"{k}:" in line or f'"{k} ' in line for k in same)}
        b = {line for line in render_payload(services2, slices2, settings).text.splitlines()
             if any(f"{k}:" in line or f'"{k} ' in line for k in same)}
        if before.keys() == after.keys():
            # (large-cluster mode did not flip for these small clusters)
            assert a == b


def test_shared_renderer_is_one_per_settings():
    a = shared_renderer(SETTINGS["default"])
    assert shared_renderer(NodeSettings(**vars(SETTINGS["default"]))) is a
    assert shared_renderer(SETTINGS["bridge"]) is not a


def test_chain_name_hash_is_names_b32_16():
    from kproxy.proxy.iptables.render import _b32_16, _hash16
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("abz/:.-019[]ÄÉ") for _ in range(rng.randint(0, 80)))
        assert _b32_16(text) == names._b32_16(text) == _hash16(text) == _hash16(text), text


def test_incremental_takes_iterators_and_names_that_only_differ_in_where_the_slash_is():
    """Two Services whose "namespace/name" strings are equal ("a/b" + "c" and "a" +
    "b/c": not valid names, but nothing here validates them) stay two Services."""
    settings = SETTINGS["default"]
    services = [_svc("a/b", "c", "172.30.0.1"), _svc("a", "b/c", "172.30.0.2"), _svc("ns", "s", "172.30.0.3")]
    slices = [_big_slice("a/b", "c", 2), _big_slice("a", "b/c", 1, start=10), _big_slice("ns", "s", 1, start=20)]
    inc = IncrementalRenderer(settings)
    for changed in (None, {"a/b/c"}, {"ns/s"}, set()):
        got = inc.render_payload(iter(services), iter(slices), changed)
        assert got == render_payload(services, slices, settings, changed)
        assert got.text.count("-j DNAT") == (4 if changed is None else 3 if changed == {"a/b/c"}
                                             else 1 if changed else 0)
