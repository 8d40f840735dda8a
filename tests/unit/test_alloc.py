"""ClusterIP, NodePort and LoadBalancer allocators."""

from __future__ import annotations

import json

import pytest

from kproxy.alloc import (AllocationError, Allocators, ClusterIPAllocator, LoadBalancerAllocator,
                          NodePortAllocator, parse_port_range)


def test_cluster_ips_skip_network_and_kubeadm_reservations():
    a = ClusterIPAllocator()          # 10.96.0.0/12
    ips = [a.allocate(f"default/s{i}") for i in range(10)]
    assert ips == ["10.96.0.2", "10.96.0.3", "10.96.0.4", "10.96.0.5", "10.96.0.6", "10.96.0.7",
                   "10.96.0.8", "10.96.0.9", "10.96.0.11", "10.96.0.12"]
    assert a.allocate("default/kubernetes") == "10.96.0.1"
    assert a.allocate("kube-system/kube-dns") == "10.96.0.10"
    assert a.allocate("default/s0") == "10.96.0.2"          # idempotent per owner


def test_requested_cluster_ips():
    a = ClusterIPAllocator("172.11.240.0/24")
    assert a.allocate("default/web", "172.11.240.5") == "172.11.240.5"
    assert a.allocate("default/web", "172.11.240.5") == "172.11.240.5"   # same owner again
    assert a.allocate("kube-system/dns", "172.11.240.10") == "172.11.240.10"  # reserved, but requested
    with pytest.raises(AllocationError) as exc:
        a.allocate("default/other", "172.11.240.5")
    assert exc.value.owner == "default/other" and exc.value.field == "spec.clusterIP"
    assert str(exc.value).startswith("Service default/other spec.clusterIP: ")
    assert "already allocated (to Service default/web)" in str(exc.value)
    with pytest.raises(AllocationError, match=r"not in the valid range. The range of valid IPs is 172.11.240.0/24"):
        a.allocate("default/far", "10.96.0.5")
    for edge in ("172.11.240.0", "172.11.240.255"):
        with pytest.raises(AllocationError, match="not in the valid range"):
            a.allocate("default/edge", edge)
    with pytest.raises(AllocationError, match="not an IP address"):
        a.allocate("default/bad", "nope")
    assert a.allocate("default/next") == "172.11.240.2"


def test_cluster_ip_range_exhaustion_and_release():
    a = ClusterIPAllocator("10.0.0.0/29", reserved={})
    got = [a.allocate(f"ns/s{i}") for i in range(6)]
    assert got == [f"10.0.0.{i}" for i in range(1, 7)]
    with pytest.raises(AllocationError, match="is full"):
        a.allocate("ns/s6")
    assert a.release("ns/s2") == ["10.0.0.3"]
    assert a.allocate("ns/s6") == "10.0.0.3"


def test_ipv6_service_cidr():
    a = ClusterIPAllocator("fd00:10:96::/112")
    assert a.allocate("default/a") == "fd00:10:96::2"


def test_node_ports():
    a = NodePortAllocator()
    assert [a.allocate("default/a"), a.allocate("default/b")] == [30000, 30001]
    assert a.allocate("default/c", 31234) == 31234
    assert a.allocate("default/c", 31234) == 31234
    with pytest.raises(AllocationError) as exc:
        a.allocate("default/d", 31234, field="spec.ports[1].nodePort")
    assert exc.value.field == "spec.ports[1].nodePort" and "already allocated" in str(exc.value)
    with pytest.raises(AllocationError) as exc:
        a.allocate("default/e", 3001, field="spec.ports[0].nodePort")
    assert str(exc.value) == ("Service default/e spec.ports[0].nodePort: Invalid value: 3001: provided port "
                              "is not in the valid range. The range of valid ports is 30000-32767")
    small = NodePortAllocator("30000-30001")
    small.allocate("x/a"), small.allocate("x/b")
    with pytest.raises(AllocationError, match="is full"):
        small.allocate("x/c")


def test_port_range_forms():
    assert parse_port_range("30000-32767") == (30000, 32767)
    assert parse_port_range("30000+2767") == (30000, 32767)
    with pytest.raises(AllocationError):
        parse_port_range("0-10")


def test_load_balancer_pool():
    a = LoadBalancerAllocator("192.168.5.200-192.168.5.201, 192.168.6.0/30")
    assert a.pool == ["192.168.5.200", "192.168.5.201", "192.168.6.1", "192.168.6.2"]
    assert a.allocate("default/a") == "192.168.5.200"
    assert a.allocate("default/b", "192.168.6.2") == "192.168.6.2"
    assert a.allocate("default/a") == "192.168.5.200"
    with pytest.raises(AllocationError) as exc:
        a.allocate("default/c", "10.0.0.1")
    assert exc.value.field == "spec.loadBalancerIP" and "not in the LoadBalancer pool" in str(exc.value)
    with pytest.raises(AllocationError, match="already assigned"):
        a.allocate("default/c", "192.168.6.2")
    a.allocate("default/c"), a.allocate("default/d")
    with pytest.raises(AllocationError, match="exhausted"):
        a.allocate("default/e")
    assert LoadBalancerAllocator(["10.1.1.1", "10.1.1.2"]).pool == ["10.1.1.1", "10.1.1.2"]


def test_state_round_trips_through_json():
    allocs = Allocators("10.96.0.0/12", "30000-32767", "192.168.5.200/30")
    allocs.cluster_ips.allocate("default/a")
    allocs.cluster_ips.allocate("default/b", "10.96.100.1")
    allocs.node_ports.allocate("default/a", 31000)
    allocs.load_balancers.allocate("default/a")
    text = allocs.to_json()
    data = json.loads(text)
    assert data["cluster_ips"]["allocated"] == {"10.96.0.2": "default/a", "10.96.100.1": "default/b"}
    assert data["node_ports"]["allocated"] == {"31000": "default/a"}
    again = Allocators.from_json(text)
    assert again.to_dict() == allocs.to_dict()
    assert again.cluster_ips.allocate("default/c") == "10.96.0.3"
    with pytest.raises(AllocationError):
        again.node_ports.allocate("default/z", 31000)
    again.release("default/a")
    assert "10.96.0.2" not in again.cluster_ips.allocated and again.node_ports.allocated == {}
    assert Allocators().to_dict()["load_balancers"] is None
