"""The cluster DNS server: a zone file served over UDP and TCP, as CoreDNS would.

    python -m kproxy.dns.server --zone-file PATH --listen 0.0.0.0:53 [--domain cluster.local]

One process, one thread for UDP and the listening TCP socket (a thread per TCP
connection). The zone is ``Zone.to_json()`` written by someone else, atomically (a
temporary file renamed over PATH); it is checked every 0.2 s and reloaded when its
mtime (or inode or size) changes. A file that is missing or does not parse is
reported and the zone served so far is kept; until a first zone has loaded, names under
``--domain`` get SERVFAIL (CoreDNS before its first sync). A zone for another domain
than ``--domain`` is not loaded.

stderr gets one line per listener (``listening udp 0.0.0.0:53``, ``listening tcp
0.0.0.0:53``), one per zone (re)load or failure, and ``stopped`` on the way out.
SIGTERM (or SIGINT) closes the sockets and exits 0. With port 0 the UDP port is chosen
by the kernel and TCP takes the same number; the listening lines say which.

Responses follow CoreDNS: authoritative, recursion-available set, answers for the
question's name as asked, the SOA in the authority section of NXDOMAIN and no-data
answers, the addresses of SRV targets in the additional section, A/AAAA records
shuffled as the ``loadbalance`` plugin of the default Corefile does (``--no-loadbalance``
keeps the zone's order). A UDP answer larger than the client's buffer (512 bytes without
EDNS) is sent empty with TC set, so the client retries over TCP.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
from typing import Dict, List, Optional, Tuple

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from kproxy.dns.records import DEFAULT_DOMAIN, Answer, Record, Zone, normalize, under

RELOAD_INTERVAL = 0.2
TCP_IDLE_TIMEOUT = 10.0
UDP_BUFSIZE = 65535
MAX_TCP_CLIENTS = 64


def log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ZoneFile:
    """The zone in ``path``, reloaded when the file changes."""

    def __init__(self, path: str, domain: str = DEFAULT_DOMAIN):
        self.path = path
        self.domain = normalize(domain)
        self.zone: Optional[Zone] = None
        self._sig: Optional[Tuple[int, int, int]] = None
        self._problem: Optional[str] = None
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Reload if the file changed since the last look; True if a new zone loaded."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._report(f"zone file {self.path}: not there yet" if self.zone is None
                             else f"zone file {self.path}: gone; serving the zone loaded before")
                self._sig = None
                return False
            sig = (st.st_mtime_ns, st.st_ino, st.st_size)
            if sig == self._sig:
                return False
            self._sig = sig
            try:
                with open(self.path) as f:
                    zone = Zone.from_json(f.read())
            except (OSError, ValueError, KeyError, TypeError) as e:
                self._report(f"zone file {self.path}: not loaded ({e.__class__.__name__}: {e}); "
                             f"{'serving the zone loaded before' if self.zone else 'no zone yet'}")
                return False
            if zone.domain != self.domain:
                self._report(f"zone file {self.path}: for domain {zone.domain}, not {self.domain}: not loaded")
                return False
            self.zone = zone
            self._problem = None
            log(f"loaded zone {zone.domain} from {self.path}: {len(zone)} records, serial {zone.serial}")
            return True

    def _report(self, problem: str) -> None:
        if problem != self._problem:        # once per distinct problem, not every 0.2 s
            self._problem = problem
            log(problem)


# --------------------------------------------------------------------------- answering


def _rcode(name: str) -> int:
    return dns.rcode.from_text(name)


def _add(msg: dns.message.Message, section: List[dns.rrset.RRset], records: List[Record],
         shuffle: bool) -> None:
    groups: Dict[Tuple[str, str], List[Record]] = {}
    for r in records:
        groups.setdefault((r.name.lower(), r.type), []).append(r)
    for (_, type_), rs in groups.items():
        data = [r.data for r in rs]
        if shuffle and type_ in ("A", "AAAA") and len(data) > 1:
            random.shuffle(data)
        rrset = dns.rrset.from_text_list(rs[0].name + ".", rs[0].ttl, "IN", type_, data)
        section.append(rrset)


def respond(files: ZoneFile, query: dns.message.Message, shuffle: bool = True) -> dns.message.Message:
    """The response to one parsed query."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    q = query.question[0]
    qname = q.name.to_text(omit_final_dot=True)
    zone = files.zone
    if q.rdclass != dns.rdataclass.IN or q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        response.set_rcode(dns.rcode.REFUSED)
        return response
    if zone is None:
        in_domain = under(normalize(qname), files.domain)
        response.set_rcode(dns.rcode.SERVFAIL if in_domain else dns.rcode.REFUSED)
        return response
    answer: Answer = zone.lookup(qname, dns.rdatatype.to_text(q.rdtype))
    response.set_rcode(_rcode(answer.rcode))
    if answer.authoritative:
        response.flags |= dns.flags.AA
    _add(response, response.answer, answer.answer, shuffle)
    _add(response, response.authority, answer.authority, False)
    _add(response, response.additional, answer.additional, False)
    return response


def _formerr(wire: bytes) -> Optional[bytes]:
    """A FORMERR reply to a message that does not parse, if its header can be read."""
    if len(wire) < 12:
        return None
    (qid, flags) = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None                       # a response: never answer those
    m = dns.message.Message(id=qid)
    m.flags = dns.flags.QR | (flags & dns.flags.RD)
    m.set_rcode(dns.rcode.FORMERR)
    return m.to_wire()


