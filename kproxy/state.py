"""What kproxy has made, on disk: a journal written before each creation, and the
cluster's current picture (nodes, pods, processes) beside it.

The journal is the cleanup's source of truth.  Every namespace and process is
written to it *before* it is created, so a crash half-way through `up` still
leaves a record of everything that may exist; `clean` removes exactly those
things and nothing else.  Layout under the state root (KPROXY_STATE_DIR, default
/var/lib/kproxy):

    clusters/<name>/journal.jsonl   one JSON object a line: {"op": ..., ...}
    clusters/<name>/state.json      the current cluster (rewritten atomically)
    clusters/<name>/snapshot.json   the machine's own namespace before `up`
    clusters/<name>/ipam/           host-local IPAM data of the cluster's pods
    clusters/<name>/lock            flock'd while a command changes the cluster
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

DEFAULT_ROOT = "/var/lib/kproxy"


def state_root() -> str:
    return os.environ.get("KPROXY_STATE_DIR", DEFAULT_ROOT)


def clusters_dir() -> str:
    return os.path.join(state_root(), "clusters")


def cluster_dir(name: str) -> str:
    return os.path.join(clusters_dir(), name)


def known_clusters() -> list[str]:
    try:
        return sorted(d for d in os.listdir(clusters_dir()) if os.path.isdir(os.path.join(clusters_dir(), d)))
    except FileNotFoundError:
        return []


def write_json_atomic(path: str, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


@dataclass
class Entry:
    op: str          # "netns", "process", "release-netns", "release-process", "dir"
    data: dict


class Journal:
    """Append-only record of what was created (and later released) for one cluster."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "journal.jsonl")
        self._f = None

    def _file(self):
        if self._f is None:
            self._f = open(self.path, "a")
        return self._f

    def record(self, op: str, **data) -> None:
        f = self._file()
        f.write(json.dumps({"op": op, **data}, sort_keys=True) + "\n")
        f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def entries(self) -> list[Entry]:
        out = []
        try:
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue   # a line torn by a crash mid-write names nothing we made yet
                    out.append(Entry(obj.pop("op"), obj))
        except FileNotFoundError:
            pass
        return out

    def live_namespaces(self) -> list[str]:
        """Namespaces recorded as created and not released, in creation order."""
        live: dict[str, None] = {}
        for e in self.entries():
            if e.op == "netns":
                live[e.data["name"]] = None
            elif e.op == "release-netns":
                live.pop(e.data["name"], None)
        return list(live)

    def live_processes(self) -> list[tuple[int, int]]:
        live: dict[tuple[int, int], None] = {}
        for e in self.entries():
            key = (e.data.get("pid"), e.data.get("started"))
            if e.op == "process":
                live[key] = None
            elif e.op == "release-process":
                live.pop(key, None)
        return list(live)


_held: dict = {}      # directory -> [fd, depth]: the lock is re-entrant within a process


@contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold the cluster's lock (one process changing the cluster's records at a time).
    Re-entrant: a holder may take it again (flock on a second descriptor would wait
    for itself)."""
    key = os.path.abspath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = [fd, 1]
        yield
    finally:
        _held.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
