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
from dataclasses import dataclass
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


# What this process read of each data directory, so that an allocation does not
# read every address file again (the reference does; at a few hundred addresses
# that is milliseconds).  Kept per directory with its signature (inode, mtime,
# ctime) as seen under the flock, when it was exact:
#
# - same signature: nothing changed, or (on a kernel whose timestamps are coarse)
#   a change within the same clock tick; one listing of the directory (getdents,
#   no per-file syscall) finds files added or removed, and only new ones are read;
# - another signature: some other process (the reference plugin, an executable)
#   changed the directory: every file is read again, as the reference does.  A
#   file removed and written again under the same name can keep its inode (ext4
#   reuses it at once), which is why a mere listing would not be enough here.
#
# Our own changes are made under the flock and recorded with the signature they
# leave, so a process that is the only writer never reads its files twice.
Record = tuple[int, IPAddress, tuple[str, str]]  # (inode, address, (containerID, ifname))


@dataclass
class _Seen:
    sig: tuple[int, int, int]
    records: dict[str, Record]  # by file name


_SEEN: dict[str, _Seen] = {}
_SEEN_MUTEX = threading.Lock()


def _dir_sig(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def _read_owner(path: str) -> Optional[tuple[str, str]]:
    try:
        with open(path, newline="") as f:
            data = f.read().strip()
    except OSError:
        return None  # released meanwhile
    cid, _, ifname = data.partition(LINE_BREAK)
    return cid.strip(), ifname.strip()


def _scan(directory: str, known: dict[str, Record]) -> dict[str, Record]:
    """The address files of ``directory``; a file in ``known`` under the same name and inode is not read."""
    out: dict[str, Record] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            record = known.get(name)
            if record is not None and record[0] == entry.inode():
                out[name] = record
                continue
            if name == "lock" or name.startswith(LAST_IP_PREFIX):
                continue
            try:
                ip = ipaddress.ip_address(name)
            except ValueError:
                continue  # anything else
            owner = _read_owner(entry.path)
            if owner is not None:
                out[name] = (entry.inode(), ip, owner)
    return out


class DiskStore:
    """The reference host-local's file layout; safe across processes and threads."""

    def __init__(self, network: str, data_dir: Optional[str] = None) -> None:
        self.dir = os.path.join(data_dir or DEFAULT_DATA_DIR, network)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.dir, "lock"), os.O_RDONLY | os.O_CREAT, 0o644)
        self._mutex = threading.RLock()  # flock does not exclude threads sharing this fd
        self._depth = 0
        self._holder = 0  # the thread holding the lock
        self._view: Optional[dict[str, Record]] = None  # the records while the lock is held
        self._dirty = False

    def _load(self) -> tuple[tuple[int, int, int], dict[str, Record]]:
        sig = _dir_sig(self.dir)
        with _SEEN_MUTEX:
            seen = _SEEN.get(self.dir)
        return sig, _scan(self.dir, seen.records if seen is not None and seen.sig == sig else {})

    @contextmanager
    def lock(self) -> Iterator[None]:
        with self._mutex:
            if self._depth:  # re-entered by the thread holding it
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                sig, self._view = self._load()
                self._holder, self._dirty, self._depth = threading.get_ident(), False, 1
                interrupted = True
                try:
                    yield
                    interrupted = False
                except Exception:
                    interrupted = False  # the changes made are in the view: it stays exact
                    raise
                finally:
                    self._remember(None if interrupted else sig)
            finally:
                self._depth, self._view, self._holder = 0, None, 0
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _remember(self, sig: Optional[tuple[int, int, int]]) -> None:
        """Keep the view with the directory's signature (None: forget the directory)."""
        if sig is not None and self._dirty:
            try:
                sig = _dir_sig(self.dir)
            except OSError:
                sig = None
        with _SEEN_MUTEX:
            if sig is None:  # interrupted, maybe between a file and its record
                _SEEN.pop(self.dir, None)
            else:
                _SEEN[self.dir] = _Seen(sig, self._view)

    def _locked_here(self) -> bool:
        return self._holder == threading.get_ident() and self._view is not None

    def _note(self, name: str, record: Optional[Record]) -> None:
        """Our own change, made under the lock, into its view (else the memory of the directory goes)."""
        if self._locked_here():
            if record is None:
                self._view.pop(name, None)
            else:
                self._view[name] = record
            self._dirty = True
        else:
            with _SEEN_MUTEX:
                _SEEN.pop(self.dir, None)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def reserve(self, container_id: str, ifname: str, ip: IPAddress, range_id: int) -> bool:
        name = str(ip)
        path = self._path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            inode = os.fstat(fd).st_ino
            with os.fdopen(fd, "w", newline="") as f:
                f.write(container_id.strip() + LINE_BREAK + ifname)
        except OSError:
            os.unlink(path)
            raise
        self._note(name, (inode, ip, (container_id.strip(), ifname)))
        # rewritten in place (truncating to zero first costs ten times more on ext4)
        data = name.encode()
        fd = os.open(self._path(f"{LAST_IP_PREFIX}{range_id}"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        return True

    def last_reserved_ip(self, range_id: int) -> Optional[IPAddress]:
        try:
            with open(self._path(f"{LAST_IP_PREFIX}{range_id}")) as f:
                return ipaddress.ip_address(f.read().strip())
        except (OSError, ValueError):
            return None

    def release(self, ip: IPAddress) -> None:
        name = str(ip)
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        self._note(name, None)

    def _records(self) -> list[Record]:
        if self._locked_here():
            return list(self._view.values())
        return list(self._load()[1].values())

    def allocations(self) -> dict[IPAddress, tuple[str, str]]:
        return {ip: owner for _inode, ip, owner in self._records()}

    def get_by_id(self, container_id: str, ifname: str) -> list[IPAddress]:
        cid = container_id.strip()
        return [ip for _inode, ip, (rcid, rifname) in self._records()
                if rcid == cid and (rifname == ifname or rifname == "")]

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
