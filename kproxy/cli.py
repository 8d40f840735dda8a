"""The kproxy command line: a few lines per command over the library.

Verbs follow kubectl where a kubectl user would look for them (get, exec, apply,
delete, describe); cluster lifecycle verbs (up, down, clean, verify) are kproxy's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

import click

from kproxy import state
from kproxy.config import ClusterConfig, DEFAULT_CLUSTER, NETWORK_MODES, nodes_from_count
from kproxy.errors import KproxyError


NS_DEFAULT_HELP = "$KPROXY_NAMESPACE or default"


def _default_namespace() -> str:
    """The namespace commands act in without -n, as a kubectl context's namespace."""
    return os.environ.get("KPROXY_NAMESPACE") or "default"


def _cluster_name(ctx: click.Context) -> str:
    return ctx.obj["cluster"]


def _open(ctx: click.Context):
    from kproxy.cluster import Cluster, require_root
    require_root()
    return Cluster.open(_cluster_name(ctx))


class KproxyGroup(click.Group):
    """Turns kproxy's own errors into one clear line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KproxyError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=KproxyGroup)
@click.option("--cluster", "-c", default=lambda: os.environ.get("KPROXY_CLUSTER", DEFAULT_CLUSTER),
              show_default="$KPROXY_CLUSTER or kproxy", help="Which emulated cluster to act on.")
@click.version_option(package_name="kproxy")
@click.pass_context
def main(ctx: click.Context, cluster: str) -> None:
    """Emulate a Kubernetes cluster's service network in network namespaces on this machine.

    \b
    Quick tour:
      kproxy up --nodes 2            # nodes, underlay, external client
      kproxy run web --node node2    # a pod
      kproxy get pods -o wide
      kproxy exec web -- ip addr
      kproxy down                    # removes it all and verifies the machine is as before
    """
    ctx.ensure_object(dict)
    ctx.obj["cluster"] = cluster


# ---- lifecycle ---------------------------------------------------------------------------

@main.command()
@click.option("--nodes", "node_count", type=int, default=None, help="Number of nodes (node1..nodeN). [default: 2]")
@click.option("--node", "node_names", multiple=True, help="A node name (repeat for several); instead of --nodes.")
@click.option("--network", "network_mode", type=click.Choice(NETWORK_MODES), default="host-gw", show_default=True,
              help="How pods on different nodes reach each other.")
@click.option("--pod-cidr", default="10.244.0.0/16", show_default=True)
@click.option("--node-subnet-prefix", type=int, default=24, show_default=True, help="Size of each node's pod subnet.")
@click.option("--service-cidr", default="10.96.0.0/12", show_default=True)
@click.option("--node-cidr", default="192.168.5.0/24", show_default=True, help="The nodes' (underlay) network.")
@click.option("--first-pod-host", type=int, default=2, show_default=True,
              help="Pods get addresses from host .N of their node's subnet up.")
@click.option("--backend", type=click.Choice(["iptables", "nftables", "ipvs"]), default="iptables", show_default=True)
@click.option("--iptables", "iptables_flavour", type=click.Choice(["nft", "legacy"]), default="nft", show_default=True,
              help="iptables-nft (trace shows every rule) or iptables-legacy (faster at thousands of Services).")
@click.pass_context
def up(ctx, node_count, node_names, network_mode, pod_cidr, node_subnet_prefix, service_cidr, node_cidr,
       first_pod_host, backend, iptables_flavour):
    """Create the cluster: node namespaces, their bridges and routes, the external client.

    Example: kproxy up --nodes 3 --network vxlan
    """
    from kproxy.cluster import Cluster, require_root
    require_root()
    if node_names and node_count is not None:
        raise click.UsageError("give --nodes or --node, not both")
    nodes = list(node_names) if node_names else nodes_from_count(2 if node_count is None else node_count)
    config = ClusterConfig(name=_cluster_name(ctx), nodes=nodes, network_mode=network_mode, pod_cidr=pod_cidr,
                           node_subnet_prefix=node_subnet_prefix, service_cidr=service_cidr,
                           node_cidr=node_cidr, first_pod_host=first_pod_host, backend=backend,
                           iptables_flavour=iptables_flavour)
    cluster = Cluster.create(config)
    click.echo(f"cluster {cluster.name} is up: {len(cluster.nodes)} nodes, {network_mode} networking")
    _print_nodes(cluster, wide=True)


@main.command()
@click.pass_context
def down(ctx):
    """Delete the cluster and verify the machine is as it was before `up`."""
    from kproxy.clean import clean_cluster
    from kproxy.cluster import require_root
    require_root()
    name = _cluster_name(ctx)
    if not os.path.isdir(state.cluster_dir(name)):
        raise KproxyError(f"cluster {name!r} does not exist")
    _no_daemon(name)
    report = clean_cluster(name)
    click.echo(report.summary())
    sys.exit(0 if report.ok else 1)


def _no_daemon(name: str) -> None:
    """A running daemon would make again what a cleanup removes: stop it first."""
    from kproxy.daemon import holder
    who = holder(state.cluster_dir(name))
    if who:
        raise KproxyError(f"cluster {name!r} is managed by a running reconciler ({who}): "
                          "stop it first (Ctrl-C, or `systemctl stop kproxy`)")


@main.command()
@click.option("--all", "all_clusters", is_flag=True, help="Every cluster kproxy has a record of.")
@click.pass_context
def clean(ctx, all_clusters):
    """Remove what a cluster made, from kproxy's records: also after a crash or a half-finished `up`."""
    from kproxy.clean import clean_cluster
    from kproxy.cluster import require_root
    require_root()
    names = state.known_clusters() if all_clusters else [_cluster_name(ctx)]
    ok = True
    for name in names:
        _no_daemon(name)
        report = clean_cluster(name)
        click.echo(report.summary())
        ok = ok and report.ok
    if not names:
        click.echo("nothing to clean")
    sys.exit(0 if ok else 1)


