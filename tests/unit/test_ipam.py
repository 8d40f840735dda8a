"""host-local IPAM: the pure allocator, the stores, and the plugin through the CNI protocol."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading

import pytest

from cni import invoke, skel
from cni.ipam import host_local
from cni.ipam.allocator import AllocationError, ConfigError, IPAllocator, Range, RangeSet, candidates
from cni.ipam.store import DiskStore, MemoryStore

ip = ipaddress.ip_address


def rangeset(*ranges: dict) -> RangeSet:
    return RangeSet.parse(list(ranges))


def take_all(alloc: IPAllocator, prefix: str = "c") -> list[str]:
    out = []
    for i in range(1000):
        try:
            addr, _gw = alloc.get(f"{prefix}{i}", "eth0")
        except AllocationError:
            break
        out.append(str(addr))
    return out


# -- ranges -------------------------------------------------------------------

def test_range_defaults_like_reference():
    r = Range.parse({"subnet": "10.1.0.0/29"})
    assert (str(r.range_start), str(r.range_end), str(r.gateway)) == ("10.1.0.1", "10.1.0.6", "10.1.0.1")
    assert str(r) == "10.1.0.1-10.1.0.6"
    v6 = Range.parse({"subnet": "fd00::/120"})
    assert (str(v6.range_start), str(v6.range_end), str(v6.gateway)) == ("fd00::1", "fd00::ff", "fd00::1")


@pytest.mark.parametrize("raw,message", [
    ({"subnet": "10.1.0.5/24"}, "Network has host bits set. For a subnet mask of length 24 the network address is 10.1.0.0"),
    ({"subnet": "10.1.0.0/31"}, "Network 10.1.0.0/31 too small to allocate from"),
    ({"subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}, "RangeStart 10.2.0.1 not in network 10.1.0.0/24"),
    ({"subnet": "10.1.0.0/24", "rangeEnd": "10.2.0.1"}, "RangeEnd 10.2.0.1 not in network 10.1.0.0/24"),
    ({"subnet": "nonsense"}, "invalid CIDR address: nonsense"),
    ({"subnet": "10.1.0.0/24", "gateway": "x"}, "invalid IP address: x"),
])
def test_invalid_range(raw, message):
    with pytest.raises(ConfigError) as e:
        Range.parse(raw)
    assert str(e.value) == message


def test_rangeset_rejects_overlap_and_mixed_families():
    with pytest.raises(ConfigError, match="overlap"):
        rangeset({"subnet": "10.1.0.0/24"}, {"subnet": "10.1.0.0/25"})
    with pytest.raises(ConfigError, match="mixed address families"):
        rangeset({"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/120"})


# -- allocation order ---------------------------------------------------------

def test_allocation_order_skips_gateway_and_exhausts():
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/29"}), MemoryStore(), 0)
    assert take_all(alloc) == [f"10.1.0.{i}/29" for i in range(2, 7)]
    with pytest.raises(AllocationError) as e:
        alloc.get("one-more", "eth0")
    assert str(e.value) == "no IP addresses available in range set: 10.1.0.1-10.1.0.6"


def test_gateway_in_the_middle_network_and_broadcast_never_handed_out():
    rs = rangeset({"subnet": "10.1.0.0/29", "rangeStart": "10.1.0.0", "rangeEnd": "10.1.0.7", "gateway": "10.1.0.4"})
    got = take_all(IPAllocator(rs, MemoryStore(), 0))
    assert got == ["10.1.0.1/29", "10.1.0.2/29", "10.1.0.3/29", "10.1.0.5/29", "10.1.0.6/29"]


def test_gateway_and_prefix_returned():
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/24", "gateway": "10.1.0.254"}), MemoryStore(), 0)
    addr, gw = alloc.get("a", "eth0")
    assert (str(addr), str(gw)) == ("10.1.0.1/24", "10.1.0.254")


def test_round_robin_after_release():
    store = MemoryStore()
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), store, 0)
    for cid in ("a", "b", "c"):
        alloc.get(cid, "eth0")  # .2 .3 .4
    alloc.release("b", "eth0")
    assert str(alloc.get("d", "eth0")[0]) == "10.1.0.5/24"  # not .3: round-robin goes on


def test_release_and_reuse_when_the_range_wraps():
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/29"}), MemoryStore(), 0)
    take_all(alloc)
    alloc.release("c1", "eth0")  # frees 10.1.0.3
    assert str(alloc.get("new", "eth0")[0]) == "10.1.0.3/29"
    alloc.release("nobody", "eth0")  # idempotent, nothing to release


def test_release_is_by_container_and_ifname():
    store = MemoryStore()
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), store, 0)
    alloc.get("a", "eth0")
    alloc.get("a", "net1")
    alloc.release("a", "eth0")
    assert [str(i) for i in store.get_by_id("a", "net1")] == ["10.1.0.3"]
    assert store.get_by_id("a", "eth0") == []


def test_duplicate_allocation_is_refused():
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), MemoryStore(), 0)
    alloc.get("a", "eth0")
    with pytest.raises(AllocationError, match="10.1.0.2 has been allocated to a, duplicate allocation is not allowed"):
        alloc.get("a", "eth0")


def test_multiple_ranges_in_one_set():
    rs = rangeset({"subnet": "10.1.0.0/30"}, {"subnet": "10.1.1.0/30"})
    alloc = IPAllocator(rs, MemoryStore(), 0)
    assert take_all(alloc) == ["10.1.0.2/30", "10.1.1.2/30"]
    with pytest.raises(AllocationError, match=r"range set: 10.1.0.1-10.1.0.2,10.1.1.1-10.1.1.2$"):
        alloc.get("x", "eth0")


def test_candidates_start_after_last_and_wrap_across_ranges():
    rs = rangeset({"subnet": "10.1.0.0/29"}, {"subnet": "10.1.1.0/29"})
    order = [str(a) for a, _ in candidates(rs, ip("10.1.0.5"))]
    assert order[:3] == ["10.1.0.6", "10.1.1.2", "10.1.1.3"]
    assert order[-1] == "10.1.0.5"
    assert len(order) == len(set(order)) == 10
    assert [str(a) for a, _ in candidates(rs, ip("192.168.0.1"))][0] == "10.1.0.2"  # not ours: start over


def test_requested_ip():
    alloc = IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), MemoryStore(), 0)
    assert str(alloc.get("a", "eth0", ip("10.1.0.77"))[0]) == "10.1.0.77/24"
    with pytest.raises(AllocationError, match="is not available"):
        alloc.get("b", "eth0", ip("10.1.0.77"))
    with pytest.raises(AllocationError, match="subnet's gateway"):
        alloc.get("b", "eth0", ip("10.1.0.1"))


def test_ipv6_range():
    alloc = IPAllocator(rangeset({"subnet": "fd00::/126"}), MemoryStore(), 0)
    assert take_all(alloc) == ["fd00::2/126", "fd00::3/126"]


# -- the disk store -------------------------------------------------------------

def test_disk_store_layout_is_the_reference_one(tmp_path):
    with DiskStore("net1", str(tmp_path)) as store:
        IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), store, 0).get("ctr-a", "eth0")
    d = tmp_path / "net1"
    assert sorted(os.listdir(d)) == ["10.1.0.2", "last_reserved_ip.0", "lock"]
    assert (d / "10.1.0.2").read_bytes() == b"ctr-a\r\neth0"
    assert (d / "last_reserved_ip.0").read_bytes() == b"10.1.0.2"


def test_restart_from_disk_sees_allocations_and_last_reserved(tmp_path):
    rs = rangeset({"subnet": "10.1.0.0/24"})
    with DiskStore("net1", str(tmp_path)) as store:
        alloc = IPAllocator(rs, store, 0)
        for cid in ("a", "b", "c"):
            alloc.get(cid, "eth0")
        alloc.release("a", "eth0")
    with DiskStore("net1", str(tmp_path)) as store:  # a new process, say
        assert str(store.last_reserved_ip(0)) == "10.1.0.4"
        assert [str(i) for i in store.get_by_id("b", "eth0")] == ["10.1.0.3"]
        assert str(IPAllocator(rs, store, 0).get("d", "eth0")[0]) == "10.1.0.5/24"


def test_disk_store_reads_reference_and_legacy_records(tmp_path):
    d = tmp_path / "net1"
    d.mkdir()
    (d / "10.1.0.9").write_bytes(b"legacy-id")  # written by host-local before ifnames were stored
    (d / "10.1.0.10").write_bytes(b"new-id\r\nnet1")
    (d / "last_reserved_ip.0").write_bytes(b"10.1.0.10")
    with DiskStore("net1", str(tmp_path)) as store:
        assert [str(i) for i in store.get_by_id("legacy-id", "eth0")] == ["10.1.0.9"]
        assert str(store.last_reserved_ip(0)) == "10.1.0.10"
        assert str(IPAllocator(rangeset({"subnet": "10.1.0.0/24"}), store, 0).get("x", "eth0")[0]) == "10.1.0.11/24"
        store.release_by_id("legacy-id", "eth0")
        store.release_by_id("new-id", "net1")
    assert sorted(os.listdir(d)) == ["10.1.0.11", "last_reserved_ip.0", "lock"]


def test_disk_store_sees_what_other_processes_changed_between_two_allocations(tmp_path):
    """The store remembers the files it read; a change by someone else must still show,
    including a record rewritten under the same name (ext4 gives it the same inode)."""
    rs = rangeset({"subnet": "10.1.0.0/24"})
    d = tmp_path / "net1"
    with DiskStore("net1", str(tmp_path)) as store:
        alloc = IPAllocator(rs, store, 0)
        for cid in ("a", "b"):
            alloc.get(cid, "eth0")
    # another process: releases b's address and gives it to c, adds d's
    os.unlink(d / "10.1.0.3")
    (d / "10.1.0.3").write_bytes(b"c\r\neth0")
    (d / "10.1.0.9").write_bytes(b"d\r\neth0")
    with DiskStore("net1", str(tmp_path)) as store:
        assert store.get_by_id("b", "eth0") == []
        assert [str(i) for i in store.get_by_id("c", "eth0")] == ["10.1.0.3"]
        assert [str(i) for i in store.get_by_id("d", "eth0")] == ["10.1.0.9"]
        with pytest.raises(AllocationError, match="duplicate allocation"):
            IPAllocator(rs, store, 0).get("c", "eth0")
        (d / "10.1.0.9").unlink()
        assert store.get_by_id("d", "eth0") == []


def test_disk_store_reads_each_file_once_while_it_is_the_only_writer(tmp_path, monkeypatch):
    from cni.ipam import store as store_mod
    reads: list[str] = []
    real = store_mod._read_owner
    monkeypatch.setattr(store_mod, "_read_owner", lambda path: reads.append(path) or real(path))
    (tmp_path / "net1").mkdir()
    (tmp_path / "net1" / "10.1.0.200").write_bytes(b"old\r\neth0")  # there before this process
    rs = rangeset({"subnet": "10.1.0.0/24"})
    for k in range(20):
        with DiskStore("net1", str(tmp_path)) as store:
            IPAllocator(rs, store, 0).get(f"c{k}", "eth0")
            if k % 2:
                IPAllocator(rs, store, 0).release(f"c{k - 1}", "eth0")
    assert [os.path.basename(p) for p in reads] == ["10.1.0.200"]
    with DiskStore("net1", str(tmp_path)) as store:
        assert len(store.allocations()) == 11 and not store.get_by_id("c0", "eth0")
        assert [str(i) for i in store.get_by_id("old", "eth0")] == ["10.1.0.200"]


def test_threads_sharing_a_data_dir_never_share_an_address(tmp_path):
    rs = rangeset({"subnet": "10.1.0.0/26"})
    got: list[str] = []
    errors: list[Exception] = []

    def worker(n: int) -> None:
        for k in range(5):
            try:
                with DiskStore("net1", str(tmp_path)) as store:
                    got.append(str(IPAllocator(rs, store, 0).get(f"t{n}-{k}", "eth0")[0]))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == len(set(got)) == 40


# -- the plugin through the protocol ---------------------------------------------

def netconf(data_dir, ipam=None, version="1.0.0", name="kpnet") -> dict:
    ipam = ipam if ipam is not None else {"ranges": [[{"subnet": "10.1.0.0/29"}]]}
    return {"cniVersion": version, "name": name, "type": "kproxy-bridge",
            "ipam": {"type": "kproxy-host-local", "dataDir": str(data_dir), **ipam}}


def hl(command: str, conf: dict, cid: str = "ctr", ifname: str = "eth0", args: str = ""):
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/run/netns/unused",
           "CNI_IFNAME": ifname, "CNI_PATH": "/nonexistent", "CNI_ARGS": args}
    code, out, _ = skel.run(host_local.PLUGIN, env, json.dumps(conf).encode())
    return code, (json.loads(out) if out.strip() else None)


def test_add_result_shapes(tmp_path):
    code, res = hl("ADD", netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/29"}]], "routes": [{"dst": "0.0.0.0/0"}]}))
    assert code == 0
    assert res == {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/29", "gateway": "10.1.0.1"}],
                   "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    code, res = hl("ADD", netconf(tmp_path, version="0.3.1"), cid="other")
    assert res == {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.1.0.3/29", "gateway": "10.1.0.1"}],
                   "dns": {}}


def test_exhaustion_error_matches_reference(tmp_path):
    conf = netconf(tmp_path)
    for i in range(5):
        assert hl("ADD", conf, cid=f"c{i}")[0] == 0
    code, err = hl("ADD", conf, cid="c5")
    assert code == 1
    assert err == {"cniVersion": "1.0.0", "code": 999, "details": "",
                   "msg": "failed to allocate for range 0: no IP addresses available in range set: 10.1.0.1-10.1.0.6"}
    assert len([f for f in os.listdir(tmp_path / "kpnet") if f[0].isdigit()]) == 5


def test_dual_stack_and_old_style_config(tmp_path):
    conf = netconf(tmp_path, {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.50", "rangeEnd": "10.1.0.52",
                              "ranges": [[{"subnet": "fd00::/120"}]]})
    code, res = hl("ADD", conf)
    assert code == 0
    assert [i["address"] for i in res["ips"]] == ["10.1.0.50/24", "fd00::2/120"]
    assert sorted(os.listdir(tmp_path / "kpnet")) == ["10.1.0.50", "fd00::2", "last_reserved_ip.0",
                                                     "last_reserved_ip.1", "lock"]


def test_del_releases_and_is_idempotent(tmp_path):
    conf = netconf(tmp_path)
    hl("ADD", conf, cid="a")
    assert hl("CHECK", conf, cid="a")[0] == 0
    for _ in range(2):
        assert hl("DEL", conf, cid="a") == (0, None)
    assert hl("DEL", conf, cid="never-added") == (0, None)
    code, err = hl("CHECK", conf, cid="a")
    assert (code, err["msg"]) == (1, "host-local: Failed to find address added by container a")


def test_check_compares_prev_result_with_the_allocation(tmp_path):
    conf = netconf(tmp_path)
    _, res = hl("ADD", conf, cid="a")
    assert hl("CHECK", {**conf, "prevResult": res}, cid="a")[0] == 0
    res["ips"][0]["address"] = "10.1.0.5/29"
    code, err = hl("CHECK", {**conf, "prevResult": res}, cid="a")
    assert code == 1 and "10.1.0.5 in prevResult is not allocated" in err["msg"]


def test_requested_ip_through_cni_args(tmp_path):
    code, res = hl("ADD", netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}]]}), args="IgnoreUnknown=1;IP=10.1.0.42")
    assert code == 0 and res["ips"][0]["address"] == "10.1.0.42/24"
    code, err = hl("ADD", netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}]]}), cid="b", args="IP=10.9.9.9")
    assert code == 1 and err["msg"] == "failed to allocate all requested IPs: 10.9.9.9"


@pytest.mark.parametrize("ipam,msg", [
    (None, "IPAM config missing 'ipam' key"),
    ({}, "no IP ranges specified"),
    ({"ranges": [[{"subnet": "10.1.0.5/24"}]]},
     "invalid range set 0: Network has host bits set. For a subnet mask of length 24 the network address is 10.1.0.0"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]}, "range set 0 overlaps with 1"),
    ({"ranges": [[{"subnet": "10.1.0.0/24"}]], "routes": [{"dst": "bogus"}]}, "invalid CIDR address: bogus"),
])
def test_invalid_config_is_code_7(tmp_path, ipam, msg):
    conf = netconf(tmp_path)
    if ipam is None:
        del conf["ipam"]
    else:
        conf["ipam"] = {"type": "kproxy-host-local", "dataDir": str(tmp_path), **ipam}
    code, err = hl("ADD", conf)
    assert (code, err["code"], err["msg"]) == (1, skel.ERR_INVALID_CONFIG, msg)


def test_gc_releases_what_is_not_valid(tmp_path):
    conf = netconf(tmp_path, version="1.1.0")
    for cid in ("a", "b", "c"):
        hl("ADD", conf, cid=cid)
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/nonexistent"}
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "b", "ifname": "eth0"}]}
    assert skel.run(host_local.PLUGIN, env, json.dumps(gc_conf).encode())[0] == 0
    assert sorted(f for f in os.listdir(tmp_path / "kpnet") if f[0].isdigit()) == ["10.1.0.3"]


def test_resolv_conf_fills_dns(tmp_path):
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n")
    _, res = hl("ADD", netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/29"}]], "resolvConf": str(rc)}))
    assert res["dns"] == {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local", "svc.cluster.local"],
                          "options": ["ndots:5"]}


def test_invoke_call_in_process_and_executable_agree(tmp_path):
    """No root needed: host-local never enters a namespace."""
    conf = netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}]]})
    conf["type"] = "kproxy-host-local"
    a = invoke.call("ADD", conf, container_id="inproc", netns="/run/netns/unused")
    b = invoke.call("ADD", conf, container_id="exec", netns="/run/netns/unused", in_process=False)
    assert (a["ips"][0]["address"], b["ips"][0]["address"]) == ("10.1.0.2/24", "10.1.0.3/24")
    assert a.keys() == b.keys()
    with pytest.raises(invoke.CNIError) as e:
        invoke.call("ADD", conf, container_id="exec", netns="/run/netns/unused", in_process=False)
    assert e.value.code == 999 and "duplicate allocation" in e.value.msg
    assert invoke.call("DEL", conf, container_id="exec", netns="", in_process=False) is None


# -- several processes on one data directory --------------------------------------

def test_concurrent_processes_never_get_the_same_ip(tmp_path):
    """12 plugin processes race for 8 addresses: 8 win distinct ones, 4 get the exhaustion error."""
    exe = os.path.join(invoke.plugin_dir(), "kproxy-host-local")
    conf = json.dumps(netconf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/28", "rangeEnd": "10.1.0.9"}]]})).encode()
    procs = []
    for i in range(12):
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"p{i}", "CNI_NETNS": "/run/netns/unused",
               "CNI_IFNAME": "eth0", "CNI_PATH": invoke.plugin_dir(), "PATH": os.environ.get("PATH", "")}
        p = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        procs.append(p)
    for p in procs:  # all started before any is fed, so they really overlap
        p.stdin.write(conf)
        p.stdin.close()
    outcomes = [(p.wait(timeout=60), json.loads(p.stdout.read())) for p in procs]
    won = [r["ips"][0]["address"] for code, r in outcomes if code == 0]
    lost = [r for code, r in outcomes if code != 0]
    assert len(won) == len(set(won)) == 8
    assert sorted(won) == sorted(f"10.1.0.{i}/28" for i in range(2, 10))
    assert all("no IP addresses available" in r["msg"] for r in lost) and len(lost) == 4
    files = [f for f in os.listdir(tmp_path / "kpnet") if f[0].isdigit()]
    assert len(files) == 8
