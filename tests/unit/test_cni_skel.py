"""The CNI contract (cni.skel), result conversion, invoke's error handling and the bytes
of cni.fastnl's rtnetlink messages; no root."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys

import pytest

from cni import fastnl, invoke, skel
from cni import result as cniresult
from cni.bridge import host_veth_name, load_conf
from cni.skel import CNIError

CONF = {"cniVersion": "1.0.0", "name": "kpnet", "type": "fake"}
RESULT = {"interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
          "ips": [{"interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
          "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


class Recorder:
    def __init__(self, fail: Exception | None = None):
        self.calls: list[skel.CmdArgs] = []
        self.fail = fail

    def __call__(self, args):
        self.calls.append(args)
        if self.fail:
            raise self.fail
        return json.loads(json.dumps(RESULT)) if args.command == "ADD" else None


def plugin(fail: Exception | None = None) -> tuple[skel.Plugin, Recorder]:
    rec = Recorder(fail)
    return skel.Plugin("fake", add=rec, delete=rec, check=rec, status=rec), rec


def env(command: str, **extra) -> dict:
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr-1", "CNI_NETNS": "/run/netns/x",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def run(command: str, conf=CONF, fail=None, **extra):
    p, rec = plugin(fail)
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    code, out, err = skel.run(p, env(command, **extra), stdin)
    return code, (json.loads(out) if out.strip() else None), rec


def assert_error(code, out, want_code, msg=None):
    assert code != 0
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert out["code"] == want_code
    if msg is not None:
        assert out["msg"] == msg


def test_version():
    code, out, rec = run("VERSION", {"cniVersion": "0.4.0"})
    assert code == 0 and not rec.calls
    assert out == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    code, out, _ = run("VERSION", b"", CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None, CNI_PATH=None)
    assert code == 0 and out["cniVersion"] == "1.0.0"


def test_add_dispatches_and_converts_to_the_config_version():
    code, out, rec = run("ADD")
    assert code == 0 and len(rec.calls) == 1
    args = rec.calls[0]
    assert (args.container_id, args.netns, args.ifname, args.path) == (
        "ctr-1", "/run/netns/x", "eth0", ("/opt/cni/bin", "/usr/lib/cni"))
    assert args.config == CONF and args.in_process is False
    assert out == {"cniVersion": "1.0.0", **RESULT}
    _, old, _ = run("ADD", {**CONF, "cniVersion": "0.4.0"})
    assert old["ips"] == [{"version": "4", "interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}]
    assert list(old) == ["cniVersion", "interfaces", "ips", "routes", "dns"]


def test_del_and_check_print_nothing():
    assert run("DEL", CNI_NETNS=None)[:2] == (0, None)  # DEL needs no netns
    assert run("CHECK")[:2] == (0, None)


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])
def test_missing_env_var_is_code_4_and_named(missing):
    code, out, rec = run("ADD", **{missing: None})
    assert_error(code, out, skel.ERR_INVALID_ENV, f"required env variables [{missing}] missing")
    assert not rec.calls


def test_several_missing_env_vars_are_all_named():
    code, out, _ = run("ADD", CNI_CONTAINERID=None, CNI_IFNAME=None)
    assert_error(code, out, 4, "required env variables [CNI_CONTAINERID,CNI_IFNAME] missing")


def test_no_command_prints_about():
    p, _ = plugin()
    code, out, err = skel.run(p, {}, b"")
    assert code == 0 and out == b"" and b"CNI protocol versions supported: 0.3.0" in err


@pytest.mark.parametrize("stdin", [b"{bad", b"[1, 2]", b"", b"\xff\xfe"])
def test_bad_json_is_code_6(stdin):
    code, out, _ = run("ADD", stdin)
    assert_error(code, out, skel.ERR_DECODE)
    assert out["msg"].startswith("error unmarshall network config")


def test_unknown_command_is_code_4():
    code, out, _ = run("FROB")
    assert_error(code, out, 4, "unknown CNI_COMMAND: FROB")


@pytest.mark.parametrize("conf,code_,msg", [
    ({"cniVersion": "1.0.0"}, 7, "missing network name"),
    ({"cniVersion": "1.0.0", "name": "bad name"}, 7, "invalid characters found in network name"),
    ({"cniVersion": "0.2.0", "name": "n"}, 1, "incompatible CNI versions"),
    ({"name": "n"}, 1, "incompatible CNI versions"),
])
def test_config_errors(conf, code_, msg):
    code, out, _ = run("ADD", conf)
    assert_error(code, out, code_, msg)


def test_incompatible_version_details_and_error_version():
    code, out, _ = run("ADD", {"cniVersion": "9.9.9", "name": "n"})
    assert out["details"].startswith('config is "9.9.9", plugin supports ["0.3.0"')
    assert out["cniVersion"] == "1.0.0"  # not a version we speak: answer in ours
    code, out, _ = run("ADD", {"cniVersion": "0.4.0", "name": "n"}, fail=CNIError(11, "busy"))
    assert out == {"cniVersion": "0.4.0", "code": 11, "msg": "busy", "details": ""}


@pytest.mark.parametrize("extra,msg", [
    ({"CNI_CONTAINERID": "bad id!"}, "invalid characters in containerID"),
    ({"CNI_IFNAME": "a" * 16}, "interface name is too long"),
    ({"CNI_IFNAME": "a/b"}, "interface name contains / or : or whitespace characters"),
])
def test_invalid_container_id_and_ifname(extra, msg):
    code, out, _ = run("ADD", **extra)
    assert_error(code, out, 4, msg)


def test_check_needs_0_4_0_and_gc_status_need_1_1_0():
    code, out, _ = run("CHECK", {**CONF, "cniVersion": "0.3.1"})
    assert_error(code, out, 1, "config version does not allow CHECK")
    code, out, _ = run("STATUS", CONF)
    assert_error(code, out, 1, "config version does not allow STATUS")
    assert run("STATUS", {**CONF, "cniVersion": "1.1.0"})[:2] == (0, None)
    code, out, _ = run("GC", {**CONF, "cniVersion": "1.1.0"})  # this fake has no GC
    assert_error(code, out, skel.ERR_UNSUPPORTED_FIELD)


def test_handler_exceptions_become_error_objects():
    code, out, _ = run("ADD", fail=CNIError(2, "ipMasq is not supported", "why"))
    assert out == {"cniVersion": "1.0.0", "code": 2, "msg": "ipMasq is not supported", "details": "why"}
    code, out, _ = run("ADD", fail=RuntimeError("boom"))
    assert_error(code, out, 999, "RuntimeError: boom")


def test_executable_speaks_the_same_protocol():
    exe = os.path.join(invoke.plugin_dir(), "kproxy-bridge")
    p = subprocess.run([exe], input=b'{"cniVersion":"1.0.0"}', capture_output=True, env={"CNI_COMMAND": "VERSION"})
    assert p.returncode == 0
    assert json.loads(p.stdout)["supportedVersions"][-1] == "1.1.0"
    p = subprocess.run([exe], input=b"{bad", capture_output=True,
                       env={"CNI_COMMAND": "ADD", "CNI_PATH": "/x", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"})
    assert p.returncode == 1
    assert json.loads(p.stdout)["msg"] == "required env variables [CNI_CONTAINERID] missing"


# -- results ----------------------------------------------------------------------

def test_result_round_trip_through_old_versions():
    for version in ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"):
        converted = cniresult.convert(RESULT, version)
        assert converted["cniVersion"] == version
        assert cniresult.convert(cniresult.parse(converted), "1.0.0")["ips"] == RESULT["ips"]
    assert cniresult.convert({"ips": []}, "1.0.0") == {"cniVersion": "1.0.0", "dns": {}}


# -- invoke -------------------------------------------------------------------------

def test_cnierror_str_and_from_dict():
    e = CNIError.from_dict({"code": 7, "msg": "bad", "details": "more"})
    assert (e.code, e.msg, e.details) == (7, "bad", "more")
    assert str(e) == "CNI error 7: bad (more)"
    assert invoke.CNIError is CNIError


def test_invoke_unknown_plugin_and_version_in_process():
    with pytest.raises(CNIError, match="failed to find plugin"):
        invoke.call("ADD", {**CONF, "type": "no-such-plugin"}, container_id="c", netns="x", cni_path=["/nonexistent"])
    out = invoke.call("VERSION", {**CONF, "type": "kproxy-bridge"}, container_id="c", netns="x")
    assert out["supportedVersions"] == list(skel.SUPPORTED_VERSIONS)


def test_invoke_raises_the_plugins_error_object():
    with pytest.raises(CNIError) as e:
        invoke.call("ADD", {"cniVersion": "1.0.0", "type": "kproxy-bridge"}, container_id="c", netns="x")
    assert (e.value.code, e.value.msg) == (7, "missing network name")


def test_plugin_dir_holds_both_executables():
    d = invoke.plugin_dir()
    for name in ("kproxy-bridge", "kproxy-host-local"):
        assert os.access(os.path.join(d, name), os.X_OK)


# -- bridge config, pure parts ----------------------------------------------------------

def test_host_veth_name_is_deterministic_and_short():
    a = host_veth_name("ctr-1", "eth0")
    assert a == host_veth_name("ctr-1", "eth0") != host_veth_name("ctr-1", "net1")
    assert a.startswith("veth") and len(a) == 12 and int(a[4:], 16) >= 0


def test_bridge_conf_defaults_and_errors():
    c = load_conf({"name": "n", "isDefaultGateway": True})
    assert (c.bridge, c.is_gateway, c.mtu, c.ipam_type) == ("cni0", True, 0, "")
    with pytest.raises(CNIError) as e:
        load_conf({"name": "n", "isGateway": "yes"})
    assert e.value.code == 7
    with pytest.raises(CNIError):
        load_conf({"name": "n", "bridge": "x" * 16})


# -- cni.fastnl: rtnetlink messages as bytes (no socket, no root) -------------------------

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="expected bytes are written little-endian")


def test_attribute_padding_is_not_counted_in_its_length():
    assert fastnl.attr_str(fastnl.IFLA_IFNAME, "eth0") == bytes.fromhex("0900 0300") + b"eth0\0" + b"\0\0\0"
    assert fastnl.attr(7, b"") == bytes.fromhex("0400 0700")
    assert fastnl.attr(7, b"abcd") == bytes.fromhex("0800 0700") + b"abcd"
    for n in range(9):
        a = fastnl.attr(1, b"x" * n)
        assert len(a) % 4 == 0 and int.from_bytes(a[:2], sys.byteorder) == 4 + n


@little_endian
def test_a_getlink_request_byte_for_byte():
    body = fastnl.link_request(name="eth0")
    msg = fastnl.nlmsg(fastnl.RTM_GETLINK, fastnl.NLM_F_REQUEST | fastnl.NLM_F_ACK, 7, body)
    assert msg.hex() == (
        "2c000000" "1200" "0500" "07000000" "00000000"              # nlmsghdr: len 44, RTM_GETLINK, REQUEST|ACK, seq 7
        "00" "00" "0000" "00000000" "00000000" "00000000"          # ifinfomsg: any family, by name
        "0900" "0300" "6574683000" "000000")                       # IFLA_IFNAME "eth0\0" + 3 bytes of padding


@little_endian
def test_nested_attributes_of_a_veth_pair():
    body = fastnl.veth_request("veth1234", "eth0", 9, mtu=1400, master=3, up=True)
    peer = (fastnl.ifinfomsg() + fastnl.attr_str(fastnl.IFLA_IFNAME, "eth0")
            + fastnl.attr_u32(fastnl.IFLA_MTU, 1400) + fastnl.attr_u32(fastnl.IFLA_NET_NS_FD, 9))
    assert len(peer) == 16 + 12 + 8 + 8
    linkinfo = (bytes.fromhex("0900 0100") + b"veth\0\0\0\0"                    # IFLA_INFO_KIND "veth"
                + (4 + 4 + len(peer)).to_bytes(2, "little") + bytes.fromhex("0200")  # IFLA_INFO_DATA
                + (4 + len(peer)).to_bytes(2, "little") + bytes.fromhex("0100")      # VETH_INFO_PEER
                + peer)
    assert body == (
        bytes.fromhex("00 00 0000 00000000 01000000 01000000")    # ifinfomsg: up (flags, change)
        + bytes.fromhex("0d00 0300") + b"veth1234\0\0\0\0"        # IFLA_IFNAME, 13 + 3 padding
        + bytes.fromhex("0800 0400 78050000")                     # IFLA_MTU 1400
        + bytes.fromhex("0800 0a00 03000000")                     # IFLA_MASTER 3
        + (4 + len(linkinfo)).to_bytes(2, "little") + bytes.fromhex("1200") + linkinfo)
    # and the parser reads back what was packed, level by level
    top = fastnl.parse_attrs(body, fastnl.IFINFOMSG.size)
    assert top[fastnl.IFLA_IFNAME] == b"veth1234\0"
    info = fastnl.parse_attrs(top[fastnl.IFLA_LINKINFO])
    assert info[fastnl.IFLA_INFO_KIND] == b"veth\0"
    data = fastnl.parse_attrs(info[fastnl.IFLA_INFO_DATA])
    peer_attrs = fastnl.parse_attrs(data[fastnl.VETH_INFO_PEER], fastnl.IFINFOMSG.size)
    assert peer_attrs == {fastnl.IFLA_IFNAME: b"eth0\0", fastnl.IFLA_MTU: (1400).to_bytes(4, "little"),
                          fastnl.IFLA_NET_NS_FD: (9).to_bytes(4, "little")}


@little_endian
def test_hairpin_is_a_flagged_nest_for_the_bridge_family():
    body = fastnl.hairpin_request(5, True)
    assert body == (bytes.fromhex("07 00 0000 05000000 00000000 00000000")   # AF_BRIDGE, index 5
                    + bytes.fromhex("0c00 0c80")                             # IFLA_PROTINFO | NLA_F_NESTED
                    + bytes.fromhex("0500 0400 01000000"))                   # IFLA_BRPORT_MODE 1, padded


@little_endian
def test_address_and_route_requests():
    v4 = fastnl.address_request(4, ipaddress.ip_interface("10.77.0.2/24"))
    assert v4 == (bytes.fromhex("02 18 00 00 04000000")                     # AF_INET /24 on index 4
                  + bytes.fromhex("0800 0200 0a4d0002")                     # IFA_LOCAL
                  + bytes.fromhex("0800 0100 0a4d0002")                     # IFA_ADDRESS
                  + bytes.fromhex("0800 0400 0a4d00ff"))                    # IFA_BROADCAST
    assert fastnl.IFA_BROADCAST not in fastnl.parse_attrs(
        fastnl.address_request(4, ipaddress.ip_interface("10.77.0.2/31")), fastnl.IFADDRMSG.size)
    v6 = fastnl.address_request(4, ipaddress.ip_interface("fd77::2/120"))
    assert v6[:8] == bytes.fromhex("0a 78 00 00 04000000") and len(v6) == 8 + 2 * 20
    default = fastnl.route_request(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.77.0.1"), 4)
    assert default == (bytes.fromhex("02 00 00 00 fe 03 00 01 00000000")    # main table, boot, universe, unicast
                       + bytes.fromhex("0800 0500 0a4d0001")                # RTA_GATEWAY (no RTA_DST for /0)
                       + bytes.fromhex("0800 0400 04000000"))               # RTA_OIF
    net = fastnl.route_request(ipaddress.ip_network("10.96.0.0/12"), None, 4)
    assert net == bytes.fromhex("02 0c 00 00 fe 03 00 01 00000000 0800 0100 0a600000 0800 0400 04000000")


def _link_reply(index: int, name: str, flags: int, kind: str, mac: str, **u32) -> bytes:
    attrs = fastnl.attr_str(fastnl.IFLA_IFNAME, name) + fastnl.attr_mac(fastnl.IFLA_ADDRESS, mac)
    attrs += fastnl.nest(fastnl.IFLA_LINKINFO, fastnl.attr_str(fastnl.IFLA_INFO_KIND, kind))
    for key, value in u32.items():
        attrs += fastnl.attr_u32(getattr(fastnl, key), value)
    return fastnl.ifinfomsg(index=index, flags=flags) + attrs


def test_parse_link():
    body = _link_reply(7, "veth0", fastnl.IFF_UP, "veth", "0a:1b:2c:3d:4e:5f", IFLA_MTU=1450, IFLA_MASTER=3,
                       IFLA_LINK=2)
    assert fastnl.parse_link(body) == fastnl.Link(index=7, name="veth0", kind="veth", mac="0a:1b:2c:3d:4e:5f",
                                                  mtu=1450, up=True, promisc=False, master=3, peer=2)


class FakeKernel:
    """Stands for the netlink socket: records what is sent, answers from a script."""

    def __init__(self, answers):
        self.sent: list[bytes] = []
        self.answers = list(answers)

    def sendto(self, data, addr):
        self.sent.append(data)
        return len(data)

    def recv(self, size):
        return self.answers.pop(0)

    def close(self):
        pass


def _fake_socket(answers) -> fastnl.NetlinkSocket:
    nl = fastnl.NetlinkSocket.__new__(fastnl.NetlinkSocket)
    nl.sock, nl.seq, nl.requests = FakeKernel(answers), 0, 0
    return nl


def _error(seq: int, err: int, msg: str = "") -> bytes:
    body = (-err).to_bytes(4, sys.byteorder, signed=True) + fastnl.NLMSGHDR.pack(16, 0, 0, seq, 0)
    flags = fastnl.NLM_F_CAPPED
    if msg:
        body += fastnl.attr_str(fastnl.NLMSGERR_ATTR_MSG, msg)
        flags |= fastnl.NLM_F_ACK_TLVS
    return fastnl.nlmsg(fastnl.NLMSG_ERROR, flags, seq, body)


def test_request_reads_answers_until_the_ack_and_skips_stale_ones():
    reply = _link_reply(1, "lo", fastnl.IFF_UP, "", "00:00:00:00:00:00", IFLA_MTU=65536)
    stale = fastnl.nlmsg(fastnl.RTM_NEWLINK, 0, 99, reply)  # left over from an interrupted request
    nl = _fake_socket([stale + fastnl.nlmsg(fastnl.RTM_NEWLINK, 0, 1, reply), _error(1, 0)])
    link = nl.get_link("lo")
    assert (link.index, link.name, link.mtu, link.up) == (1, "lo", 65536, True)
    assert nl.requests == 1 and len(nl.sock.sent) == 1
    length, mtype, flags, seq, _pid = fastnl.NLMSGHDR.unpack_from(nl.sock.sent[0])
    assert (length, mtype, flags, seq) == (len(nl.sock.sent[0]), fastnl.RTM_GETLINK, 5, 1)


def test_kernel_errors_become_oserror_with_the_extended_ack():
    nl = _fake_socket([_error(1, errno.EEXIST, "veth exists"), _error(2, errno.ENODEV), _error(3, errno.ENODEV)])
    with pytest.raises(OSError) as e:
        nl.add_veth("v", "eth0", 3)
    assert e.value.errno == errno.EEXIST and e.value.strerror == "File exists (veth exists)"
    assert nl.get_link("gone") is None   # ENODEV: no such link
    assert nl.del_link("gone") is False
