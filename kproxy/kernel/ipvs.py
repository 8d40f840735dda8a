"""Programming kube-proxy's IPVS mode inside a node's namespace.

    available(scheduler)   (ok, reason): does this kernel have IP_VS, the scheduler and
                           the dummy interface type? Changes nothing outside a throwaway
                           namespace (the dummy probe, root only).
    load_modules(sched)    modprobe ip_vs ip_vs_<sched> (kernel modules are machine-wide:
                           only call it on a machine meant for it, e.g. the test VM).
    apply(ns, plan)        converge namespace ``ns`` to an ``IpvsPlan``: sysctls, the
                           kube-ipvs0 dummy device (left DOWN, NOARP) and its /32s, the
                           ipsets (``ipset restore -exist``), the IPVS table (``ipvsadm -C``
                           then ``ipvsadm -R``; or only the differences with
                           ``incremental=True``), the iptables payload
                           (``iptables-restore --noflush``) and the jump rules.
    cleanup(ns)            what upstream's CleanupLeftovers removes, in that namespace.
    saved(ns)              ``ipvsadm -Sn`` in ``ns``.

IPVS tables, ipsets, iptables rules and the ``net.ipv4.vs.*`` sysctls are all per network
namespace, so everything here runs inside ``ns`` (``ip netns exec``, or a netlink socket
opened there); the machine's own namespace is refused. When IP_VS is missing, ``apply``
raises KernelError with ``available()``'s reason before it changes anything.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import Dict, List, Optional, Set, Tuple

from pyroute2.netlink.exceptions import NetlinkError

from cni import netns
from kproxy.errors import KernelError
from kproxy.kernel import iptables, links, process
from kproxy.proxy.ipvs import names as n

PROC_IP_VS = "/proc/net/ip_vs"
_MODPROBE_PATHS = ("/sbin/modprobe", "/usr/sbin/modprobe")


def _no_ipvs_reason(scheduler: str) -> str:
    return (f"this kernel has no IP_VS (CONFIG_IP_VS): {PROC_IP_VS} is missing; IPVS mode needs the "
            f"ip_vs, ip_vs_{scheduler} modules — run it in a VM with a stock distribution kernel, "
            f"e.g. `make test-vm`")


def _modprobe() -> Optional[str]:
    found = shutil.which("modprobe")
    if found:
        return found
    return next((p for p in _MODPROBE_PATHS if os.access(p, os.X_OK)), None)


def _builtin(module: str) -> bool:
    try:
        with open(f"/lib/modules/{os.uname().release}/modules.builtin") as f:
            return any(line.strip().endswith(f"/{module}.ko") for line in f)
    except OSError:
        return False


def module_status(module: str) -> Tuple[Optional[bool], str]:
    """Whether a kernel module can be had: (True, how) when loaded, built in or
    loadable; (False, why) when it is not there; (None, why) when this cannot be told."""
    if os.path.isdir(f"/sys/module/{module}"):
        return True, "loaded"
    if _builtin(module):
        return True, "built in"
    exe = _modprobe()
    if exe is None:
        moddir = f"/lib/modules/{os.uname().release}"
        if not os.path.isdir(moddir):
            return False, f"modprobe is not installed and {moddir} does not exist"
        return None, "modprobe is not installed"
    res = subprocess.run([exe, "-n", module], capture_output=True, text=True)
    if res.returncode == 0:
        return True, "available as a module (not loaded)"
    return False, (res.stderr.strip() or res.stdout.strip() or f"modprobe -n {module} failed")


def dummy_supported() -> Tuple[Optional[bool], str]:
    """Try ``ip link add type dummy`` inside a throwaway namespace (deleted at once).
    Needs root; (None, why) without it."""
    if os.geteuid() != 0:
        return None, "not checked (needs root)"
    name = f"kpipvs-probe-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        with links.socket_in(name) as ipr:
            try:
                ipr.link("add", ifname="kpdummy0", kind="dummy")
            except NetlinkError as e:
                return False, os.strerror(e.code) if e.code > 0 else str(e)
        return True, "supported"
    finally:
        netns.delete(name)


def available(scheduler: str = n.DEFAULT_SCHEDULER, check_dummy: bool = True) -> Tuple[bool, str]:
    """(True, summary) when IPVS mode can run here, else (False, the reason in plain
    words). Looks at /proc/net/ip_vs (present in every namespace once IP_VS is in the
    kernel), the scheduler's module, and whether dummy interfaces can be made."""
    problems: List[str] = []
    found: List[str] = []
    if os.path.exists(PROC_IP_VS):
        found.append(f"IP_VS ({PROC_IP_VS})")
        ok, how = module_status(f"ip_vs_{scheduler}")
        if ok is False:
            problems.append(f"the IPVS scheduler {scheduler!r} is missing: ip_vs_{scheduler} ({how})")
        else:
            found.append(f"ip_vs_{scheduler} ({how})")
    else:
        ok, how = module_status("ip_vs")
        if ok is True:
            problems.append(f"{PROC_IP_VS} is missing but the ip_vs module is {how}: load it with "
                            f"`modprobe ip_vs ip_vs_{scheduler}` (kproxy.kernel.ipvs.load_modules); "
                            f"kproxy does not load kernel modules on its own")
        else:
            problems.append(f"{_no_ipvs_reason(scheduler)} ({how})")
    if check_dummy:
        ok, how = dummy_supported()
        if ok is False:
            problems.append(f"this kernel has no dummy interface type (CONFIG_DUMMY): `ip link add type dummy` "
                            f"fails ({how}); IPVS mode binds Service IPs to the {n.DUMMY_DEVICE} dummy device")
        else:
            found.append(f"dummy interfaces ({how})")
    for tool in ("ipset", "ipvsadm"):
        if shutil.which(tool) is None:
            problems.append(f"the {tool} tool is not installed (apt-get install {tool})")
    if problems:
        return False, "; ".join(problems)
    return True, "IPVS mode can run: " + ", ".join(found)


