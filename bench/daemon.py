"""`kproxy daemon` figures: network programming latency, a rolling update under load,
and the idle daemon's CPU and memory.

    python bench/daemon.py [--which latency|rollout|idle|all] [--quick] [--backend iptables nftables]

Each part runs on its own 2-node cluster (a unique name, KPROXY_STATE_DIR in a temp
dir) with a `kproxy daemon` subprocess at its default flags (min-sync-period 1 s,
interval 0.2 s, sync-period 30 s; metrics on a free loopback port), ended by its PID.

1. latency: with 1,000 ClusterIP Services, each selecting one of 5 Deployments of 2
   pods (--deployments, --deployment-replicas; with 1 Deployment behind all of them each
   of its pod IPs carries 1,000 PTR names in the DNS zone), apply
   100 new Services one at a time (Store.apply, as `kproxy apply` does) and time
   commit -> first successful TCP connection to the new ClusterIP from a client pod
   (a new connect every 5 ms, each given 250 ms).  p50/p99/max, and the daemon's own
   kubeproxy_network_programming_duration_seconds and sync_proxy_rules_duration_seconds
   over those 100 (the /metrics histograms, before/after difference).  Target: p99 < 1 s.
   Each commit lands at least --gap seconds after the previous Service answered (default:
   the min-sync-period + 0.25 s, so that the previous sync's rate limit does not hold the
   change back; --gap 0 shows back-to-back applies).
2. rollout: a 10-replica Deployment (RollingUpdate 25%/25%) behind a Service; a client
   pod sends HTTP requests without pause while the template changes; the rollout time
   (apply -> done: the cluster's state checked as `kproxy rollout status` does, every
   50 ms, beside the moment the command itself said so) and the failed requests (target: 0).
3. idle: 200 pods (50 Deployments x 4) and 1,000 Services (each selecting one of the
   Deployments), settled; the daemon's CPU (utime+stime of /proc/PID/stat, % of one
   core) and VmRSS over 30 s.

--quick: latency 200 + 20 Services, rollout 4 replicas, idle 40 pods / 200 Services / 10 s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---- programs run inside the client pod ---------------------------------------------------

# Reads "IP PORT TIMEOUT" lines; for each, opens a new non-blocking connection every EVERY
# seconds (a new source port each time: an attempt made before the rules existed keeps its
# un-NATed conntrack entry, so retrying the same socket would never see them), each given
# TRY seconds; prints "ok MONOTONIC ATTEMPTS" at the first established one, or "timeout".
PROBER = textwrap.dedent("""
    import errno, selectors, socket, sys, time
    EVERY, TRY = float(sys.argv[1]), float(sys.argv[2])

    def first_connect(ip, port, limit):
        sel = selectors.DefaultSelector()
        pending = {}
        attempts = 0
        end = time.monotonic() + limit
        next_at = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    return None, attempts
                if now >= next_at:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    attempts += 1
                    err = s.connect_ex((ip, port))
                    if err == 0:
                        s.close()
                        return time.monotonic(), attempts
                    if err == errno.EINPROGRESS:
                        sel.register(s, selectors.EVENT_WRITE)
                        pending[s] = now + TRY
                    else:
                        s.close()
                    next_at = now + EVERY
                wait = max(0.0, min(next_at, end) - time.monotonic())
                for key, _ in sel.select(timeout=wait):
                    s = key.fileobj
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == 0:
                        return time.monotonic(), attempts
                    sel.unregister(s)
                    pending.pop(s, None)
                    s.close()
                now = time.monotonic()
                for s, t in list(pending.items()):
                    if now >= t:
                        sel.unregister(s)
                        del pending[s]
                        s.close()
        finally:
            for s in pending:
                s.close()
            sel.close()

    for line in sys.stdin:
        ip, port, limit = line.split()
        when, attempts = first_connect(ip, int(port), float(limit))
        print(f"ok {when!r} {attempts}" if when is not None else f"timeout {attempts}", flush=True)