@main.command()
@click.pass_context
def verify(ctx):
    """Compare the machine's own namespace with the snapshot taken before `up`."""
    from kproxy.clean import verify as do_verify
    problems = do_verify(_cluster_name(ctx))
    if problems:
        click.echo("differences:\n" + "\n".join(f"  - {p}" for p in problems))
        sys.exit(1)
    click.echo("the machine's own namespace is as it was before `up`")


# ---- get -----------------------------------------------------------------------------------

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _print_nodes(cluster, wide: bool = False, output: Optional[str] = None, names=()) -> None:
    nodes = [n for n in cluster.nodes if not names or n.name in names]
    if output == "json":
        items = [{
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name},
            "spec": {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": n.ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
            "kproxy": {"netns": n.netns},
        } for n in nodes]
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        return
    head = ["NAME", "STATUS", "INTERNAL-IP", "POD-CIDR"]
    if wide:
        head += ["NETNS", "NETWORK"]
    rows = [head]
    for n in nodes:
        row = [n.name, "Ready", n.ip, n.pod_cidr]
        if wide:
            row += [n.netns, cluster.config.network_mode]
        rows.append(row)
    click.echo(_table(rows))


def _pod_row(p) -> dict:
    st = p.status
    return {"name": p.name, "namespace": p.namespace, "ip": p.ip, "node": p.node,
            "ready": st.get("ready_count", "0/0"), "status": st.get("reason", "Running"),
            "restarts": st.get("restarts", 0), "netns": p.netns}


def _rfc3339(t: float) -> str:
    import time as _time
    return _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(t))


def _print_pods(cluster, namespace: Optional[str], wide: bool, output: Optional[str], names=()) -> None:
    pods = [p for p in cluster.pods.values()
            if (namespace is None or p.namespace == namespace) and (not names or p.name in names)]
    pods.sort(key=lambda p: (p.namespace, p.name))
    if output == "json":
        items = [{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels,
                         **({"deletionTimestamp": _rfc3339(p.status["deleting_at"])}
                            if p.status.get("deleting_at") else {})},
            "spec": {"nodeName": p.node},
            "status": {"phase": p.status.get("phase", "Running"), "podIP": p.ip, "podIPs": [{"ip": p.ip}],
                       "conditions": [{"type": "Ready", "status": str(bool(p.status.get("ready", True)))}]},
            "kproxy": {"netns": p.netns, "containerID": p.container_id},
        } for p in pods]
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        return
    if not pods:
        where = "any namespace" if namespace is None else f"{namespace} namespace"
        click.echo(f"No resources found in {where}.")
        return
    head = (["NAMESPACE"] if namespace is None else []) + ["NAME", "READY", "STATUS", "RESTARTS"]
    if wide:
        head += ["IP", "NODE", "NETNS"]
    rows = [head]
    for p in pods:
        r = _pod_row(p)
        row = ([p.namespace] if namespace is None else []) + [r["name"], r["ready"], r["status"], str(r["restarts"])]
        if wide:
            row += [r["ip"], r["node"], r["netns"]]
        rows.append(row)
    click.echo(_table(rows))


KINDS = {
    "nodes": "nodes", "node": "nodes", "no": "nodes",
    "pods": "pods", "pod": "pods", "po": "pods",
    "services": "services", "service": "services", "svc": "services",
    "endpointslices": "endpointslices", "endpointslice": "endpointslices",
    "deployments": "deployments", "deployment": "deployments", "deploy": "deployments",
}


