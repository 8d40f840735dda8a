"""Making a cluster whole again when a reconciler starts: after its predecessor was
killed at any moment, or after the machine rebooted.

What can be left, and what is done with it:

* the machine rebooted: the store and the cluster's records survive on disk, but every
  network namespace and process is gone (/run/netns is a tmpfs).  The nodes, the
  underlay and the external client are rebuilt from the cluster's configuration; the
  pods are forgotten (their sandboxes are gone) and the controllers create them again
  from the store, with fresh addresses, as kubelet recreates sandboxes after a reboot.
* a pod the dead reconciler was creating: its namespace is in the journal (written
  before it was made) but the pod has no record.  It is torn down (CNI DEL, namespace
  removed), from the journal's own record of it.
* a process started but not recorded in its pod's status: ended by PID and start time.
* a managed pod recorded before its containers were started: its containers start now.

Nothing is recreated twice: running processes recorded in a pod's status are adopted
as they are (the kubelet checks them by PID and start time).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import List

from cni import invoke as cni_invoke
from cni import netns
from kproxy.cluster import Cluster
from kproxy.dns import resolv as dns_resolv
from kproxy.kernel import process

log = logging.getLogger("kproxy.recover")


@dataclass
class RecoveryReport:
    rebuilt: bool = False
    forgotten_pods: List[str] = field(default_factory=list)
    orphan_pods: List[str] = field(default_factory=list)
    orphan_processes: List[int] = field(default_factory=list)
    unstarted_pods: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = []
        if self.rebuilt:
            out.append(f"rebuilt the nodes (their namespaces were gone: a reboot?); "
                       f"{len(self.forgotten_pods)} pod(s) will be created again")
        out += [f"removed pod {k}: its creation was interrupted" for k in self.orphan_pods]
        out += [f"ended process {pid}: started but never recorded" for pid in self.orphan_processes]
        out += [f"pod {k}: starting its containers (interrupted before they started)" for k in self.unstarted_pods]
        return out


def infrastructure_missing(cluster: Cluster) -> bool:
    wanted = [cluster.underlay_ns, cluster.external_ns] + [n.netns for n in cluster.nodes]
    return any(not netns.exists(ns) for ns in wanted)


def rebuild(cluster: Cluster, report: RecoveryReport) -> None:
    """After a reboot: forget what is gone, build the nodes again."""
    journal = cluster.journal
    for ns in journal.live_namespaces():
        if netns.exists(ns):
            # part of the cluster survived: remove it, the rebuild starts from nothing
            netns.delete(ns)
        journal.record("release-netns", name=ns)
    for pid, started in journal.live_processes():
        process.stop(pid, started)
        journal.record("release-process", pid=pid, started=started)
    for key, pod in list(cluster.pods.items()):
        if dns_resolv.uninstall(pod.netns):
            journal.record("release-etc-netns", name=pod.netns)
        report.forgotten_pods.append(key)
        cluster.touch(key)
        del cluster.pods[key]
    shutil.rmtree(os.path.join(cluster.dir, "ipam"), ignore_errors=True)
    dns_zone = os.path.join(cluster.dir, "dns", "zone.json")
    if os.path.exists(dns_zone):
        os.remove(dns_zone)
    cluster.proxy_state.clear()
    cluster.build_infrastructure()
    cluster.save()
    report.rebuilt = True


def adopt(cluster: Cluster, kubelet_for, spec_of) -> RecoveryReport:
    """Bring the records and what exists back in line (see the module docstring).
    ``kubelet_for(pod)`` is the kubelet of the pod's node, ``spec_of(pod)`` the pod's
    object (the reconciler's)."""
    report = RecoveryReport()
    if infrastructure_missing(cluster):
        rebuild(cluster, report)
        return report
    journal = cluster.journal
    entries = journal.entries()
    live_ns = set(journal.live_namespaces())
    known_ns = {p.netns for p in cluster.pods.values()}

    # pods whose creation was interrupted
    for e in entries:
        if e.op != "pod" or e.data["netns"] not in live_ns or e.data["netns"] in known_ns:
            continue
        key, ns_name = e.data["key"], e.data["netns"]
        node = next((n for n in cluster.nodes if n.name == e.data["node"]), None)
        for pid, started in cluster.processes_of(_Shell(ns_name)):
            process.stop(pid, started)
            journal.record("release-process", pid=pid, started=started)
        if node is not None:
            try:
                cni_invoke.call("DEL", cluster.cni_config(node), container_id=e.data["container_id"],
                                netns=netns.path_of(ns_name), ifname="eth0", host_netns=node.netns)
            except Exception as exc:          # DEL is best effort: the namespace goes anyway
                log.warning("CNI DEL of interrupted pod %s: %s", key, exc)
        cluster._release_netns(ns_name)
        live_ns.discard(ns_name)
        report.orphan_pods.append(key)

    # processes nobody recorded
    recorded = {(c["pid"], c["started"]) for p in cluster.pods.values()
                for c in p.status.get("containers", []) if "pid" in c}
    unmanaged_ns = {p.netns for p in cluster.pods.values() if not p.status.get("managed")}
    live_procs = set(journal.live_processes())
    for e in entries:
        if e.op != "process":
            continue
        key = (e.data["pid"], e.data["started"])
        if key in recorded or e.data.get("netns") in unmanaged_ns or key not in live_procs:
            continue
        if process.stop(*key):
            report.orphan_processes.append(key[0])
        journal.record("release-process", pid=key[0], started=key[1])
        live_procs.discard(key)

    # managed pods recorded before their containers started
    for pod in cluster.pods.values():
        if pod.status.get("managed") and "containers" not in pod.status and not pod.status.get("deleting_at"):
            kubelet_for(pod).start(pod, spec_of(pod))
            report.unstarted_pods.append(pod.key)
    if report.orphan_pods or report.unstarted_pods or report.orphan_processes:
        cluster.save()
    return report


class _Shell:
    """Enough of a Pod for Cluster.processes_of (which matches by namespace)."""

    def __init__(self, ns: str):
        self.netns = ns
