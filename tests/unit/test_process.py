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