@main.command()
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.argument("names", nargs=-1)
@click.option("-o", "--output", type=click.Choice(["wide", "json", "yaml"]), default=None)
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.option("-A", "--all-namespaces", is_flag=True)
@click.pass_context
def get(ctx, kind, names, output, namespace, all_namespaces):
    """List nodes, pods, deployments, services or endpointslices, as kubectl would
    (-o wide|json|yaml); NAMES narrow the list.

    Example: kproxy get svc -A -o wide; kproxy get svc wordpress
    """
    from kproxy import views
    cluster = _open(ctx)
    kind = KINDS[kind]
    wide = output == "wide"
    ns = None if all_namespaces else namespace
    if names:
        _check_names(cluster, kind, ns, names)
    if kind == "nodes":
        _print_nodes(cluster, wide=wide, output=output, names=names)
        return
    if kind == "pods":
        _print_pods(cluster, ns, wide, "json" if output == "yaml" else output, names=names)
        return
    if kind == "deployments":
        _print_deployments(cluster, ns, output, names=names)
        return
    services, slices = _view(cluster)
    items = services if kind == "services" else slices
    items = [x for x in items if (ns is None or x.namespace == ns) and (not names or x.name in names)]
    if output in ("json", "yaml"):
        click.echo(views.as_list(items, output))
    elif kind == "services":
        click.echo(views.services_table(items, wide=wide, all_namespaces=ns is None, namespace=namespace))
    else:
        click.echo(views.endpointslices_table(items, all_namespaces=ns is None, namespace=namespace))


def _check_names(cluster, kind: str, namespace: Optional[str], names) -> None:
    """kubectl's NotFound for a name that is not there."""
    if kind == "nodes":
        have = {n.name for n in cluster.nodes}
    elif kind == "pods":
        have = {p.name for p in cluster.pods.values() if namespace is None or p.namespace == namespace}
    elif kind == "deployments":
        store = _store(cluster)
        try:
            have = {d.name for d in store.objects().get("Deployment", [])
                    if namespace is None or d.namespace == namespace}
        finally:
            store.close()
    else:
        services, slices = _view(cluster)
        have = {x.name for x in (services if kind == "services" else slices)
                if namespace is None or x.namespace == namespace}
    for name in names:
        if name not in have:
            resource = {"deployments": "deployments.apps", "endpointslices": "endpointslices.discovery.k8s.io"}.get(kind, kind)
            raise KproxyError(f'(NotFound) {resource} "{name}" not found')


def _print_deployments(cluster, namespace: Optional[str], output: Optional[str], names=()) -> None:
    import time as _time
    from kproxy import deployments
    from kproxy.reconciler import pod_view
    store = _store(cluster)
    try:
        deps = [d for d in store.objects().get("Deployment", [])
                if (namespace is None or d.namespace == namespace) and (not names or d.name in names)]
    finally:
        store.close()
    if not deps:
        where = "any namespace" if namespace is None else f"{namespace} namespace"
        click.echo(f"No resources found in {where}.")
        return
    rows, items = [], []
    for dep in sorted(deps, key=lambda d: (d.namespace, d.name)):
        key = f"{dep.namespace}/{dep.name}"
        views = [pod_view(p) for p in cluster.pods.values() if p.status.get("owner") == key]
        st = deployments.status(dep, views, _time.time())
        row = deployments.get_row(dep, st)
        rows.append(([dep.namespace] if namespace is None else []) + [str(v) for v in row.values()])
        items.append({"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": {"name": dep.name, "namespace": dep.namespace},
                      "spec": {"replicas": dep.replicas},
                      "status": {"replicas": st.replicas, "updatedReplicas": st.updated_replicas,
                                 "readyReplicas": st.ready_replicas, "availableReplicas": st.available_replicas}})
    if output in ("json", "yaml"):
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        return
    head = (["NAMESPACE"] if namespace is None else []) + [k.upper() for k in row]
    click.echo(_table([head] + rows))


def _view(cluster):
    from kproxy.reconciler import current_view, open_store
    store = open_store(cluster)
    try:
        return current_view(cluster, store)
    finally:
        store.close()


@main.command()
@click.argument("kind", type=click.Choice(["svc", "service", "services"]))
@click.argument("name")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.pass_context
def describe(ctx, kind, name, namespace):
    """Show a Service as `kubectl describe svc` does, with its endpoints.

    Example: kproxy describe svc wordpress
    """
    from kproxy import views
    services, slices = _view(_open(ctx))
    svc = next((s for s in services if s.name == name and s.namespace == namespace), None)
    if svc is None:
        raise KproxyError(f'services "{name}" not found in namespace {namespace}')
    mine = [s for s in slices if s.namespace == namespace and s.service_name == name]
    click.echo(views.describe_service(svc, mine, max_endpoints=None))


# ---- pods ----------------------------------------------------------------------------------

