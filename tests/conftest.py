"""Shared fixtures: root-only marking, a private state directory, clusters that always go away."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed_dir() -> Path:
    """The course manifests (test data, never edited): $KPROXY_SEED, else ../shared beside
    the repository (as CI lays it out), else the developers' /work/shared."""
    for candidate in (os.environ.get("KPROXY_SEED"),
                      os.path.join(os.path.dirname(REPO), "shared", "seed-exercise", "sesiones"),
                      "/work/shared/seed-exercise/sesiones"):
        if candidate and os.path.isdir(candidate):
            return Path(candidate)
    return Path(os.path.join(os.path.dirname(REPO), "shared", "seed-exercise", "sesiones"))


SEED = _seed_dir()
needs_seed = pytest.mark.skipif(not SEED.is_dir(), reason=f"the course manifests are not at {SEED} (set KPROXY_SEED)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root: creates network namespaces")
    for item in items:
        if "root" in item.keywords and not ROOT:
            item.add_marker(skip)


_UNIQUE_NAMES: set[str] = set()


def unique(prefix: str = "t") -> str:
    """A name no other test run uses (cluster names become namespace-name prefixes).

    Every name handed out is remembered: at the end of the run no namespace named
    after one of them may be left."""
    name = f"{prefix}{secrets.token_hex(3)}"
    _UNIQUE_NAMES.add(name)
    return name


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("KPROXY_STATE_DIR", str(d))
    return str(d)


@pytest.fixture
def make_cluster(state_dir):
    """Factory: make_cluster(nodes=2, network_mode="host-gw", **config) -> Cluster.

    Every cluster it made is cleaned at teardown from its journal, even when the test
    failed half-way, and the cleanup's own verification must pass."""
    from kproxy.clean import clean_cluster
    from kproxy.cluster import Cluster
    from kproxy.config import ClusterConfig, nodes_from_count

    made = []

    def factory(nodes=2, **kwargs):
        name = kwargs.pop("name", None) or unique("t")
        node_names = nodes if isinstance(nodes, list) else nodes_from_count(nodes)
        made.append(name)
        return Cluster.create(ClusterConfig(name=name, nodes=node_names, **kwargs))

    yield factory
    problems = []
    for name in made:                       # every cluster is cleaned, even if one fails
        if os.path.isdir(os.path.join(state_dir, "clusters", name)):
            try:
                problems += clean_cluster(name).problems
            except Exception as e:          # reported below, after the others are cleaned
                problems.append(f"cleaning {name} raised {e!r}")
    assert not problems, f"cleanup left differences: {problems}"


def kproxy_cli(*args, env=None, check=False, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (python -m kproxy), capturing text output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    kwargs.setdefault("cwd", REPO)
    res = subprocess.run([sys.executable, "-m", "kproxy", *args], capture_output=True, text=True,
                         env=full_env, **kwargs)
    if check and res.returncode != 0:
        raise AssertionError(f"kproxy {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="session", autouse=True)
def no_leaked_namespaces():
    """After the whole run, no namespace named after a test's unique name may be left.

    (Only this run's names count: another test run on the machine is not a leak of ours.)"""
    yield
    if not ROOT:
        return
    from cni import netns
    left = sorted(n for n in netns.list_names()
                  if any(n == u or n.startswith(u + "-") for u in _UNIQUE_NAMES))
    assert not left, f"the test run left network namespaces behind: {left}"
