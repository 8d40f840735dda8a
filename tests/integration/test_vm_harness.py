"""scripts/vm/run.sh: a command runs in a throwaway VM on a stock Debian kernel.

The kernel here may lack IP_VS and dummy links; the VM's has them. Each test boots a VM
(about 10-20 s with TCG) and the first run downloads the kernel package (about 70 MB) into
vm/, so these tests run only when KPROXY_VM_TESTS=1 is set, with qemu installed
(`bash scripts/install-deps.sh --vm`). See docs/vm.md.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

RUN_SH = os.path.join(REPO, "scripts", "vm", "run.sh")

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("KPROXY_VM_TESTS") != "1",
                       reason="boots a VM: set KPROXY_VM_TESTS=1 (make test-vm)"),
    pytest.mark.skipif(os.environ.get("KPROXY_IN_VM") == "1", reason="already inside the test VM"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu is not installed: bash scripts/install-deps.sh --vm"),
]


def run_vm(*command: str, options: tuple[str, ...] = (), timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([RUN_SH, "--timeout", "600", *options, "--", *command], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def explain(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


def test_ipvs_and_a_dummy_link_work_in_the_vm():
    script = ("cat /proc/net/ip_vs && ip link add d0 type dummy && "
              "ipvsadm -A -t 10.96.0.1:80 -s rr && ipvsadm -ln && pwd && ip -br link show d0")
    res = run_vm("sh", "-c", script)
    assert res.returncode == 0, explain(res)
    out = res.stdout
    assert out.startswith("IP Virtual Server version"), explain(res)
    assert re.search(r"^TCP\s+10\.96\.0\.1:80 rr\b", out, re.M), explain(res)
    # The command ran where the caller was, on the caller's files.
    assert f"\n{REPO}\n" in out, explain(res)
    assert re.search(r"^d0\s", out, re.M), explain(res)
    # Only the command's output is on stdout; the harness reports on stderr.
    assert "kproxy-vm:" not in out, explain(res)
    assert re.search(r"kproxy-vm: booted in [\d.]+ s \((kvm|tcg), ", res.stderr), explain(res)
    # Nothing of it happened on this machine.
    host = subprocess.run(["ip", "link", "show", "d0"], capture_output=True, text=True)
    assert host.returncode != 0, "the VM's dummy link d0 appeared on the host"


def test_a_failing_commands_exit_code_and_streams_come_back():
    res = run_vm("sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7")
    assert res.returncode == 7, explain(res)
    assert res.stdout == "to-stdout\n", explain(res)
    assert "to-stderr\n" in res.stderr, explain(res)
    assert "exit code 7" in res.stderr, explain(res)


def test_the_timeout_kills_the_vm():
    res = run_vm("sleep", "600", options=("--timeout", "5"), timeout=120)
    assert res.returncode == 124, explain(res)
    assert "timeout" in res.stderr, explain(res)