def _parse_labels(values) -> dict:
    labels = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"label {v!r} is not KEY=VALUE", param_hint="--labels")
        k, _, val = v.partition("=")
        labels[k] = val
    return labels


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--node", default=None, help="The node to put the pod on (default: the least loaded).")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.option("-l", "--labels", multiple=True, help="KEY=VALUE (repeat).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, name, node, namespace, labels, command):
    """Create a pod, and optionally start a command in it (after --).

    Example: kproxy run web --node node2 -- python3 -m http.server 80
    """
    cluster = _open(ctx)
    pod = cluster.add_pod(name, namespace=namespace, node=node, labels=_parse_labels(labels))
    click.echo(f"pod/{pod.name} created on {pod.node} with IP {pod.ip} (netns {pod.netns})")
    if command:
        proc = cluster.start_process(pod, list(command), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        click.echo(f"started {' '.join(command)!r} as PID {proc.pid}")


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.option("-c", "--container", default=None, help="The container whose image decides the command (default: the first).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx, pod, namespace, container, command):
    """Run a command in a pod's network namespace; its exit code is passed through.

    In a pod made from a manifest the command is looked up as the container's image
    would have it: in a busybox pod `nslookup` and `wget` are busybox's applets, and a
    command the image lacks (curl in busybox) fails as kubectl exec would.  POD may
    also be `node/NAME` (a node's namespace) or `external` (the outside client).

    Example: kproxy exec busybox -- nslookup store-products
    """
    cluster = _open(ctx)
    argv = list(command)
    if pod == "external":
        res = cluster.exec_in(cluster.external_ns, argv)
    elif pod.startswith("node/"):
        res = cluster.exec_in(cluster.node(pod.split("/", 1)[1]).netns, argv)
    else:
        p = cluster.pod(pod, namespace)
        containers = (p.status.get("spec") or {}).get("spec", {}).get("containers", [])
        if container is not None:
            containers = [c for c in containers if c.get("name") == container]
            if not containers:
                raise KproxyError(f"container {container} is not valid for pod {pod}")
        if containers:
            from kproxy.workload.images import exec_argv
            resolved = exec_argv(containers[0].get("image", ""), argv)
            if resolved is None:
                click.echo(f'error: exec: "{argv[0]}": executable file not found in $PATH '
                           f'(image {containers[0].get("image", "")})', err=True)
                sys.exit(126)
            argv = resolved
        res = cluster.exec(p, argv)
    sys.exit(res.returncode)


def _load_manifests(files, validate: bool, namespace: Optional[str] = None):
    from kproxy.model import load
    return load(list(files), strict=validate, stdin=sys.stdin if "-" in files else None,
                default_namespace=namespace or _default_namespace())


def _store(cluster):
    from kproxy.reconciler import open_store
    return open_store(cluster)


def _converge(ctx, cluster, store, wait: bool, timeout: float, mark_deleting=()):
    """Put the store in effect: by converging here when no daemon runs (holding the
    reconciler lock), or, when a daemon runs, by leaving it to the daemon and, with
    --wait, waiting until it reports the store's revision in effect."""
    from kproxy.cluster import Cluster
    from kproxy.daemon import daemon_running, reconciler_lock, wait_settled
    if daemon_running(cluster.dir):
        revision, _ = store.revision()
        if wait:
            wait_settled(store, revision, timeout)
        else:
            click.echo("a daemon manages this cluster: it puts the change in effect "
                       "(--wait waits for it)", err=True)
        return None
    from kproxy.reconciler import Reconciler
    with reconciler_lock(cluster.dir, role="cli", blocking=True):
        cluster = Cluster.open(cluster.name)       # as it is now, under the lock
        rec = Reconciler(cluster, store)
        try:
            if mark_deleting:
                rec.mark_deleting(list(mark_deleting))
            report = rec.converge_once(timeout)
        finally:
            rec.close()
    for key in report.not_ready:
        pod = cluster.pods.get(key)
        if pod is not None:
            click.echo(f"pod/{pod.name} is not ready: {pod.status.get('reason')}", err=True)
    return report


def _check_node_names(cluster, loaded) -> None:
    """A Pod (or a Deployment's template) pinned with spec.nodeName to a node this
    cluster does not have would never start: refuse it before anything is stored."""
    from kproxy.model import objects as o
    nodes = {n.name for n in cluster.nodes}
    for lo in loaded:
        obj = lo.obj
        spec, path = ((obj.spec, "spec.nodeName") if isinstance(obj, o.Pod) else
                      (obj.template.spec, "spec.template.spec.nodeName") if isinstance(obj, o.Deployment) else
                      (None, ""))
        if spec is not None and spec.node_name and spec.node_name not in nodes:
            raise KproxyError(f'{lo.source}: document {lo.doc_index}: {lo.kind} {obj.namespace}/{obj.name}: '
                              f'{path}: Invalid value: "{spec.node_name}": cluster {cluster.name!r} has no such '
                              f'node (nodes: {", ".join(sorted(nodes))}); nothing was applied')


WAIT_OPTION = click.option("--wait/--no-wait", default=False, show_default=True,
                           help="With a daemon running: wait until the change is in effect.")
TIMEOUT_OPTION = click.option("--timeout", type=float, default=120.0, show_default=True,
                              help="Seconds to wait (--wait, or converging without a daemon).")


@main.command()
@click.option("-f", "--filename", "files", multiple=True, required=True,
              help="A manifest file, a directory (read in lexical order) or - for stdin; repeatable.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Strict field validation as kubectl's default (--no-validate drops unknown fields).")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP,
              help="The namespace of objects whose manifest names none.")
@WAIT_OPTION
@TIMEOUT_OPTION
@click.pass_context
def apply(ctx, files, validate, namespace, wait, timeout):
    """Create or update objects from manifests, then put them in effect.

    All or nothing: one invalid object and nothing changes; the error names the file,
    the document, the object and the field.  Without a daemon the command converges
    the cluster itself; with `kproxy daemon` running it writes the store and the daemon
    acts (--wait waits for it).

    Example: kproxy apply -f sesiones/Sesion4-Kubernetes/Stateful-app
    """
    cluster = _open(ctx)
    loaded = _load_manifests(files, validate, namespace)
    _check_node_names(cluster, loaded)
    store = _store(cluster)
    try:
        result = store.apply(loaded)
        for line in result.lines():
            click.echo(line)
        _converge(ctx, cluster, store, wait, timeout)
    finally:
        store.close()


DELETE_KINDS = {"pod": "Pod", "pods": "Pod", "po": "Pod",
                "service": "Service", "services": "Service", "svc": "Service",
                "deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
                "namespace": "Namespace", "namespaces": "Namespace", "ns": "Namespace"}


@main.command(name="delete")
@click.argument("kind", required=False, type=click.Choice(sorted(DELETE_KINDS)))
@click.argument("names", nargs=-1)
@click.option("-f", "--filename", "files", multiple=True, help="Delete the objects these manifests name.")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@WAIT_OPTION
@TIMEOUT_OPTION
@click.pass_context
def delete(ctx, kind, names, files, namespace, wait, timeout):
    """Delete objects named in manifests (-f), or by kind and name.

    A namespace takes every object in it.  Deleting a pod a Deployment owns makes the
    Deployment create another, as on a cluster; a pod made with `kproxy run` is removed
    at once.

    Examples: kproxy delete -f sesiones/Sesion4-Kubernetes/Stateful-app;
    kproxy delete namespace curso; kproxy delete pod web
    """
    cluster = _open(ctx)
    store = _store(cluster)
    try:
        if files:
            for line in store.delete(_load_manifests(files, validate=False, namespace=namespace)):
                click.echo(line)
            _converge(ctx, cluster, store, wait, timeout)
            return
        if not kind or not names:
            raise click.UsageError("give -f FILE, or KIND NAME...")
        kind = DELETE_KINDS[kind]
        if kind != "Pod":
            if kind == "Namespace" and set(names) & {"default", "kube-system", "kube-public", "kube-node-lease"}:
                raise KproxyError("namespaces default, kube-system, kube-public and kube-node-lease "
                                  "may not be deleted")
            for line in store.delete_names(kind, namespace, list(names)):
                click.echo(line)
            _converge(ctx, cluster, store, wait, timeout)
            return
        stored = {o.name for o in store.objects().get("Pod", []) if o.namespace == namespace}
        owned = []
        for name in names:
            pod = cluster.pods.get(f"{namespace}/{name}")
            if name in stored:
                store.delete_names("Pod", namespace, [name])
            elif pod is not None and pod.status.get("managed"):
                owned.append(pod.key)
            else:
                cluster.delete_pod(name, namespace)
            click.echo(f'pod "{name}" deleted')
        if owned:
            from kproxy.daemon import daemon_running
            if daemon_running(cluster.dir):
                store.request_pod_deletions(owned)
            _converge(ctx, cluster, store, wait, timeout, mark_deleting=owned)
        elif len(stored & set(names)):
            _converge(ctx, cluster, store, wait, timeout)
    finally:
        store.close()


def _deployment_ref(ref: str, name: Optional[str]) -> str:
    kind, _, rest = ref.partition("/")
    if not rest:
        kind, rest = ref, name or ""
    if kind not in ("deployment", "deployments", "deploy", "deployment.apps") or not rest:
        raise click.UsageError(f"expected deployment/NAME, not {ref!r}")
    return rest


@main.command()
@click.argument("ref", metavar="deployment/NAME")
@click.argument("name", required=False)
@click.option("--replicas", type=click.IntRange(0, 1000), required=True)
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@WAIT_OPTION
@TIMEOUT_OPTION
@click.pass_context
def scale(ctx, ref, name, replicas, namespace, wait, timeout):
    """Set a Deployment's number of replicas.

    Example: kproxy scale deployment/wordpress --replicas 6
    """
    name = _deployment_ref(ref, name)
    cluster = _open(ctx)
    store = _store(cluster)
    try:
        store.scale("Deployment", namespace, name, replicas)
        click.echo(f"deployment.apps/{name} scaled")
        _converge(ctx, cluster, store, wait, timeout)
    finally:
        store.close()


@main.group()
def rollout():
    """Follow a Deployment's rollout."""


@rollout.command(name="status")
@click.argument("ref", metavar="deployment/NAME")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.option("-w", "--watch/--no-watch", default=True, show_default=True, help="Follow until it is done.")
@click.option("--timeout", type=float, default=0, show_default=True, help="Give up after this many seconds (0: never).")
@click.pass_context
def rollout_status(ctx, ref, name, namespace, watch, timeout):
    """Print a Deployment's rollout progress as `kubectl rollout status` does; exit 0
    once it has rolled out, 1 when it exceeded its progress deadline or timed out.

    Example: kproxy rollout status deployment/wordpress
    """
    import time as _time
    from kproxy import deployments
    from kproxy.cluster import Cluster
    from kproxy.daemon import daemon_running
    from kproxy.reconciler import pod_view
    name = _deployment_ref(ref, name)
    cluster = _open(ctx)
    store = _store(cluster)
    deadline = _time.monotonic() + timeout if timeout else None
    last = None
    try:
        while True:
            dep = next((d for d in store.objects().get("Deployment", [])
                        if d.name == name and d.namespace == namespace), None)
            if dep is None:
                raise KproxyError(f'deployments.apps "{name}" not found in namespace {namespace!r}')
            cluster = Cluster.open(cluster.name)
            key = f"{namespace}/{name}"
            views = [pod_view(p) for p in cluster.pods.values()
                     if p.status.get("managed") and p.status.get("owner") == key]
            progress = cluster.proxy_state.get("deployments", {}).get(key)
            message, done = deployments.rollout_status(dep, views, _time.time(), progress=progress)
            if message != last:
                click.echo(message)
                last = message
            if done:
                return
            if message.startswith("error:"):
                sys.exit(1)
            if not watch:
                return
            if not daemon_running(cluster.dir):
                raise KproxyError("no daemon is running to take the rollout further "
                                  "(`kproxy daemon`, or `kproxy apply` again to converge once)")
            if deadline is not None and _time.monotonic() > deadline:
                click.echo("error: timed out waiting for the condition", err=True)
                sys.exit(1)
            _time.sleep(0.2)
    finally:
        store.close()


@main.command()
@click.option("--min-sync-period", type=float, default=1.0, show_default=True,
              help="Least time between two proxier syncs; changes in between are batched (kube-proxy's flag).")
@click.option("--sync-period", type=float, default=30.0, show_default=True,
              help="Time between full checks that repair drift (rules flushed, pods' namespaces deleted).")
@click.option("--interval", type=float, default=0.2, show_default=True,
              help="Time between passes when nothing changes (a store change wakes it at once).")
@click.option("--metrics-bind-address", default="127.0.0.1:10249", show_default=True,
              help="Loopback address:port of the Prometheus /metrics endpoint ('' for none).")
@click.option("--backoff", "backoff_base", type=float, default=10.0, show_default=True,
              help="First crash-loop back-off in seconds (doubles to 300).")
@click.option("-v", "--verbose", count=True, help="-v: log every pod created and deleted; -vv: every pass.")
@click.pass_context
def daemon(ctx, min_sync_period, sync_period, interval, metrics_bind_address, backoff_base, verbose):
    """Run the cluster's controllers continuously, in the foreground.

    Keeps the cluster true to the store as kubelet, the controllers and kube-proxy do:
    supervises and probes pods, rolls Deployments, keeps endpoints, DNS and every
    node's rules current, and repairs drift.  Stop it with Ctrl-C or SIGTERM: the
    cluster keeps running, and the next daemon adopts it.  vagrant/kproxy.service runs
    it under systemd.

    Example: kproxy daemon --metrics-bind-address 127.0.0.1:10249
    """
    import logging
    from kproxy.daemon import Daemon
    _open(ctx)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kproxy").setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    d = Daemon(_cluster_name(ctx), min_sync_period=min_sync_period, sync_period=sync_period,
               interval=interval, metrics_address=metrics_bind_address or None, backoff_base=backoff_base)
    click.echo(f"kproxy daemon for cluster {_cluster_name(ctx)!r} (pid {os.getpid()})", err=True)
    d.run()


