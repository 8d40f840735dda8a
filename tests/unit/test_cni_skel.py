"""The CNI contract (cni.skel), result conversion and invoke's error handling; no root."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from cni import invoke, skel
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
