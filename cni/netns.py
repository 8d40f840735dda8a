"""Named network namespaces, the way iproute2 keeps them (/run/netns/NAME).

Everything here works on the calling thread only: ``setns`` and ``unshare``
change the network namespace of one thread, so a namespace can be entered,
a netlink socket opened inside it, and the thread put back, in microseconds
and without forking.  A netlink socket stays bound to the namespace it was
opened in, which is what makes ``socket_in(name)`` useful.
"""
from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager
from typing import Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def path_of(name: str) -> str:
    """The bind-mount path of a named namespace (a path is returned as is)."""
    return name if name.startswith("/") else os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _ensure_run_dir() -> None:
    """Make /run/netns a shared mount point, as `ip netns add` does."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    d = NETNS_RUN_DIR.encode()
    if _libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"mount --make-shared {NETNS_RUN_DIR}")
    _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), f"mount --bind {NETNS_RUN_DIR}")
    _check(_libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None), f"mount --make-shared {NETNS_RUN_DIR}")


def _setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def create(name: str) -> str:
    """Create a named network namespace; FileExistsError if the name is taken."""
    _ensure_run_dir()
    path = path_of(name)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                f"bind-mount namespace to {path}",
            )
        finally:
            _setns(own)
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(own)
    return path


def delete(name: str) -> bool:
    """Remove a named namespace; False if it was not there (idempotent)."""
    path = path_of(name)
    if not os.path.exists(path):
        return False
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            _check(-1, f"umount {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body of a with-block on this thread inside namespace ``name``."""
    target = os.open(path_of(name), os.O_RDONLY)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def sysctl(key: str, value: str) -> bool:
    """Set /proc/sys/<key> ("net/ipv4/ip_forward") in the calling thread's namespace
    (a read first: nothing is written when it already holds ``value``); False if impossible."""
    path = os.path.join("/proc/sys", key)
    try:
        with open(path) as f:
            if f.read().strip() == value:
                return True
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def open_fd(name: str) -> int:
    """An O_RDONLY descriptor on the namespace, for IFLA_NET_NS_FD; caller closes it."""
    return os.open(path_of(name), os.O_RDONLY)


def _ns_id(path: str):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


# The namespace this process started in: the machine's own, for a kproxy run from a shell.
_STARTED_IN = _ns_id("/proc/self/ns/net")


def same_as_init(name: str) -> bool:
    """True if ``name`` is the machine's own namespace (PID 1's, or the one kproxy started in)."""
    target = _ns_id(path_of(name))
    try:
        if target == _ns_id("/proc/1/ns/net"):
            return True
    except PermissionError:
        pass
    return target == _STARTED_IN
