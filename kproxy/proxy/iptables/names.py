"""Chain names and constants of kube-proxy's iptables mode.

    KUBE-SVC-/SVL-/EXT-/FW- + base32(sha256(spn + proto))[:16]
    KUBE-SEP-              + base32(sha256(spn + proto + "IP:port"))[:16]

``spn`` is the ServicePortName string and ``proto`` the lower-case protocol.
"""

from __future__ import annotations

import base64
import hashlib

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
KUBE_FIREWALL = "KUBE-FIREWALL"          # a copy of kubelet's anti-martian chain

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

NFACCT_CT_STATE_INVALID_DROPPED = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORT_ACCEPTED = "localhost_nps_accepted_pkts"


def _b32_16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    return _b32_16(service_port_name + protocol.lower())


def svc_chain(spn: str, protocol: str) -> str:
    return SVC_PREFIX + port_proto_hash(spn, protocol)


def svl_chain(spn: str, protocol: str) -> str:
    return SVL_PREFIX + port_proto_hash(spn, protocol)


def ext_chain(spn: str, protocol: str) -> str:
    return EXT_PREFIX + port_proto_hash(spn, protocol)


def fw_chain(spn: str, protocol: str) -> str:
    return FW_PREFIX + port_proto_hash(spn, protocol)


def sep_chain(spn: str, protocol: str, endpoint: str) -> str:
    """``endpoint`` is ``IP:port`` (``[IPv6]:port``) with the IP canonicalised."""
    return SEP_PREFIX + _b32_16(spn + protocol.lower() + endpoint)


def is_service_chain(name: str) -> bool:
    return name.startswith(SERVICE_CHAIN_PREFIXES)


def probability(n: int) -> str:
    """Go's ``fmt.Sprintf("%0.10f", 1.0/float64(n))``."""
    return "%0.10f" % (1.0 / n)


def masquerade_mark(bit: int) -> str:
    """Go's ``fmt.Sprintf("%#08x", 1<<bit)``: 8 zero-padded digits after ``0x``
    (bit 14 gives ``0x00004000``)."""
    return "0x%08x" % (1 << bit)
