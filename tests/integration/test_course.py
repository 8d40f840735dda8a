"""The course's exercises run as a student runs them, through the CLI only.

`kproxy up`, `kproxy apply -f <dir or file>` (from inside the exercise folder where the
course says `kubectl apply -f .`), `kproxy get ...`, `kproxy exec POD -- cmd`,
`kproxy trace`, on one live emulated cluster shared by the whole module. The manifests
are the seed's byte-for-byte copies of the course (``tests.conftest.SEED``), never edited;
their paths hold spaces, so they are only handled as ``pathlib`` paths and argv items.

The cases share the cluster in file order, and each applies what it needs itself (an
unchanged apply is a no-op), so any one of them can also run alone (``-k``). The one case
that changes shared objects (Kubernetes II over Stateful-app) puts them back.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SEED, kproxy_cli, needs_seed, unique

pytestmark = [pytest.mark.root, needs_seed]

SESION4 = SEED / "Sesion4-Kubernetes"
STATEFUL = SESION4 / "Stateful-app"
KUBERNETES_II = SESION4 / "Kubernetes II"
EJERCICIOS = SESION4 / "Ejercicios"
EJERCICIO1 = EJERCICIOS / "Ejercicio1"
NODEPORT = SEED / "UltimaSesion" / "NodePort"

LB_POOL = ipaddress.ip_network("192.168.5.240/28")     # kproxy's LoadBalancer pool (README)
NODE_PORTS = range(30000, 32767 + 1)
DEADLINE = 30.0                                          # generous: this machine is loaded


# ---- helpers -------------------------------------------------------------------------------

def eventually(check, what: str, deadline: float = DEADLINE, interval: float = 0.25):
    """Poll ``check()`` -> (ok, detail) until ok; fail with the last detail at the deadline.
    (A deadline to stop waiting, never a timing assertion.)"""
    end = time.monotonic() + deadline
    while True:
        ok, detail = check()
        if ok:
            return detail
        if time.monotonic() > end:
            raise AssertionError(f"{what}: still not so after {deadline:.0f} s; last seen:\n{detail}")
        time.sleep(interval)


def table(text: str) -> list[dict]:
    """A kubectl-style table as rows keyed by header (cells hold no spaces here)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0].split()
    return [dict(zip(head, ln.split())) for ln in lines[1:]]


def answering_pods(body: str) -> list[str]:
    """The pod names in the built-in server's HTTP answers (``pod: NAME`` lines)."""
    return re.findall(r"^pod: (\S+)$", body, re.M)


