"""kproxy.metrics: the registry, the text exposition format 0.0.4, its parser, kube-proxy's
metric set and the loopback-only /metrics server."""
from __future__ import annotations

import math
import socket
import urllib.error
import urllib.request

import pytest

from kproxy import metrics as m


def test_exposition_golden_text():
    reg = m.Registry()
    c = reg.counter("demo_requests_total", "Requests.\nSecond line with a \\ backslash.")
    c.inc()
    c.inc(2)
    g = reg.gauge("demo_temperature", "A gauge.", ["room", "floor"])
    g.set(21.5, room="kitchen", floor="1")
    g.set(-3, room='say "hi"\\\n', floor="0")
    h = reg.histogram("demo_latency_seconds", "A histogram.", ["node"], buckets=[0.1, 1, 10])
    for v in (0.05, 0.1, 0.5, 3, 20):
        h.observe(v, node="n1")
    reg.gauge("demo_never_set", "Unlabelled, so shown at 0.")
    reg.counter("demo_labelled_unused_total", "Labelled and never used.", ["x"])
    assert reg.expose() == (
        "# HELP demo_labelled_unused_total Labelled and never used.\n"
        "# TYPE demo_labelled_unused_total counter\n"
        "# HELP demo_latency_seconds A histogram.\n"
        "# TYPE demo_latency_seconds histogram\n"
        'demo_latency_seconds_bucket{node="n1",le="0.1"} 2\n'
        'demo_latency_seconds_bucket{node="n1",le="1"} 3\n'
        'demo_latency_seconds_bucket{node="n1",le="10"} 4\n'
        'demo_latency_seconds_bucket{node="n1",le="+Inf"} 5\n'
        'demo_latency_seconds_sum{node="n1"} 23.65\n'
        'demo_latency_seconds_count{node="n1"} 5\n'
        "# HELP demo_never_set Unlabelled, so shown at 0.\n"
        "# TYPE demo_never_set gauge\n"
        "demo_never_set 0\n"
        "# HELP demo_requests_total Requests.\\nSecond line with a \\\\ backslash.\n"
        "# TYPE demo_requests_total counter\n"
        "demo_requests_total 3\n"
        "# HELP demo_temperature A gauge.\n"
        "# TYPE demo_temperature gauge\n"
        'demo_temperature{floor="0",room="say \\"hi\\"\\\\\\n"} -3\n'
        'demo_temperature{floor="1",room="kitchen"} 21.5\n')


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    h = m.Histogram("h", "h", buckets=[1, 2, 4])
    for v in (0, 1, 1.5, 2, 2.0001, 4, 5, 100):
        h.observe(v)
    cumulative, total, count = h.labels().get()
    assert cumulative == [2, 4, 6]           # a value equal to a bound is in that bucket
    assert count == 8 and total == pytest.approx(115.5001)
    parsed = m.parse_text(m.Registry().expose() + "\n".join(h.expose_lines()) + "\n")
    assert parsed["h"]["type"] == "histogram"
    buckets = {s[1]["le"]: s[2] for s in parsed["h"]["samples"] if s[0] == "h_bucket"}
    assert buckets == {"1": 2, "2": 4, "4": 6, "+Inf": 8}
    assert m.get_sample(parsed, "h_count") == 8


def test_histogram_buckets_must_increase_and_inf_is_implicit():
    assert m.Histogram("a", "a", buckets=[1, 2, math.inf]).buckets == (1.0, 2.0)
    with pytest.raises(ValueError):
        m.Histogram("b", "b", buckets=[2, 1])
    with pytest.raises(ValueError):
        m.Histogram("c", "c", ["le"])


def test_label_escaping_round_trips_through_the_parser():
    reg = m.Registry()
    g = reg.gauge("g", "g", ["v"])
    nasty = ['back\\slash', 'quo"te', "new\nline", "comma,brace}{=", "", "ünï"]
    for i, value in enumerate(nasty):
        g.set(i, v=value)
    text = reg.expose()
    assert 'g{v="back\\\\slash"}' in text and 'g{v="quo\\"te"}' in text and 'g{v="new\\nline"}' in text
    parsed = m.parse_text(text)
    got = {s[1]["v"]: s[2] for s in parsed["g"]["samples"]}
    assert got == {value: i for i, value in enumerate(nasty)}


