"""The cluster's DNS records as CoreDNS's ``kubernetes`` plugin answers them.

``records_for(services, endpoint_slices, pods)`` is a pure function from kproxy's model
objects (what ``kproxy.reconciler.current_view`` or ``kproxy.render.resolve_manifests``
give) to a :class:`Zone`; ``Zone.lookup(qname, qtype)`` answers one question the way
CoreDNS would with the Corefile kubeadm, kind and minikube install::

    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    forward . /etc/resolv.conf

What is in the zone (the Kubernetes DNS specification, as CoreDNS implements it):

* ``<svc>.<ns>.svc.<domain>``: A/AAAA of the ClusterIP(s). For a headless Service, the
  Ready endpoint addresses instead (none Ready: the name does not exist, NXDOMAIN, as
  in CoreDNS). SRV at the same name for every port: ``0 <weight> <port> <target>``.
* ``_<port>._<proto>.<svc>.<ns>.svc.<domain>`` for each named port: SRV (and A, as
  CoreDNS answers an A question there too). The target is the Service name, or for a
  headless Service one ``<endpoint>.<svc>.<ns>.svc.<domain>`` per endpoint, with the
  endpoint's port. The weight is CoreDNS's: ``floor(100 / n)`` for the n records that
  answer the question (at least 1); the priority is 0.
* ``<endpoint>.<svc>.<ns>.svc.<domain>``: A of one Ready endpoint, where ``<endpoint>``
  is the endpoint's hostname (a Pod with ``hostname`` whose ``subdomain`` is the
  Service) or else its IP with dashes (``10-244-0-5``). CoreDNS answers these for
  every Service with endpoints, not only headless ones, and so does this zone.
* ExternalName: ``<svc>.<ns>.svc.<domain>`` CNAME the external name (and SRV
  ``0 100 0 <external name>``, as CoreDNS gives).
* Pods: ``<a-b-c-d>.<ns>.pod.<domain>`` A. With ``pods="insecure"`` (the kubeadm
  default) any well-formed address in an existing namespace resolves; ``"verified"``
  only a Pod's own address in its own namespace; ``"disabled"`` none.
* ``kube-dns.kube-system.svc.<domain>`` (ports ``dns`` 53/UDP, ``dns-tcp`` 53/TCP,
  ``metrics`` 9153/TCP, as kubeadm's Service) unless the Services already hold one;
  ``ns.dns.<domain>`` A, the apex SOA and NS, ``dns-version.<domain>`` TXT ``1.1.0``.
* PTR in ``in-addr.arpa``/``ip6.arpa`` for ClusterIPs (the Service name) and for
  Ready endpoint addresses (the endpoint name).

Answers: the records of the name and type (NOERROR); an existing name without that type
gives NOERROR with no answer (the SOA in the authority section), as do the structural
names ``svc.<domain>``, ``<ns>.svc.<domain>``, ``<ns>.pod.<domain>`` of an existing
namespace; any other name under the cluster domain gives NXDOMAIN (with the SOA).

Names outside the cluster domain (and reverse names with no record) are REFUSED. In a
real cluster CoreDNS would forward them to the node's resolver (``forward .
/etc/resolv.conf``); the emulated cluster has no upstream resolver and no route out, so
there is nothing to forward to, and saying so at once beats a client's time-out.

Every record has TTL 30: the CoreDNS plugin's own default is 5 seconds, but every
kubeadm/kind/minikube Corefile sets ``ttl 30`` (kubernetes/kubernetes#76238, to match
kube-dns), and that is what a student's cluster answers with.
"""

from __future__ import annotations

import ipaddress
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from kproxy.model import objects as o

TTL = 30                     # kubeadm's Corefile: `ttl 30`
DNS_SCHEMA_VERSION = "1.1.0"  # the TXT answer at dns-version.<domain>
DNS_SCHEMA_TTL = 28800
DEFAULT_DOMAIN = "cluster.local"
DEFAULT_DNS_IP = "10.96.0.10"
DEFAULT_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
POD_MODES = ("insecure", "verified", "disabled")
REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400
MAX_CNAME_CHAIN = 8
ZONE_FORMAT = "kproxy-dns-zone"
ZONE_VERSION = 1

NOERROR, NXDOMAIN, REFUSED, SERVFAIL = "NOERROR", "NXDOMAIN", "REFUSED", "SERVFAIL"


