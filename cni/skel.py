"""The CNI contract in one place: environment + stdin in, a result or an error object out.

A plugin is a `Plugin` (a name and one function per command).  `run()` is the whole
protocol as a function of (env, stdin) -> (exit code, stdout, stderr), so the very same
code serves the executable (`main()`) and in-process calls from `cni.invoke`.

Checks follow containernetworking/cni's skel v1.1: required variables per command,
config JSON with a valid network name, a valid container id and interface name, and a
supported cniVersion, in that order.  A command function returns the result as a dict
in the current (1.0) shape and `run()` converts it to the config's cniVersion.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from cni import result as cniresult

# Error codes of the CNI specification (1.0, 1.1) and the reference plugins' 999.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_INTERNAL = 999

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.0.0"

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
MAX_IFNAME = 15

# Which variables each command needs (CNI spec 1.1, section "Parameters").
_REQUIRED = {
    "CNI_COMMAND": ("ADD", "CHECK", "DEL", "GC", "STATUS", "VERSION"),
    "CNI_CONTAINERID": ("ADD", "CHECK", "DEL"),
    "CNI_NETNS": ("ADD", "CHECK"),
    "CNI_IFNAME": ("ADD", "CHECK", "DEL"),
    "CNI_PATH": ("ADD", "CHECK", "DEL", "GC", "STATUS"),
}


class CNIError(Exception):
    """A CNI error object: ``code``, ``msg``, ``details`` (spec section "Error")."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(code, msg, details)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        text = f"CNI error {self.code}: {self.msg}"
        return f"{text} ({self.details})" if self.details else text

    def to_dict(self, cni_version: str = CURRENT_VERSION) -> dict:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}

    @classmethod
    def from_dict(cls, obj: dict) -> "CNIError":
        return cls(int(obj.get("code", ERR_INTERNAL)), str(obj.get("msg", "")), str(obj.get("details", "") or ""))