""")

# HTTP requests without pause until stdin closes; then one JSON line.  A failure is kept
# with when it began, the stage it failed in (connect or response), how long it took and
# the client's source port, so that it can be matched with conntrack and the daemon's log.
LOAD = textwrap.dedent("""
    import json, socket, sys, threading, time
    from kproxy.workload.client import parse_facts
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    ip, port = sys.argv[1], int(sys.argv[2])
    request = f"GET / HTTP/1.1\\r\\nHost: {ip}:{port}\\r\\nConnection: close\\r\\n\\r\\n".encode()
    ok, failed, pods = 0, [], {}
    t0 = time.monotonic()
    while not done.is_set():
        t, stage, sport = time.monotonic(), "connect", None
        try:
            with socket.create_connection((ip, port), timeout=2) as s:
                sport, stage = s.getsockname()[1], "response"
                s.settimeout(max(0.05, 2 - (time.monotonic() - t)))
                s.sendall(request)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            pod = parse_facts(data.split(b"\\r\\n\\r\\n", 1)[1].decode())["pod"]
            pods[pod] = pods.get(pod, 0) + 1
            ok += 1
        except Exception as e:
            failed.append([round(t - t0, 3), stage, round(time.monotonic() - t, 3), sport, repr(e)])
    print(json.dumps({"ok": ok, "failed": failed, "pods": pods, "seconds": time.monotonic() - t0}))
""")


# ---- manifests ----------------------------------------------------------------------------

def deployment(name: str, replicas: int, image: str = "nginx", labels: dict = None, strategy: str = "") -> str:
    labels = labels or {"app": name}
    lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return (f"---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
            f"spec:\n  replicas: {replicas}\n{strategy}"
            f"  selector: {{matchLabels: {{{lab}}}}}\n"
            f"  template:\n    metadata: {{labels: {{{lab}}}}}\n"
            f"    spec: {{containers: [{{name: c, image: {image}, ports: [{{containerPort: 80}}]}}]}}\n")


def service(name: str, app: str, port: int = 80) -> str:
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n"
            f"spec: {{selector: {{app: {app}}}, ports: [{{port: {port}, targetPort: 80}}]}}\n")


# ---- a cluster with a daemon ----------------------------------------------------------------

class Bench:
    """One cluster (2 nodes) with a `kproxy daemon` subprocess; ``close()`` always cleans:
    the daemon by its PID (SIGTERM, then SIGKILL), then the cluster from its journal."""

    def __init__(self, tag: str, backend: str = "iptables", daemon_args=(), profile: str = None):
        from kproxy.cluster import Cluster
        from kproxy.config import ClusterConfig
        from kproxy.reconciler import open_store

        self.name = f"bd{tag}{secrets.token_hex(3)}"
        self.proc = None
        self.log = None
        self.store = None
        self.helpers: list = []
        self.cluster = None
        t = time.perf_counter()
        try:
            # 2 nodes, a /24 of pod addresses each (.2-.254: 252 pods a node, 200 over 2 fit)
            self.cluster = Cluster.create(ClusterConfig(name=self.name, nodes=["node1", "node2"],
                                                        node_subnet_prefix=24, backend=backend))
            self.store = open_store(self.cluster)
            self.client = self.cluster.add_pod("client", node="node1")
        except BaseException:
            self.close()
            raise
        self.up_seconds = time.perf_counter() - t
        self.daemon_args = list(daemon_args)
        self.profile = profile

    # the daemon
    def start_daemon(self) -> None:
        self.log_path = os.path.join(os.environ["KPROXY_STATE_DIR"], f"daemon-{self.name}.log")
        self.log = open(self.log_path, "w+")
        pre = [sys.executable]
        if self.profile:
            pre += ["-m", "cProfile", "-o", os.path.join(self.profile, f"daemon-{self.name}.prof")]
        argv = pre + ["-m", "kproxy", "--cluster", self.name, "daemon", "-v",
                      "--metrics-bind-address", "127.0.0.1:0", *self.daemon_args]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=dict(os.environ), start_new_session=True)
        deadline = time.monotonic() + 60
        while (self.store.get_meta("daemon") or {}).get("pid") != self.proc.pid:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.metrics_url = self.store.get_meta("daemon")["metrics"]

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)      # by its PID: our own child
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()

    def metrics(self) -> dict:
        from kproxy.metrics import parse_text
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return parse_text(r.read().decode())

    # the store
    def apply(self, text: str):
        from kproxy.model import loads
        objs = loads(text, source="bench")
        self.store.apply(objs)
        return time.monotonic()

    def wait_settled(self, timeout: float, what: str) -> float:
        """Until the daemon reports the store's current revision in effect; seconds taken."""
        t = time.monotonic()
        rev = self.store.revision()[0]
        while (self.store.get_meta("settled") or {}).get("revision", -1) < rev:
            self.check_alive()
            if time.monotonic() - t > timeout:
                raise RuntimeError(f"{what}: the daemon did not settle revision {rev} in {timeout:.0f}s "
                                   f"(it has {self.store.get_meta('settled')})")
            time.sleep(0.05)
        return time.monotonic() - t

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{self.output()[-3000:]}")

    def cluster_ip(self, name: str, namespace: str = "default") -> str:
        row = self.store.db.execute("SELECT allocated FROM objects WHERE kind='Service' AND namespace=? AND name=?",
                                    (namespace, name)).fetchone()
        return json.loads(row[0])["clusterIP"]

    def pods(self) -> dict:
        from kproxy import state
        data = state.read_json(os.path.join(self.cluster.dir, "state.json")) or {}
        return data.get("pods", {})

    def wait_pods_ready(self, prefix_count: dict, timeout: float) -> float:
        """Until, for each name prefix, that many managed pods are ready (none terminating)."""
        t = time.monotonic()
        while True:
            self.check_alive()
            pods = [p for p in self.pods().values() if p["status"].get("managed")
                    and not p["status"].get("deleting_at")]
            ok = all(sum(1 for p in pods if p["name"].startswith(pre) and p["status"].get("ready")) >= n
                     for pre, n in prefix_count.items())
            if ok:
                return time.monotonic() - t
            if time.monotonic() - t > timeout:
                ready = sum(1 for p in pods if p["status"].get("ready"))
                raise RuntimeError(f"pods not ready after {timeout:.0f}s: {ready} ready of {len(pods)}")
            time.sleep(0.2)

    # programs in the client pod
    def in_client(self, code: str, *args, **popen) -> subprocess.Popen:
        from kproxy.kernel import process
        p = subprocess.Popen(process.exec_argv(self.client.netns, [sys.executable, "-c", code, *args]),
                             cwd=REPO, text=True, bufsize=1, **popen)
        self.helpers.append(p)
        return p

    def close(self) -> None:
        from kproxy.clean import clean_cluster
        from cni import netns
        for p in self.helpers:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            self.stop_daemon()
        finally:
            if self.store is not None:
                self.store.close()
            if self.cluster is not None:
                self.cluster.journal.close()
            report = clean_cluster(self.name)
            left = [n for n in netns.list_names() if n.startswith(self.name + "-")]
            if not report.ok or left:
                print(f"# cleanup of {self.name}: {report.summary()} namespaces left: {left}", flush=True)


