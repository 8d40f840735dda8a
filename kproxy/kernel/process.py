"""Processes inside pod namespaces, tracked by PID and start time.

A PID alone can be reused by the kernel after the process ends; kproxy records the
start time (field 22 of /proc/PID/stat) beside it and only ever signals a PID whose
start time still matches, so it never ends a process it did not start.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional, Sequence

from cni import netns


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time) from one read of /proc/PID/stat, or None once it is gone.

    A process that exits while its stat file is open makes the read fail with ESRCH
    (ProcessLookupError) rather than the open with ENOENT: both mean "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


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


def stop(pid: int, started: int, grace: float = 2.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds, the process we recorded (only it).

    Returns True if a process was signalled."""
    if not alive(pid, started):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid, started):
            _reap(pid)
            return True
        _reap(pid)
        time.sleep(0.02)
    if alive(pid, started):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in range(100):
        _reap(pid)
        if not alive(pid, started):
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
    """:func:`stop` for a child we still hold the Popen of: SIGTERM, SIGKILL after
    ``grace`` seconds, but reaped through ``proc`` so its exit status is kept.

    Signals only while the PID still has the recorded start time.  Returns the exit
    status (:func:`exit_status`), or None if it cannot be known."""
    if proc.poll() is None and alive(proc.pid, started):
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=max(grace, 0.0))
        except subprocess.TimeoutExpired:
            if alive(proc.pid, started):
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                return None
    rc = proc.poll()
    return None if rc is None else exit_status(rc)
