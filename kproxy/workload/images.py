"""What a container would listen on, and what it would run, without pulling its image.

kproxy never pulls images. A pod's container becomes either

* a **command** run as given inside the pod's network namespace, when the container
  spec has a ``command``/``args`` that can run on this machine (``sleep 3600``,
  ``sh -c ...``), see :func:`runs_command`; or
* the **built-in workload server** (:mod:`kproxy.workload.server`), listening where the
  real image would listen, see :func:`listeners_for`.

Image names
-----------
Images are matched on their *name* without registry, tag or digest
(:func:`image_name`): ``docker.io/library/nginx:1.21`` -> ``nginx``,
``quay.io/bitnami/wordpress`` -> ``bitnami/wordpress``, ``nginx@sha256:...`` -> ``nginx``,
``localhost:5000/team/app:v1`` -> ``team/app``. The first path component is a registry
when it contains a ``.`` or a ``:`` or is ``localhost`` (the rule docker uses); a leading
``library/`` (Docker Hub's official images) is dropped; the result is lower-cased.

The table (:data:`IMAGES`)
--------------------------
=====================================  ==========================  ======================
image name                             listens on                  notes
=====================================  ==========================  ======================
nginx, httpd, wordpress                80/TCP http
bitnami/nginx                          8080/TCP http, 8443/TCP     non-root; 8443 is TLS
bitnami/wordpress                      8080/TCP http, 8443/TCP     non-root; 8443 is TLS
bitnami/mariadb, mysql, mariadb        3306/TCP
ghost                                  2368/TCP http
postgres                               5432/TCP
redis                                  6379/TCP
memcached                              11211/TCP
mongo                                  27017/TCP
hashicorp/http-echo                    5678/TCP http               ``-text``, ``-listen``
nicholasjackson/fake-service           9090/TCP http
linuxacademycontent/store-products     80/TCP http
scottsbaldwin/docker-hello-world       80/TCP http
strm/helloworld-http                   80/TCP http
openshift/hello-openshift              8080/TCP http, 8888/TCP http
busybox, alpine, debian, ubuntu        nothing                     they run their command
=====================================  ==========================  ======================

TLS ports (8443) are *not* HTTP here: the built-in server has no certificate, it accepts
the connection and sends the plain TCP banner, so the port is open as in the real image
but a TLS handshake fails.

A few documented settings that move an image's port are honoured when they are given as
literal values in the container spec (``env[].value``; ``valueFrom`` is not resolved):
``NGINX_HTTP_PORT_NUMBER``/``NGINX_HTTPS_PORT_NUMBER`` (bitnami/nginx),
``APACHE_HTTP_PORT_NUMBER``/``APACHE_HTTPS_PORT_NUMBER`` (bitnami/wordpress),
``MARIADB_PORT_NUMBER`` (bitnami/mariadb), ``server__port`` (ghost), ``PORT`` and
``SECOND_PORT`` (openshift/hello-openshift), ``LISTEN_ADDR`` (fake-service, ``host:port``),
and http-echo's ``-listen=:PORT`` flag in ``args``.

Listening rules (:func:`listeners_for`)
---------------------------------------
1. A container that runs its own command (:func:`runs_command` is not ``None``) listens on
   nothing the table knows: the image's server is not started (the course's ``nginx`` pod
   with ``command: [sleep, 3600]`` serves nothing). Result: ``[]``.
2. A known image listens on its table ports only. A declared ``containerPort`` does **not**
   open a port the image does not listen on (``containerPort`` is informational in
   Kubernetes): ``bitnami/nginx`` declaring 80 listens on 8080 (and 8443), so a Service
   with targetPort 80 is refused, as in a real cluster.
3. A known base image (busybox, alpine, debian, ubuntu) listens on nothing.
4. An unknown image listens on its declared ``ports[].containerPort`` (deduplicated on
   port+protocol, in declaration order), protocol from ``ports[].protocol`` (default TCP).
   A TCP port is HTTP when ``appProtocol`` is ``http``/``h2c``/``kubernetes.io/h2c``, or its
   name is ``http``, starts with ``http-`` or is ``web``/``www``, or (unnamed, no
   appProtocol) its number is one of :data:`HTTP_PORT_NUMBERS`; names or numbers that say
   TLS (``https``, ``tls``, 443, 8443) make it plain TCP. Everything else gets the plain TCP
   banner. UDP ports get the UDP echo.

Command rules (:func:`runs_command`)
------------------------------------
* argv is ``command + args`` when ``command`` is set (Kubernetes: ``command`` replaces the
  image's ENTRYPOINT); ``args`` alone when only ``args`` is set (it replaces the CMD, and
  the images here either have no ENTRYPOINT or an entrypoint script that execs its
  arguments) -- except for images whose ENTRYPOINT is their own server binary
  (hashicorp/http-echo, fake-service, hello-openshift): there ``args`` are that binary's
  flags, nothing is run, and :func:`http_echo_text` reads ``-text``.
* If argv[0] (its basename) is the known image's own server (``nginx``, ``mariadbd``,
  ``apache2-foreground``, ``docker-entrypoint.sh``, ...), nothing is run: the image is
  emulated (``wordpress-pod2``'s ``args: [apache2-foreground]``), even if this machine
  happens to have that program.
* Otherwise argv runs *as given* when ``shutil.which(argv[0])`` resolves. When it does
  not, but this machine's ``busybox`` has an applet of that name, the result is
  ``["busybox", applet, *argv[1:]]``.
* busybox and alpine have a busybox userland: when this machine has busybox, argv[0]'s
  basename must be one of its applets (``sh``, ``sleep``, ``wget``, ``nslookup``, ...) or
  ``busybox`` itself, so ``curl`` or ``bash`` in a busybox pod does not run (busybox has
  ``wget``, no ``curl``: the course notes hit exactly this). A program found by
  ``shutil.which`` still runs as given (``wget`` is then this machine's wget).
* Anything else: ``None`` (:func:`plan` tells "emulate the image" from "cannot start").

``$(VAR)`` references in command/args are not expanded (that is the kubelet's job).

:func:`plan` combines both into one decision for the kubelet.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Listener",
    "ImageInfo",
    "ContainerPlan",
    "IMAGES",
    "HTTP_PORT_NUMBERS",
    "image_name",
    "lookup",
    "listeners_for",
    "declared_ports",
    "runs_command",
    "http_echo_text",
    "plan",
]

PROTOCOLS = ("TCP", "UDP", "SCTP")

#: Unnamed TCP ports of unknown images treated as HTTP.
HTTP_PORT_NUMBERS = frozenset({80, 3000, 5000, 8000, 8008, 8080, 8081, 8888})
_TLS_PORT_NUMBERS = frozenset({443, 8443})
_HTTP_APP_PROTOCOLS = frozenset({"http", "h2c", "kubernetes.io/h2c"})


@dataclass(frozen=True)
class Listener:
    """One socket the workload listens on.

    ``protocol`` is a Kubernetes protocol name (``TCP``, ``UDP``, ``SCTP``); ``http`` says
    whether the built-in server speaks HTTP there (TCP only) rather than the plain
    banner-and-echo; ``name`` is informational (``http``, ``https``, ``mysql``, ...).
    """

    port: int
    protocol: str = "TCP"
    http: bool = False
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}")
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.http and self.protocol != "TCP":
            raise ValueError("only a TCP listener can be HTTP")

    @property
    def spec(self) -> str:
        """The server's ``--listen`` form: ``tcp:80:http``, ``tcp:3306``, ``udp:53``."""
        s = f"{self.protocol.lower()}:{self.port}"
        return s + ":http" if self.http else s

    @classmethod
    def parse(cls, spec: str) -> "Listener":
        """Inverse of :attr:`spec`. ``PROTO:PORT[:http|:tcp]``; PROTO in tcp/udp/sctp."""
        parts = spec.strip().lower().split(":")
        if len(parts) not in (2, 3) or parts[0].upper() not in PROTOCOLS:
            raise ValueError(f"bad listener {spec!r}: want PROTO:PORT[:http] (tcp, udp, sctp)")
        try:
            port = int(parts[1])
        except ValueError:
            raise ValueError(f"bad listener {spec!r}: port is not a number") from None
        kind = parts[2] if len(parts) == 3 else ""
        if kind not in ("", "http", "tcp"):
            raise ValueError(f"bad listener {spec!r}: kind must be http or tcp")
        return cls(port=port, protocol=parts[0].upper(), http=(kind == "http"))