@main.command()
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP, help="Namespace of FROM and TO names.")
@click.option("--udp", is_flag=True, help="Send UDP instead of TCP.")
@click.option("--http", is_flag=True, help="Send an HTTP request and show the answer.")
@click.option("--count", type=click.IntRange(1, 100), default=1, show_default=True, help="Connections to make.")
@click.option("-o", "--output", type=click.Choice(["text", "json", "mermaid"]), default="text", show_default=True)
@click.option("--pcap", type=click.Path(dir_okay=False, writable=True), help="Write every captured packet here.")
@click.pass_context
def trace(ctx, source, target, namespace, udp, http, count, output, pcap):
    """Follow a real packet from FROM to TO and tell what the kernel did with it.

    \b
    FROM: a pod ([ns/]pod) or `external` (the client outside the cluster)
    TO:   a Service ([ns/]svc[:port]), IP:PORT, or node/NAME:NODEPORT

    It traces the flow's netfilter rules on every node (nft monitor trace), reads its
    conntrack entry (the rewrite, as the kernel recorded it) and captures it on every
    hop, then removes all of that again.

    Example: kproxy trace client wordpress --http
    """
    from kproxy.trace import live, story
    cluster = _open(ctx)
    if namespace != "default":
        source = source if "/" in source or source == "external" else f"{namespace}/{source}"
        if not target.startswith("node/") and "/" not in target.split(":")[0] and not target[0].isdigit():
            target = f"{namespace}/{target}"
    services, slices = _view(cluster)
    result = live.run(cluster, services, slices, source, target, udp=udp, http=http, count=count, pcap=pcap)
    report = story.build(result)
    if output == "json":
        click.echo(json.dumps(report, indent=2, default=str))
    elif output == "mermaid":
        click.echo(report["diagram"])
    else:
        click.echo(story.text(report, color=sys.stdout.isatty()))