class Student:
    """One cluster driven only through the `kproxy` CLI, as a student would."""

    def __init__(self, name: str, state_dir: str):
        self.name = name
        self.state_dir = state_dir
        # PYTHONPATH: `python -m kproxy` run from inside a seed folder must import this
        # checkout's kproxy, not the one the venv's editable install points at.
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
        self.env = {"KPROXY_CLUSTER": name, "KPROXY_STATE_DIR": state_dir, "PYTHONPATH": path}

    @property
    def cluster_dir(self) -> str:
        return os.path.join(self.state_dir, "clusters", self.name)

    def kproxy(self, *args, cwd: Path | None = None, check: bool = True, timeout: float = 180):
        kwargs = {"cwd": cwd} if cwd is not None else {}
        res = kproxy_cli(*[str(a) for a in args], env=self.env, timeout=timeout, stdin=subprocess.DEVNULL,
                         **kwargs)
        if check and res.returncode != 0:
            raise AssertionError(f"kproxy {' '.join(map(str, args))} (cwd {cwd}) failed "
                                 f"({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def apply(self, *files, cwd: Path, validate: bool = True, check: bool = True):
        args = ["apply"] + [x for f in files for x in ("-f", f)]
        if not validate:
            args.append("--no-validate")
        return self.kproxy(*args, cwd=cwd, check=check)

    def exec(self, pod: str, *argv, namespace: str = "default", timeout: float = 120):
        return self.kproxy("exec", pod, "-n", namespace, "--", *argv, check=False, timeout=timeout)

    def get(self, kind: str, *args) -> str:
        return self.kproxy("get", kind, *args).stdout

    def get_json(self, kind: str, *args) -> list[dict]:
        return json.loads(self.get(kind, "-o", "json", *args))["items"]

    def svc(self, name: str, namespace: str = "default") -> dict:
        return next(s for s in self.get_json("svc", "-n", namespace) if s["metadata"]["name"] == name)

    def pods(self, namespace: str = "default", **labels) -> list[dict]:
        return [p for p in self.get_json("pods", "-n", namespace)
                if all(p["metadata"]["labels"].get(k) == v for k, v in labels.items())]

    def node_ips(self) -> dict:
        return {n["metadata"]["name"]: n["status"]["addresses"][0]["address"] for n in self.get_json("nodes")}

    def node_rules(self, node: str, table_: str) -> str:
        res = self.exec(f"node/{node}", "iptables-save", "-t", table_)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def netns_left(self) -> list[str]:
        from cni import netns
        return [n for n in netns.list_names() if n == self.name or n.startswith(self.name + "-")]

    def down(self) -> list[str]:
        """`kproxy down`; should it fail half-way, clean from the journal. Returns problems."""
        problems = []
        if os.path.isdir(self.cluster_dir):
            res = self.kproxy("down", check=False)
            if res.returncode != 0:
                problems.append(f"kproxy down exited {res.returncode}: {res.stdout}{res.stderr}")
        if os.path.isdir(self.cluster_dir):
            from kproxy.clean import clean_cluster
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KPROXY_STATE_DIR", self.state_dir)
                problems += clean_cluster(self.name).problems
        left = self.netns_left()
        if left:
            problems.append(f"network namespaces left behind: {left}")
        return problems


class running_daemon:
    """`kproxy daemon` for the student's cluster for the length of a with-block (fast
    periods, a short crash-loop back-off), ended by its PID."""

    def __init__(self, student: "Student", backoff: float = 1.0):
        self.student = student
        self.argv = [sys.executable, "-m", "kproxy", "daemon", "--min-sync-period", "0.2", "--sync-period", "5",
                     "--interval", "0.1", "--metrics-bind-address", "", "--backoff", str(backoff)]

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.student.env}, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lock = os.path.join(self.student.cluster_dir, "reconciler.lock")

        def holding():
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                with open(lock) as f:
                    return f.read().strip() == f"{self.proc.pid} daemon"
            except FileNotFoundError:
                return False
        eventually(lambda: (holding(), "lock"), "the daemon to start")
        return self.proc

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return False


# ---- fixtures: one cluster for the module ----------------------------------------------------

@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 2-node cluster for the module: its own KPROXY_STATE_DIR (the module-scoped twin of
    conftest's ``state_dir``), a unique name (checked by conftest's session leak check), and
    `kproxy down` at the end even when a case failed; then none of its namespaces may be left."""
    for folder in (STATEFUL, KUBERNETES_II, EJERCICIO1, NODEPORT):
        assert folder.is_dir(), f"seed folder missing: {folder}"
    s = Student(unique("crs"), str(tmp_path_factory.mktemp("course-state")))
    where = subprocess.run([sys.executable, "-c", "import kproxy; print(kproxy.__file__)"], cwd=STATEFUL,
                           env={**os.environ, **s.env}, capture_output=True, text=True)
    assert where.stdout.strip() == os.path.join(REPO, "kproxy", "__init__.py"), \
        f"the CLI would not run this checkout's kproxy: {where.stdout}{where.stderr}"
    try:
        s.kproxy("up", "--nodes", "2")
        yield s
    finally:
        problems = s.down()
        assert not problems, problems


@pytest.fixture(scope="module")
def stateful_app(student):
    """`kubectl apply -f .` in sesiones/Sesion4-Kubernetes/Stateful-app (the deck's solution)."""
    return student.apply(".", cwd=STATEFUL)


@pytest.fixture(scope="module")
def ejercicio1(student):
    """Práctica 1: the Deployment, its Service and the busybox client, then example.yaml
    (Namespace curso, busybox-sleep, and busybox-sleep-less in curso)."""
    first = student.apply("1Despliege.yaml", "1Service.yaml", "busybox.yaml", cwd=EJERCICIO1)
    second = student.apply("example.yaml", cwd=EJERCICIOS)
    return first.stdout + second.stdout


def wordpress_frontends(student) -> dict:
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in student.pods(app="wordpress", tier="frontend")}


