"""Where host-local records who holds which address.

`DiskStore` keeps the reference host-local's on-disk layout, so the two can share a
data directory (and a node's state survives restarts):

    <dataDir>/<network>/<ip>                  "<containerID>\\r\\n<ifname>"
    <dataDir>/<network>/last_reserved_ip.<N>  the last address range set N handed out
    <dataDir>/<network>/lock                  flock(2)ed around every change

`MemoryStore` is the same interface in memory, for tests and dry runs.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Protocol

from cni.ipam.allocator import IPAddress

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_IP_PREFIX = "last_reserved_ip."
LINE_BREAK = "\r\n"


class Store(Protocol):
    def lock(self): ...  # a context manager held around a read-modify-write
    def reserve(self, container_id: str, ifname: str, ip: IPAddress, range_id: int) -> bool: ...
    def last_reserved_ip(self, range_id: int) -> Optional[IPAddress]: ...
    def release(self, ip: IPAddress) -> None: ...
    def release_by_id(self, container_id: str, ifname: str) -> bool: ...
    def get_by_id(self, container_id: str, ifname: str) -> list[IPAddress]: ...
    def allocations(self) -> dict[IPAddress, tuple[str, str]]: ...
    def close(self) -> None: ...


def _owner_matches(owner: tuple[str, str], container_id: str, ifname: str) -> bool:
    """Exact (id, ifname) match, or a legacy record that only holds the id."""
    cid, ifn = owner
    return cid == container_id.strip() and (ifn == ifname or ifn == "")


class MemoryStore:
    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._owners: dict[IPAddress, tuple[str, str]] = {}
        self._last: dict[int, IPAddress] = {}

    @contextmanager
    def lock(self) -> Iterator[None]:
        with self._mutex:
            yield

    def reserve(self, container_id: str, ifname: str, ip: IPAddress, range_id: int) -> bool:
        with self._mutex:
            if ip in self._owners:
                return False
            self._owners[ip] = (container_id.strip(), ifname)
            self._last[range_id] = ip
            return True

    def last_reserved_ip(self, range_id: int) -> Optional[IPAddress]:
        return self._last.get(range_id)

    def release(self, ip: IPAddress) -> None:
        self._owners.pop(ip, None)

    def release_by_id(self, container_id: str, ifname: str) -> bool:
        with self._mutex:
            mine = self.get_by_id(container_id, ifname)
            for ip in mine:
                del self._owners[ip]
            return bool(mine)

    def get_by_id(self, container_id: str, ifname: str) -> list[IPAddress]:
        return [ip for ip, owner in self._owners.items() if _owner_matches(owner, container_id, ifname)]

    def allocations(self) -> dict[IPAddress, tuple[str, str]]:
        return dict(self._owners)

    def close(self) -> None:
        pass


class DiskStore:
    """The reference host-local's file layout; safe across processes and threads."""

    def __init__(self, network: str, data_dir: Optional[str] = None) -> None:
        self.dir = os.path.join(data_dir or DEFAULT_DATA_DIR, network)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDONLY | os.O_CREAT, 0o644)
        self._mutex = threading.RLock()  # flock does not exclude threads sharing this fd
        self._depth = 0

    @contextmanager
    def lock(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def reserve(self, container_id: str, ifname: str, ip: IPAddress, range_id: int) -> bool:
        path = self._path(str(ip))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(container_id.strip() + LINE_BREAK + ifname)
        except OSError:
            os.unlink(path)
            raise
        with open(self._path(f"{LAST_IP_PREFIX}{range_id}"), "w") as f:
            f.write(str(ip))
        return True

    def last_reserved_ip(self, range_id: int) -> Optional[IPAddress]:
        try:
            with open(self._path(f"{LAST_IP_PREFIX}{range_id}")) as f:
                return ipaddress.ip_address(f.read().strip())
        except (OSError, ValueError):
            return None

    def release(self, ip: IPAddress) -> None:
        try:
            os.unlink(self._path(str(ip)))
        except FileNotFoundError:
            pass

    def allocations(self) -> dict[IPAddress, tuple[str, str]]:
        out: dict[IPAddress, tuple[str, str]] = {}
        for entry in os.scandir(self.dir):
            try:
                ip = ipaddress.ip_address(entry.name)
            except ValueError:
                continue  # lock, last_reserved_ip.N, anything else
            try:
                with open(entry.path, newline="") as f:
                    data = f.read().strip()
            except OSError:
                continue  # released meanwhile
            cid, _, ifname = data.partition(LINE_BREAK)
            out[ip] = (cid.strip(), ifname.strip())
        return out

    def get_by_id(self, container_id: str, ifname: str) -> list[IPAddress]:
        return [ip for ip, owner in self.allocations().items() if _owner_matches(owner, container_id, ifname)]

    def release_by_id(self, container_id: str, ifname: str) -> bool:
        mine = self.get_by_id(container_id, ifname)
        for ip in mine:
            self.release(ip)
        return bool(mine)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "DiskStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
