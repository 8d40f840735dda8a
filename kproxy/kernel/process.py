"""Processes inside pod namespaces, tracked by PID and start time.

A PID alone can be reused by the kernel after the process ends; kproxy records the
start time (field 22 of /proc/PID/stat) beside it and only ever signals a PID whose
start time still matches, so it never ends a process it did not start.

Every process kproxy starts leads a session and a process group of its own (its PGID and
SID are its PID), so what it forks (``sh -c 'server & wait'``) stays in that group.  A
container runtime ends a container's every process; kproxy ends the group: through the
leader while it still runs with its recorded start time, and after the leader has gone,
each member still in the group by its own PID.  The kernel does not hand out a PID that
is still some group's PGID, so while the group has members its ID is still ours; the
members are also checked to have started no earlier than the leader.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional, Sequence

from cni import netns


def _stat(pid: int) -> Optional[tuple[str, int, int, int]]:
    """(state, start time, PGID, SID) from one read of /proc/PID/stat, or None once it is gone.

    A process that exits while its stat file is open makes the read fail with ESRCH
    (ProcessLookupError) rather than the open with ENOENT: both mean "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19]), int(fields[2]), int(fields[3])


def start_time(pid: int) -> Optional[int]:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def alive(pid: int, started: int) -> bool:
    """True while ``pid`` is the process that started at ``started`` and not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and stat[0] != "Z"


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` in namespace ``ns`` the way `ip netns exec` does
    (which also bind-mounts /etc/netns/<ns>/* over /etc, e.g. a pod's resolv.conf)."""
    if not netns.exists(ns):
        raise FileNotFoundError(f"network namespace {ns} does not exist")
    return ["ip", "netns", "exec", ns, *argv]


def spawn(ns: str, argv: Sequence[str], **popen_kwargs) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` in ``ns``; returns the Popen and the start time to record."""
    proc = subprocess.Popen(exec_argv(ns, argv), start_new_session=True, **popen_kwargs)
    started = start_time(proc.pid)
    return proc, started if started is not None else -1


def group_members(pgid: int, started: int) -> list[int]:
    """The live processes still in the session and process group ``pgid`` that a leader
    started at ``started`` made (the leader too, if it still runs)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None and st[2] == pgid and st[3] == pgid and st[1] >= started and st[0] != "Z":
            found.append(int(entry))
    return found


def signal_group(pid: int, started: int, sig: int) -> bool:
    """Send ``sig`` to the group the recorded process leads (see the module's notes), or to
    the process alone if it leads none.  True if anything was signalled."""
    if alive(pid, started):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
            return True
        except ProcessLookupError:
            pass
    sent = False
    for member in group_members(pid, started):
        try:
            os.kill(member, sig)
            sent = True
        except ProcessLookupError:
            pass
    return sent


def end_leftovers(pid: int, started: int) -> bool:
    """SIGKILL what is left in the group of a leader that has ended (as a runtime ends a
    container whose main process exited).  True if there was anything."""
    if alive(pid, started):
        return False
    return signal_group(pid, started, signal.SIGKILL)


def _group_gone(pid: int, started: int) -> bool:
    _reap(pid)
    return not alive(pid, started) and not group_members(pid, started)


def stop(pid: int, started: int, grace: float = 2.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds, the process we recorded and its
    group (only them).  Returns True if a process was signalled."""
    if not signal_group(pid, started, signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _group_gone(pid, started):
            return True
        time.sleep(0.02)
    signal_group(pid, started, signal.SIGKILL)
    for _ in range(100):
        if _group_gone(pid, started):
            break
        time.sleep(0.01)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def exit_status(returncode: int) -> int:
    """A Popen returncode as a container runtime reports it: a process ended by signal N
    (returncode -N) exited with 128+N, as a shell shows it (SIGKILL: 137, SIGTERM: 143)."""
    return 128 - returncode if returncode < 0 else returncode


def stop_child(proc: subprocess.Popen, started: int, grace: float = 2.0) -> Optional[int]:
    """:func:`stop` for a child we still hold the Popen of: SIGTERM to its group, SIGKILL
    after ``grace`` seconds, the child reaped through ``proc`` so its exit status is kept.

    Signals only while the PID still has the recorded start time (and, after it ended,
    only what is left of its group).  Returns the exit status (:func:`exit_status`), or
    None if it cannot be known."""
    if proc.poll() is None and alive(proc.pid, started):
        signal_group(proc.pid, started, signal.SIGTERM)
        try:
            proc.wait(timeout=max(grace, 0.0))
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, started, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return None
    if proc.poll() is not None:
        # the leader is reaped: what it left behind gets until the grace is over
        deadline = time.monotonic() + max(grace, 0.0)
        while group_members(proc.pid, started) and time.monotonic() < deadline:
            time.sleep(0.02)
        end_leftovers(proc.pid, started)
    rc = proc.poll()
    return None if rc is None else exit_status(rc)