def resolve(student, pod: str, name: str, namespace: str = "default") -> str:
    """`getent hosts NAME` in the pod, polled: the DNS server reloads its zone after a converge."""
    def check():
        res = student.exec(pod, "getent", "hosts", name, namespace=namespace)
        return res.returncode == 0 and bool(res.stdout.split()), res.stdout + res.stderr
    return eventually(check, f"{name} resolves in {pod}").split()[0]


# ---- 1. Stateful-app -------------------------------------------------------------------------

def test_stateful_app_apply_dot_runs_one_mysql_and_four_wordpress_pods(student, stateful_app):
    out = stateful_app.stdout
    for line in ("service/wordpress-mysql created", "service/wordpress created",
                 "deployment/wordpress-mysql created", "deployment/wordpress created"):
        assert line in out, out
    for obj in ("persistentvolume/local-pv-1", "persistentvolume/local-pv-2", "secret/mysql-pass",
                "persistentvolumeclaim/mysql-pv-claim", "persistentvolumeclaim/wp-pv-claim"):
        assert f"{obj} accepted, not emulated" in out, out

    mysql = [p["metadata"]["name"] for p in student.pods(app="wordpress", tier="mysql")]
    frontends = wordpress_frontends(student)
    assert len(mysql) == 1 and mysql[0].startswith("wordpress-mysql-"), mysql
    assert len(frontends) == 4 and not any(n.startswith("wordpress-mysql-") for n in frontends), frontends

    def all_running():
        rows = {r["NAME"]: r for r in table(student.get("pods"))}
        ours = [rows.get(n) for n in [*mysql, *frontends]]
        ok = all(r and r["READY"] == "1/1" and r["STATUS"] == "Running" for r in ours)
        return ok, "\n".join(map(str, ours))
    eventually(all_running, "get pods: the 5 Stateful-app pods Running and 1/1 Ready")


def test_stateful_app_get_svc_like_kubectl(student, stateful_app):
    rows = {r["NAME"]: r for r in table(student.get("svc"))}
    mysql, wp = rows["wordpress-mysql"], rows["wordpress"]
    assert mysql["TYPE"] == "ClusterIP" and mysql["CLUSTER-IP"] == "None" and mysql["PORT(S)"] == "3306/TCP", mysql
    assert wp["TYPE"] == "LoadBalancer", wp
    assert ipaddress.ip_address(wp["CLUSTER-IP"]) in ipaddress.ip_network("10.96.0.0/12"), wp
    m = re.fullmatch(r"8080:(\d+)/TCP", wp["PORT(S)"])
    assert m and int(m.group(1)) in NODE_PORTS, wp
    assert ipaddress.ip_address(wp["EXTERNAL-IP"]) in LB_POOL, wp
    # the same from the API objects
    spec = student.svc("wordpress")
    assert spec["spec"]["ports"][0]["nodePort"] == int(m.group(1))
    assert spec["status"]["loadBalancer"]["ingress"][0]["ip"] == wp["EXTERNAL-IP"]


def test_headless_wordpress_mysql_is_the_pod_itself_without_rules(student, stateful_app):
    [mysql] = student.pods(app="wordpress", tier="mysql")
    mysql_name, mysql_ip = mysql["metadata"]["name"], mysql["status"]["podIP"]
    frontends = wordpress_frontends(student)
    wp, wp_ip = sorted(frontends.items())[0]

    # WORDPRESS_DB_HOST=wordpress-mysql: DNS gives the MySQL pod's own IP (no ClusterIP)
    assert resolve(student, wp, "wordpress-mysql") == mysql_ip
    # and a TCP connection to wordpress-mysql:3306 lands on that pod, from the WordPress pod's
    # own address (bash's /dev/tcp, as in the wordpress:*-apache image)
    def banner():
        res = student.exec(wp, "timeout", "20", "bash", "-c",
                           'exec 3<>/dev/tcp/wordpress-mysql/3306 && read -r line <&3 && echo "$line"')
        return res.returncode == 0, res.stdout + res.stderr
    line = eventually(banner, "wordpress-mysql:3306 from a wordpress pod")
    assert f"pod={mysql_name} " in line and f"ip={mysql_ip} " in line and "port=3306" in line, line
    assert f"client={wp_ip}:" in line, f"pod to pod, no NAT: {line}"

    # no kube-proxy rule for it at all, on any node, while wordpress has its KUBE-SVC chain
    rules = student.kproxy("rules", "wordpress-mysql").stdout
    assert "no rules in any mode" in rules, rules
    for node in student.node_ips():
        nat, filt = student.node_rules(node, "nat"), student.node_rules(node, "filter")
        assert "wordpress-mysql" not in nat + filt, f"{node} has rules for the headless Service"
        assert f"{mysql_ip}:3306" not in nat, f"{node} DNATs to the MySQL pod"
        assert re.search(r'-A KUBE-SERVICES .*"default/wordpress cluster IP".* -j KUBE-SVC-', nat), nat


