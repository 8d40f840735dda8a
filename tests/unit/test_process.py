"""kproxy.kernel.process: telling a recorded process from a gone or reused PID."""
import builtins
import io
import os
import subprocess
import sys
import time

from kproxy.kernel import process


def test_own_process_is_alive_with_its_start_time():
    started = process.start_time(os.getpid())
    assert started is not None and started > 0
    assert process.alive(os.getpid(), started)
    assert not process.alive(os.getpid(), started + 1)          # a reused PID


def test_exited_child_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process.start_time(proc.pid)
    proc.wait()
    assert process.start_time(proc.pid) is None
    assert not process.alive(proc.pid, started)


def test_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process.start_time(proc.pid)
    try:
        # not reaped yet: a zombie keeps its stat file, with state Z
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the child never became a zombie")
        assert process.start_time(proc.pid) == started
        assert not process.alive(proc.pid, started)
    finally:
        proc.wait()


class _ExitsWhileOpen(io.StringIO):
    def read(self, *args):
        raise ProcessLookupError(3, "No such process")


def test_process_that_exits_between_open_and_read_is_gone(monkeypatch):
    # the race CI hit: the open succeeds, the process ends, the read fails with ESRCH
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).startswith("/proc/") and str(path).endswith("/stat"):
            return _ExitsWhileOpen()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert process.start_time(12345) is None
    assert not process.alive(12345, 1)
    assert process.stop(12345, 1) is False


# ---- a container's process group -------------------------------------------------------------

def _leader(script: str) -> tuple[subprocess.Popen, int, int]:
    """``sh -c script`` leading its own session and group, as kproxy starts containers;
    the script prints the PID of the child it leaves running."""
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    started = process.start_time(proc.pid)
    child = int(proc.stdout.readline())
    return proc, started, child


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = process.start_time(pid)
        if st is None:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.01)
    return False


def _kill_if_left(pid: int, started: int) -> None:
    if process.alive(pid, started):
        os.kill(pid, 9)


def test_stop_ends_what_the_container_forked():
    proc, started, child = _leader("sleep 300 & echo $!; wait")
    child_started = process.start_time(child)
    try:
        assert process.group_members(proc.pid, started) == sorted([proc.pid, child])
        assert process.stop(proc.pid, started, grace=2.0)
        assert _gone(child)
        assert process.group_members(proc.pid, started) == []
    finally:
        _kill_if_left(child, child_started)
        proc.wait()


def test_stop_child_ends_the_group_and_keeps_the_exit_status():
    proc, started, child = _leader("trap 'exit 7' TERM; sleep 300 & echo $!; wait")
    child_started = process.start_time(child)
    try:
        assert process.stop_child(proc, started, grace=2.0) == 7
        assert _gone(child)
    finally:
        _kill_if_left(child, child_started)


def test_leftovers_of_an_ended_leader_are_killed():
    proc, started, child = _leader("sleep 300 & echo $!; exit 3")
    child_started = process.start_time(child)
    try:
        assert proc.wait(timeout=5) == 3
        assert process.alive(child, child_started)              # orphaned, still in the group
        assert process.end_leftovers(proc.pid, started)
        assert _gone(child)
        assert not process.end_leftovers(proc.pid, started)     # nothing left the second time
    finally:
        _kill_if_left(child, child_started)


def test_a_process_leading_no_group_is_signalled_alone():
    # started without a session of its own, it shares this test's group: that group must
    # never be signalled (it holds pytest itself)
    proc = subprocess.Popen(["sleep", "300"])
    started = process.start_time(proc.pid)
    try:
        assert os.getpgid(proc.pid) == os.getpgid(0) != proc.pid
        assert process.stop(proc.pid, started, grace=2.0)
        assert _gone(proc.pid)                       # (stop reaped it: Popen cannot tell how)
    finally:
        _kill_if_left(proc.pid, started)


def test_another_group_is_not_touched():
    ours, started, child = _leader("sleep 300 & echo $!; wait")
    other, other_started, other_child = _leader("sleep 300 & echo $!; wait")
    child_started, other_child_started = process.start_time(child), process.start_time(other_child)
    try:
        assert process.stop_child(ours, started, grace=2.0) is not None
        assert _gone(child)
        assert process.alive(other.pid, other_started) and process.alive(other_child, other_child_started)
    finally:
        process.stop_child(other, other_started, grace=0.5)
        for pid, st in ((child, child_started), (other_child, other_child_started)):
            _kill_if_left(pid, st)