@dataclass(frozen=True)
class ImageInfo:
    """What one well-known image does.

    ``listeners``: what it listens on. ``server_commands``: argv[0] basenames that mean
    "run the image's own server" (emulated, never run from this machine).
    ``args_to_entrypoint``: its ENTRYPOINT is its server binary, so ``args`` alone are
    flags for it. ``busybox_userland``: its commands are busybox applets.
    ``port_env``: env var -> index into ``listeners`` whose port it sets.
    """

    name: str
    listeners: Tuple[Listener, ...] = ()
    server_commands: frozenset = frozenset()
    args_to_entrypoint: bool = False
    busybox_userland: bool = False
    port_env: Mapping[str, int] = field(default_factory=dict)

    @property
    def base(self) -> bool:
        """A base OS image: listens on nothing, runs whatever command it is given."""
        return not self.listeners


def _http(port: int, name: str = "http") -> Listener:
    return Listener(port, "TCP", True, name)


def _tcp(port: int, name: Optional[str] = None) -> Listener:
    return Listener(port, "TCP", False, name)


_ENTRY = {"docker-entrypoint.sh", "/docker-entrypoint.sh", "/usr/local/bin/docker-entrypoint.sh"}
_NGINX = frozenset({"nginx", "nginx-debug"} | _ENTRY)
_APACHE = frozenset({"httpd", "httpd-foreground", "apache2", "apache2-foreground", "apache2ctl"} | _ENTRY)
_MYSQL = frozenset({"mysqld", "mariadbd", "mysqld_safe", "mariadbd-safe"} | _ENTRY)
_BITNAMI = frozenset({"/opt/bitnami/scripts/nginx/run.sh", "/opt/bitnami/scripts/wordpress/entrypoint.sh",
                      "/opt/bitnami/scripts/apache/run.sh", "/opt/bitnami/scripts/mariadb/run.sh",
                      "/opt/bitnami/scripts/mariadb/entrypoint.sh", "/opt/bitnami/scripts/nginx/entrypoint.sh",
                      "run.sh", "entrypoint.sh"})