def normalize(name: str) -> str:
    """A domain name as the zone keys it: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


def under(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def fqdn(name: str) -> str:
    return normalize(name) + "."


def dashed(ip: str) -> str:
    """``10.244.0.5`` -> ``10-244-0-5`` (and ``:`` -> ``-`` for IPv6), CoreDNS's
    endpoint name for an address without a hostname."""
    return ip.replace(".", "-").replace(":", "-")


def reverse_name(ip: str) -> str:
    return normalize(ipaddress.ip_address(ip).reverse_pointer)


def _addr_type(ip: str) -> Optional[str]:
    try:
        return "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
    except ValueError:
        return None


@dataclass(frozen=True)
class Record:
    """One resource record; ``data`` is the RDATA in zone-file presentation form
    (names absolute, with their trailing dot)."""

    name: str
    type: str
    data: str
    ttl: int = TTL

    def text(self) -> str:
        return f"{self.name}. {self.ttl} IN {self.type} {self.data}"

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "ttl": self.ttl, "data": self.data}


@dataclass
class Answer:
    """What the server sends back for one question."""

    rcode: str
    answer: List[Record] = field(default_factory=list)
    authority: List[Record] = field(default_factory=list)
    additional: List[Record] = field(default_factory=list)
    authoritative: bool = True

    def values(self, type_: Optional[str] = None) -> List[str]:
        """The answer section's data (of one type), e.g. the A addresses."""
        return [r.data for r in self.answer if type_ is None or r.type == type_]


