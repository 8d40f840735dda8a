"""A tiny stdlib-only client for the workload server, and a parser for what it says.

Functions (each opens one fresh connection/socket in the *calling* process's network
namespace; to ask from inside a pod, run the CLI below under ``ip netns exec``):

``http_get(ip, port, path="/", timeout=2.0, *, headers=None, method="GET", source_ip="",
source_port=0) -> (status, headers, body)``
    One HTTP/1.1 request with ``Connection: close``. ``status`` is an int, ``headers`` a
    dict with lower-cased names, ``body`` a str (UTF-8, undecodable bytes replaced).
``tcp_banner(ip, port, timeout=2.0, *, source_ip="", source_port=0) -> str``
    Connects, returns the first line the server sends (without the newline), closes.
``tcp_echo(ip, port, data, timeout=2.0, *, source_ip="", source_port=0) -> (banner, echoed)``
    Connects, reads the banner line, sends ``data`` and reads back as many bytes.
``udp_ask(ip, port, payload=b"", timeout=2.0, *, source_ip="", source_port=0) -> bytes``
    Sends one datagram from a connected UDP socket (so only a reply from ``ip:port`` is
    accepted: a reply whose source was not un-NATed is ignored, as a real resolver does)
    and returns the reply.
``parse_facts(text) -> dict``
    See its docstring.

``source_port``/``source_ip`` bind the client socket first, so a test knows the client
address the server should report. Errors are the socket's own: ``ConnectionRefusedError``
(a closed port, or an RST from a reject rule), ``TimeoutError``/``socket.timeout`` (a
drop), ``OSError`` for the rest (e.g. an ICMP port-unreachable on UDP surfaces as
``ConnectionRefusedError`` on the connected socket).

CLI, for use inside a namespace (prints one JSON object, exit 0 on an answer, 1 on an
error, which is reported as ``{"ok": false, "error": "ConnectionRefusedError: ..."}``)::

    python -m kproxy.workload.client http IP PORT [--path /] [--timeout 2] [--source-port N]
    python -m kproxy.workload.client tcp  IP PORT [--timeout 2] [--source-port N]
    python -m kproxy.workload.client udp  IP PORT [--payload TEXT] [--timeout 2] [--source-port N]
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["http_get", "tcp_banner", "tcp_echo", "udp_ask", "parse_facts", "main"]

_ALIASES = {"namespace": "ns"}
_INT_KEYS = ("port", "client_port")


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _connect(ip: str, port: int, timeout: float, source_ip: str, source_port: int) -> socket.socket:
    s = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if source_ip or source_port:
            s.bind((source_ip or ("::" if ":" in ip else "0.0.0.0"), source_port))
        s.connect((ip, port))
    except BaseException:
        s.close()
        raise
    return s


def http_get(ip: str, port: int, path: str = "/", timeout: float = 2.0, *,
             headers: Optional[Mapping[str, str]] = None, method: str = "GET",
             source_ip: str = "", source_port: int = 0) -> Tuple[int, Dict[str, str], str]:
    """One HTTP request, ``Connection: close``; returns ``(status, headers, body)``."""
    src = (source_ip or ("::" if ":" in ip else "0.0.0.0"), source_port) if (source_ip or source_port) else None
    conn = http.client.HTTPConnection(ip, port, timeout=timeout, source_address=src)
    try:
        hdrs = {"Host": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", "Connection": "close",
                "User-Agent": "kproxy-workload-client"}
        hdrs.update(headers or {})
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body.decode("utf-8", "replace")
    finally:
        conn.close()


def _read_line(s: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


def tcp_banner(ip: str, port: int, timeout: float = 2.0, *, source_ip: str = "",
               source_port: int = 0) -> str:
    """The first line the server sends on connect (no newline)."""
    s = _connect(ip, port, timeout, source_ip, source_port)
    try:
        return _read_line(s).split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    finally:
        s.close()


def tcp_echo(ip: str, port: int, data: Union[bytes, str], timeout: float = 2.0, *,
             source_ip: str = "", source_port: int = 0) -> Tuple[str, bytes]:
    """Banner line, then ``data`` sent and as many bytes read back: ``(banner, echoed)``."""
    payload = data.encode() if isinstance(data, str) else bytes(data)
    s = _connect(ip, port, timeout, source_ip, source_port)
    try:
        buf = _read_line(s)
        line, _, rest = buf.partition(b"\n")
        s.sendall(payload)
        got = rest
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return line.decode("utf-8", "replace").rstrip("\r"), got
    finally:
        s.close()


def udp_ask(ip: str, port: int, payload: Union[bytes, str] = b"", timeout: float = 2.0, *,
            source_ip: str = "", source_port: int = 0) -> bytes:
    """Send one datagram, return the reply datagram."""
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    s = socket.socket(_family(ip), socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        if source_ip or source_port:
            s.bind((source_ip or ("::" if ":" in ip else "0.0.0.0"), source_port))
        s.connect((ip, port))
        s.send(data)
        return s.recv(65535)
    finally:
        s.close()


def _split_client(facts: Dict[str, object]) -> None:
    client = facts.get("client")
    if isinstance(client, str) and ":" in client and "client_ip" not in facts:
        host, _, port = client.rpartition(":")
        facts["client_ip"] = host.strip("[]")
        facts["client_port"] = port
    for k in _INT_KEYS:
        if k in facts:
            try:
                facts[k] = int(facts[k])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass


def parse_facts(text: Union[str, bytes]) -> Dict[str, object]:
    """The facts from anything the server sends.

    Accepts the facts line (TCP banner, the first line of a UDP reply, the
    ``X-Kproxy-Facts`` header), the HTTP text block, or the HTTP JSON body; ``bytes`` are
    decoded as UTF-8. Returns a dict with ``pod``, ``ns``, ``ip``, ``node``, ``port`` (int),
    ``client`` (``"IP:PORT"``), ``client_ip``, ``client_port`` (int), plus whatever else the
    source had (``method``, ``path``, ``host``, ... as strings). Only the facts are read:
    for a UDP reply the first line, for the text block the leading ``key: value`` lines,
    so echoed payload cannot disturb it. Raises ``ValueError`` when there are no facts
    (e.g. an http-echo ``--text`` body: read its ``x-kproxy-facts`` header instead).
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    s = text.lstrip()
    facts: Dict[str, object] = {}
    if s.startswith("{"):
        try:
            doc = json.loads(s)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            facts = {_ALIASES.get(k, k): v for k, v in doc.items()}
    else:
        lines = s.splitlines()
        first = lines[0] if lines else ""
        if "pod=" in first.split(" ", 1)[0] or " pod=" in first:
            for tok in first.split():
                k, eq, v = tok.partition("=")
                if eq:
                    facts[_ALIASES.get(k, k)] = v
        else:
            for line in lines:
                k, colon, v = line.partition(":")
                if not colon or not k or " " in k.strip() or k != k.strip():
                    break
                facts[_ALIASES.get(k, k)] = v.strip()
    if "pod" not in facts:
        raise ValueError(f"no workload facts in {text[:80]!r}")
    _split_client(facts)
    return facts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kproxy.workload.client",
                                description="Ask a kproxy workload who it is; prints JSON.")
    p.add_argument("kind", choices=["http", "tcp", "udp"])
    p.add_argument("ip")
    p.add_argument("port", type=int)
    p.add_argument("--path", default="/")
    p.add_argument("--payload", default="")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--source-port", type=int, default=0)
    a = p.parse_args(argv)
    out: Dict[str, object] = {"kind": a.kind, "target": f"{a.ip}:{a.port}"}
    try:
        if a.kind == "http":
            status, headers, body = http_get(a.ip, a.port, a.path, a.timeout, source_port=a.source_port)
            out.update(ok=True, status=status, body=body)
            raw = headers.get("x-kproxy-facts", body)
        elif a.kind == "tcp":
            raw = tcp_banner(a.ip, a.port, a.timeout, source_port=a.source_port)
            out.update(ok=True, banner=raw)
        else:
            reply = udp_ask(a.ip, a.port, a.payload, a.timeout, source_port=a.source_port)
            raw = reply.decode("utf-8", "replace")
            out.update(ok=True, reply=raw)
        try:
            out["facts"] = parse_facts(raw)
        except ValueError:
            out["facts"] = None
        rc = 0
    except OSError as e:
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
        rc = 1
    print(json.dumps(out))
    return rc


if __name__ == "__main__":
    sys.exit(main())
