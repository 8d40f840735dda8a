"""Packet capture on many interfaces in many namespaces, from one thread, with no tcpdump.

Each capture point is an AF_PACKET socket opened inside the interface's namespace (a
socket stays bound to the namespace it was created in) and bound to that interface.
One reader thread selects over all of them; frames are kept with their arrival time
and decoded with scapy afterwards, so nothing is parsed on the hot path.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

from cni import netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35                  # the kernel's receive time of each frame, in ns


@dataclass
class Point:
    """One place to look: an interface in a namespace, and what it stands for."""
    label: str          # e.g. "pod default/client eth0", "node node1 cni0"
    ns: str
    iface: str
    role: str = ""      # "client", "client-node", "node", "endpoint"


@dataclass
class Frame:
    point: Point
    time: float
    data: bytes
    outgoing: bool


@dataclass
class Capture:
    points: List[Point]
    frames: List[Frame] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    _socks: dict = field(default_factory=dict)
    _stop: Optional[threading.Event] = None
    _thread: Optional[threading.Thread] = None

    def start(self) -> "Capture":
        for p in self.points:
            try:
                with netns.entered(p.ns):
                    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((p.iface, ETH_P_ALL))
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                s.setblocking(False)
                self._socks[s.fileno()] = (s, p)
            except OSError as e:
                self.errors.append(f"cannot capture on {p.label}: {e}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kproxy-capture", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        fds = list(self._socks)
        while not self._stop.is_set():
            ready, _, _ = select.select(fds, [], [], 0.05)
            for fd in ready:
                s, p = self._socks[fd]
                while True:
                    try:
                        data, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(16))
                    except (BlockingIOError, InterruptedError):
                        break
                    stamp = time.time()
                    for level, kind, raw in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                            sec, nsec = struct.unpack("qq", raw[:16])
                            stamp = sec + nsec / 1e9
                    self.frames.append(Frame(p, stamp, data, addr[2] == PACKET_OUTGOING))

    def stop(self) -> None:
        if self._stop is not None:
            time.sleep(0.05)      # let the last frames in flight arrive
            self._stop.set()
            self._thread.join(timeout=2)
        for s, _ in self._socks.values():
            s.close()
        self._socks.clear()


def decode(frame: Frame) -> Optional[dict]:
    """The facts of an IPv4 TCP/UDP/ICMP frame, or None for anything else (ARP, IPv6...)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(frame.data)
    ip = pkt.getlayer(IP)
    if ip is None:
        return None
    out = {"hop": frame.point.label, "ns": frame.point.ns, "iface": frame.point.iface,
           "role": frame.point.role, "time": frame.time, "src": ip.src, "dst": ip.dst,
           "proto": {6: "tcp", 17: "udp", 1: "icmp"}.get(ip.proto, str(ip.proto)),
           "direction": "out" if frame.outgoing else "in"}
    if TCP in pkt:
        t = pkt[TCP]
        out.update(sport=t.sport, dport=t.dport, flags=str(t.flags))
    elif UDP in pkt:
        out.update(sport=pkt[UDP].sport, dport=pkt[UDP].dport)
    elif ICMP in pkt:
        out.update(icmp_type=pkt[ICMP].type, icmp_code=pkt[ICMP].code)
    return out


def write_pcap(frames: List[Frame], path: str) -> int:
    """All frames, in time order, as one pcap file (readable by tcpdump and Wireshark)."""
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapWriter

    frames = sorted(frames, key=lambda f: f.time)
    with PcapWriter(path, linktype=1, sync=True) as w:
        for f in frames:
            pkt = Ether(f.data)
            pkt.time = f.time
            w.write(pkt)
    return len(frames)
