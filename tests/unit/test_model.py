"""The manifest loader against the seed course manifests and kubectl's rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kproxy.model import (Deployment, EndpointSlice, Endpoints, ManifestError, Namespace,
                          NotEmulated, Pod, Service, load, loads)
from kproxy.model.objects import SERVICE_NAME_LABEL

from tests.conftest import SEED  # noqa: E402
needs_seed = pytest.mark.skipif(not SEED.is_dir(), reason="seed exercise not available")

# What every seed file loads as (kind + namespace/name), from the seed README's index.
# Files that fail under strict validation map to the field the error names.
SEED_FILES = {
    "Sesion4-Kubernetes/Stateful-app/local-storage.yaml": ["PersistentVolume local-pv-1", "PersistentVolume local-pv-2"],
    "Sesion4-Kubernetes/Stateful-app/mysql.yaml": ["Service default/wordpress-mysql", "PersistentVolumeClaim default/mysql-pv-claim", "Deployment default/wordpress-mysql"],
    "Sesion4-Kubernetes/Stateful-app/secret.yaml": ["Secret default/mysql-pass"],
    "Sesion4-Kubernetes/Stateful-app/wordpress.yaml": ["Service default/wordpress", "PersistentVolumeClaim default/wp-pv-claim", "Deployment default/wordpress"],
    "Sesion4-Kubernetes/service.yaml": ["Service curso/dashboard"],
    "Sesion4-Kubernetes/Ejercicios/Ejercicio1/1Despliege.yaml": ["Deployment default/store-products"],
    "Sesion4-Kubernetes/Ejercicios/Ejercicio1/1Service.yaml": ["Service default/store-products"],
    "Sesion4-Kubernetes/Ejercicios/Ejercicio1/busybox.yaml": ["Pod default/busybox"],
    "Sesion4-Kubernetes/Ejercicios/Ejercicio1/nginx.yaml": ["Pod default/nginx"],
    "Sesion4-Kubernetes/Ejercicios/example.yaml": ["Namespace curso", "Pod default/busybox-sleep", "Pod curso/busybox-sleep-less"],
    "Sesion4-Kubernetes/2Container-1Pod/Deployment.yaml": ["Pod default/two-containers"],
    "Sesion4-Kubernetes/Kubernetes II/Deployment-mysql.yaml": ["Deployment default/wordpress-mysql"],
    "Sesion4-Kubernetes/Kubernetes II/Deployment-wordpress.yaml": ["Deployment default/wordpress"],
    "Sesion4-Kubernetes/Kubernetes II/local-storage.yaml": ["PersistentVolume local-pv-1", "PersistentVolume local-pv-2"],
    "Sesion4-Kubernetes/Kubernetes II/mysql.yaml": ["Service default/wordpress-mysql", "PersistentVolumeClaim default/mysql-pv-claim"],
    "Sesion4-Kubernetes/Kubernetes II/secret.yaml": ["Secret default/mysql-pass"],
    "Sesion4-Kubernetes/Kubernetes II/wordpress.yaml": ["Service default/wordpress", "PersistentVolumeClaim default/wp-pv-claim"],
    "Sesion4-Kubernetes/Kubernetes II/ingress/app.yaml": ["Deployment default/docker-hello-world", "Service default/docker-hello-world-svc"],
    "Sesion4-Kubernetes/Kubernetes II/ingress/app2.yaml": ["Deployment default/hello-world-http", "Service default/hello-world-http-svc"],
    "Sesion4-Kubernetes/Kubernetes II/ingress/ingress.yaml": ["Ingress default/hello-world-ing"],
    "Sesion4-Kubernetes/Kubernetes II/rollingupdate/beebox-web.yaml": "spec.strategy.strategy",
    "Sesion4-Kubernetes/Kubernetes II/rollingupdate/test.yaml": "spec.template.spec.containers[0].ports[0].containerPort",
    "Sesion4-Kubernetes/test/apple.yaml": ["Pod default/apple-app", "Service default/apple-service"],
    "Sesion4-Kubernetes/test/banana.yaml": ["Pod default/banana-app", "Service default/banana-service"],
    "Sesion4-Kubernetes/test/ingress.yaml": ["Ingress default/example-ingress"],
    "UltimaSesion/NodePort/nodeport.yaml": "spec.nodePort",
    "Sesion15-Introducción a Helm/Ejercicio1/deployment.yaml": ["Deployment default/blog"],
    "Sesion15-Introducción a Helm/Ejercicio1/service.yaml": ["Service default/blog"],
    "Sesion3-Podman/webserver.yaml": ["Pod default/wordpress-pod2"],
    "Sesion6,7,8,9,10,11,12-OpenShift Avanzado/Aplicaciones/Stateful-app/local-storage.yaml": ["PersistentVolume local-pv-1", "PersistentVolume local-pv-2"],
    "Sesion6,7,8,9,10,11,12-OpenShift Avanzado/Aplicaciones/Stateful-app/mariadb.yaml": ["Service default/wordpress-mariadb", "PersistentVolumeClaim default/mariadb-pv-claim", "Deployment default/wordpress-mariadb"],
    "Sesion6,7,8,9,10,11,12-OpenShift Avanzado/Aplicaciones/Stateful-app/secret.yaml": ["Secret default/mariadb-pass"],
    "Sesion6,7,8,9,10,11,12-OpenShift Avanzado/Aplicaciones/Stateful-app/wordpress.yaml": ["Service default/wordpress", "PersistentVolumeClaim default/wp-pv-claim", "Deployment default/wordpress"],
    "Sesion6,7,8,9,10,11,12-OpenShift Avanzado/Deployments/deploymentk8s.yaml": ["Deployment curso/hello-openshift"],
}


def refs(objs):
    return [lo.ref() for lo in objs]


# --------------------------------------------------------------------------- the seed


@needs_seed
def test_every_seed_manifest_is_covered():
    assert sorted(str(p.relative_to(SEED)) for p in SEED.rglob("*.yaml")) == sorted(SEED_FILES)


@needs_seed
@pytest.mark.parametrize("rel", sorted(SEED_FILES))
def test_seed_manifest_strict(rel):
    expected = SEED_FILES[rel]
    path = SEED / rel
    if isinstance(expected, list):
        assert refs(load(str(path))) == expected
    else:
        with pytest.raises(ManifestError) as exc:
            load(str(path))
        err = exc.value
        assert err.field == expected and err.file == str(path)
        assert expected in str(err) and str(path) in str(err)


@needs_seed
def test_nodeport_yaml_strict_names_the_misplaced_field():
    path = SEED / "UltimaSesion/NodePort/nodeport.yaml"
    with pytest.raises(ManifestError) as exc:
        load(str(path))
    err = exc.value
    assert (err.doc_index, err.obj, err.field) == (1, "Service default/my-nginx", "spec.nodePort")
    assert 'unknown field "spec.nodePort"' in err.reason
    assert str(err) == (f'{path}: document 1: Service default/my-nginx: spec.nodePort: '
                        'strict decoding error: unknown field "spec.nodePort"')


@needs_seed
def test_nodeport_yaml_non_strict_drops_the_field_and_gets_a_random_nodeport():
    from kproxy.render import resolve_manifests

    objs = load(str(SEED / "UltimaSesion/NodePort/nodeport.yaml"), strict=False)
    assert refs(objs) == ["Deployment default/my-nginx", "Service default/my-nginx"]
    svc = objs[1].obj
    assert svc.type == "NodePort" and svc.ports[0].node_port == 0 and svc.ports[0].target_port == 80
    assert any('unknown field "spec.nodePort"' in w for w in objs[1].warnings)
    assert "nodePort" not in svc.raw["spec"]
    resolved = resolve_manifests(str(SEED / "UltimaSesion/NodePort/nodeport.yaml"), strict=False)
    (service,) = resolved.services
    assert 30000 <= service.ports[0].node_port <= 32767 and service.ports[0].node_port != 31234


@needs_seed
def test_test_yaml_template_fails_strict_or_not():
    path = SEED / "Sesion4-Kubernetes/Kubernetes II/rollingupdate/test.yaml"
    for strict in (True, False):
        with pytest.raises(ManifestError) as exc:
            load(str(path), strict=strict)
        err = exc.value
        assert err.obj == "Deployment default/myapp" and err.doc_index == 0
        assert err.field == "spec.template.spec.containers[0].ports[0].containerPort"
        assert '"<Port>"' in err.reason and "placeholder" in err.reason


@needs_seed
def test_beebox_web_strict_and_not():
    path = SEED / "Sesion4-Kubernetes/Kubernetes II/rollingupdate/beebox-web.yaml"
    with pytest.raises(ManifestError) as exc:
        load(str(path))
    assert exc.value.field == "spec.strategy.strategy" and exc.value.obj == "Deployment default/fake-service"
    objs = load(str(path), strict=False)
    dep, svc = objs[0].obj, objs[1].obj
    assert isinstance(dep, Deployment) and dep.replicas == 4
    assert dep.strategy.type == "RollingUpdate"
    assert (dep.strategy.rolling_update.max_surge, dep.strategy.rolling_update.max_unavailable) == ("25%", "25%")
    assert dep.template.spec.containers[0].ports[0].name == "fake-service"
    assert isinstance(svc, Service) and svc.ports[0].target_port == 9090


@needs_seed
def test_stateful_app_directory_in_kubectl_order():
    objs = load(str(SEED / "Sesion4-Kubernetes/Stateful-app"))
    assert refs(objs) == [
        "PersistentVolume local-pv-1", "PersistentVolume local-pv-2",
        "Service default/wordpress-mysql", "PersistentVolumeClaim default/mysql-pv-claim",
        "Deployment default/wordpress-mysql", "Secret default/mysql-pass",
        "Service default/wordpress", "PersistentVolumeClaim default/wp-pv-claim", "Deployment default/wordpress"]
    assert [lo.emulated for lo in objs] == [False, False, True, False, True, False, True, False, True]
    assert all(lo.warnings and "not emulated" in lo.warnings[0] for lo in objs if not lo.emulated)
    assert objs[0].namespace is None and objs[3].namespace == "default"
    mysql_svc, mysql_dep, wp_svc, wp_dep = objs[2].obj, objs[4].obj, objs[6].obj, objs[8].obj
    assert mysql_svc.headless and mysql_svc.ports[0].port == 3306 and mysql_svc.ports[0].target_port == 3306
    assert mysql_svc.selector == {"app": "wordpress", "tier": "mysql"}
    assert mysql_dep.replicas == 1 and mysql_dep.strategy.type == "Recreate" and mysql_dep.strategy.rolling_update is None
    container = mysql_dep.template.spec.containers[0]
    assert (container.name, container.image) == ("mysql", "mysql:5.6")
    assert container.ports[0].name == "mysql" and container.ports[0].protocol == "TCP"
    assert container.liveness_probe == {"tcpSocket": {"port": 3306}} and container.readiness_probe is None
    assert container.env[1 - 1]["name"] == "MYSQL_ROOT_PASSWORD"
    assert wp_svc.type == "LoadBalancer" and wp_svc.cluster_ip == ""
    port = wp_svc.ports[0]
    assert (port.name, port.protocol, port.port, port.target_port, port.node_port) == ("", "TCP", 8080, 80, 0)
    assert wp_svc.external_traffic_policy == "Cluster" and wp_svc.internal_traffic_policy == "Cluster"
    assert wp_svc.session_affinity == "None" and wp_svc.session_affinity_timeout == 10800
    assert wp_dep.replicas == 4 and wp_dep.strategy.rolling_update.max_surge == "50%"
    assert wp_dep.match_labels == {"app": "wordpress", "tier": "frontend"}
    assert objs[5].obj.raw["data"]["password"] == "MWYyZDFlMmU2N2Rm"


@needs_seed
def test_pod_fields_from_the_seed():
    (two,) = [lo.obj for lo in load(str(SEED / "Sesion4-Kubernetes/2Container-1Pod/Deployment.yaml"))]
    assert isinstance(two, Pod) and two.restart_policy == "Never"
    assert [c.name for c in two.containers] == ["nginx-container", "debian-container"]
    assert two.containers[1].command == ["/bin/sh"]
    assert two.containers[1].args == ["-c", "echo Hello from the debian container > /pod-data/index.html"]
    (podman,) = [lo.obj for lo in load(str(SEED / "Sesion3-Podman/webserver.yaml"))]
    assert podman.labels == {"app": "wordpress-pod"} and podman.restart_policy == "Always"
    assert podman.containers[0].ports[0].host_port == 8080 and podman.containers[0].args == ["mariadbd"]
    objs = load(str(SEED / "Sesion4-Kubernetes/Ejercicios/example.yaml"))
    assert isinstance(objs[0].obj, Namespace) and objs[0].obj.metadata.labels == {"name": "curso"}
    assert objs[2].obj.namespace == "curso" and objs[2].obj.containers[0].args == ["sleep", "10"]


@needs_seed
def test_whole_seed_tree_fails_as_one_load_with_every_error():
    with pytest.raises(ManifestError) as exc:
        load([str(SEED / rel) for rel in sorted(SEED_FILES)])
    fields = sorted(e.field for e in exc.value.errors)
    assert fields == ["spec.nodePort", "spec.strategy.strategy",
                      "spec.template.spec.containers[0].ports[0].containerPort"]
    assert "2 more error(s)" in str(exc.value)


# --------------------------------------------------------------------------- loader mechanics


SVC = """apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec: {{ports: [{{port: 80}}], selector: {{app: {name}}}}}
"""


def test_directory_order_extensions_and_no_recursion(tmp_path):
    (tmp_path / "b.yaml").write_text(SVC.format(name="b"))
    (tmp_path / "a.yml").write_text(SVC.format(name="a"))
    (tmp_path / "c.json").write_text(json.dumps({"apiVersion": "v1", "kind": "Service",
                                                 "metadata": {"name": "c"}, "spec": {"ports": [{"port": 80}]}}))
    (tmp_path / "d.txt").write_text(SVC.format(name="d"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.yaml").write_text(SVC.format(name="e"))
    assert [lo.name for lo in load(str(tmp_path))] == ["a", "b", "c"]
    # an explicitly named file is read whatever its extension
    assert [lo.name for lo in load([str(tmp_path / "d.txt"), str(tmp_path / "a.yml")])] == ["d", "a"]


def test_stdin_and_multi_document_with_empty_documents():
    text = "---\n# only a comment\n---\n" + SVC.format(name="one") + "---\n\n---\n" + SVC.format(name="two")
    objs = load("-", stdin=io.StringIO(text))
    assert [(lo.source, lo.doc_index, lo.name) for lo in objs] == [("-", 1, "one"), ("-", 3, "two")]


def test_kind_list_is_expanded():
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "y"}, "spec": {"ports": [{"port": 70000}]}},
    ]})
    with pytest.raises(ManifestError) as exc:
        loads(text, source="list.json")
    assert (exc.value.file, exc.value.doc_index, exc.value.item_index, exc.value.field) == (
        "list.json", 0, 2, "spec.ports[0].port")
    assert "document 0 item 2" in str(exc.value)
    objs = loads(text.replace("70000", "80"))
    assert [lo.ref() for lo in objs] == ["Service default/x", "ConfigMap default/cm", "Service default/y"]
    assert [lo.item_index for lo in objs] == [0, 1, 2]


def test_unknown_kinds_are_reported_not_failing():
    objs = loads("""
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec: {whatever: [1, 2, 3]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: ing, namespace: web}
spec: {rules: []}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: pv1}
spec: {capacity: {storage: {2: "<Size>"}}}
""")
    assert [type(lo.obj) for lo in objs] == [NotEmulated] * 3
    assert [lo.ref() for lo in objs] == ["StatefulSet default/db", "Ingress web/ing", "PersistentVolume pv1"]
    assert all("not emulated" in lo.warnings[0] for lo in objs)


def test_missing_paths_kind_and_unserved_versions():
    with pytest.raises(ManifestError, match="does not exist"):
        load("/nonexistent/manifest.yaml")
    with pytest.raises(ManifestError, match=r"kind not set"):
        loads("apiVersion: v1\nmetadata: {name: x}\n")
    with pytest.raises(ManifestError, match=r'no matches for kind "Deployment" in version "extensions/v1beta1"'):
        loads("apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(ManifestError, match="must be a map"):
        loads("just a string\n")


def test_yaml_syntax_error_names_file_and_document():
    with pytest.raises(ManifestError) as exc:
        loads(SVC.format(name="ok") + "---\nkind: Service\n  bad: [indent\n", source="broken.yaml")
    assert exc.value.file == "broken.yaml" and exc.value.doc_index == 1
    assert "invalid YAML" in exc.value.reason


def test_load_is_all_or_nothing(tmp_path):
    (tmp_path / "a.yaml").write_text(SVC.format(name="good"))
    (tmp_path / "b.yaml").write_text(SVC.format(name="Bad_Name") + "---\n" + SVC.format(name="x").replace("80", "0"))
    with pytest.raises(ManifestError) as exc:
        load(str(tmp_path))
    assert [(Path(e.file).name, e.doc_index, e.field) for e in exc.value.errors] == [
        ("b.yaml", 0, "metadata.name"), ("b.yaml", 1, "spec.ports[0].port"),
        ("b.yaml", 1, "spec.ports[0].targetPort")]      # defaulted from port, as the API does


# --------------------------------------------------------------------------- validation


def _error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as exc:
        loads(text, source="t.yaml")
    return exc.value


def _service(spec: str, name: str = "svc", meta: str = "") -> str:
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}{meta}}}\nspec: {spec}\n"


@pytest.mark.parametrize("spec,field,reason", [
    ("{ports: [{port: 70000}]}", "spec.ports[0].port", "Invalid value: 70000: must be between 1 and 65535, inclusive"),
    ("{ports: [{port: 0}]}", "spec.ports[0].port", "must be between 1 and 65535"),
    ("{ports: [{port: 80, targetPort: 65536}]}", "spec.ports[0].targetPort", "must be between 1 and 65535"),
    ("{ports: [{port: 80, targetPort: Http}]}", "spec.ports[0].targetPort", "alpha-numeric"),
    ("{ports: [{port: 80, targetPort: a-very-long-port-name}]}", "spec.ports[0].targetPort", "no more than 15"),
    ("{ports: [{port: 80, targetPort: '8080'}]}", "spec.ports[0].targetPort", "at least one letter"),
    ("{ports: [{port: 80, targetPort: web--x}]}", "spec.ports[0].targetPort", "consecutive hyphens"),
    ("{ports: [{port: 80, protocol: ICMP}]}", "spec.ports[0].protocol", 'Unsupported value: "ICMP"'),
    ("{ports: [{port: 80, protocol: tcp}]}", "spec.ports[0].protocol", 'Unsupported value: "tcp"'),
    ("{ports: [{name: a, port: 80}, {port: 81}]}", "spec.ports[1].name", "Required value"),
    ("{ports: [{name: a, port: 80}, {name: b, port: 80}]}", "spec.ports[1]", "Duplicate value"),
    ("{ports: [{name: a, port: 80}, {name: a, port: 81}]}", "spec.ports[1].name", "Duplicate value"),
    ("{ports: [{name: Web, port: 80}]}", "spec.ports[0].name", "RFC 1123 label"),
    ("{clusterIP: 10.96.0.300, ports: [{port: 80}]}", "spec.clusterIP", "must be a valid IP address"),
    ("{type: NodePort, clusterIP: None, ports: [{port: 80}]}", "spec.clusterIP", "None"),
    ("{type: Balancer, ports: [{port: 80}]}", "spec.type", 'Unsupported value: "Balancer"'),
    ("{ports: [{port: 80, nodePort: 30080}]}", "spec.ports[0].nodePort", "may not be used when `type` is 'ClusterIP'"),
    ("{selector: {app: 1}, ports: [{port: 80}]}", "spec.selector.app", "expected a string, got a number"),
    ("{selector: [app], ports: [{port: 80}]}", "spec.selector", "expected a map"),
    ("{ports: [{port: '80'}]}", "spec.ports[0].port", 'Invalid value: "80": expected an integer'),
    ("{ports: {port: 80}}", "spec.ports", "expected a list"),
    ("{}", "spec.ports", "Required value"),
    ("{ports: [{port: 80}], sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "greater than 0"),
    ("{ports: [{port: 80}], externalTrafficPolicy: Nearby}", "spec.externalTrafficPolicy", "Unsupported value"),
    ("{ports: [{port: 80}], externalIPs: [not-an-ip]}", "spec.externalIPs[0]", "valid IP"),
    ("{type: LoadBalancer, ports: [{port: 80}], loadBalancerSourceRanges: [10.0.0.0/33]}",
     "spec.loadBalancerSourceRanges[0]", "IP ranges"),
    ("{type: ExternalName}", "spec.externalName", "Required value"),
    ("{ports: [{port: 80, hostPort: 80}]}", "spec.ports[0].hostPort", "unknown field"),
])
def test_service_validation(spec, field, reason):
    err = _error(_service(spec))
    assert err.field == field, str(err)
    assert reason in err.reason
    assert err.obj == "Service default/svc" and err.file == "t.yaml" and err.doc_index == 0


@pytest.mark.parametrize("name,ok", [
    ("my-svc", True), ("a", True), ("My-Svc", False), ("my_svc", False), ("1svc", False),
    ("my.svc", False), ("-svc", False), ("x" * 63, True), ("x" * 64, False),
])
def test_service_names_are_dns_labels(name, ok):
    text = _service("{ports: [{port: 80}]}", name=f'"{name}"')
    if ok:
        assert loads(text)[0].name == name
    else:
        assert _error(text).field == "metadata.name"


def test_namespace_and_pod_and_deployment_names():
    assert _error(_service("{ports: [{port: 80}]}", meta=", namespace: Bad_NS")).field == "metadata.namespace"
    assert _error("apiVersion: v1\nkind: Namespace\nmetadata: {name: my.ns}\n").field == "metadata.name"
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: NAME}\nspec: {containers: [{name: c, image: busybox}]}\n"
    assert loads(pod.replace("NAME", "web.v1-0"))[0].name == "web.v1-0"      # subdomains allow dots
    assert _error(pod.replace("NAME", "Web")).field == "metadata.name"
    assert _error("apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {ports: [{port: 80}]}\n").field == "metadata.name"


DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx, ports: [{containerPort: 80, name: http}]}]
"""


