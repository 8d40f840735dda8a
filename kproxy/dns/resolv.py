"""A pod's /etc/resolv.conf, as the kubelet (through the container runtime) writes it
for ``dnsPolicy: ClusterFirst``, and its place under /etc/netns.

``ip netns exec NAME cmd`` bind-mounts every file in ``/etc/netns/NAME/`` over the same
name in ``/etc`` for ``cmd`` (``resolv.conf`` over ``/etc/resolv.conf``), so a pod's
processes started that way (kproxy.kernel.process does) read the pod's resolv.conf and
nothing else on the machine changes. ``/etc/resolv.conf`` must exist as a file (or a
symlink to one) for that mount to work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Sequence

from kproxy.dns.records import DEFAULT_DNS_IP, DEFAULT_DOMAIN

NETNS_ETC = "/etc/netns"
NDOTS = 5


def resolv_conf(namespace: str, nameserver: str = DEFAULT_DNS_IP, domain: str = DEFAULT_DOMAIN,
                *, host_search: Sequence[str] = ()) -> str:
    """resolv.conf for a ClusterFirst pod in ``namespace``::

        search <ns>.svc.cluster.local svc.cluster.local cluster.local
        nameserver 10.96.0.10
        options ndots:5

    (the order containerd's CRI writes). A real kubelet appends the node's own search
    domains after the cluster's: ``host_search``, none by default.
    """
    domain = domain.rstrip(".")
    search = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain, *host_search]
    return (f"search {' '.join(search)}\n"
            f"nameserver {nameserver}\n"
            f"options ndots:{NDOTS}\n")


def _netns_dir(netns_name: str, base: str) -> str:
    if (not netns_name or netns_name in (".", "..") or "/" in netns_name or "\0" in netns_name):
        raise ValueError(f"not a network namespace name: {netns_name!r}")
    return os.path.join(base, netns_name)


def install(netns_name: str, text: str, base: str = NETNS_ETC) -> str:
    """Write ``text`` as ``<base>/<netns_name>/resolv.conf`` (atomically: a temporary
    file renamed over it), creating the directories; returns the file's path."""
    d = _netns_dir(netns_name, base)
    os.makedirs(d, mode=0o755, exist_ok=True)
    if os.path.islink(d):
        raise ValueError(f"{d} is a symbolic link: not writing through it")
    path = os.path.join(d, "resolv.conf")
    fd, tmp = tempfile.mkstemp(prefix=".resolv.conf.", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def uninstall(netns_name: str, base: str = NETNS_ETC) -> bool:
    """Remove ``<base>/<netns_name>/`` (that directory only, by its exact name; never
    ``base`` itself). Returns True if it was there."""
    d = _netns_dir(netns_name, base)
    if os.path.islink(d):
        os.unlink(d)
        return True
    if not os.path.isdir(d):
        return False
    shutil.rmtree(d)
    return True
