"""Calling CNI plugins: the API the cluster code uses, and IPAM delegation.

    result = call("ADD", conf, container_id="pod-a", netns="pod-a-ns", host_netns="node1")

The plugin runs with ``host_netns`` as its "host" namespace (the emulated node's).
``kproxy-bridge`` and ``kproxy-host-local`` run in the calling thread through the same
`cni.skel.run` as their executables (same env, same stdin bytes, same JSON out); any
other plugin type, or ``in_process=False``, is executed from ``cni_path`` with its
environment and stdin, as a container runtime would, in ``host_netns``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import Mapping, Optional

from cni import netns as nsutil
from cni import skel
from cni.skel import CNIError

__all__ = ["CNIError", "call", "plugin_dir", "find_plugin", "delegate"]

# plugin type -> module holding its skel.Plugin as PLUGIN
IN_PROCESS_PLUGINS = {
    "kproxy-bridge": "cni.bridge",
    "kproxy-host-local": "cni.ipam.host_local",
}
DEFAULT_CNI_PATH = ("/usr/lib/cni", "/opt/cni/bin")
_local = threading.local()  # .host_netns: the host namespace path of this thread's in-process call
EXEC_TIMEOUT = 120.0  # seconds; a plugin that hangs longer is reported as failed


def plugin_dir() -> str:
    """The directory holding the installed kproxy-bridge and kproxy-host-local."""
    here = os.path.dirname(sys.executable)
    if os.access(os.path.join(here, "kproxy-bridge"), os.X_OK):
        return here
    found = shutil.which("kproxy-bridge")
    return os.path.dirname(found) if found else here


def find_plugin(plugin_type: str, cni_path: list[str] | tuple[str, ...]) -> str:
    if not plugin_type or os.sep in plugin_type:
        raise CNIError(skel.ERR_INVALID_CONFIG, f"invalid plugin type {plugin_type!r}")
    for d in cni_path:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(skel.ERR_INVALID_CONFIG, f"failed to find plugin {plugin_type!r} in path {list(cni_path)}")


def _parse_output(plugin_type: str, command: str, code: int, out: bytes, err: bytes) -> Optional[dict]:
    if code != 0:
        try:
            obj = json.loads(out)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "code" in obj:
            raise CNIError.from_dict(obj)
        text = (err or out).decode(errors="replace").strip()
        raise CNIError(skel.ERR_INTERNAL, f"plugin {plugin_type} failed (exit {code})", text)
    if command not in ("ADD", "VERSION"):
        return None
    try:
        obj = json.loads(out)
    except ValueError as e:
        raise CNIError(skel.ERR_DECODE, f"plugin {plugin_type} {command}: cannot decode its output: {e}",
                       out.decode(errors="replace")) from None
    if not isinstance(obj, dict):
        raise CNIError(skel.ERR_DECODE, f"plugin {plugin_type} {command}: output is not a JSON object")
    return obj


def host_namespace() -> Optional[str]:
    """The path of the host namespace of the in-process call running on this thread,
    None when the plugin was not given one (it runs in the caller's namespace)."""
    return getattr(_local, "host_netns", None)


def _run_in_process(plugin_type: str, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    plugin = importlib.import_module(IN_PROCESS_PLUGINS[plugin_type]).PLUGIN
    return skel.run(plugin, env, stdin, in_process=True)


def _run_executable(path: str, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes, bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full_env.update(env)
    try:
        p = subprocess.run([path], input=stdin, env=full_env, capture_output=True, timeout=EXEC_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CNIError(skel.ERR_INTERNAL, f"plugin {path} timed out after {EXEC_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise CNIError(skel.ERR_IO, f"cannot execute plugin {path}: {e}") from None
    return p.returncode, p.stdout, p.stderr


def _exec(plugin_type: str, env: Mapping[str, str], stdin: bytes, cni_path, in_process: bool) -> Optional[dict]:
    """Run a plugin in the current namespace; a child process inherits this thread's."""
    if in_process and plugin_type in IN_PROCESS_PLUGINS:
        code, out, err = _run_in_process(plugin_type, env, stdin)
    else:
        code, out, err = _run_executable(find_plugin(plugin_type, cni_path), env, stdin)
    return _parse_output(plugin_type, env.get("CNI_COMMAND", ""), code, out, err)


def call(command: str, config: dict, *, container_id: str, netns: str, ifname: str = "eth0",
         host_netns: str | None = None, cni_path: list[str] | None = None,
         in_process: bool = True, cni_args: str = "") -> dict | None:
    """Run one CNI command for one attachment.

    ``netns`` (a name under /run/netns or a path) is the container's namespace and
    ``host_netns`` the one playing the host (None: the caller's).  Returns the ADD
    result or the VERSION answer as a dict, None for DEL/CHECK/GC/STATUS; raises
    `CNIError` with the plugin's error object.

    It blocks.  Called from a thread running an asyncio loop, it does its work on a
    helper thread (netlink's sync API cannot run inside a running loop); prefer
    ``await asyncio.to_thread(call, ...)`` there.
    """
    kwargs = dict(container_id=container_id, netns=netns, ifname=ifname, host_netns=host_netns,
                  cni_path=cni_path, in_process=in_process, cni_args=cni_args)
    if _loop_running():
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(_call, command, config, **kwargs).result()
    return _call(command, config, **kwargs)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _call(command: str, config: dict, *, container_id: str, netns: str, ifname: str,
          host_netns: str | None, cni_path: list[str] | None, in_process: bool, cni_args: str) -> dict | None:
    path = list(cni_path) if cni_path is not None else [plugin_dir(), *DEFAULT_CNI_PATH]
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": cni_args,
        "CNI_PATH": os.pathsep.join(path),
    }
    if netns:
        env["CNI_NETNS"] = nsutil.path_of(netns)
    stdin = json.dumps(config).encode()
    plugin_type = config.get("type", "")
    host_path = nsutil.path_of(host_netns) if host_netns else None
    with contextlib.ExitStack() as stack:
        if host_path:
            try:
                stack.enter_context(nsutil.entered(host_path))
            except OSError as e:
                raise CNIError(skel.ERR_IO, f"cannot enter host namespace {host_netns!r}: {e}") from None
        outer, _local.host_netns = getattr(_local, "host_netns", None), host_path
        try:
            return _exec(plugin_type, env, stdin, path, in_process)
        finally:
            _local.host_netns = outer


def delegate(command: str, plugin_type: str, args: skel.CmdArgs) -> Optional[dict]:
    """Run a delegated plugin (IPAM) with the caller's env and stdin, as libcni's
    invoke.DelegateAdd/Del/Check does: in process when the caller is, and the
    type is one of ours; else the executable found in CNI_PATH."""
    env = dict(args.env)
    env["CNI_COMMAND"] = command
    return _exec(plugin_type, env, args.stdin_data, args.path, args.in_process)