@dataclass(frozen=True)
class CmdArgs:
    """What a command function gets: the CNI_* variables, stdin and its parsed config."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    path: tuple[str, ...]
    stdin_data: bytes
    config: dict
    env: Mapping[str, str] = field(repr=False)
    in_process: bool = False

    @property
    def cni_version(self) -> str:
        return self.config.get("cniVersion", "")


Handler = Callable[[CmdArgs], Optional[dict]]


@dataclass(frozen=True)
class Plugin:
    name: str
    add: Handler
    delete: Handler
    check: Handler
    gc: Optional[Handler] = None
    status: Optional[Handler] = None

    @property
    def about(self) -> str:
        return f"CNI {self.name} plugin (kproxy)"


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=4) + "\n").encode()


def version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        raise CNIError(ERR_DECODE, f"unparsable version string {version!r}") from None


def parse_args(cni_args: str) -> dict[str, str]:
    """CNI_ARGS "K1=V1;K2=V2" as a dict."""
    out: dict[str, str] = {}
    for pair in filter(None, cni_args.split(";")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise CNIError(ERR_INVALID_ENV, f"ARGS: invalid pair {pair!r}")
        out[key] = value
    return out


def _validate_ifname(ifname: str) -> None:
    if not ifname:
        raise CNIError(ERR_INVALID_ENV, "interface name is empty")
    if len(ifname) > MAX_IFNAME:
        raise CNIError(ERR_INVALID_ENV, "interface name is too long",
                       f"interface name should be less than {MAX_IFNAME + 1} characters")
    if ifname in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in ifname):
        raise CNIError(ERR_INVALID_ENV, "interface name contains / or : or whitespace characters")


def _validate_container_id(cid: str) -> None:
    if not cid:
        raise CNIError(ERR_UNKNOWN_CONTAINER, "missing containerID")
    if not _NAME_RE.match(cid):
        raise CNIError(ERR_INVALID_ENV, "invalid characters in containerID", cid)


def _decode_config(stdin: bytes) -> dict:
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(ERR_DECODE, f"error unmarshall network config: {e}") from None
    if not isinstance(config, dict):
        raise CNIError(ERR_DECODE, "error unmarshall network config: not a JSON object")
    name = config.get("name")
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", str(name))
    return config


def _check_version(config: dict) -> str:
    version = config.get("cniVersion") or "0.1.0"
    if not isinstance(version, str):
        raise CNIError(ERR_DECODE, "decoding version from network config: cniVersion is not a string")
    if version not in SUPPORTED_VERSIONS:
        supported = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'config is "{version}", plugin supports [{supported}]')
    return version


def _dispatch(plugin: Plugin, env: Mapping[str, str], stdin: bytes, in_process: bool) -> Optional[dict]:
    cmd = env.get("CNI_COMMAND", "")
    missing = [k for k, cmds in _REQUIRED.items() if not env.get(k) and (not cmd or cmd in cmds)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")

    if cmd == "VERSION":
        try:
            asked = json.loads(stdin or b"{}").get("cniVersion")
        except (ValueError, AttributeError):
            asked = None
        answer = asked if asked in SUPPORTED_VERSIONS else CURRENT_VERSION
        return {"cniVersion": answer, "supportedVersions": list(SUPPORTED_VERSIONS)}

    config = _decode_config(stdin)
    if cmd in ("ADD", "CHECK", "DEL"):
        _validate_container_id(env.get("CNI_CONTAINERID", ""))
        _validate_ifname(env.get("CNI_IFNAME", ""))

    handlers = {"ADD": plugin.add, "DEL": plugin.delete, "CHECK": plugin.check,
                "GC": plugin.gc, "STATUS": plugin.status}
    if cmd not in handlers:
        raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {cmd}")
    version = _check_version(config)
    if cmd == "CHECK" and version_tuple(version) < (0, 4, 0):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK")
    if cmd in ("GC", "STATUS") and version_tuple(version) < (1, 1, 0):
        raise CNIError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {cmd}")
    handler = handlers[cmd]
    if handler is None:
        raise CNIError(ERR_UNSUPPORTED_FIELD, f"{cmd} is not supported by {plugin.name}")

    args = CmdArgs(
        command=cmd,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=env.get("CNI_ARGS", ""),
        path=tuple(p for p in env.get("CNI_PATH", "").split(os.pathsep) if p),
        stdin_data=stdin,
        config=config,
        env=env,
        in_process=in_process,
    )
    out = handler(args)
    if cmd == "ADD":
        if out is None:
            raise CNIError(ERR_INTERNAL, f"{plugin.name}: ADD produced no result")
        return cniresult.convert(out, version)
    return None


def _error_version(stdin: bytes) -> str:
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError, TypeError):
        return CURRENT_VERSION
    return version if version in SUPPORTED_VERSIONS else CURRENT_VERSION


def run(plugin: Plugin, env: Mapping[str, str], stdin: bytes, *, in_process: bool = False) -> tuple[int, bytes, bytes]:
    """Run one CNI command; returns (exit code, stdout bytes, stderr bytes)."""
    if not env.get("CNI_COMMAND"):
        about = f"{plugin.about}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
        return 0, b"", about.encode()
    try:
        out = _dispatch(plugin, env, stdin, in_process)
    except CNIError as e:
        return 1, _dump(e.to_dict(_error_version(stdin))), b""
    except Exception as e:  # a bug or an unexpected OS error: still answer with an error object
        err = CNIError(ERR_INTERNAL, f"{type(e).__name__}: {e}")
        return 1, _dump(err.to_dict(_error_version(stdin))), b""
    if out is None:
        return 0, b"", b""
    if env.get("CNI_COMMAND") == "VERSION":
        return 0, (json.dumps(out) + "\n").encode(), b""
    return 0, _dump(out), b""


def main(plugin: Plugin) -> None:
    """Entry point of a plugin executable."""
    env = os.environ
    stdin = b""
    if env.get("CNI_COMMAND"):
        try:
            stdin = sys.stdin.buffer.read()
        except OSError as e:
            err = CNIError(ERR_IO, f"error reading from stdin: {e}")
            sys.stdout.buffer.write(_dump(err.to_dict()))
            sys.exit(1)
    code, out, errtext = run(plugin, env, stdin)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    if errtext:
        sys.stderr.buffer.write(errtext)
    sys.exit(code)