def test_deployment_defaults():
    (lo,) = loads(DEPLOYMENT)
    dep = lo.obj
    assert dep.replicas == 1 and dep.strategy.type == "RollingUpdate"
    assert (dep.strategy.rolling_update.max_surge, dep.strategy.rolling_update.max_unavailable) == ("25%", "25%")
    assert dep.template.spec.restart_policy == "Always"
    assert dep.template.spec.containers[0].ports[0].protocol == "TCP"


@pytest.mark.parametrize("change,field,reason", [
    (("matchLabels: {app: web}", "matchLabels: {app: other}"), "spec.template.metadata.labels", "does not match"),
    (("containerPort: 80", "containerPort: 0"), "spec.template.spec.containers[0].ports[0].containerPort", "between 1 and 65535"),
    (("name: http", "name: HTTP"), "spec.template.spec.containers[0].ports[0].name", "alpha-numeric"),
    (("image: nginx, ", ""), "spec.template.spec.containers[0].image", "Required value"),
    (("  selector:", "  replicas: -1\n  selector:"), "spec.replicas", "greater than or equal to 0"),
    (("  selector:", "  strategy: {type: Recreate, rollingUpdate: {maxSurge: 1}}\n  selector:"),
     "spec.strategy.rollingUpdate", "Recreate"),
    (("  selector:", "  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0}}\n  selector:"),
     "spec.strategy.rollingUpdate.maxUnavailable", "may not be 0"),
    (("  selector:", "  strategy: {rollingUpdate: {maxSurge: 10x}}\n  selector:"),
     "spec.strategy.rollingUpdate.maxSurge", "percent"),
    (("  selector:", "  strategy: {type: BlueGreen}\n  selector:"), "spec.strategy.type", "Unsupported value"),
    (("      containers:", "      restartPolicy: Never\n      containers:"), "spec.template.spec.restartPolicy",
     'supported values: "Always"'),
    (("image: nginx, ", "image: nginx, imagePullPolicy: Always, colour: blue, "),
     "spec.template.spec.containers[0].colour", "unknown field"),
])
def test_deployment_validation(change, field, reason):
    err = _error(DEPLOYMENT.replace(*change))
    assert err.field == field, str(err)
    assert reason in err.reason