def _info(name: str, *listeners: Listener, cmds=(), args_to_entrypoint=False,
          busybox_userland=False, port_env=None) -> ImageInfo:
    return ImageInfo(name, tuple(listeners), frozenset(os.path.basename(c) for c in cmds),
                     args_to_entrypoint, busybox_userland, dict(port_env or {}))


#: The table, keyed by normalised image name (see :func:`image_name`).
IMAGES: Dict[str, ImageInfo] = {i.name: i for i in [
    _info("nginx", _http(80), cmds=_NGINX),
    _info("httpd", _http(80), cmds=_APACHE),
    _info("bitnami/nginx", _http(8080), _tcp(8443, "https"), cmds=_NGINX | _BITNAMI,
          port_env={"NGINX_HTTP_PORT_NUMBER": 0, "NGINX_HTTPS_PORT_NUMBER": 1}),
    _info("bitnami/wordpress", _http(8080), _tcp(8443, "https"), cmds=_APACHE | _BITNAMI,
          port_env={"APACHE_HTTP_PORT_NUMBER": 0, "APACHE_HTTPS_PORT_NUMBER": 1}),
    _info("bitnami/mariadb", _tcp(3306, "mysql"), cmds=_MYSQL | _BITNAMI,
          port_env={"MARIADB_PORT_NUMBER": 0}),
    _info("ghost", _http(2368), cmds={"node", "ghost"} | _ENTRY, port_env={"server__port": 0}),
    _info("wordpress", _http(80), cmds=_APACHE),
    _info("mysql", _tcp(3306, "mysql"), cmds=_MYSQL),
    _info("mariadb", _tcp(3306, "mysql"), cmds=_MYSQL),
    _info("postgres", _tcp(5432, "postgresql"), cmds={"postgres", "pg_ctl"} | _ENTRY),
    _info("redis", _tcp(6379, "redis"), cmds={"redis-server"} | _ENTRY),
    _info("memcached", _tcp(11211, "memcache"), cmds={"memcached"} | _ENTRY),
    _info("mongo", _tcp(27017, "mongodb"), cmds={"mongod", "mongos"} | _ENTRY),
    _info("hashicorp/http-echo", _http(5678), cmds={"/http-echo", "http-echo"}, args_to_entrypoint=True),
    _info("nicholasjackson/fake-service", _http(9090), cmds={"/app/fake-service", "fake-service"},
          args_to_entrypoint=True, port_env={"LISTEN_ADDR": 0}),
    _info("linuxacademycontent/store-products", _http(80), cmds={"node", "npm"}),
    _info("scottsbaldwin/docker-hello-world", _http(80), cmds=_NGINX),
    _info("strm/helloworld-http", _http(80), cmds={"python", "python2", "python3"}),
    _info("openshift/hello-openshift", _http(8080), _http(8888), cmds={"/hello-openshift", "hello-openshift"},
          args_to_entrypoint=True, port_env={"PORT": 0, "SECOND_PORT": 1}),
    _info("busybox", busybox_userland=True),
    _info("alpine", busybox_userland=True),
    _info("debian"),
    _info("ubuntu"),
]}