def test_wordpress_through_clusterip_nodeport_and_loadbalancer(student, stateful_app):
    frontends = wordpress_frontends(student)
    wp = student.svc("wordpress")
    vip, node_port = wp["spec"]["clusterIP"], wp["spec"]["ports"][0]["nodePort"]
    lb_ip = wp["status"]["loadBalancer"]["ingress"][0]["ip"]
    client = sorted(frontends)[0]

    # ClusterIP:8080 from a pod (20 new connections; each answer is a wordpress pod's)
    res = student.exec(client, "sh", "-c", f"for i in $(seq 20); do wget -qO- -T 10 http://{vip}:8080/; done")
    seen = answering_pods(res.stdout)
    assert res.returncode == 0 and len(seen) == 20, res.stdout + res.stderr
    assert set(seen) <= set(frontends) and len(set(seen)) > 1, seen
    # the short name works too (cluster DNS, then the TRAP)
    res = student.exec(client, "wget", "-qO-", "-T", "10", "http://wordpress:8080/")
    assert res.returncode == 0 and answering_pods(res.stdout)[0] in frontends, res.stdout + res.stderr

    # from outside the cluster: every node's IP:NodePort, then the LoadBalancer IP
    for node, ip in student.node_ips().items():
        res = student.exec("external", "wget", "-qO-", "-T", "10", f"http://{ip}:{node_port}/")
        assert res.returncode == 0, f"NodePort on {node}: {res.stderr}"
        assert answering_pods(res.stdout)[0] in frontends, res.stdout
    res = student.exec("external", "wget", "-qO-", "-T", "10", f"http://{lb_ip}:8080/")
    assert res.returncode == 0 and answering_pods(res.stdout)[0] in frontends, res.stdout + res.stderr


# ---- 2. Ejercicio1 ---------------------------------------------------------------------------

def test_ejercicio1_busybox_nslookup_store_products(student, ejercicio1):
    assert "deployment/store-products created" in ejercicio1 and "pod/busybox created" in ejercicio1
    vip = student.svc("store-products")["spec"]["clusterIP"]
    # This machine's busybox is 1.35, not the course's pinned 1.28.4: it also asks each search
    # suffix and exits 1 on their NXDOMAIN. What the student reads is the answer below.
    def answered():
        res = student.exec("busybox", "busybox", "nslookup", "store-products")
        return ("Name:\tstore-products.default.svc.cluster.local" in res.stdout
                and f"Address: {vip}" in res.stdout), res.stdout + res.stderr
    eventually(answered, "busybox nslookup store-products gives the ClusterIP")


def test_ejercicio1_nslookup_exactly_as_the_course_writes_it(student, ejercicio1):
    vip = student.svc("store-products")["spec"]["clusterIP"]
    res = student.exec("busybox", "nslookup", "store-products")
    assert "Name:\tstore-products.default.svc.cluster.local" in res.stdout, res.stdout + res.stderr
    assert f"Address: {vip}" in res.stdout, res.stdout


def test_ejercicio1_wget_store_products_balances_over_four_pods(student, ejercicio1):
    store = {p["metadata"]["name"] for p in student.pods(app="store-products")}
    assert len(store) == 4, store
    # `kubectl exec -it busybox-sleep wget -O - store-products`, 40 times
    res = student.exec("busybox-sleep", "sh", "-c",
                       "for i in $(seq 40); do wget -qO- -T 10 store-products; done")
    seen = answering_pods(res.stdout)
    assert res.returncode == 0 and len(seen) == 40, res.stdout + res.stderr
    assert set(seen) == store, f"40 requests reached {sorted(set(seen))}, not all of {sorted(store)}"