def test_non_strict_drops_nested_unknown_fields_with_warnings():
    text = DEPLOYMENT.replace("image: nginx, ", "image: nginx, colour: blue, ").replace(
        "  selector:", "  sidecar: yes\n  selector:")
    assert len(_error(text).errors) == 2
    (lo,) = loads(text, strict=False)
    assert len(lo.warnings) == 2 and "colour" not in lo.obj.raw["spec"]["template"]["spec"]["containers"][0]
    assert "sidecar" not in lo.obj.raw["spec"]


def test_pod_parsing_and_validation():
    (lo,) = loads("""
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ns, labels: {app: a}}
spec:
  nodeName: node-2
  restartPolicy: OnFailure
  containers:
  - name: c
    image: busybox
    command: [sleep]
    args: ["3600"]
    ports: [{containerPort: 53, protocol: UDP, name: dns}]
    readinessProbe: {httpGet: {path: /, port: 8080}}
status: {podIP: 10.244.1.5, phase: Running, conditions: [{type: Ready, status: "False"}]}
""")
    pod = lo.obj
    assert (pod.namespace, pod.node_name, pod.restart_policy, pod.pod_ip) == ("ns", "node-2", "OnFailure", "10.244.1.5")
    assert pod.containers[0].ports[0].protocol == "UDP" and pod.containers[0].readiness_probe["httpGet"]["port"] == 8080
    assert pod.status.condition("Ready") is False
    err = _error("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i, args: [sleep, 3600]}]}\n")
    assert err.field == "spec.containers[0].args[1]" and "expected a string" in err.reason
    err = _error("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
    assert err.field == "spec.containers" and "Required" in err.reason


def test_service_status_clusterips_and_defaults():
    (lo,) = loads("""
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.5.5]
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP}]
  sessionAffinity: ClientIP
status: {loadBalancer: {ingress: [{ip: 192.168.5.200, ipMode: VIP}]}}
""")
    svc = lo.obj
    assert svc.cluster_ip == "10.96.5.5" and svc.external_traffic_policy == "Local"
    assert [p.target_port for p in svc.ports] == ["http", 53] and svc.ports[1].protocol == "UDP"
    assert svc.session_affinity_timeout == 10800
    assert svc.load_balancer_ingress[0].ip == "192.168.5.200" and svc.load_balancer_ingress[0].ip_mode == "VIP"


def test_endpoint_slices_and_endpoints():
    objs = loads("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  hints: {forZones: [{name: z1}]}
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: legacy}
subsets:
- addresses: [{ip: 10.0.0.2, nodeName: n1}]
  notReadyAddresses: [{ip: 10.0.0.3}]
  ports: [{name: web, port: 80}]
""")
    es, eps = objs[0].obj, objs[1].obj
    assert isinstance(es, EndpointSlice) and es.service_name == "s" and es.ports[0].protocol == "TCP"
    ep = es.endpoints[0]
    assert (ep.conditions.ready, ep.conditions.serving, ep.conditions.terminating) == (False, True, True)
    assert ep.node_name == "n1" and ep.hints_for_zones == ["z1"]
    assert isinstance(eps, Endpoints)
    (converted,) = eps.to_endpoint_slices()
    assert converted.metadata.labels[SERVICE_NAME_LABEL] == "legacy" and converted.namespace == "default"
    assert [(e.addresses, e.conditions.ready, e.node_name) for e in converted.endpoints] == [
        (["10.0.0.2"], True, "n1"), (["10.0.0.3"], False, None)]
    assert [(p.name, p.port) for p in converted.ports] == [("web", 80)]
    err = _error("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\n"
                 "addressType: IPv4\nendpoints: [{addresses: [fd00::1]}]\n")
    assert err.field == "endpoints[0].addresses[0]" and "IPv4" in err.reason


def test_slice_without_service_label_warns():
    (lo,) = loads("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\n")
    assert "kube-proxy ignores" in lo.warnings[0]
