"""Cluster settings and names: checked before anything is created (no root needed)."""
import pytest

from kproxy import naming
from kproxy.config import ClusterConfig, nodes_from_count
from kproxy.errors import ConfigError


def test_defaults_follow_kubeadm_and_the_course_slide():
    c = ClusterConfig().validate()
    assert c.node_ip(0) == "192.168.5.11"          # the slide's node eth0
    assert c.node_pod_cidr(0) == "10.244.0.0/24"
    assert c.node_pod_cidr(1) == "10.244.1.0/24"
    assert c.external_ip() == "192.168.5.100"


@pytest.mark.parametrize("changes, message", [
    ({"nodes": []}, "at least one node"),
    ({"pod_cidr": "10.96.0.0/16"}, "pod cidr 10.96.0.0/16 overlaps service cidr"),
    ({"pod_cidr": "192.168.0.0/16"}, "overlaps node cidr"),
    ({"service_cidr": "192.168.5.0/28"}, "service cidr 192.168.5.0/28 overlaps node cidr"),
    ({"pod_cidr": "10.244.0.1/16"}, "not a valid network"),
    ({"network_mode": "bgp"}, "network mode 'bgp'"),
    ({"nodes": ["node1", "node1"]}, "given twice"),
    ({"nodes": ["Node_1"]}, "node name 'Node_1'"),
    ({"nodes": ["underlay"]}, "reserved"),
    ({"name": "x" * 21}, "cluster name"),
    ({"pod_cidr": "10.244.0.0/24", "nodes": ["a", "b"]}, "holds only 1"),
    ({"node_port_range": "30000"}, "LOW-HIGH"),
    ({"node_port_range": "0-70000"}, "outside 1-65535"),
    ({"lb_pool": "192.168.5.8/29"}, "contains node or client address 192.168.5.11"),
])
def test_bad_settings_name_the_value(changes, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig(**changes).validate()


def test_node_count():
    assert nodes_from_count(3) == ["node1", "node2", "node3"]
    with pytest.raises(ConfigError, match="node count 0"):
        nodes_from_count(0)


def test_interface_names_fit_and_do_not_collide():
    assert naming.check_ifname("port15") == "port15"
    with pytest.raises(ValueError, match="at most 15"):
        naming.check_ifname("a-very-long-interface")
    from cni.bridge import host_veth_name
    # the cluster's container IDs for two long pod names that differ only at the end,
    # then the host-side veth names the bridge plugin derives from them
    pods = ["web-" + "x" * 200 + "-a", "web-" + "x" * 200 + "-b"]
    ids = [naming.short_hash("kproxy", "default", p, length=32) for p in pods]
    names = {host_veth_name(cid, "eth0") for cid in ids}
    assert len(names) == 2 and all(len(n.encode()) <= 15 for n in names)


def test_pod_namespace_names():
    assert naming.pod_netns("kproxy", "default", "web") == "kproxy-default-web"
    with pytest.raises(ValueError, match="over the kernel's limit of 255"):
        naming.pod_netns("kproxy", "default", "x" * 250)