class Zone:
    """The records of the cluster domain (and the reverse names), with CoreDNS's rules
    for answering. Build one with :func:`records_for`; save it with ``to_json()``."""

    def __init__(self, domain: str = DEFAULT_DOMAIN, records: Iterable[Record] = (),
                 namespaces: Iterable[str] = DEFAULT_NAMESPACES, pods: str = "insecure",
                 ttl: int = TTL, serial: Optional[int] = None,
                 nameservers: Sequence[str] = (DEFAULT_DNS_IP,)):
        if pods not in POD_MODES:
            raise ValueError(f"pods must be one of {', '.join(POD_MODES)}, not {pods!r}")
        self.domain = normalize(domain)
        self.ttl = int(ttl)
        self.pods = pods
        self.namespaces: List[str] = sorted({normalize(n) for n in namespaces})
        self.nameservers: List[str] = list(nameservers)
        self._by_name: Dict[str, Dict[str, List[Record]]] = {}
        self._seen: set = set()          # every record once (an rrset can be thousands long)
        for r in records:
            self._add(r)
        self.serial = int(serial) if serial is not None else self._content_serial()

    # ---- building ---------------------------------------------------------------------

    def _add(self, r: Record) -> None:
        r = Record(normalize(r.name), r.type.upper(), r.data, int(r.ttl))
        if r not in self._seen:
            self._seen.add(r)
            self._by_name.setdefault(r.name, {}).setdefault(r.type, []).append(r)

    def _content_serial(self) -> int:
        """A serial that changes whenever the content does (CoreDNS uses the time of the
        last change it saw; a pure function has no clock)."""
        text = json.dumps([self.domain, self.pods, self.namespaces, self.nameservers,
                           [r.to_dict() for r in self.records]], sort_keys=True)
        return zlib.crc32(text.encode()) or 1

    # ---- reading ----------------------------------------------------------------------

    @property
    def records(self) -> List[Record]:
        return [r for name in sorted(self._by_name) for t in sorted(self._by_name[name])
                for r in self._by_name[name][t]]

    def get(self, name: str, type_: str) -> List[Record]:
        return list(self._rrsets(normalize(name)).get(type_.upper(), []))

    def values(self, name: str, type_: str) -> List[str]:
        return [r.data for r in self.get(name, type_)]

    def __contains__(self, name: str) -> bool:
        return self.exists(name)

    def __len__(self) -> int:
        return sum(len(v) for t in self._by_name.values() for v in t.values())

    def soa(self, zone: Optional[str] = None) -> Record:
        z = normalize(zone) if zone is not None else self.domain
        return Record(z, "SOA", f"ns.dns.{self.domain}. hostmaster.{self.domain}. {self.serial} "
                                f"{SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {self.ttl}", min(self.ttl, 300))

    def _structural(self, name: str) -> bool:
        """Names CoreDNS answers NOERROR/no data for: the apex, svc., pod., and
        <ns>.svc./<ns>.pod. of an existing namespace."""
        d = self.domain
        if name in (d, f"svc.{d}", f"pod.{d}"):
            return True
        for kind in ("svc", "pod"):
            suffix = f".{kind}.{d}"
            if name.endswith(suffix):
                ns = name[:-len(suffix)]
                if "." not in ns and ns in self.namespaces:
                    return kind == "svc" or self.pods != "disabled"
        return False

    def _pod_record(self, name: str) -> Optional[Record]:
        """``pods insecure``: any well-formed address in an existing namespace."""
        if self.pods != "insecure":
            return None
        suffix = f".pod.{self.domain}"
        if not name.endswith(suffix):
            return None
        parts = name[:-len(suffix)].split(".")
        if len(parts) != 2 or parts[1] not in self.namespaces:
            return None
        label = parts[0]
        if label.count("-") == 3 and "--" not in label:
            text = label.replace("-", ".")
        else:
            text = label.replace("-", ":")
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return None
        return Record(name, "AAAA" if ip.version == 6 else "A", str(ip), self.ttl)

    def _rrsets(self, name: str) -> Dict[str, List[Record]]:
        got = self._by_name.get(name)
        if name == self.domain:          # the SOA carries the serial: made when asked
            return dict(got or {}, SOA=[self.soa()])
        if got:
            return got
        pod = self._pod_record(name)
        return {pod.type: [pod]} if pod else {}

    def exists(self, name: str) -> bool:
        n = normalize(name)
        return bool(self._rrsets(n)) or (under(n, self.domain) and self._structural(n))

    def authority_zone(self, name: str) -> Optional[str]:
        """The zone a name belongs to here, or None (it would be forwarded)."""
        n = normalize(name)
        if under(n, self.domain):
            return self.domain
        for rz in REVERSE_ZONES:
            if under(n, rz) and n in self._by_name:
                return rz
        return None

    # ---- answering --------------------------------------------------------------------

    def lookup(self, qname: str, qtype: str) -> Answer:
        """Answer one question (``qtype`` a type name: "A", "SRV", ...).

        Answer records carry ``qname`` as written (case kept), as CoreDNS does."""
        name, qtype = normalize(qname), qtype.upper()
        owner = qname.rstrip(".") or name
        zone = self.authority_zone(name)
        if zone is None:
            return Answer(REFUSED, authoritative=False)
        rrsets = self._rrsets(name)
        if not rrsets and not self._structural(name):
            return Answer(NXDOMAIN, authority=[self.soa(zone)])
        answer: List[Record] = []
        additional: List[Record] = []
        if qtype in rrsets:
            answer = [_renamed(r, owner) for r in rrsets[qtype]]
        elif "CNAME" in rrsets:
            answer = self._chase(rrsets["CNAME"][0], owner, qtype)
        if qtype in ("SRV", "NS"):
            additional = self._addresses([_target(r) for r in answer])
        if not answer:
            return Answer(NOERROR, authority=[self.soa(zone)])
        return Answer(NOERROR, answer=answer, additional=additional)

    def _chase(self, cname: Record, owner: str, qtype: str) -> List[Record]:
        """The CNAME, then what its target has of ``qtype`` when the target is in this
        zone (CoreDNS would ask the upstream for a target outside: there is none)."""
        out = [_renamed(cname, owner)]
        seen = {normalize(owner)}
        target = normalize(cname.data)
        while target not in seen and len(out) <= MAX_CNAME_CHAIN and under(target, self.domain):
            seen.add(target)
            rrsets = self._rrsets(target)
            if qtype in rrsets:
                out.extend(rrsets[qtype])
                break
            if "CNAME" not in rrsets:
                break
            out.append(rrsets["CNAME"][0])
            target = normalize(rrsets["CNAME"][0].data)
        return out

    def _addresses(self, targets: Iterable[str]) -> List[Record]:
        out: List[Record] = []
        for t in targets:
            for type_ in ("A", "AAAA"):
                for r in self._rrsets(normalize(t)).get(type_, []):
                    if r not in out:
                        out.append(r)
        return out

    # ---- the zone file ----------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": ZONE_FORMAT, "version": ZONE_VERSION, "domain": self.domain,
                "ttl": self.ttl, "serial": self.serial, "pods": self.pods,
                "namespaces": list(self.namespaces), "nameservers": list(self.nameservers),
                "records": [r.to_dict() for r in self.records]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Zone":
        if d.get("format") != ZONE_FORMAT or d.get("version") != ZONE_VERSION:
            raise ValueError(f"not a {ZONE_FORMAT} version {ZONE_VERSION} document")
        records = [Record(r["name"], r["type"], r["data"], int(r.get("ttl", TTL))) for r in d["records"]]
        return cls(domain=d["domain"], records=records, namespaces=d.get("namespaces", DEFAULT_NAMESPACES),
                   pods=d.get("pods", "insecure"), ttl=d.get("ttl", TTL), serial=d.get("serial"),
                   nameservers=d.get("nameservers", (DEFAULT_DNS_IP,)))

    @classmethod
    def from_json(cls, text: str) -> "Zone":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, Zone) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Zone({self.domain!r}, {len(self)} records, serial={self.serial})"


