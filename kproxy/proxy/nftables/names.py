"""Names and constants of kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go).

Per-service objects are named ``<prefix><H8>-<readable>``:

    service-ULMVA6XW-ns1/svc1/tcp/p80                   (readable = ns/svc/proto/port)
    endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80   (readable = ...__ip/port)

``H8`` is ``base32(sha256(readable))[:8]``. IPv6 endpoint IPs have their ``:`` turned
into ``.`` (``:`` is not allowed in a chain name). ``<H8>-<readable>`` is cut to
240 characters (knftables' NameLengthMax of 256 minus 16 for the longest prefix),
ending in ``...`` when cut; upstream's Test_servicePortEndpointChainNameBase has
examples. The same base serves the cluster-policy (``service-``), local-policy
(``local-``), ``external-`` and ``firewall-`` chains of a service port; endpoints get
``endpoint-`` chains and ``affinity-`` sets.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Optional

TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"

# base chains: name -> (type, hook, priority)
FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

DNAT_PRIORITY = -100
SNAT_PRIORITY = 100
FILTER_PRIORITY = 0

BASE_CHAINS = (
    # filter chains before DNAT, to see the original destination (LB source ranges)
    (FILTER_PREROUTING_PRE_DNAT, "filter", "prerouting", DNAT_PRIORITY - 10),
    (FILTER_OUTPUT_PRE_DNAT, "filter", "output", DNAT_PRIORITY - 10),
    (FILTER_INPUT, "filter", "input", FILTER_PRIORITY),
    (FILTER_FORWARD, "filter", "forward", FILTER_PRIORITY),
    (FILTER_OUTPUT, "filter", "output", FILTER_PRIORITY),
    (NAT_PREROUTING, "nat", "prerouting", DNAT_PRIORITY),
    (NAT_OUTPUT, "nat", "output", DNAT_PRIORITY),
    (NAT_POSTROUTING, "nat", "postrouting", SNAT_PRIORITY),
)

# regular top-level chains
SERVICES = "services"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

# (destination chain, source base chain, extra match), in upstream's order
JUMP_CHAINS = (
    (NODEPORT_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_FORWARD, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK, FILTER_OUTPUT, "ct state new"),
    (FIREWALL_CHECK, FILTER_PREROUTING_PRE_DNAT, "ct state new"),
    (FIREWALL_CHECK, FILTER_OUTPUT_PRE_DNAT, "ct state new"),
    (SERVICES, NAT_OUTPUT, ""),
    (SERVICES, NAT_PREROUTING, ""),
    (MASQUERADING, NAT_POSTROUTING, ""),
    (CLUSTER_IPS_CHECK, FILTER_FORWARD, "ct state new"),
    (CLUSTER_IPS_CHECK, FILTER_OUTPUT, "ct state new"),
)

# sets and maps
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"

# the containers whose elements the proxier keeps in step with the services
ELEMENT_CONTAINERS = (CLUSTER_IPS, SERVICE_IPS, FIREWALL_IPS, NO_ENDPOINT_SERVICES,
                      NO_ENDPOINT_NODEPORTS, SERVICE_NODEPORTS)

SERVICE_PREFIX = "service-"
LOCAL_PREFIX = "local-"
EXTERNAL_PREFIX = "external-"
ENDPOINT_PREFIX = "endpoint-"
AFFINITY_PREFIX = "affinity-"
FIREWALL_PREFIX = "firewall-"
PER_SERVICE_PREFIXES = (SERVICE_PREFIX, LOCAL_PREFIX, EXTERNAL_PREFIX, ENDPOINT_PREFIX, AFFINITY_PREFIX,
                        FIREWALL_PREFIX)

NAME_LENGTH_MAX = 256                    # knftables.NameLengthMax
COMMENT_LENGTH_MAX = 128                 # nft: "comment too long, 128 characters maximum allowed"
CHAIN_NAME_PREFIX_LENGTH_MAX = 16
CHAIN_NAME_BASE_LENGTH_MAX = NAME_LENGTH_MAX - CHAIN_NAME_PREFIX_LENGTH_MAX   # 240

# Above this many endpoints the renderer switches to "large cluster" load balancing
# (the same threshold as the iptables proxier's large-cluster mode); see render.py.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"       # RFC 4648 standard alphabet


def _b32_8(text: str) -> str:
    """``base32(sha256(text))[:8]``: 8 base32 characters are exactly the first 40 bits
    of the digest (computed here without base64's slow pure-Python encoder)."""
    v = int.from_bytes(hashlib.sha256(text.encode()).digest()[:5], "big")
    return "".join([_B32[(v >> shift) & 31] for shift in (35, 30, 25, 20, 15, 10, 5, 0)])


@lru_cache(maxsize=1 << 17)
def hash_and_truncate(name: str) -> str:
    """``<H8>-name``, cut to 240 characters with a trailing ``...`` (upstream
    ``hashAndTruncate``)."""
    out = _b32_8(name) + "-" + name
    if len(out) > CHAIN_NAME_BASE_LENGTH_MAX:
        out = out[:CHAIN_NAME_BASE_LENGTH_MAX - 3] + "..."
    return out


def service_port_chain_base(namespace: str, name: str, protocol: str, port_name: str) -> str:
    """``H8-ns/svc/proto/port`` (upstream ``servicePortChainNameBase``)."""
    return hash_and_truncate(f"{namespace}/{name}/{protocol.lower()}/{port_name}")


def endpoint_chain_base(namespace: str, name: str, protocol: str, port_name: str,
                        endpoint_ip: str, endpoint_port: int) -> str:
    """``H8-ns/svc/proto/port__ip/port`` (upstream ``servicePortEndpointChainNameBase``)."""
    ip = endpoint_ip.strip("[]").replace(":", ".")
    return hash_and_truncate(f"{namespace}/{name}/{protocol.lower()}/{port_name}__{ip}/{endpoint_port}")


def split_host_port(endpoint: str):
    """``IP:port`` or ``[IPv6]:port`` into (ip, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def is_service_chain(name: str) -> bool:
    """Per-service chains always hold a ``/``; kube-proxy's fixed chains never do."""
    return "/" in name


def is_affinity_set(name: str) -> bool:
    return name.startswith(AFFINITY_PREFIX)


def owner(name: str) -> Optional[str]:
    """``namespace/name`` of the Service a per-service chain or set belongs to, or None.

    The namespace and Service names come right after ``<prefix><H8>-`` and are never
    cut (together at most 127 characters)."""
    for prefix in PER_SERVICE_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) + 9:]
            parts = rest.split("/", 2)
            if len(parts) >= 2 and name[len(prefix) + 8:len(prefix) + 9] == "-":
                return f"{parts[0]}/{parts[1]}"
            return None
    return None


def owner_of_verdict(value: Optional[str]) -> Optional[str]:
    """The owner of the chain a ``goto <chain>`` / ``jump <chain>`` verdict names."""
    if not value:
        return None
    verb, _, target = value.partition(" ")
    if verb in ("goto", "jump") and target:
        return owner(target)
    return None


def owner_of_comment(comment: Optional[str]) -> Optional[str]:
    """``ns/svc`` from a ServicePortName comment (``ns/svc:port`` or ``ns/svc``)."""
    if not comment or "/" not in comment:
        return None
    return comment.split(":", 1)[0]