@main.group(name="proxy-mode")
def proxy_mode():
    """Show or switch kube-proxy's mode (iptables, nftables, ipvs) on a running cluster."""


@proxy_mode.command(name="get")
@click.pass_context
def proxy_mode_get(ctx):
    """Print the cluster's proxy mode."""
    click.echo(_open(ctx).config.backend)


@proxy_mode.command(name="set")
@click.argument("mode", type=click.Choice(["iptables", "nftables", "ipvs"]))
@click.pass_context
def proxy_mode_set(ctx, mode):
    """Switch every node to MODE: the old mode's rules go, the new mode's come, pods stay.

    Example: kproxy proxy-mode set nftables
    """
    from kproxy.cluster import Cluster
    from kproxy.daemon import reconciler_lock
    from kproxy.reconciler import open_store, switch_mode
    cluster = _open(ctx)
    with reconciler_lock(cluster.dir, role="cli", blocking=True):
        cluster = Cluster.open(cluster.name)
        cluster.reconciler = True
        old = cluster.config.backend
        store = open_store(cluster)
        try:
            gaps = switch_mode(cluster, store, mode)
        finally:
            store.close()
    if not gaps:
        click.echo(f"the cluster already runs kube-proxy in {mode} mode")
        return
    click.echo(f"switched from {old} to {mode} mode on {len(gaps)} nodes")
    for node, gap in gaps.items():
        click.echo(f"  {node}: new connections had no rules for {gap * 1000:.0f} ms "
                   f"(old rules removed -> new rules in place)")