def handle_wire(files: ZoneFile, wire: bytes, max_size: Optional[int], shuffle: bool = True) -> Optional[bytes]:
    """Bytes in, bytes out (None: send nothing). ``max_size`` None for TCP."""
    try:
        query = dns.message.from_wire(wire)
    except dns.message.ShortHeader:
        return None
    except Exception:
        return _formerr(wire)
    if query.flags & dns.flags.QR:
        return None
    try:
        response = respond(files, query, shuffle)
    except Exception as e:               # a bad record in the zone: SERVFAIL, not a crash
        log(f"answering {query.question[0].name if query.question else '?'}: {e.__class__.__name__}: {e}")
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
    if max_size is None:
        return response.to_wire()
    limit = max(512, query.payload) if query.edns >= 0 else 512
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer, response.authority, response.additional = [], [], []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


# --------------------------------------------------------------------------- sockets


def parse_listen(text: str) -> Tuple[str, int]:
    """``0.0.0.0:53``, ``[::]:53``, ``127.0.0.1:0``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"--listen wants ADDRESS:PORT, not {text!r}")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants ADDRESS:PORT, not {text!r}")
    return host, int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_sockets(host: str, port: int) -> Tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same port (with port 0, the kernel's choice for UDP
    and the same number for TCP)."""
    family = _family(host)
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((host, port))
            chosen = udp.getsockname()[1]
            tcp.bind((host, chosen))
            tcp.listen(128)
            return udp, tcp
        except OSError:
            udp.close()
            tcp.close()
            if port != 0:
                raise
    raise OSError(f"no port free for both UDP and TCP on {host}")


def _recv_exact(conn: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve_tcp_connection(files: ZoneFile, conn: socket.socket, shuffle: bool,
                         slots: threading.Semaphore) -> None:
    try:
        conn.settimeout(TCP_IDLE_TIMEOUT)
        while True:
            head = _recv_exact(conn, 2)
            if head is None:
                return
            (length,) = struct.unpack("!H", head)
            wire = _recv_exact(conn, length)
            if wire is None:
                return
            out = handle_wire(files, wire, None, shuffle)
            if out is None:
                return
            conn.sendall(struct.pack("!H", len(out)) + out)
    except (OSError, socket.timeout):
        pass
    finally:
        conn.close()
        slots.release()


class Server:
    def __init__(self, files: ZoneFile, host: str, port: int, shuffle: bool = True):
        self.files = files
        self.shuffle = shuffle
        self.udp, self.tcp = bind_sockets(host, port)
        self.stopping = threading.Event()
        self.slots = threading.Semaphore(MAX_TCP_CLIENTS)

    def addresses(self) -> Tuple[str, str]:
        def show(sock):
            h, p = sock.getsockname()[:2]
            return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
        return show(self.udp), show(self.tcp)

    def _watch(self) -> None:
        while not self.stopping.wait(RELOAD_INTERVAL):
            try:
                self.files.check()
            except Exception as e:       # never let the watcher die
                log(f"zone file {self.files.path}: {e.__class__.__name__}: {e}")

    def serve(self, wakeup: Optional[socket.socket] = None) -> None:
        threading.Thread(target=self._watch, name="zone-watch", daemon=True).start()
        sel = selectors.DefaultSelector()
        self.udp.setblocking(False)
        self.tcp.setblocking(False)
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "tcp")
        if wakeup is not None:
            sel.register(wakeup, selectors.EVENT_READ, "wakeup")
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "udp":
                        self._udp_once()
                    elif key.data == "tcp":
                        self._accept()
                    else:
                        try:
                            wakeup.recv(64)
                        except OSError:
                            pass
        finally:
            self.stopping.set()
            sel.close()
            self.udp.close()
            self.tcp.close()

    def _udp_once(self) -> None:
        for _ in range(64):              # drain a burst, then look at the other sockets
            try:
                wire, peer = self.udp.recvfrom(UDP_BUFSIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                out = handle_wire(self.files, wire, 512, self.shuffle)
            except Exception as e:       # never let one datagram end the server
                log(f"udp query from {peer[0]}: {e.__class__.__name__}: {e}")
                continue
            if out is not None:
                try:
                    self.udp.sendto(out, peer)
                except OSError:
                    pass

    def _accept(self) -> None:
        try:
            conn, _ = self.tcp.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return
        if not self.slots.acquire(blocking=False):
            conn.close()
            return
        conn.setblocking(True)
        threading.Thread(target=serve_tcp_connection, args=(self.files, conn, self.shuffle, self.slots),
                         daemon=True).start()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kproxy.dns.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zone-file", required=True, help="the zone, as Zone.to_json() writes it")
    ap.add_argument("--listen", default="0.0.0.0:53", help="ADDRESS:PORT for UDP and TCP (default 0.0.0.0:53)")
    ap.add_argument("--domain", default=DEFAULT_DOMAIN, help="the cluster domain (default cluster.local)")
    ap.add_argument("--no-loadbalance", action="store_true",
                    help="keep A/AAAA records in the zone's order instead of shuffling them")
    args = ap.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        ap.error(str(e))

    files = ZoneFile(args.zone_file, args.domain)
    files.check()
    try:
        server = Server(files, host, port, shuffle=not args.no_loadbalance)
    except OSError as e:
        log(f"cannot listen on {args.listen}: {e}")
        return 1
    udp_addr, tcp_addr = server.addresses()

    rsock, wsock = socket.socketpair()
    rsock.setblocking(False)
    wsock.setblocking(False)

    def stop(signum, frame):
        server.stopping.set()
        try:
            wsock.send(b"x")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening udp {udp_addr}")
    log(f"listening tcp {tcp_addr}")
    server.serve(wakeup=rsock)
    rsock.close()
    wsock.close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
