"""Remove exactly what a cluster made, from its journal, and prove it.

Works from the journal alone, so it also cleans a cluster whose `up` crashed
half-way or whose state.json is gone.  Processes are ended by recorded PID and
start time; namespaces are removed by recorded name (which takes every link
inside them, including the veth ends in other namespaces of the cluster); the
IPAM files live under the cluster's own directory.  Nothing is deleted by
pattern.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from cni import netns
from kproxy import snapshot, state
from kproxy.dns import resolv as dns_resolv
from kproxy.kernel import process


@dataclass
class CleanReport:
    cluster: str
    namespaces_removed: list[str] = field(default_factory=list)
    processes_stopped: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"cluster {self.cluster}: removed {len(self.namespaces_removed)} namespaces, "
                 f"stopped {len(self.processes_stopped)} processes"]
        if self.ok:
            lines.append("verified: no namespace or process of the cluster is left, and the machine's own "
                         "namespace (links, addresses, routes, rules, iptables, nftables, sysctls) is as before `up`")
        else:
            lines.append("verify found differences:")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def leftovers(name: str) -> list[str]:
    """Namespaces and processes the journal says were made and that still exist."""
    problems = []
    journal = state.Journal(state.cluster_dir(name))
    for ns in journal.live_namespaces():
        if netns.exists(ns):
            problems.append(f"namespace {ns} still exists")
    for pid, started in journal.live_processes():
        if process.alive(pid, started):
            problems.append(f"process {pid} still runs")
    return problems


def verify(name: str) -> list[str]:
    """Leftovers, plus differences between the machine's own namespace now and before `up`."""
    d = state.cluster_dir(name)
    problems = leftovers(name)
    before = state.read_json(os.path.join(d, "snapshot.json"))
    if before is None:
        problems.append(f"no snapshot in {d}: cannot compare the machine's own namespace")
    else:
        problems += snapshot.diff(before, snapshot.capture())
    return problems


def clean_cluster(name: str, remove_state: bool = True) -> CleanReport:
    d = state.cluster_dir(name)
    report = CleanReport(name)
    if not os.path.isdir(d):
        report.problems.append(f"no record of cluster {name!r} in {d}")
        return report
    with state.locked(d):
        journal = state.Journal(d)
        # One record that cannot be undone must not stop the others from being undone:
        # it stays in the journal (a later clean retries it) and is reported.
        failed = []
        for pid, started in journal.live_processes():
            try:
                if process.stop(pid, started):
                    report.processes_stopped.append(pid)
            except OSError as e:
                failed.append(f"could not stop process {pid}: {e}")
                continue
            journal.record("release-process", pid=pid, started=started)
        for ns in reversed(journal.live_namespaces()):
            try:
                if netns.delete(ns):
                    report.namespaces_removed.append(ns)
            except OSError as e:
                failed.append(f"could not delete namespace {ns}: {e}")
                continue
            journal.record("release-netns", name=ns)
        entries = journal.entries()
        for e in entries:
            if e.op == "etc-netns":             # a pod's resolv.conf directory, by its exact name
                dns_resolv.uninstall(e.data["name"])
        for e in entries:
            if e.op == "etc-netns-base":        # /etc/netns, if kproxy made it and it is empty now
                try:
                    os.rmdir(e.data["path"])
                except OSError:
                    pass
        journal.close()
        shutil.rmtree(os.path.join(d, "ipam"), ignore_errors=True)
        report.problems = failed + verify(name)
        # The records go once nothing they name is left; a difference in the machine's
        # own namespace is reported (and fails the command) but is not ours to undo.
        forget = remove_state and not leftovers(name)
        if forget:
            for f in ("journal.jsonl", "state.json", "snapshot.json"):
                try:
                    os.unlink(os.path.join(d, f))
                except FileNotFoundError:
                    pass
    if forget:
        shutil.rmtree(d, ignore_errors=True)
    return report