@pytest.mark.parametrize("value,text", [
    (0, "0"), (3, "3"), (2.5, "2.5"), (-2.5, "-2.5"), (0.001, "0.001"), (16.384, "16.384"),
    (123456, "123456"), (1e6, "1e+06"), (1234567, "1.234567e+06"), (1.7e9, "1.7e+09"),
    (0.0001, "0.0001"), (0.00001, "1e-05"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"),
])
def test_numbers_are_printed_as_go_prints_them(value, text):
    assert m.format_value(value) == text


def test_registry_refuses_bad_use():
    reg = m.Registry()
    c = reg.counter("x_total", "x", ["a"])
    with pytest.raises(ValueError):
        reg.counter("x_total", "again")
    with pytest.raises(ValueError):
        c.inc(-1, a="1")
    with pytest.raises(ValueError):
        c.inc(b="1")
    with pytest.raises(ValueError):
        reg.gauge("bad-name", "x")
    reg.histogram("lat", "x")
    with pytest.raises(ValueError):
        reg.gauge("lat_count", "collides with the histogram's _count series")


def test_gauge_remove_clear_and_bound_views():
    reg = m.Registry()
    g = reg.gauge("pods", "p", ["node", "phase"])
    n1 = g.bind(node="n1")
    n1.set(3, phase="Running")
    n1.inc(phase="Pending")
    n1.dec(phase="Pending")
    assert g.value(node="n1", phase="Running") == 3
    n1.remove(phase="Pending")
    assert 'phase="Pending"' not in reg.expose()
    g.clear()
    assert "pods{" not in reg.expose()
    with pytest.raises(ValueError):
        g.bind(zone="a")


def test_collect_hooks_refresh_before_exposition():
    reg = m.Registry()
    g = reg.gauge("live", "l")
    calls = []
    reg.on_collect(lambda: (calls.append(1), g.set(len(calls))))
    assert "live 1\n" in reg.expose() and "live 2\n" in reg.expose()


def test_parse_text_reads_types_help_timestamps_and_untyped_samples():
    text = ("# HELP a_total Help with \\\\ and \\n.\n# TYPE a_total counter\na_total 4 1700000000000\n"
            "# a free comment\n\nloose{x=\"1\"} +Inf\n")
    parsed = m.parse_text(text)
    assert parsed["a_total"] == {"type": "counter", "help": "Help with \\ and \n.",
                                 "samples": [("a_total", {}, 4.0)]}
    assert parsed["loose"]["type"] == "untyped" and m.get_sample(parsed, "loose", {"x": "1"}) == math.inf
    assert m.get_sample(parsed, "missing") is None
    for bad in ("a{x=1} 2\n", "a 1 2 3\n", "a{x=\"1\"\n", "a notanumber\n", "# TYPE a sometype\n"):
        with pytest.raises(ValueError, match="line 1"):
            m.parse_text(bad)


def test_kube_proxy_buckets_match_upstream():
    assert m.SYNC_BUCKETS == tuple(0.001 * 2 ** i for i in range(15))
    assert m.SYNC_BUCKETS[0] == 0.001 and m.SYNC_BUCKETS[-1] == 16.384
    want = ([0.0, 0.25, 0.5] + list(range(1, 60)) + list(range(60, 116, 5))
            + list(range(120, 301, 30)))
    assert list(m.NETWORK_PROGRAMMING_BUCKETS) == want
    assert len(m.NETWORK_PROGRAMMING_BUCKETS) == 81


def test_kube_proxy_metric_set():
    reg = m.Registry()
    km = m.kube_proxy_metrics(reg, nodes=["node1", "node2"])
    names = reg.names()
    for name in ("kubeproxy_sync_proxy_rules_duration_seconds",
                 "kubeproxy_sync_full_proxy_rules_duration_seconds",
                 "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                 "kubeproxy_network_programming_duration_seconds",
                 "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                 "kubeproxy_sync_proxy_rules_service_changes_pending",
                 "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                 "kubeproxy_sync_proxy_rules_service_changes_total",
                 "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                 "kubeproxy_sync_proxy_rules_iptables_total",
                 "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                 "kproxy_pods", "kproxy_pods_ready", "kproxy_container_restarts_total",
                 "prober_probe_total", "kproxy_reconcile_passes_total", "kproxy_drift_repairs_total"):
        assert name in names
    n1 = km.for_node("node1")
    n1.sync_proxy_rules_duration_seconds.observe(0.003)
    n1.sync_proxy_rules_last_timestamp_seconds.set(1700000000.5)
    n1.sync_proxy_rules_iptables_total.set(42, table="nat")
    n1.sync_proxy_rules_service_changes_total.inc(3)
    km.prober_probe_total.inc(probe_type="Readiness", result="successful")
    km.pods.set(2, phase="Running")
    km.drift_repairs_total.inc(what="route")
    text = reg.expose()
    assert ("# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n"
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n") in text
    p = m.parse_text(text)
    dur = "kubeproxy_sync_proxy_rules_duration_seconds"
    assert m.get_sample(p, dur + "_bucket", {"node": "node1", "le": "0.002"}) == 0
    assert m.get_sample(p, dur + "_bucket", {"node": "node1", "le": "0.004"}) == 1
    assert m.get_sample(p, dur + "_count", {"node": "node2"}) == 0        # pre-created
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds{node=\"node1\"} 1.7000000005e+09" in text
    assert m.get_sample(p, "kubeproxy_sync_proxy_rules_iptables_total", {"node": "node1", "table": "nat"}) == 42
    assert m.get_sample(p, "kubeproxy_sync_proxy_rules_service_changes_total", {"node": "node1"}) == 3
    assert m.get_sample(p, "prober_probe_total", {"probe_type": "Readiness", "result": "successful"}) == 1
    assert m.get_sample(p, "kproxy_pods", {"phase": "Running"}) == 2
    assert m.get_sample(p, "kproxy_drift_repairs_total", {"what": "route"}) == 1
    npd = p["kubeproxy_network_programming_duration_seconds"]["samples"]
    assert npd[0] == ("kubeproxy_network_programming_duration_seconds_bucket", {"node": "node1", "le": "0"}, 0)


def test_a_mode_registers_what_upstream_registers_for_it():
    reg = m.Registry()
    km = m.kube_proxy_metrics(reg, mode="nftables")
    assert "kubeproxy_sync_proxy_rules_iptables_total" not in reg.names()
    assert "kubeproxy_sync_full_proxy_rules_duration_seconds" not in reg.names()
    assert "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total" in reg.names()
    km.for_node("n").sync_proxy_rules_iptables_total.set(1, table="nat")     # a no-op
    km.sync_full_proxy_rules_duration_seconds.observe(1, node="n")
    reg2 = m.Registry()
    m.kube_proxy_metrics(reg2, mode="iptables")
    assert "kubeproxy_sync_proxy_rules_nftables_sync_failures_total" not in reg2.names()


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read().decode()


def test_live_server_on_an_ephemeral_loopback_port():
    reg = m.Registry()
    km = m.kube_proxy_metrics(reg, nodes=["node1"])
    km.reconcile_passes_total.inc()
    server = m.serve(reg, "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        status, ctype, body = _get(server.url + "/metrics")
        assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert m.get_sample(m.parse_text(body), "kproxy_reconcile_passes_total") == 1
        km.reconcile_passes_total.inc()
        assert "kproxy_reconcile_passes_total 2\n" in _get(server.url + "/metrics?x=1")[2]
        assert _get(server.url + "/healthz")[::2] == (200, "ok")
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "/nope")
        assert err.value.code == 404
    finally:
        server.stop()
    with pytest.raises(OSError):
        _get(server.url + "/healthz")


def test_the_server_refuses_non_loopback_addresses():
    reg = m.Registry()
    for host in ("0.0.0.0", "", "192.168.5.11", "10.0.0.1", "::", "example.com", "127.0.0.1.nip.io"):
        with pytest.raises(ValueError, match="loopback"):
            m.serve(reg, host, 0)
    with m.serve(reg, "localhost", 0) as s:
        assert s.host == "127.0.0.1" and _get(s.url + "/healthz")[2] == "ok"


def test_the_server_serves_ipv6_loopback_when_the_machine_has_it():
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with m.serve(m.Registry(), "::1", 0) as s:
        assert s.url.startswith("http://[::1]:") and _get(s.url + "/healthz")[2] == "ok"