def test_ejercicio1_get_pods_all_namespaces_shows_curso(student, ejercicio1):
    rows = table(student.get("pods", "-A"))
    assert rows and "NAMESPACE" in rows[0], rows
    curso = [r for r in rows if r["NAMESPACE"] == "curso"]
    assert [r["NAME"] for r in curso] == ["busybox-sleep-less"], rows
    default = {r["NAME"] for r in rows if r["NAMESPACE"] == "default"}
    assert {"busybox", "busybox-sleep"} <= default, default
    assert "busybox-sleep-less" not in {r["NAME"] for r in table(student.get("pods"))}


# ---- 3. service.yaml: dashboard in curso ----------------------------------------------------

def test_dashboard_in_curso_has_no_endpoints_and_refuses_at_once(student, stateful_app, ejercicio1):
    res = student.apply("service.yaml", cwd=SESION4)
    assert "service/dashboard -n curso created" in res.stdout, res.stdout
    [row] = table(student.get("svc", "-n", "curso"))
    assert row["NAME"] == "dashboard" and row["TYPE"] == "LoadBalancer", row
    # the selector matches the 4 wordpress pods, but they live in default, not curso
    assert len(wordpress_frontends(student)) == 4
    desc = student.kproxy("describe", "svc", "dashboard", "-n", "curso").stdout
    assert re.search(r"^Endpoints:\s+<none>$", desc, re.M), desc
    slices = table(student.get("endpointslices", "-n", "curso"))
    assert [s["ENDPOINTS"] for s in slices] == ["<unset>"], slices
    for node in student.node_ips():
        assert "curso/dashboard has no endpoints" in student.node_rules(node, "filter"), node

    # A connection is turned away by the REJECT rule: "Connection refused", not a timeout.
    res = student.exec("busybox", "wget", "-O-", "-T", "30", "-t", "1", "http://dashboard.curso/")
    assert res.returncode != 0 and "Connection refused" in res.stderr, res.stderr
    assert "timed out" not in res.stderr.lower(), res.stderr
    res = student.exec("busybox", "busybox", "nc", "-w", "30", row["CLUSTER-IP"], "80")
    assert res.returncode != 0 and "Connection refused" in res.stderr, res.stderr


# ---- 4. UltimaSesion/NodePort ----------------------------------------------------------------

