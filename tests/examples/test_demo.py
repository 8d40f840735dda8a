"""`make demo` runs `kproxy demo`: it must work and leave nothing behind."""
import pytest

from tests.conftest import kproxy_cli

pytestmark = pytest.mark.root


def test_demo_runs_and_cleans_up(state_dir):
    res = kproxy_cli("demo", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the server saw the client's own pod IP" in res.stdout
    assert "verified" in res.stdout