@main.command()
@click.argument("service", metavar="[NS/]SVC")
@click.option("--backend", "modes", multiple=True, type=click.Choice(["iptables", "nftables", "ipvs"]),
              help="A mode to show (repeat); default: all three.")
@click.option("--node", default=None, help="The node whose rules to show (default: the first).")
@click.option("-n", "--namespace", default=_default_namespace, show_default=NS_DEFAULT_HELP)
@click.pass_context
def rules(ctx, service, modes, node, namespace):
    """The rules that implement one Service in each proxy mode, side by side.

    Every line is labelled with the Service port or the endpoint it comes from. The
    rules are rendered for the running cluster's objects: no mode has to be active.

    Example: kproxy rules wordpress --backend iptables --backend nftables
    """
    from kproxy import rules as rules_mod
    cluster = _open(ctx)
    ns, _, name = service.rpartition("/")
    ns = ns or namespace
    services, slices = _view(cluster)
    svc = next((s for s in services if s.name == name and s.namespace == ns), None)
    if svc is None:
        raise KproxyError(f'services "{name}" not found in namespace {ns}')
    n = cluster.node(node) if node else cluster.nodes[0]
    modes = list(modes) or list(rules_mod.MODES)
    settings = rules_mod.NodeSettings(node_name=n.name, node_ips=[n.ip], cluster_cidr=cluster.config.pod_cidr)
    grouped = rules_mod.rules_for(services, slices, svc, settings, modes, cluster.config.service_cidr)
    click.echo(rules_mod.text(svc, grouped, modes))


@main.command()
@click.pass_context
def demo(ctx):
    """The guided demo `make demo` runs: a cluster, pods on two nodes, traffic between them."""
    from kproxy.demo import run_demo
    sys.exit(run_demo(echo=click.echo))


# ---- render (no cluster, no root) ----------------------------------------------------------
# Defaults are kproxy.render's and kproxy.alloc's (tests/unit/test_render_cli.py checks they
# agree); they are written out so that `kproxy --help` does not import the renderer.

@main.command()
@click.option("--backend", default="iptables", show_default=True,
              help="Proxier whose rules to print (iptables is built in).")
@click.option("-f", "--filename", "files", multiple=True, required=True,
              help="A manifest file, a directory (its *.yaml/*.yml/*.json in lexical order) "
                   "or - for stdin; repeatable.")
@click.option("--node-name", default="node-1", show_default=True,
              help="The node the rules are for; Pods without spec.nodeName run on it.")
@click.option("--node-ip", default="192.168.5.11", show_default=True, help="That node's address.")
@click.option("--cluster-cidr", default="10.244.0.0/16", show_default=True,
              help="Pod network; each node gets the next /24, Pods get .2 upwards.")
@click.option("--service-cidr", default="10.96.0.0/12", show_default=True,
              help="Where ClusterIPs come from (.1 and .10 are kept, as kubeadm does).")
@click.option("--node-port-range", default="30000-32767", show_default=True)
@click.option("--lb-pool", "lb_pools", multiple=True,
              help="LoadBalancer addresses: a CIDR, a-b range or comma list; repeatable. "
                   "Without one, LoadBalancer Services stay <pending>.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Strict field validation, as kubectl's default (--no-validate drops unknown fields).")