# ---- histograms from /metrics ----------------------------------------------------------------

def histogram(parsed: dict, family: str) -> dict:
    """{node: {"buckets": [(le, cumulative count)], "sum": s, "count": n}}."""
    out: dict = {}
    for name, labels, value in parsed.get(family, {}).get("samples", []):
        node = labels.get("node", "")
        h = out.setdefault(node, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if name.endswith("_bucket"):
            h["buckets"][float(labels["le"])] = value
        elif name.endswith("_sum"):
            h["sum"] = value
        elif name.endswith("_count"):
            h["count"] = value
    return out


def histogram_delta(after: dict, before: dict) -> dict:
    out = {}
    for node, h in after.items():
        b = before.get(node, {"buckets": {}, "sum": 0.0, "count": 0.0})
        out[node] = {"buckets": {le: c - b["buckets"].get(le, 0.0) for le, c in h["buckets"].items()},
                     "sum": h["sum"] - b["sum"], "count": h["count"] - b["count"]}
    return out


def quantile(h: dict, q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket holding the rank."""
    buckets = sorted(h["buckets"].items())
    total = h["count"]
    if not total or not buckets:
        return float("nan")
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def describe_histogram(title: str, delta: dict) -> list:
    lines = []
    for node in sorted(delta):
        h = delta[node]
        if not h["count"]:
            lines.append(f"  {title} {node}: no observations")
            continue
        nonzero = []
        prev = 0.0
        for le, c in sorted(h["buckets"].items()):
            if c > prev:
                nonzero.append(f"le {le:g}: {c - prev:.0f}")
            prev = c
        lines.append(f"  {title} {node}: n={h['count']:.0f} mean {h['sum'] / h['count'] * 1000:.0f} ms, "
                     f"p50 ~{quantile(h, 0.5) * 1000:.0f} ms, p99 ~{quantile(h, 0.99) * 1000:.0f} ms "
                     f"[{', '.join(nonzero)}]")
    return lines


def pct(values: list, p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


# ---- 1. network programming latency -------------------------------------------------------------

def bench_latency(backend: str, existing: int, new: int, gap, args) -> None:
    deps, per = args.deployments, args.deployment_replicas
    print(f"\n# 1. network programming latency, {backend}"
          f"{' (iptables-nft)' if backend == 'iptables' else ''}: {existing} Services exist "
          f"(each selecting one of {deps} Deployment(s) of {per}), {new} applied one at a time", flush=True)
    b = Bench("l", backend, args.daemon_args, args.profile)
    try:
        t = time.perf_counter()
        b.apply("".join(deployment(f"web{d}", per) for d in range(deps)))
        b.start_daemon()
        b.wait_pods_ready({f"web{d}-": per for d in range(deps)}, 180)
        b.wait_settled(120, "web")
        t_setup = time.perf_counter() - t
        t = time.perf_counter()
        b.apply("".join(service(f"s{i}", f"web{i % deps}") for i in range(existing)))
        t_store = time.perf_counter() - t
        t_settle = b.wait_settled(600, f"{existing} Services")
        print(f"cluster up {b.up_seconds:.1f} s; daemon + {deps * per} pods ready {t_setup:.1f} s; "
              f"{existing} Services: Store.apply {t_store:.2f} s, daemon settled {t_settle:.1f} s later", flush=True)
        prober = b.in_client(PROBER, "0.005", "0.25", stdin=subprocess.PIPE, stdout=subprocess.PIPE)

        def first_connect(ip: str, port: int, limit: float):
            prober.stdin.write(f"{ip} {port} {limit}\n")
            prober.stdin.flush()
            line = prober.stdout.readline().split()
            if not line:
                raise RuntimeError("the prober died")
            return (float(line[1]), int(line[2])) if line[0] == "ok" else (None, int(line[1]))

        if first_connect(b.cluster_ip("s0"), 80, 10)[0] is None:       # sanity: an existing one answers
            raise RuntimeError("an existing Service does not answer")
        min_sync = 1.0
        if "--min-sync-period" in args.daemon_args:
            min_sync = float(args.daemon_args[args.daemon_args.index("--min-sync-period") + 1])
        # the next commit lands at least `gap` after the previous answer (the apply itself
        # takes part of it): the previous sync's rate limit does not hold the change back
        gap = min_sync + 0.25 if gap is None else gap
        time.sleep(gap)
        before = b.metrics()
        lat, attempts, applies, timeouts = [], [], [], 0
        t_run = time.monotonic()
        for i in range(new):
            name = f"new{i}"
            t = time.monotonic()
            t0 = b.apply(service(name, f"web{i % deps}"))          # the commit
            applies.append(t0 - t)
            when, n = first_connect(b.cluster_ip(name), 80, 60)
            if when is None:
                timeouts += 1
                print(f"  {name}: no connection within 60 s", flush=True)
            else:
                lat.append(when - t0)
                attempts.append(n)
            time.sleep(max(0.0, gap - applies[-1]))
        t_run = time.monotonic() - t_run
        after = b.metrics()
        prober.stdin.close()
        prober.wait(timeout=10)
        if not lat:
            print("no Service answered")
            return
        p99 = pct(lat, 99)
        print(f"apply -> first connection over {len(lat)} Services (each commit >= {gap:g} s after the "
              f"previous answer"
              f"{', ' + str(timeouts) + ' timed out' if timeouts else ''}; {t_run:.0f} s in all): "
              f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
              f"(min {min(lat) * 1000:.0f} ms, mean {statistics.mean(lat) * 1000:.0f} ms)")
        print(f"target p99 < 1 s: {'met' if p99 < 1.0 and not timeouts else 'NOT met'}")
        print(f"Store.apply of one Service (before the commit, not in the latency): "
              f"p50 {statistics.median(applies) * 1000:.0f} ms, max {max(applies) * 1000:.0f} ms")
        print("daemon /metrics over those applies (difference after - before):")
        prog = histogram_delta(histogram(after, "kubeproxy_network_programming_duration_seconds"),
                               histogram(before, "kubeproxy_network_programming_duration_seconds"))
        for line in describe_histogram("network_programming", prog):
            print(line)
        for line in describe_histogram("sync_proxy_rules", histogram_delta(
                histogram(after, "kubeproxy_sync_proxy_rules_duration_seconds"),
                histogram(before, "kubeproxy_sync_proxy_rules_duration_seconds"))):
            print(line)
        fulls = histogram_delta(histogram(after, "kubeproxy_sync_full_proxy_rules_duration_seconds"),
                                histogram(before, "kubeproxy_sync_full_proxy_rules_duration_seconds"))
        if fulls:
            print("  of those syncs, full rewrites (the daemon's periodic full sync, every --sync-period): "
                  + ", ".join(f"{n} {h['count']:.0f} (mean {h['sum'] / h['count'] * 1000:.0f} ms)" if h["count"]
                              else f"{n} 0" for n, h in sorted(fulls.items())))
        n1 = prog.get("node1")
        if n1 and n1["count"]:
            print(f"  (the client is on node1: measured mean {statistics.mean(lat) * 1000:.0f} ms, the daemon's "
                  f"own {n1['sum'] / n1['count'] * 1000:.0f} ms)")
        sys.stdout.flush()
    finally:
        b.close()


# ---- 2. rolling update under load -----------------------------------------------------------------

def bench_rollout(replicas: int, args) -> None:
    print(f"\n# 2. rolling update of a {replicas}-replica Deployment (RollingUpdate 25%/25%) "
          "under continuous HTTP requests", flush=True)
    strategy = "  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 25%, maxUnavailable: 25%}}\n"
    b = Bench("r", "iptables", args.daemon_args, args.profile)
    try:
        t = time.perf_counter()
        b.apply(deployment("web", replicas, strategy=strategy) + service("web", "web", 8080))
        b.start_daemon()
        b.wait_pods_ready({"web-": replicas}, 180)
        b.wait_settled(120, "web")
        print(f"cluster up {b.up_seconds:.1f} s; {replicas} pods ready {time.perf_counter() - t:.1f} s", flush=True)
        old = {p["name"] for p in b.pods().values() if p["name"].startswith("web-")}
        load = b.in_client(LOAD, b.cluster_ip("web"), "8080", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        time.sleep(2)
        t0 = b.apply(deployment("web", replicas, image="nginx:1.25", strategy=strategy) + service("web", "web", 8080))
        polled: dict = {}
        poller = threading.Thread(target=poll_rollout, args=(b, "default/web", t0, polled), daemon=True)
        poller.start()
        status = subprocess.Popen([sys.executable, "-m", "kproxy", "--cluster", b.name, "rollout", "status",
                                   "deployment/web", "--timeout", "300"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        b.helpers.append(status)
        messages, t_done = [], None
        for line in status.stdout:
            messages.append(line.rstrip())
            if "successfully rolled out" in line:
                t_done = time.monotonic()
        status.wait()
        poller.join(timeout=60)
        time.sleep(1)                      # a second more of requests on the new pods
        load.stdin.close()
        result = json.loads(load.stdout.readline())
        load.wait(timeout=10)
        new = {p["name"] for p in b.pods().values() if p["name"].startswith("web-")}
        total = result["ok"] + len(result["failed"])
        if t_done is None:
            print(f"the rollout did not finish: {messages[-3:]}")
        else:
            print(f"rollout: apply -> done {polled.get('done', float('nan')) - t0:.1f} s (the cluster's state "
                  f"polled every 50 ms: {polled.get('steps', '?')} distinct states); `kproxy rollout status` "
                  f"reported it {t_done - t0:.1f} s after the apply ({len(messages)} status lines); "
                  f"new pods {len(new - old)}, old left {len(new & old)}")
        print(f"requests: {len(result['failed'])} failed of {total} over {result['seconds']:.1f} s "
              f"({total / result['seconds']:.0f}/s; answered by {len(result['pods'])} pods, "
              f"{len(set(result['pods']) & old)} old, {len(set(result['pods']) - old)} new)")
        print(f"target 0 failed: {'met' if not result['failed'] else 'NOT met'}")
        for when, stage, took, sport, err in result["failed"][:5]:
            print(f"  failed at +{when:.3f} s in {stage} after {took:.3f} s (source port {sport}): {err}")
        sys.stdout.flush()
    finally:
        b.close()


def poll_rollout(b: Bench, key: str, t0: float, out: dict) -> None:
    """What `kproxy rollout status` checks, every 50 ms, in this process: out["done"] is
    the monotonic time it first said done."""
    from kproxy import deployments
    from kproxy.cluster import Cluster
    from kproxy.reconciler import open_store, pod_view
    ns, name = key.split("/")
    store = open_store(b.cluster)
    seen = set()
    try:
        while time.monotonic() - t0 < 300:
            dep = next(d for d in store.objects()["Deployment"] if d.name == name and d.namespace == ns)
            c = Cluster.open(b.name)
            views = [pod_view(p) for p in c.pods.values() if p.status.get("managed") and p.status.get("owner") == key]
            message, done = deployments.rollout_status(dep, views, time.time(),
                                                       progress=c.proxy_state.get("deployments", {}).get(key))
            seen.add(message)
            if done:
                out["done"] = time.monotonic()
                break
            time.sleep(0.05)
    except Exception as e:          # a figure missing, not a failed benchmark
        out["error"] = repr(e)
    finally:
        out["steps"] = len(seen)
        store.close()


# ---- 3. the idle daemon --------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK       # utime + stime


def proc_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def descendants(pid: int) -> list:
    children: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def bench_idle(pods: int, services: int, seconds: float, args) -> None:
    deps, per = pods // 4, 4
    print(f"\n# 3. the idle daemon: {deps * per} pods ({deps} Deployments x {per}) and {services} Services, "
          f"sampled {seconds:g} s", flush=True)
    b = Bench("i", "iptables", args.daemon_args, args.profile)
    try:
        b.start_daemon()
        b.wait_settled(60, "start")
        text = "".join(deployment(f"d{i}", per) for i in range(deps))
        text += "".join(service(f"s{i}", f"d{i % deps}") for i in range(services))
        t = time.perf_counter()
        b.apply(text)
        t_store = time.perf_counter() - t
        t_ready = b.wait_pods_ready({f"d{i}-": per for i in range(deps)}, 900)
        t_settled = b.wait_settled(300, "idle setup")
        print(f"cluster up {b.up_seconds:.1f} s; Store.apply {t_store:.2f} s; {deps * per} pods ready "
              f"{t_ready:.1f} s after it; settled {t_settled:.1f} s later", flush=True)
        time.sleep(2)
        pid = b.proc.pid
        m0 = b.metrics()
        passes0 = sum(v for n, _, v in m0.get("kproxy_reconcile_passes_total", {}).get("samples", []))
        cpu0, w0 = proc_cpu(pid), time.monotonic()
        rss, per_second = [], []
        end = w0 + seconds
        c, w = cpu0, w0
        while time.monotonic() < end:
            rss.append(proc_rss_mib(pid))
            time.sleep(max(0.0, min(1.0, end - time.monotonic())))
            c1, w1 = proc_cpu(pid), time.monotonic()
            per_second.append(100 * (c1 - c) / (w1 - w))
            c, w = c1, w1
        cpu1, w1 = proc_cpu(pid), time.monotonic()
        m1 = b.metrics()
        passes1 = sum(v for n, _, v in m1.get("kproxy_reconcile_passes_total", {}).get("samples", []))
        syncs = histogram_delta(histogram(m1, "kubeproxy_sync_proxy_rules_duration_seconds"),
                                histogram(m0, "kubeproxy_sync_proxy_rules_duration_seconds"))
        pods_procs = [p for p in descendants(pid)]
        pods_rss = sum(proc_rss_mib(p) for p in pods_procs)
        print(f"daemon (pid {pid}): CPU {100 * (cpu1 - cpu0) / (w1 - w0):.1f} % of one core over {w1 - w0:.1f} s; "
              f"RSS {statistics.mean(rss):.1f} MiB (max {max(rss):.1f})")
        busy = sorted(per_second, reverse=True)
        print(f"  per second: median {statistics.median(per_second):.1f} %, busiest "
              + ", ".join(f"{x:.0f} %" for x in busy[:3]))
        print(f"  in that time: {passes1 - passes0:.0f} reconcile passes "
              f"({(passes1 - passes0) / (w1 - w0):.1f}/s), proxier syncs "
              + ", ".join(f"{n} {h['count']:.0f} ({h['sum']:.2f} s)" for n, h in sorted(syncs.items())))
        print(f"  the pods' own processes (the daemon's descendants): {len(pods_procs)} processes, "
              f"RSS {pods_rss:.0f} MiB in all")
        sys.stdout.flush()
    finally:
        b.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", choices=["latency", "rollout", "idle", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--backend", nargs="+", default=["iptables"], choices=["iptables", "nftables"],
                    help="proxy backends for the latency part (iptables is iptables-nft)")
    ap.add_argument("--services", type=int, default=None, help="latency: Services that exist (1000; quick 200)")
    ap.add_argument("--new", type=int, default=None, help="latency: Services applied one at a time (100; quick 20)")
    ap.add_argument("--deployments", type=int, default=5,
                    help="latency: Deployments the Services select, round-robin (5)")
    ap.add_argument("--deployment-replicas", type=int, default=2, help="latency: replicas of each (2)")
    ap.add_argument("--gap", type=float, default=None,
                    help="latency: least seconds between a Service answering and the next commit "
                         "(default: the daemon's min-sync-period + 0.25)")
    ap.add_argument("--replicas", type=int, default=None, help="rollout: replicas (10; quick 4)")
    ap.add_argument("--pods", type=int, default=None, help="idle: pods, 4 per Deployment (200; quick 40)")
    ap.add_argument("--idle-services", type=int, default=None, help="idle: Services (1000; quick 200)")
    ap.add_argument("--seconds", type=float, default=None, help="idle: sampling time (30; quick 10)")
    ap.add_argument("--daemon-arg", dest="daemon_args", action="append", default=[],
                    help="an extra `kproxy daemon` argument (repeat), e.g. --daemon-arg=--min-sync-period "
                         "--daemon-arg=0.5")
    ap.add_argument("--profile", metavar="DIR", help="run each daemon under cProfile, writing DIR/daemon-*.prof")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/daemon.py needs root")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))       # run the cleanups
    state_dir = tempfile.mkdtemp(prefix="kproxy-bench-daemon-")
    os.environ["KPROXY_STATE_DIR"] = state_dir
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    q = args.quick
    print(f"# kproxy daemon, 2 nodes, {os.cpu_count()} CPUs{', --quick' if q else ''}; "
          f"daemon flags: defaults {' '.join(args.daemon_args)}", flush=True)
    started = time.perf_counter()
    ok = False
    try:
        if args.which in ("latency", "all"):
            for backend in args.backend:
                bench_latency(backend, args.services or (200 if q else 1000), args.new or (20 if q else 100),
                              args.gap, args)
        if args.which in ("rollout", "all"):
            bench_rollout(args.replicas or (4 if q else 10), args)
        if args.which in ("idle", "all"):
            bench_idle(args.pods or (40 if q else 200), args.idle_services or (200 if q else 1000),
                       args.seconds or (10 if q else 30), args)
        ok = True
    finally:
        print(f"\n# total {time.perf_counter() - started:.0f} s", flush=True)
        if ok:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            print(f"# state and daemon logs kept in {state_dir}", flush=True)


if __name__ == "__main__":
    main()