def load_modules(scheduler: str = n.DEFAULT_SCHEDULER) -> None:
    """``modprobe ip_vs ip_vs_<scheduler>``: a machine-wide change, for machines meant for
    it (the test VM). Raises KernelError with modprobe's message."""
    exe = _modprobe()
    if exe is None:
        raise KernelError("modprobe is not installed")
    for module in ("ip_vs", f"ip_vs_{scheduler}"):
        res = subprocess.run([exe, module], capture_output=True, text=True)
        if res.returncode != 0:
            raise KernelError(f"modprobe {module}: {res.stderr.strip() or res.stdout.strip()}")


# --------------------------------------------------------------------------- in a namespace


def _check_ns(ns: str) -> None:
    if not netns.exists(ns):
        raise KernelError(f"network namespace {ns} does not exist")
    if netns.same_as_init(ns):
        raise KernelError(f"refusing to act on {ns!r}: it is the machine's own network namespace")


def _run(ns: str, argv: List[str], stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    return subprocess.run(process.exec_argv(ns, argv), input=stdin, capture_output=True, text=True)


def _run_checked(ns: str, argv: List[str], stdin: Optional[str] = None) -> str:
    res = _run(ns, argv, stdin)
    if res.returncode != 0:
        raise KernelError(f"{' '.join(argv)} in {ns} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def _ipset_entries(ns: str) -> Dict[str, Set[str]]:
    """The members of every set in ``ns`` (from ``ipset save``)."""
    out: Dict[str, Set[str]] = {}
    for line in _run_checked(ns, ["ipset", "save"]).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "create":
            out.setdefault(parts[1], set())
        elif len(parts) >= 3 and parts[0] == "add":
            out.setdefault(parts[1], set()).add(parts[2])
    return out


def ipset_sync_text(plan, current: Dict[str, Set[str]]) -> str:
    """``ipset restore -exist`` input that takes sets holding ``current`` to the plan:
    every ``create`` line, a ``del`` per stale entry and an ``add`` per missing one (the
    sets never go empty on the way, as upstream's syncIPSetEntries)."""
    lines = [s.create_line() for s in plan.ipsets.values()]
    for s in plan.ipsets.values():
        have = current.get(s.name, set())
        lines += [f"del {s.name} {e}" for e in sorted(have - set(s.entries))]
        lines += [f"add {s.name} {e}" for e in s.entries if e not in have]
    return "\n".join(lines) + "\n"


def _parse_saved(saved_text: str) -> Dict[Tuple[str, str], Tuple[str, Dict[str, str]]]:
    """``ipvsadm -Sn`` text -> {(flag, vip:port): (the -A line, {rs: the -a line})}."""
    out: Dict[Tuple[str, str], Tuple[str, Dict[str, str]]] = {}
    for line in saved_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "-A":
            out[(parts[1], parts[2])] = (line.strip(), out.get((parts[1], parts[2]), ("", {}))[1])
        elif len(parts) >= 5 and parts[0] == "-a" and parts[3] == "-r":
            key = (parts[1], parts[2])
            head, dests = out.setdefault(key, ("", {}))
            dests[parts[4]] = line.strip()
    return out


def ipvsadm_sync_text(plan, saved_text: str) -> str:
    """``ipvsadm -R`` input that takes the table ``saved_text`` (``ipvsadm -Sn``) to the
    plan without flushing it, as upstream's syncService / syncEndpoint /
    cleanLegacyService do: ``-D`` for virtual servers that went away, ``-E`` for changed
    ones (scheduler, persistence), ``-A`` for new ones; per virtual server ``-d`` for
    stale real servers, ``-e`` for a changed weight, ``-a`` for new ones. Empty when the
    table already matches."""
    have = _parse_saved(saved_text)
    lines: List[str] = []
    wanted = {(vs.service_flag, vs.endpoint): vs for vs in plan.virtual_servers}
    for key in have:
        if key not in wanted:
            lines.append(f"-D {key[0]} {key[1]}")
    for key, vs in wanted.items():
        head, dests = have.get(key, ("", {}))
        add = vs.add_line()
        if not head:
            lines.append(add)
        elif head != add:
            lines.append("-E" + add[2:])
        want_rs = {str(rs): line for rs, line in zip(vs.real_servers, vs.real_server_lines())}
        for rs in dests:
            if rs not in want_rs:
                lines.append(f"-d {key[0]} {key[1]} -r {rs}")
        for rs, line in want_rs.items():
            if rs not in dests:
                lines.append(line)
            elif dests[rs] != line:
                lines.append("-e" + line[2:])
    return "\n".join(lines) + ("\n" if lines else "")


def _ensure_dummy(ns: str, plan) -> None:
    """kube-ipvs0 exists (created DOWN: upstream never sets it up; dummy devices are
    NOARP) and holds exactly the plan's addresses. Local routes for addresses on a down
    device still exist, so traffic to them is delivered locally, where IPVS takes it."""
    want = set(plan.dummy_addresses)
    with links.socket_in(ns) as ipr:
        found = ipr.link_lookup(ifname=plan.dummy_device)
        if not found:
            links._do(f"create dummy {plan.dummy_device}", ipr.link, "add", ifname=plan.dummy_device,
                      kind="dummy")
            found = ipr.link_lookup(ifname=plan.dummy_device)
        index = found[0]
        have = set()
        for msg in ipr.get_addr(index=index):
            have.add(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        for cidr in sorted(want - have):
            ip, plen = cidr.split("/")
            links._do(f"add address {cidr} to {plan.dummy_device}", ipr.addr, "add", index=index,
                      address=ip, prefixlen=int(plen))
        for cidr in sorted(have - want):
            ip, plen = cidr.split("/")
            links._do(f"remove address {cidr} from {plan.dummy_device}", ipr.addr, "del", index=index,
                      address=ip, prefixlen=int(plen))


def apply(ns: str, plan, flavour: str = "nft", incremental: bool = False) -> None:
    """Converge namespace ``ns`` to ``plan`` (a ``kproxy.proxy.ipvs.IpvsPlan``).

    The IPVS table is rewritten with ``ipvsadm -C`` then ``ipvsadm -R`` (the table is
    per namespace, so only this node's is cleared; a real server re-added to the same
    virtual server comes back from the kernel's trash, so established connections keep
    it, though a packet that arrives between the two commands is lost and, with
    expire_nodest_conn=1, its connection expired). With
    ``incremental`` only the differences from ``ipvsadm -Sn`` are sent
    (``ipvsadm_sync_text``): what a proxier's resync wants, as upstream never flushes.

    Raises KernelError, before changing anything, when the namespace is the machine's
    own or missing, or when ``available(plan.scheduler)`` says IPVS mode cannot run."""
    _check_ns(ns)
    ok, reason = available(plan.scheduler)
    if not ok:
        raise KernelError(f"cannot program IPVS mode in {ns}: {reason}")
    for key, value in plan.sysctls.items():
        try:
            links.write_sysctl(ns, key, value)
        except OSError as e:
            raise KernelError(f"sysctl {key}={value} in {ns}: {e.strerror or e}") from e
    _ensure_dummy(ns, plan)
    _run_checked(ns, ["ipset", "restore", "-exist"], ipset_sync_text(plan, _ipset_entries(ns)))
    if incremental:
        text = ipvsadm_sync_text(plan, _run_checked(ns, ["ipvsadm", "-Sn"]))
    else:
        _run_checked(ns, ["ipvsadm", "-C"])
        text = plan.ipvsadm_restore()
    if text:
        _run_checked(ns, ["ipvsadm", "-R"], text)
    iptables.restore(ns, plan.iptables_restore(), flavour)
    iptables.ensure_jumps(ns, plan.jump_rules, flavour)


def saved(ns: str) -> str:
    """``ipvsadm -Sn`` in ``ns``: the IPVS table in ``ipvsadm -R`` syntax."""
    _check_ns(ns)
    return _run_checked(ns, ["ipvsadm", "-Sn"])


def cleanup(ns: str, flavour: str = "nft") -> List[str]:
    """Remove what IPVS mode made in ``ns`` (upstream's cleanupLeftovers, in its order):
    the IPVS table, kube-ipvs0, the jump rules, kube-proxy's IPVS-mode chains, then the
    ipsets (a set still referenced by a rule cannot be destroyed). Idempotent; returns
    the problems met (empty when all went well)."""
    _check_ns(ns)
    problems: List[str] = []
    if os.path.exists(PROC_IP_VS) and shutil.which("ipvsadm"):
        res = _run(ns, ["ipvsadm", "-C"])
        if res.returncode != 0:
            problems.append(f"ipvsadm -C: {res.stderr.strip()}")
    with links.socket_in(ns) as ipr:
        found = ipr.link_lookup(ifname=n.DUMMY_DEVICE)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as e:
                problems.append(f"delete {n.DUMMY_DEVICE}: {os.strerror(e.code) if e.code > 0 else e}")
    ipt = iptables._tool("iptables", flavour)
    for rule in n.JUMP_RULES:
        for _ in range(8):                       # duplicates, if any, go too
            if _run(ns, [ipt, "-w", "5", *rule.delete_argv()]).returncode != 0:
                break
    payload = []
    for table, chains in (("nat", n.NAT_CHAINS), ("filter", n.FILTER_CHAINS)):
        payload += [f"*{table}"] + [f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT"]
    res = _run(ns, [iptables._tool("iptables-restore", flavour), "-w", "5", "--noflush"], "\n".join(payload) + "\n")
    if res.returncode != 0:
        problems.append(f"deleting the IPVS-mode chains: {res.stderr.strip()}")
    if shutil.which("ipset"):
        existing = _ipset_entries(ns) if _run(ns, ["ipset", "list", "-n"]).returncode == 0 else {}
        for info in n.SETS:
            for name in {n.set_name(info.name, False), n.set_name(info.name, True)}:
                if name in existing:
                    res = _run(ns, ["ipset", "destroy", name])
                    if res.returncode != 0:
                        problems.append(f"ipset destroy {name}: {res.stderr.strip()}")
    return problems
