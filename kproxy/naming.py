"""Names kproxy gives to namespaces and interfaces, and the checks on them.

Linux limits an interface name to 15 bytes (IFNAMSIZ - 1) and a namespace name
(a file under /run/netns) to 255.  Kubernetes names go up to 253 characters, so
every interface name that could be derived from a user's name is a short hash
instead, and every namespace name is checked before anything is created.
"""
from __future__ import annotations

import hashlib
import re

IFNAMSIZ_MAX = 15
NETNS_NAME_MAX = 255

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# kproxy's cluster names become the prefix of every namespace name; keep them short
# so that pod namespace names stay readable in `ip netns list`.
CLUSTER_NAME_MAX = 20


def check_dns_label(value: str, what: str, max_len: int = 63) -> str:
    if not value or len(value) > max_len or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use at most {max_len} lower-case letters, "
            "digits and '-', starting and ending with a letter or digit"
        )
    return value


def check_dns_subdomain(value: str, what: str) -> str:
    if not value or len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"{what} {value!r} is not valid: a DNS subdomain of at most 253 characters "
            "(lower-case letters, digits, '-' and '.')"
        )
    return value


def check_ifname(value: str) -> str:
    if not value or len(value.encode()) > IFNAMSIZ_MAX or "/" in value or value.strip() != value:
        raise ValueError(f"interface name {value!r} is invalid: at most {IFNAMSIZ_MAX} bytes, no '/' or spaces")
    return value


def short_hash(*parts: str, length: int = 8) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def node_netns(cluster: str, node: str) -> str:
    return f"{cluster}-{node}"


def underlay_netns(cluster: str) -> str:
    return f"{cluster}-underlay"


def external_netns(cluster: str) -> str:
    return f"{cluster}-external"


def pod_netns(cluster: str, namespace: str, pod: str) -> str:
    """``<cluster>-<namespace>-<pod>``, e.g. ``kproxy-default-web-0``."""
    name = f"{cluster}-{namespace}-{pod}"
    if len(name.encode()) > NETNS_NAME_MAX:
        raise ValueError(
            f"pod {namespace}/{pod}: its namespace name would be {len(name)} characters, "
            f"over the kernel's limit of {NETNS_NAME_MAX}"
        )
    return name


def underlay_port(index: int) -> str:
    """The underlay bridge's port for node ``index`` (0-based) or the external client."""
    return check_ifname(f"port{index}")