def _renamed(r: Record, owner: str) -> Record:
    return r if normalize(owner) != r.name else Record(owner, r.type, r.data, r.ttl)


def _target(r: Record) -> str:
    if r.type == "SRV":
        return r.data.split()[3]
    if r.type in ("NS", "CNAME", "PTR"):
        return r.data
    return ""


# --------------------------------------------------------------------------- building


@dataclass
class _Entry:
    """One of CoreDNS's msg.Service values: an address, a port (-1 for none) and the
    name an SRV record points at."""

    ip: str
    port: int
    target: str
    port_name: str = ""
    protocol: str = ""


def kube_dns_service(dns_ip: str = DEFAULT_DNS_IP) -> o.Service:
    """kube-system/kube-dns as kubeadm creates it."""
    return o.Service(
        metadata=o.ObjectMeta(name="kube-dns", namespace="kube-system",
                              labels={"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}),
        cluster_ip=dns_ip, cluster_ips=[dns_ip], selector={"k8s-app": "kube-dns"},
        ports=[o.ServicePort(port=53, name="dns", protocol="UDP", target_port=53),
               o.ServicePort(port=53, name="dns-tcp", protocol="TCP", target_port=53),
               o.ServicePort(port=9153, name="metrics", protocol="TCP", target_port=9153)])


def _srv_weight(n: int) -> int:
    # plugin/backend_lookup.go: weight 100 each, then floor(100/total * 100), at least 1
    return max(1, int(math.floor((100.0 / float(100 * n)) * 100)))


def _emit(out: List[Record], name: str, entries: List[_Entry], ttl: int) -> None:
    """A/AAAA and SRV at ``name`` for the entries that answer a question there."""
    if not entries:
        return
    seen_ip: Set[str] = set()
    for e in entries:
        t = _addr_type(e.ip)
        if t and e.ip not in seen_ip:
            seen_ip.add(e.ip)
            out.append(Record(name, t, e.ip, ttl))
    weight = _srv_weight(len(entries))
    seen_srv: Set[Tuple[str, int]] = set()
    for e in entries:
        if e.port < 0 or (e.target, e.port) in seen_srv:
            continue
        seen_srv.add((e.target, e.port))
        out.append(Record(name, "SRV", f"0 {weight} {e.port} {e.target}.", ttl))


def _ready_endpoints(slices: List[o.EndpointSlice], hostnames: Dict[Tuple[str, str], str]):
    """(endpoint name, ip, ports) for each Ready address of the Service's slices, in the
    slices' order; ports [(name, protocol, number)], or [("", "", -1)] when the slice
    has none (CoreDNS's sentinel: an A record, no SRV)."""
    out = []
    for s in slices:
        ports = [(p.name or "", (p.protocol or "TCP"), p.port) for p in s.ports if p.port is not None]
        for ep in s.endpoints:
            if ep.conditions.ready is False:
                continue
            for ip in ep.addresses:
                host = ep.hostname
                if not host and ep.target_ref and ep.target_ref.get("kind", "Pod") == "Pod":
                    host = hostnames.get((s.namespace, ep.target_ref.get("name", "")))
                out.append((normalize(host) if host else dashed(ip), ip, ports or [("", "", -1)]))
    return out


def records_for(services: Iterable[o.Service], endpoint_slices: Iterable[o.EndpointSlice],
                pods: Iterable[o.Pod], cluster_domain: str = DEFAULT_DOMAIN, *,
                dns_ip: Optional[str] = DEFAULT_DNS_IP, pods_mode: str = "insecure",
                namespaces: Iterable[str] = (), ttl: int = TTL,
                serial: Optional[int] = None) -> Zone:
    """The zone CoreDNS would serve for these objects (see the module docstring).

    ``endpoint_slices`` are matched to Services by namespace and the
    ``kubernetes.io/service-name`` label; only Ready endpoints (``ready`` True or unset)
    count. ``pods`` give the namespaces, the pod records (``pods_mode``) and the
    hostnames of endpoints whose Pod sets ``hostname`` and ``subdomain: <service>``.
    ``dns_ip`` is kube-dns's ClusterIP: it adds ``kube-dns.kube-system.svc`` when no
    such Service is given, and ``ns.dns.<domain>`` (None for neither). ``namespaces``
    adds existing namespaces beyond the default four and those the objects are in.
    """
    domain = normalize(cluster_domain)
    services = list(services)
    slices = list(endpoint_slices)
    pods = list(pods)
    if dns_ip and not any(s.namespace == "kube-system" and s.name == "kube-dns" for s in services):
        services.append(kube_dns_service(dns_ip))

    ns_set = set(DEFAULT_NAMESPACES) | {normalize(n) for n in namespaces}
    ns_set |= {s.namespace for s in services} | {s.namespace for s in slices} | {p.namespace for p in pods}

    by_svc: Dict[Tuple[str, str], List[o.EndpointSlice]] = {}
    for sl in sorted(slices, key=lambda s: (s.namespace, s.name)):
        if sl.service_name:
            by_svc.setdefault((sl.namespace, sl.service_name), []).append(sl)
    hostnames = {(p.namespace, p.name): p.spec.hostname for p in pods
                 if p.spec.hostname and p.spec.subdomain}
    subdomain_of = {(p.namespace, p.name): p.spec.subdomain for p in pods if p.spec.hostname}

    out: List[Record] = []
    ptr_service: Dict[str, str] = {}
    ptr_endpoint: Dict[str, List[str]] = {}
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        base = f"{svc.name}.{svc.namespace}.svc.{domain}"
        if svc.type == "ExternalName":
            target = normalize(svc.external_name)
            if target and _addr_type(target) is None:
                out.append(Record(base, "CNAME", target + ".", ttl))
                out.append(Record(base, "SRV", f"0 100 0 {target}.", ttl))
            continue
        # hostnames count for a Service only when the Pod's subdomain names it
        svc_hosts = {k: h for k, h in hostnames.items() if subdomain_of.get(k) == svc.name}
        endpoints = _ready_endpoints(by_svc.get((svc.namespace, svc.name), []), svc_hosts)
        ep_entries: List[_Entry] = []
        for host, ip, ports in endpoints:
            for pname, proto, number in ports:
                ep_entries.append(_Entry(ip, number, f"{host}.{base}", pname, proto))
                ptr_endpoint.setdefault(ip, [])
                if f"{host}.{base}." not in ptr_endpoint[ip]:
                    ptr_endpoint[ip].append(f"{host}.{base}.")
        if svc.headless:
            entries = ep_entries
        else:
            ips = [ip for ip in (svc.cluster_ips or [svc.cluster_ip]) if ip and ip != "None"]
            entries = [_Entry(ip, p.port, base, p.name, p.protocol) for p in svc.ports for ip in ips]
            for ip in ips:
                ptr_service.setdefault(ip, f"{base}.")
        _emit(out, base, entries, ttl)
        for pname, proto in sorted({(e.port_name, e.protocol) for e in entries if e.port_name}):
            _emit(out, f"_{normalize(pname)}._{proto.lower()}.{base}",
                  [e for e in entries if e.port_name == pname and e.protocol == proto], ttl)
        for host in dict.fromkeys(e.target for e in ep_entries):
            _emit(out, host, [e for e in ep_entries if e.target == host], ttl)

    for ip, name in ptr_service.items():
        out.append(Record(reverse_name(ip), "PTR", name, ttl))
    for ip, names in ptr_endpoint.items():
        if ip in ptr_service:
            continue
        for name in names:
            out.append(Record(reverse_name(ip), "PTR", name, ttl))

    if pods_mode != "disabled":
        for p in sorted(pods, key=lambda p: (p.namespace, p.name)):
            if p.spec.host_network or p.status.phase in ("Succeeded", "Failed"):
                continue
            for ip in p.pod_ips:
                t = _addr_type(ip)
                if t:
                    out.append(Record(f"{dashed(ip)}.{p.namespace}.pod.{domain}", t, ip, ttl))

    nameservers = [dns_ip] if dns_ip else []
    out.append(Record(domain, "NS", f"ns.dns.{domain}.", ttl))
    for ip in nameservers:
        out.append(Record(f"ns.dns.{domain}", _addr_type(ip) or "A", ip, ttl))
    out.append(Record(f"dns-version.{domain}", "TXT", f'"{DNS_SCHEMA_VERSION}"', DNS_SCHEMA_TTL))
    return Zone(domain, out, namespaces=ns_set, pods=pods_mode, ttl=ttl, serial=serial,
                nameservers=nameservers)
