"""The built-in workload server: what an emulated pod's container answers with.

Run it (normally inside a pod's network namespace, started by the kubelet)::

    python -m kproxy.workload.server --pod NAME --namespace NS --node NODE \\
        --listen tcp:80:http --listen tcp:3306 --listen udp:53 [--text apple] [--bind 0.0.0.0]

One process, one asyncio event loop, no threads, serving every ``--listen`` at once.

Listeners (``--listen PROTO:PORT[:http]``, repeatable; port 0 lets the OS choose, for tests)
------------------------------------------------------------------------------------------
The *facts* are the same everywhere: ``pod`` and ``ns`` (from the options), ``ip`` and
``port`` (the local address and port the connection or datagram arrived on: the pod IP and
the targetPort after any DNAT), ``node``, and ``client`` (the remote address and port the
server saw: a Service path with SNAT shows the node's address here, without SNAT the real
client). The facts line is::

    pod=NAME ns=NS ip=IP node=NODE port=PORT client=IP:PORT

(an IPv6 client is written ``client=[ADDR]:PORT``).

``tcp:PORT:http``
    HTTP/1.1 (and 1.0), keep-alive (1.1 default; 1.0 with ``Connection: keep-alive``),
    pipelining, any method answered with 200 (``HEAD`` without a body; a request body is
    read and discarded, ``Expect: 100-continue`` is honoured; a chunked request body makes
    the server answer then close). Bodies, ``Content-Type`` ``text/plain`` unless said:

    * ``/healthz``: ``ok``;
    * with ``--text T`` (hashicorp/http-echo): ``T`` + newline, for every other path;
    * ``Accept: application/json`` or path ``/json``: one JSON object with ``pod``,
      ``namespace``, ``ip``, ``node``, ``port``, ``client``, ``client_ip``, ``client_port``,
      ``method``, ``path``, ``host``, ``version`` (``application/json``);
    * otherwise a short text block, one ``key: value`` per line: ``pod``, ``namespace``,
      ``ip``, ``node``, ``port``, ``client``, ``method``, ``path``, ``host``.

    Every response also carries the facts line in an ``X-Kproxy-Facts`` header (so an
    http-echo pod still says who it is). Idle keep-alive connections are closed after
    :data:`KEEPALIVE_TIMEOUT` seconds; a request head over 64 KiB gets 431 and a close; a
    malformed request line gets 400 and a close.
``tcp:PORT`` (and ``sctp:PORT``)
    On connect, the facts line + ``\\n``; then every byte received is echoed back until the
    client closes (so a line-based client gets its lines back).
``udp:PORT``
    Each datagram is answered, from the address it was sent to (``IP_PKTINFO``), with the
    facts line + ``\\n`` + the datagram's payload (truncated to fit one datagram).

At start, after every socket is bound, one line per listener goes to stderr, in
``--listen`` order::

    listening tcp 0.0.0.0:80 http
    listening tcp 0.0.0.0:3306 banner
    listening udp 0.0.0.0:53 echo

If any socket cannot be bound the server prints ``error: ...`` and exits 1 before
listening anywhere (exit 2 for bad options). SIGTERM or SIGINT close every socket and
the process exits 0.

:func:`server_argv` builds the command line for a :class:`~kproxy.workload.images.Listener`
list.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import struct
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

from kproxy.workload.images import Listener

__all__ = ["Facts", "server_argv", "main", "KEEPALIVE_TIMEOUT"]

KEEPALIVE_TIMEOUT = 60.0      # seconds an idle HTTP keep-alive connection is kept
MAX_HEAD = 64 * 1024          # largest accepted HTTP request head
BACKLOG = 4096                # listen() backlog (the kernel caps it at somaxconn)
UDP_MAX = 65507               # largest UDP/IPv4 payload

# Linux values; Python 3.11's socket module has no IP_PKTINFO.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


def server_argv(pod: str, namespace: str, node: str, listeners: Sequence[Listener],
                text: Optional[str] = None, bind: str = "0.0.0.0",
                python: Optional[str] = None) -> List[str]:
    """The argv that runs this server for the given listeners."""
    argv = [python or sys.executable, "-m", "kproxy.workload.server",
            "--pod", pod, "--namespace", namespace, "--node", node, "--bind", bind]
    for l in listeners:
        argv += ["--listen", l.spec]
    if text is not None:
        argv += ["--text", text]
    return argv


def _addr(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Facts:
    """Who answers (pod, ns, node: fixed) and for which connection (ip, port, client)."""

    __slots__ = ("pod", "ns", "node", "ip", "port", "client_ip", "client_port")

    def __init__(self, ident: "Identity", local: Tuple, remote: Tuple) -> None:
        self.pod, self.ns, self.node = ident.pod, ident.namespace, ident.node
        self.ip, self.port = _addr(str(local[0])), int(local[1])
        self.client_ip, self.client_port = _addr(str(remote[0])), int(remote[1])

    @property
    def client(self) -> str:
        return _hostport(self.client_ip, self.client_port)

    def line(self) -> str:
        return (f"pod={self.pod} ns={self.ns} ip={self.ip} node={self.node} "
                f"port={self.port} client={self.client}")


class Identity:
    __slots__ = ("pod", "namespace", "node", "text")

    def __init__(self, pod: str, namespace: str, node: str, text: Optional[str]) -> None:
        self.pod, self.namespace, self.node, self.text = pod, namespace, node, text


class Hub:
    """Everything the loop owns, so SIGTERM can close it all."""

    def __init__(self, ident: Identity) -> None:
        self.ident = ident
        self.conns: Set[asyncio.BaseProtocol] = set()
        self.servers: List[asyncio.AbstractServer] = []
        self.udp: List[socket.socket] = []


# -- plain TCP: banner + echo -------------------------------------------------------------

class BannerEcho(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.t: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.t = transport
        self.hub.conns.add(self)
        facts = Facts(self.hub.ident, transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
        transport.write((facts.line() + "\n").encode())

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echo is flushed

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()

    def connection_lost(self, exc) -> None:
        self.hub.conns.discard(self)

    def close(self) -> None:
        if self.t is not None:
            self.t.abort()


# -- HTTP ------------------------------------------------------------------------------

_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large"}


class Http(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.t: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.discard = 0          # request body bytes still to skip
        self.closing = False
        self.last = 0.0
        self.local: Tuple = ()
        self.remote: Tuple = ()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.t = transport
        self.local = transport.get_extra_info("sockname")
        self.remote = transport.get_extra_info("peername")
        self.last = asyncio.get_running_loop().time()
        self.hub.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.hub.conns.discard(self)

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        if not self.closing:
            self.t.resume_reading()

    def close(self) -> None:
        if self.t is not None:
            self.t.abort()

    def idle(self, now: float) -> bool:
        return not self.buf and not self.discard and now - self.last > KEEPALIVE_TIMEOUT

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last = asyncio.get_running_loop().time()
        self.buf += data
        self._process()

    def _process(self) -> None:
        buf = self.buf
        while not self.closing:
            if self.discard:
                n = min(self.discard, len(buf))
                del buf[:n]
                self.discard -= n
                if self.discard:
                    return
            # RFC 9112 2.2: ignore empty lines before a request line.
            while buf[:2] == b"\r\n" or buf[:1] == b"\n":
                del buf[:2 if buf[:1] == b"\r" else 1]
            end, sep = buf.find(b"\r\n\r\n"), 4
            lf = buf.find(b"\n\n")
            if lf >= 0 and (end < 0 or lf < end):
                end, sep = lf, 2
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._reply(431, b"request head too large\n", "text/plain", None, keep=False)
                return
            head = bytes(buf[:end])
            del buf[:end + sep]
            self._request(head)

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\n")
        parts = lines[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") \
                or not parts[0].replace("-", "").replace("_", "").isalnum():
            self._reply(400, b"bad request\n", "text/plain", None, keep=False)
            return
        method, target, version = parts
        headers: Dict[str, str] = {}
        for raw in lines[1:]:
            name, colon, value = raw.partition(":")
            if not colon or not name.strip():
                self._reply(400, b"bad header\n", "text/plain", None, keep=False)
                return
            key = name.strip().lower()
            value = value.strip()
            headers[key] = headers[key] + ", " + value if key in headers else value
        conn_tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep = ("keep-alive" in conn_tokens) if version == "HTTP/1.0" else ("close" not in conn_tokens)
        te = headers.get("transfer-encoding", "").strip().lower()
        if te and te != "identity":
            keep = False  # a chunked body is not parsed: answer, then close
        elif "content-length" in headers:
            try:
                self.discard = int(headers["content-length"])
                if self.discard < 0:
                    raise ValueError
            except ValueError:
                self._reply(400, b"bad content-length\n", "text/plain", None, keep=False)
                return
        if self.discard and headers.get("expect", "").lower() == "100-continue":
            self.t.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        path = target
        if "://" in path:  # absolute-form
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        route = path.split("?", 1)[0].split("#", 1)[0]
        facts = Facts(self.hub.ident, self.local, self.remote)
        text = self.hub.ident.text
        if route == "/healthz":
            body, ctype = b"ok\n", "text/plain; charset=utf-8"
        elif text is not None:
            body, ctype = (text + "\n").encode(), "text/plain; charset=utf-8"
        elif route == "/json" or "application/json" in headers.get("accept", "").lower():
            doc = {"pod": facts.pod, "namespace": facts.ns, "ip": facts.ip, "node": facts.node,
                   "port": facts.port, "client": facts.client, "client_ip": facts.client_ip,
                   "client_port": facts.client_port, "method": method, "path": path,
                   "host": headers.get("host", ""), "version": version}
            body, ctype = (json.dumps(doc) + "\n").encode(), "application/json"
        else:
            block = (f"pod: {facts.pod}\nnamespace: {facts.ns}\nip: {facts.ip}\nnode: {facts.node}\n"
                     f"port: {facts.port}\nclient: {facts.client}\nmethod: {method}\npath: {path}\n"
                     f"host: {headers.get('host', '')}\n")
            body, ctype = block.encode(), "text/plain; charset=utf-8"
        self._reply(200, body, ctype, facts, keep=keep, head_only=(method == "HEAD"),
                    version=version)

    def _reply(self, status: int, body: bytes, ctype: str, facts: Optional[Facts], *,
               keep: bool, head_only: bool = False, version: str = "HTTP/1.1") -> None:
        hdr = [f"{version if version == 'HTTP/1.0' else 'HTTP/1.1'} {status} {_REASONS.get(status, '')}",
               f"Content-Type: {ctype}", f"Content-Length: {len(body)}", "Server: kproxy-workload",
               "Connection: " + ("keep-alive" if keep else "close")]
        if facts is not None:
            hdr.append("X-Kproxy-Facts: " + facts.line())
        out = ("\r\n".join(hdr) + "\r\n\r\n").encode("latin-1", "replace")
        self.t.write(out if head_only else out + body)
        if not keep:
            self.closing = True
            self.buf.clear()
            self.t.close()  # after the response is flushed


# -- UDP -------------------------------------------------------------------------------

class UdpEcho:
    """A datagram socket served with add_reader and recvmsg/sendmsg, so each reply leaves
    from the exact address the request was sent to (IP_PKTINFO), like a real server bound
    to 0.0.0.0 that cares (DNS servers do)."""

    def __init__(self, hub: Hub, sock: socket.socket) -> None:
        self.hub, self.sock = hub, sock
        self.v6 = sock.family == socket.AF_INET6
        self.bound = sock.getsockname()
        if self.v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.cmsg_space = socket.CMSG_SPACE(32)

    def readable(self) -> None:
        for _ in range(64):  # bounded batch, then let others run
            try:
                data, anc, _flags, peer = self.sock.recvmsg(UDP_MAX, self.cmsg_space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP error queued from an earlier reply
            local_ip = self.bound[0]
            pktinfo = None
            for level, typ, cdata in anc:
                if not self.v6 and level == socket.IPPROTO_IP and typ == IP_PKTINFO and len(cdata) >= 12:
                    _ifi, _spec, dst = struct.unpack("I4s4s", cdata[:12])
                    local_ip = socket.inet_ntop(socket.AF_INET, dst)
                    pktinfo = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("I4s4s", 0, dst, b"\0" * 4))
                elif self.v6 and level == socket.IPPROTO_IPV6 and typ == IPV6_PKTINFO and len(cdata) >= 20:
                    dst, _ifi = struct.unpack("16sI", cdata[:20])
                    local_ip = socket.inet_ntop(socket.AF_INET6, dst)
                    pktinfo = (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16sI", dst, 0))
            facts = Facts(self.hub.ident, (local_ip, self.bound[1]), peer)
            reply = (facts.line() + "\n").encode() + data
            try:
                self.sock.sendmsg([reply[:UDP_MAX]], [pktinfo] if pktinfo else [], 0, peer)
            except OSError:
                pass  # UDP: a reply that cannot be sent is lost


# -- main ------------------------------------------------------------------------------

def _bind(listener: Listener, host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if listener.protocol == "UDP":
        sock = socket.socket(family, socket.SOCK_DGRAM)
    elif listener.protocol == "SCTP":
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if listener.protocol != "UDP":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, listener.port))
        sock.setblocking(False)
        if listener.protocol != "UDP":
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _raise_nofile() -> None:
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(ident: Identity, listeners: Sequence[Listener], host: str) -> int:
    loop = asyncio.get_running_loop()
    hub = Hub(ident)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    socks: List[socket.socket] = []
    try:
        for l in listeners:
            socks.append(_bind(l, host))
    except OSError as e:
        for s in socks:
            s.close()
        print(f"error: cannot listen {l.protocol.lower()} {_hostport(host, l.port)}: {e.strerror or e}",
              file=sys.stderr, flush=True)
        return 1

    lines = []
    for l, sock in zip(listeners, socks):
        bound = sock.getsockname()
        where = f"{l.protocol.lower()} {_hostport(str(bound[0]), bound[1])}"
        if l.protocol == "UDP":
            u = UdpEcho(hub, sock)
            hub.udp.append(sock)
            loop.add_reader(sock.fileno(), u.readable)
            lines.append(f"listening {where} echo")
        else:
            proto = Http if l.http else BannerEcho
            srv = await loop.create_server(lambda p=proto: p(hub), sock=sock, backlog=BACKLOG)
            hub.servers.append(srv)
            lines.append(f"listening {where} {'http' if l.http else 'banner'}")
    sys.stderr.write("".join(s + "\n" for s in lines))
    sys.stderr.flush()

    async def sweep() -> None:
        while True:
            await asyncio.sleep(5.0)
            now = loop.time()
            for c in [c for c in hub.conns if isinstance(c, Http) and c.idle(now)]:
                c.t.close()

    sweeper = loop.create_task(sweep())
    await stop.wait()
    sweeper.cancel()
    for srv in hub.servers:
        srv.close()
    for c in list(hub.conns):
        c.close()
    for sock in hub.udp:
        loop.remove_reader(sock.fileno())
        sock.close()
    await asyncio.sleep(0)  # let the transports finish closing
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kproxy.workload.server",
                                description="kproxy's built-in workload server (answers with who it is).")
    p.add_argument("--pod", default=socket.gethostname(), help="pod name (default: hostname)")
    p.add_argument("--namespace", "-n", default="default", help="pod namespace (default: default)")
    p.add_argument("--node", default="-", help="node name")
    p.add_argument("--listen", action="append", default=[], metavar="PROTO:PORT[:http]",
                   help="tcp:80:http, tcp:3306, udp:53, sctp:9999 (repeatable)")
    p.add_argument("--text", default=None, help="http-echo mode: HTTP body is this text + newline")
    p.add_argument("--bind", default="0.0.0.0", help="address to bind (default 0.0.0.0; :: for IPv6)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    try:
        listeners = [Listener.parse(s) for s in a.listen]
    except ValueError as e:
        p.error(str(e))
    if not listeners:
        p.error("at least one --listen is needed")
    _raise_nofile()
    return asyncio.run(_serve(Identity(a.pod, a.namespace, a.node, a.text), listeners, a.bind))


if __name__ == "__main__":
    sys.exit(main())