def test_nodeport_yaml_strict_apply_names_file_object_and_field(student):
    res = student.apply("nodeport.yaml", cwd=NODEPORT, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert ("nodeport.yaml: document 1: Service default/my-nginx: spec.nodePort: "
            'strict decoding error: unknown field "spec.nodePort"') in res.stderr, res.stderr
    # all or nothing: the Deployment before it in the file was not created either
    assert "my-nginx" not in student.get("svc") and "my-nginx" not in student.get("pods")


def test_nodeport_without_validation_is_dnated_then_refused(student):
    res = student.apply("nodeport.yaml", cwd=NODEPORT, validate=False)
    assert "service/my-nginx created" in res.stdout and "deployment/my-nginx created" in res.stdout, res.stdout
    assert 'unknown field "spec.nodePort" dropped' in res.stdout + res.stderr, res.stdout + res.stderr
    row = next(r for r in table(student.get("svc")) if r["NAME"] == "my-nginx")
    m = re.fullmatch(r"80:(\d+)/TCP", row["PORT(S)"])
    assert row["TYPE"] == "NodePort" and m, row
    node_port = int(m.group(1))
    # dropped, so one is allocated from the range (kproxy hands out the lowest free port,
    # where kube-apiserver picks at random: only "in range, not 31234" is asserted)
    assert node_port in NODE_PORTS and node_port != 31234, "the misplaced nodePort was dropped"

    pods = {p["metadata"]["name"]: p["status"]["podIP"] for p in student.pods(run="my-nginx")}
    assert len(pods) == 2, pods
    rows = {r["NAME"]: r for r in table(student.get("pods"))}
    assert all(rows[n]["READY"] == "1/1" and rows[n]["STATUS"] == "Running" for n in pods), rows

    nodes = student.node_ips()
    node, node_ip = sorted(nodes.items())[0]
    # the student's curl http://<node-ip>:<nodePort>: refused
    res = student.exec("external", "wget", "-O-", "-T", "30", "-t", "1", f"http://{node_ip}:{node_port}/")
    assert res.returncode != 0 and "Connection refused" in res.stderr, res.stderr
    # ... after kube-proxy's DNAT to a pod's port 80, where bitnami/nginx does not listen
    report = json.loads(student.kproxy("trace", "external", f"node/{node}:{node_port}", "-o", "json").stdout)
    assert report["service"]["name"] == "my-nginx" and report["verdict"]["action"] == "DNAT", report["verdict"]
    assert report["trap"]["before"] == f"{node_ip}:{node_port}", report["trap"]
    ip, _, port = report["trap"]["after"].rpartition(":")
    assert ip in pods.values() and port == "80", report["trap"]
    assert report["refused_after_dnat"] is True
    assert "Connection refused" in report["probes"][0]["error"], report["probes"]
    # the image does serve, on 8080
    pod, pod_ip = sorted(pods.items())[0]
    res = student.exec(f"node/{node}", "wget", "-qO-", "-T", "10", f"http://{pod_ip}:8080/")
    assert res.returncode == 0 and answering_pods(res.stdout) == [pod], res.stdout + res.stderr


# ---- 2 (cont.). the curso pod whose command exits -------------------------------------------

def test_curso_pod_whose_sleep_exits_is_shown_restarting(student, ejercicio1):
    """`sleep 10` under restartPolicy Always: with the daemon supervising, the pod is
    restarted, then waits in CrashLoopBackOff, and RESTARTS grows (`get pod -A`)."""
    seen = set()
    with running_daemon(student, backoff=4):
        def crash_looping():
            row = next(r for r in table(student.get("pods", "-A")) if r["NAME"] == "busybox-sleep-less")
            seen.add(row["STATUS"])
            return row["STATUS"] == "CrashLoopBackOff" and int(row["RESTARTS"]) >= 1, row
        eventually(crash_looping, "busybox-sleep-less in CrashLoopBackOff", deadline=90, interval=0.5)

        def restarted_again():
            row = next(r for r in table(student.get("pods", "-A")) if r["NAME"] == "busybox-sleep-less")
            return int(row["RESTARTS"]) >= 2, row
        eventually(restarted_again, "a second restart", deadline=60, interval=0.5)
    assert "Running" in seen, seen


# ---- 6. changing the image versions: RollingUpdate and Recreate ------------------------------

def test_stateful_app_new_image_versions_roll_as_their_strategies_say(student, stateful_app, tmp_path):
    """Objectivos.md, task 4: change the wordpress and mysql image versions.  wordpress
    (4 replicas, RollingUpdate 50%/25%) never has more than 6 pods or fewer than 3
    available; mysql (Recreate) is down before the new one is up.  A copy of the folder
    with the new tags is applied (the seed itself is never edited)."""
    copy = tmp_path / "Stateful-app"
    copy.mkdir()
    for f in STATEFUL.glob("*.yaml"):
        text = f.read_text()
        text = text.replace("image: wordpress:5.9-apache", "image: wordpress:6.0-apache")
        text = text.replace("image: mysql:5.6", "image: mysql:5.7")
        (copy / f.name).write_text(text)
    assert "wordpress:6.0-apache" in (copy / "wordpress.yaml").read_text()
    old_wp = set(wordpress_frontends(student))
    old_db = {p["metadata"]["name"] for p in student.pods(app="wordpress", tier="mysql")}
    worst = {"wordpress_active": 0, "wordpress_available": 4, "mysql_together": 0}
    with running_daemon(student):
        student.kproxy("apply", "-f", ".", cwd=copy)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pods = student.get_json("pods")
            wp = [p for p in pods if p["metadata"]["labels"].get("tier") == "frontend"
                  and "deletionTimestamp" not in p["metadata"]]
            ready = [p for p in wp if any(c["type"] == "Ready" and c["status"] == "True"
                                          for c in p["status"]["conditions"])]
            db = [p for p in pods if p["metadata"]["labels"].get("tier") == "mysql"]
            worst["wordpress_active"] = max(worst["wordpress_active"], len(wp))
            worst["wordpress_available"] = min(worst["wordpress_available"], len(ready))
            worst["mysql_together"] = max(worst["mysql_together"], len(db))
            names = {p["metadata"]["name"] for p in pods}
            if len(ready) == 4 and not (names & (old_wp | old_db)) and len(db) == 1:
                break
            time.sleep(0.2)
        status = student.kproxy("rollout", "status", "deployment/wordpress", "--timeout", "60")
        assert 'deployment "wordpress" successfully rolled out' in status.stdout, status.stdout
        status = student.kproxy("rollout", "status", "deployment/wordpress-mysql", "--timeout", "60")
        assert 'deployment "wordpress-mysql" successfully rolled out' in status.stdout, status.stdout
    assert worst["wordpress_active"] <= 6 and worst["wordpress_available"] >= 3, worst
    assert worst["mysql_together"] == 1, "Recreate: the old mysql pod is gone before the new one is made"
    new_wp = set(wordpress_frontends(student))
    assert len(new_wp) == 4 and not (new_wp & old_wp)
    rows = table(student.get("deployments"))
    ready = {r["NAME"]: r["READY"] for r in rows}
    assert ready.get("wordpress") == "4/4" and ready.get("wordpress-mysql") == "1/1", rows
    # and back to the seed's versions (other cases share the cluster)
    student.apply(".", cwd=STATEFUL)
    assert len(wordpress_frontends(student)) == 4


# ---- 5. Kubernetes II over Stateful-app ------------------------------------------------------

def _wordpress_rules(student, node: str) -> list[str]:
    return [ln for ln in student.node_rules(node, "nat").splitlines()
            if ln.startswith("-A KUBE-SERVICES ") and '"default/wordpress cluster IP"' in ln]


def _wordpress_port_is(student, port: int, vip: str, client: str):
    """The Service, every node's rules and real traffic all say `wordpress` is on ``port``."""
    other = {80: 8080, 8080: 80}[port]
    row = next(r for r in table(student.get("svc")) if r["NAME"] == "wordpress")
    assert row["CLUSTER-IP"] == vip and re.fullmatch(rf"{port}:\d+/TCP", row["PORT(S)"]), row
    for node in student.node_ips():
        lines = _wordpress_rules(student, node)
        assert len(lines) == 1 and f"-d {vip}/32 " in lines[0] and f"--dport {port} " in lines[0], (node, lines)
    frontends = wordpress_frontends(student)
    assert len(frontends) == 4, frontends
    res = student.exec(client, "wget", "-qO-", "-T", "10", f"http://{vip}:{port}/")
    assert res.returncode == 0 and answering_pods(res.stdout)[0] in frontends, res.stdout + res.stderr
    res = student.exec(client, "wget", "-qO-", "-T", "10", "-t", "1", f"http://{vip}:{other}/")
    assert res.returncode != 0 and not answering_pods(res.stdout), f"{vip}:{other} still answers: {res.stdout}"


def test_kubernetes_ii_over_stateful_app_updates_wordpress_port(student, stateful_app, ejercicio1):
    student.apply(".", cwd=STATEFUL)                  # (again: a no-op when the module ran in order)
    vip = student.svc("wordpress")["spec"]["clusterIP"]
    _wordpress_port_is(student, 8080, vip, "busybox")
    old_pods = set(wordpress_frontends(student))
    try:
        res = student.apply(".", cwd=KUBERNETES_II)
        assert "service/wordpress configured" in res.stdout, res.stdout
        assert "deployment/wordpress configured" in res.stdout, res.stdout
        assert "service/wordpress-mysql unchanged" in res.stdout, res.stdout
        _wordpress_port_is(student, 80, vip, "busybox")
        assert not set(wordpress_frontends(student)) & old_pods, "wordpress:4.8-apache replaced the pods"
    finally:
        # and back: the last apply wins (also leaves the module's shared objects as they were)
        res = student.apply(".", cwd=STATEFUL)
    assert "service/wordpress configured" in res.stdout, res.stdout
    _wordpress_port_is(student, 8080, vip, "busybox")