def render(backend, files, node_name, node_ip, cluster_cidr, service_cidr, node_port_range,
           lb_pools, validate):
    """Print the rules kube-proxy would write on one node for these manifests.

    No cluster and no root needed: Services get ClusterIPs, NodePorts and LB IPs as the
    control plane would hand them out, and every selected Pod counts as a ready
    endpoint. Prints an iptables-restore payload (*filter and *nat tables).

    \b
    Example:
      kproxy render -f sesiones/Sesion4-Kubernetes/Stateful-app \\
          --node-name node1 --node-ip 192.168.5.11 --lb-pool 192.168.5.240/28
    """
    import ipaddress
    from kproxy.alloc import AllocationError
    from kproxy.model import ManifestError
    from kproxy.render import render_manifests
    try:
        ipaddress.ip_address(node_ip)
        payload = render_manifests(list(files), backend=backend, node_name=node_name, node_ip=node_ip,
                                   cluster_cidr=cluster_cidr, service_cidr=service_cidr,
                                   node_port_range=node_port_range,
                                   lb_pool=",".join(lb_pools) or None, strict=validate)
    except (ManifestError, AllocationError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(payload, nl=not payload.endswith("\n"))


# ---- explain (no cluster, no root, sends nothing) -------------------------------------------

@main.command()
@click.option("-f", "--filename", "files", multiple=True,
              help="Manifests to render the node's rules from (as `kproxy render`); repeatable.")
@click.option("--rules", "rules_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="A ruleset saved from a node: iptables-save output, nft list ruleset (text or -j JSON).")
@click.option("--from", "src", required=True,
              help="Source: an IP, `node`, `external`, or (with -f) a Pod name [NS/]POD.")
@click.option("--to", "dst", required=True,
              help="Destination: IP:PORT, [IPv6]:PORT, node:PORT, or (with -f) a Service [NS/]SVC[:PORT].")
@click.option("-p", "--protocol", type=click.Choice(["tcp", "udp", "sctp"]), default=None,
              help="[default: the Service port's, else tcp]")
@click.option("--udp", "udp", is_flag=True, help="Same as -p udp.")
@click.option("--node", "--node-name", "node", default=None,
              help="The node whose rules these are. [default with -f: node-1]")
@click.option("--node-ip", "node_ips", multiple=True,
              help="The node's addresses (what addrtype LOCAL matches); repeatable. [default with -f: 192.168.5.11]")
@click.option("--cluster-cidr", default=None, help="The pod network. [default with -f: 10.244.0.0/16; "
                                                 "with --rules: read from the rules]")
@click.option("--service-cidr", default="10.96.0.0/12", show_default=True, help="With -f: where ClusterIPs come from.")
@click.option("--node-port-range", default="30000-32767", show_default=True)
@click.option("--lb-pool", "lb_pools", multiple=True, help="With -f: LoadBalancer addresses (as `kproxy render`).")
@click.option("--validate/--no-validate", default=True, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--color/--no-color", default=None, help="[default: when stdout is a terminal]")
@click.option("-v", "--verbose", is_flag=True, help="Show every rule in full, and each candidate's own hops.")
def explain(files, rules_file, src, dst, protocol, udp, node, node_ips, cluster_cidr, service_cidr,
            node_port_range, lb_pools, validate, output, color, verbose):
    """Explain where a packet to a Service goes on one node, offline (no root, sends nothing).

    Walks a NEW packet through kube-proxy's rules and prints every endpoint it can be
    DNATed to with its probability, the chains and rules on the way, whether it is
    masqueraded and why, and the verdict. The rules are rendered from manifests (-f)
    or read from a file saved on a node (--rules). JSON schema: kproxy/explain/schema.md.

    \b
    Examples:
      kproxy explain -f sesiones/Sesion4-Kubernetes/Ejercicios/Ejercicio1 --from busybox --to store-products:80
      kproxy explain --rules node1.iptables-save --node-ip 192.168.5.11 --from 10.244.1.5 --to 10.96.0.10:53 --udp
      kproxy explain --rules node1.nft --from external --to node:30080 -o json
    """
    from kproxy.alloc import AllocationError
    from kproxy.explain import inputs
    from kproxy.model import ManifestError
    if bool(files) == bool(rules_file):
        raise click.UsageError("give manifests (-f) or a saved ruleset (--rules), one of them")
    proto = "udp" if udp else protocol
    try:
        if files:
            inp = inputs.from_manifests(files, node or "node-1", list(node_ips) or ["192.168.5.11"],
                                        cluster_cidr or "10.244.0.0/16", service_cidr, node_port_range,
                                        ",".join(lb_pools) or None, validate,
                                        stdin=sys.stdin if "-" in files else None)
        else:
            with click.open_file(rules_file) as fh:
                inp = inputs.from_file(fh.read(), node, list(node_ips), cluster_cidr)
        report = inputs.explain_inputs(inp, src, dst, proto)
    except (ManifestError, AllocationError, ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        use_color = sys.stdout.isatty() if color is None else color
        click.echo(report.text(color=use_color, verbose=verbose), nl=False, color=use_color)


if __name__ == "__main__":
    main()