def image_name(image: str) -> str:
    """Normalise an image reference: no registry, tag, digest or ``library/``; lower case."""
    ref = (image or "").strip().split("@", 1)[0]
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if ":" in parts[-1]:
        parts[-1] = parts[-1].split(":", 1)[0]
    name = "/".join(parts).lower()
    if name.startswith("library/"):
        name = name[len("library/"):]
    return name


def lookup(image: str) -> Optional[ImageInfo]:
    """The table entry for an image reference, or ``None`` for an unknown image."""
    return IMAGES.get(image_name(image))


# -- listeners --------------------------------------------------------------------------

def _port_from(value: Any) -> Optional[int]:
    """``8081`` or ``":8081"`` or ``"0.0.0.0:8081"`` -> 8081; anything else None."""
    s = str(value).strip()
    if ":" in s:
        s = s.rsplit(":", 1)[1]
    try:
        p = int(s)
    except ValueError:
        return None
    return p if 0 < p <= 65535 else None


def _literal_env(container: Mapping[str, Any]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for e in container.get("env") or ():
        if isinstance(e, Mapping) and "name" in e and "value" in e and e["value"] is not None:
            out[str(e["name"])] = str(e["value"])
    return out


def _go_flag(argv: Sequence[str], flag: str) -> Optional[str]:
    """Value of a Go-style flag (``-f=v``, ``--f=v``, ``-f v``, ``--f v``), last one wins."""
    value = None
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        for dash in ("-", "--"):
            if a.startswith(dash + flag + "="):
                value = a[len(dash + flag) + 1:]
            elif a == dash + flag and i + 1 < len(argv):
                value = argv[i + 1]
                next(it, None)
    return value


def _argv_of(container: Mapping[str, Any]) -> List[str]:
    return [str(x) for x in (container.get("command") or [])] + [str(x) for x in (container.get("args") or [])]


def http_echo_text(container: Mapping[str, Any]) -> Optional[str]:
    """The ``-text`` of a hashicorp/http-echo container (``args: ["-text=apple"]`` -> ``apple``).

    ``None`` for other images or when no ``-text`` is given (real http-echo then refuses to
    start; the built-in server answers with its facts instead).
    """
    info = lookup(str(container.get("image", "")))
    if info is None or info.name != "hashicorp/http-echo":
        return None
    return _go_flag(_argv_of(container), "text")


def _is_http_port(port: int, protocol: str, name: str, app_protocol: str) -> bool:
    if protocol != "TCP":
        return False
    name, app_protocol = name.lower(), app_protocol.lower()
    if app_protocol:
        return app_protocol in _HTTP_APP_PROTOCOLS
    if name:
        if "https" in name or "tls" in name or "ssl" in name:
            return False
        return name == "http" or name.startswith("http-") or name in ("web", "www")
    return port in HTTP_PORT_NUMBERS and port not in _TLS_PORT_NUMBERS


def declared_ports(container: Mapping[str, Any]) -> List[Listener]:
    """The container's declared ``ports`` as listeners (rule 4), invalid entries skipped."""
    out: List[Listener] = []
    seen = set()
    for p in container.get("ports") or ():
        if not isinstance(p, Mapping):
            continue
        try:
            port = int(p.get("containerPort"))
        except (TypeError, ValueError):
            continue  # e.g. the course's unfilled template: containerPort: <Port>
        proto = str(p.get("protocol") or "TCP").upper()
        if not 0 < port <= 65535 or proto not in PROTOCOLS or (port, proto) in seen:
            continue
        seen.add((port, proto))
        name = str(p.get("name") or "")
        http = _is_http_port(port, proto, name, str(p.get("appProtocol") or ""))
        out.append(Listener(port, proto, http, name or None))
    return out


def _table_listeners(info: ImageInfo, container: Mapping[str, Any]) -> List[Listener]:
    ls = list(info.listeners)
    env = _literal_env(container)
    for var, idx in info.port_env.items():
        if var in env and idx < len(ls):
            port = _port_from(env[var])
            if port is not None:
                ls[idx] = Listener(port, ls[idx].protocol, ls[idx].http, ls[idx].name)
    if info.name == "hashicorp/http-echo":
        listen = _go_flag(_argv_of(container), "listen")
        if listen is not None and _port_from(listen) is not None:
            ls[0] = Listener(_port_from(listen), "TCP", True, "http")
    # Two settings pointing at the same port: one socket.
    out, seen = [], set()
    for l in ls:
        if (l.port, l.protocol) not in seen:
            seen.add((l.port, l.protocol))
            out.append(l)
    return out


def listeners_for(container: Mapping[str, Any]) -> List[Listener]:
    """What a container spec listens on (see the module docstring, "Listening rules")."""
    if runs_command(container) is not None:
        return []
    info = lookup(str(container.get("image", "")))
    if info is not None:
        return _table_listeners(info, container)
    return declared_ports(container)


# -- commands ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _busybox_applets() -> frozenset:
    """This machine's busybox applets (empty when there is no busybox)."""
    exe = shutil.which("busybox")
    if not exe:
        return frozenset()
    try:
        out = subprocess.run([exe, "--list"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.strip() for line in out.splitlines() if line.strip())


def _resolve(argv: List[str], busybox_userland: bool) -> Optional[List[str]]:
    word = argv[0]
    base = os.path.basename(word)
    applets = _busybox_applets()
    if busybox_userland and applets and base != "busybox" and base not in applets:
        return None  # e.g. curl in a busybox pod: executable file not found in $PATH
    if shutil.which(word):
        return list(argv)
    if base in applets:
        return ["busybox", base, *argv[1:]]
    if base == "busybox" and applets:
        return ["busybox", *argv[1:]]
    return None


def _wanted_argv(container: Mapping[str, Any], info: Optional[ImageInfo]) -> Optional[List[str]]:
    command = [str(x) for x in (container.get("command") or [])]
    args = [str(x) for x in (container.get("args") or [])]
    if command:
        return command + args
    if args and not (info is not None and info.args_to_entrypoint):
        return args
    return None


def exec_argv(image: str, argv: List[str]) -> Optional[List[str]]:
    """What `kubectl exec POD -- argv` runs in a container of ``image`` here: the same
    lookup as a container's command (a busybox pod's ``nslookup`` is busybox's applet),
    or ``None`` when the image would not have the command (``curl`` in busybox)."""
    if not argv:
        return None
    info = lookup(str(image))
    return _resolve(list(argv), bool(info and info.busybox_userland))


def runs_command(container: Mapping[str, Any]) -> Optional[List[str]]:
    """The argv to run for this container on this machine, or ``None`` (module docstring)."""
    info = lookup(str(container.get("image", "")))
    argv = _wanted_argv(container, info)
    if not argv or not argv[0]:
        return None
    if info is not None and os.path.basename(argv[0]) in info.server_commands:
        return None
    return _resolve(argv, bool(info and info.busybox_userland))


# -- the decision -----------------------------------------------------------------------

@dataclass(frozen=True)
class ContainerPlan:
    """What the kubelet should start for one container.

    ``kind`` is one of

    * ``"exec"``: run ``argv`` in the pod's namespace;
    * ``"serve"``: run the built-in server on ``listeners`` (``text``: http-echo's body);
    * ``"fail"``: the container cannot start, ``reason`` says why (a base image whose
      command is not available here, like ``curl`` in busybox; Kubernetes shows
      ``RunContainerError``);
    * ``"exit"``: a base image with no command: its default ``sh``/``bash`` exits at once
      without a TTY (Completed / CrashLoopBackOff in Kubernetes);
    * ``"idle"``: nothing known to run and nothing to listen on (an unknown image with no
      declared ports, or a base image with ``stdin``/``tty``): keep a placeholder process.
    """

    kind: str
    argv: Optional[List[str]] = None
    listeners: Tuple[Listener, ...] = ()
    text: Optional[str] = None
    reason: str = ""


def plan(container: Mapping[str, Any]) -> ContainerPlan:
    """One decision per container, from :func:`runs_command` and :func:`listeners_for`."""
    argv = runs_command(container)
    if argv is not None:
        return ContainerPlan("exec", argv=argv)
    listeners = listeners_for(container)
    if listeners:
        return ContainerPlan("serve", listeners=tuple(listeners), text=http_echo_text(container))
    info = lookup(str(container.get("image", "")))
    wanted = _wanted_argv(container, info)
    if info is not None and info.base:
        if wanted:
            return ContainerPlan("fail", reason=f'exec: "{wanted[0]}": executable file not found in $PATH')
        if container.get("stdin") or container.get("tty"):
            return ContainerPlan("idle", reason="base image shell waiting on stdin/tty")
        return ContainerPlan("exit", reason="base image with no command: its shell exits at once")
    return ContainerPlan("idle", reason="nothing known to run and no port to listen on")
