"""Prometheus metrics without a dependency: a registry of counters, gauges and
histograms, the text exposition format 0.0.4, a parser for it, and a loopback-only
HTTP server for ``/metrics`` and ``/healthz``.

    >>> reg = Registry()
    >>> syncs = reg.counter("demo_syncs_total", "Syncs done.", ["node"])
    >>> syncs.inc(node="node1")
    >>> print(reg.expose(), end="")
    # HELP demo_syncs_total Syncs done.
    # TYPE demo_syncs_total counter
    demo_syncs_total{node="node1"} 1

The output follows the Go client (client_golang/expfmt): families sorted by name, label
pairs sorted by label name, series sorted by label values, numbers printed as Go's
``strconv.FormatFloat(v, 'g', -1, 64)`` (``1e+06``, ``0.001``, ``+Inf``), histograms as
cumulative ``_bucket{le=...}`` series ending with ``le="+Inf"``, then ``_sum`` and
``_count``. A metric without labels is always exposed (at 0); a labelled one from the
first time a label set is used.

``kube_proxy_metrics(registry)`` defines kube-proxy's metric set (names, HELP texts,
buckets as in kubernetes pkg/proxy/metrics/metrics.go, each with a ``node`` label:
kproxy runs one proxier per node) and kproxy's own; ``serve(registry)`` serves them.
"""

from __future__ import annotations

import decimal
import ipaddress
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_PORT = 10249            # kube-proxy's --metrics-bind-address port
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)   # prometheus.DefBuckets

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_NAME_AT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_AT = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# --------------------------------------------------------------------------- buckets


def exponential_buckets(start: float, factor: float, count: int) -> Tuple[float, ...]:
    """prometheus.ExponentialBuckets: start, start*factor, ... (count values)."""
    if count < 1 or start <= 0 or factor <= 1:
        raise ValueError("exponential buckets need count >= 1, start > 0 and factor > 1")
    out = []
    for _ in range(count):                  # repeated multiplication, as Go computes them
        out.append(start)
        start *= factor
    return tuple(out)


def linear_buckets(start: float, width: float, count: int) -> Tuple[float, ...]:
    """prometheus.LinearBuckets: start, start+width, ... (count values)."""
    if count < 1:
        raise ValueError("linear buckets need count >= 1")
    out = []
    for _ in range(count):                  # repeated addition, as Go computes them
        out.append(start)
        start += width
    return tuple(out)


def merge_buckets(*parts: Sequence[float]) -> Tuple[float, ...]:
    """component-base metrics.MergeBuckets: a leading 0 bucket, then every part in order
    (upstream starts the merged slice with one zero element)."""
    out = [0.0]
    for p in parts:
        out.extend(p)
    return tuple(out)


# --------------------------------------------------------------------------- formatting


def format_value(value: float) -> str:
    """A number as Go's strconv.FormatFloat(value, 'g', -1, 64) prints it."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits, exp = decimal.Decimal(repr(value)).as_tuple()
    ds = list(digits)
    while len(ds) > 1 and ds[-1] == 0:
        ds.pop()
        exp += 1
    text = "".join(map(str, ds))
    point = len(ds) + exp                      # value = 0.<digits> * 10**point
    x = point - 1
    neg = "-" if sign else ""
    if x < -4 or x >= 6:                       # %e: shortest precision decides at 6
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{neg}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if point <= 0:
        return f"{neg}0.{'0' * -point}{text}"
    if point >= len(text):
        return f"{neg}{text}{'0' * (point - len(text))}"
    return f"{neg}{text[:point]}.{text[point:]}"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(pairs: Sequence[Tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs) + "}"


# --------------------------------------------------------------------------- metrics


class _Metric:
    type = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (),
                 registry: Optional["Registry"] = None):
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames: Tuple[str, ...] = tuple(labelnames)
        for ln in self.labelnames:
            if not _LABEL_NAME.match(ln) or ln.startswith("__"):
                raise ValueError(f"{name}: invalid label name {ln!r}")
            if ln == "le" and self.type == "histogram":
                raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise ValueError(f"{name}: duplicate label names in {self.labelnames}")
        self._lock = threading.Lock()
        self._children: Dict[Tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    # children -------------------------------------------------------------------------
    def _new_child(self) -> Any:
        raise NotImplementedError

    def _key(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[str, ...]:
        if args and kwargs:
            raise ValueError(f"{self.name}: give label values by position or by name, not both")
        if args:
            if len(args) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values "
                                 f"{self.labelnames}, got {len(args)}")
            return tuple(str(a) for a in args)
        if set(kwargs) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {sorted(self.labelnames)}, "
                             f"got {sorted(kwargs)}")
        return tuple(str(kwargs[ln]) for ln in self.labelnames)

    def labels(self, *values: Any, **labels: Any) -> Any:
        """The series for these label values (created at 0 the first time)."""
        key = self._key(values, labels)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, *values: Any, **labels: Any) -> None:
        """Drop one labelled series (a phase no pod is in any more...)."""
        with self._lock:
            self._children.pop(self._key(values, labels), None)

    def clear(self) -> None:
        """Drop every labelled series (an unlabelled metric is reset to 0)."""
        with self._lock:
            self._children.clear()
            if not self.labelnames:
                self._children[()] = self._new_child()

    def bind(self, **labels: Any) -> "Bound":
        """A view with some labels fixed (``m.bind(node="node1").inc(table="nat")``)."""
        unknown = set(labels) - set(self.labelnames)
        if unknown:
            raise ValueError(f"{self.name}: no label(s) {sorted(unknown)}")
        return Bound(self, labels)

    def _series(self) -> List[Tuple[Tuple[str, ...], Any]]:
        with self._lock:
            return list(self._children.items())

    # exposition -----------------------------------------------------------------------
    def expose_lines(self) -> List[str]:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        order = sorted(range(len(self.labelnames)), key=lambda i: self.labelnames[i])
        rows = []
        for key, child in self._series():
            pairs = [(self.labelnames[i], key[i]) for i in order]
            rows.append(([v for _, v in pairs], pairs, child))
        for _, pairs, child in sorted(rows, key=lambda r: r[0]):
            lines.extend(self._child_lines(pairs, child))
        return lines

    def _child_lines(self, pairs, child) -> List[str]:
        return [f"{self.name}{_labels_text(pairs)} {format_value(child.get())}"]


class _Value:
    def __init__(self) -> None:
        self._v = 0.0
        self._lock = threading.Lock()

    def get(self) -> float:
        with self._lock:
            return self._v


class _CounterChild(_Value):
    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter can only go up (inc by a negative amount)")
        with self._lock:
            self._v += amount


class _GaugeChild(_Value):
    def set(self, value: float) -> None:
        with self._lock:
            self._v = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._v += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._v -= amount

    def set_to_current_time(self) -> None:
        self.set(time.time())


class _HistogramChild:
    def __init__(self, buckets: Tuple[float, ...]):
        self._buckets = buckets
        self._counts = [0] * len(buckets)       # per bucket, not cumulative
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self._buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    def get(self) -> Tuple[List[int], float, int]:
        """(cumulative count per bucket, sum, count)."""
        with self._lock:
            cumulative, total = [], 0
            for c in self._counts:
                total += c
                cumulative.append(total)
            return cumulative, self._sum, self._count


class Counter(_Metric):
    type = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).inc(amount)

    def value(self, **labels: Any) -> float:
        return self.labels(**labels).get()


class Gauge(_Metric):
    type = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float, **labels: Any) -> None:
        self.labels(**labels).set(value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).dec(amount)

    def set_to_current_time(self, **labels: Any) -> None:
        self.labels(**labels).set_to_current_time()

    def value(self, **labels: Any) -> float:
        return self.labels(**labels).get()


class Histogram(_Metric):
    type = "histogram"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (),
                 registry: Optional["Registry"] = None, buckets: Sequence[float] = DEFAULT_BUCKETS):
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()                            # +Inf is always added
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be a non-empty, strictly increasing list")
        self.buckets: Tuple[float, ...] = tuple(bounds)
        super().__init__(name, help, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, value: float, **labels: Any) -> None:
        self.labels(**labels).observe(value)

    def time(self, **labels: Any) -> "_Timer":
        """``with h.time(node="n1"): ...`` observes the block's duration in seconds."""
        return _Timer(self.labels(**labels))

    def _child_lines(self, pairs, child) -> List[str]:
        cumulative, total, count = child.get()
        lines = []
        for bound, n in zip(self.buckets, cumulative):
            lines.append(f"{self.name}_bucket{_labels_text(list(pairs) + [('le', format_value(bound))])} {n}")
        lines.append(f"{self.name}_bucket{_labels_text(list(pairs) + [('le', '+Inf')])} {count}")
        lines.append(f"{self.name}_sum{_labels_text(pairs)} {format_value(total)}")
        lines.append(f"{self.name}_count{_labels_text(pairs)} {count}")
        return lines


class _Timer:
    def __init__(self, child: _HistogramChild):
        self.child = child

    def __enter__(self) -> "_Timer":
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.child.observe(time.monotonic() - self.start)


class Bound:
    """A metric with some labels fixed; the rest are given as keywords."""

    def __init__(self, metric: _Metric, fixed: Mapping[str, Any]):
        self.metric = metric
        self.fixed = dict(fixed)

    def labels(self, **labels: Any) -> Any:
        return self.metric.labels(**self.fixed, **labels)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self.labels(**labels).dec(amount)

    def set(self, value: float, **labels: Any) -> None:
        self.labels(**labels).set(value)

    def set_to_current_time(self, **labels: Any) -> None:
        self.labels(**labels).set_to_current_time()

    def observe(self, value: float, **labels: Any) -> None:
        self.labels(**labels).observe(value)

    def value(self, **labels: Any) -> float:
        return self.labels(**labels).get()

    def remove(self, **labels: Any) -> None:
        self.metric.remove(**self.fixed, **labels)


class _NoOp:
    """Stands for a metric a proxy mode does not register: every call does nothing."""

    def __getattr__(self, _name: str) -> Callable[..., Any]:
        return lambda *a, **k: self

    def get(self) -> float:
        return 0.0


NOOP = _NoOp()


# --------------------------------------------------------------------------- registry


class Registry:
    """A set of metric families; ``expose()`` renders them all (format 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: Dict[str, _Metric] = {}
        self._hooks: List[Callable[[], None]] = []

    def register(self, metric: _Metric) -> _Metric:
        names = {metric.name}
        if isinstance(metric, Histogram):
            names |= {metric.name + s for s in ("_bucket", "_sum", "_count")}
        with self._lock:
            taken = set(self._metrics)
            for m in self._metrics.values():
                if isinstance(m, Histogram):
                    taken |= {m.name + s for s in ("_bucket", "_sum", "_count")}
            if names & taken:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def unregister(self, name: str) -> None:
        with self._lock:
            self._metrics.pop(name, None)

    def get(self, name: str) -> Optional[_Metric]:
        with self._lock:
            return self._metrics.get(name)

    def names(self) -> List[str]:
        with self._lock:
            return sorted(self._metrics)

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return Counter(name, help, labelnames, registry=self)

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return Gauge(name, help, labelnames, registry=self)

    def histogram(self, name: str, help: str, labelnames: Iterable[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return Histogram(name, help, labelnames, registry=self, buckets=buckets)

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before every exposition (to refresh gauges from live state)."""
        with self._lock:
            self._hooks.append(hook)

    def expose(self) -> str:
        """Every family in the text exposition format 0.0.4."""
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            hook()
        with self._lock:
            metrics = [self._metrics[n] for n in sorted(self._metrics)]
        lines: List[str] = []
        for m in metrics:
            lines.extend(m.expose_lines())
        return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- parsing


def _unescape(text: str, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            if n == "n":
                out.append("\n")
            elif n == "\\" or (quote and n == '"'):
                out.append(n)
            else:
                out.append("\\" + n)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _parse_value(text: str, lineno: int) -> float:
    special = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"line {lineno}: bad sample value {text!r}") from None


def _parse_labels(text: str, start: int, lineno: int) -> Tuple[Dict[str, str], int]:
    """Labels from text[start] == '{'; returns (labels, index after '}')."""
    labels: Dict[str, str] = {}
    i = start + 1
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "}":
            return labels, i + 1
        m = _LABEL_AT.match(text, i)
        if not m:
            raise ValueError(f"line {lineno}: bad label name at column {i + 1}")
        name = m.group(0)
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if text[i:i + 2] != '="':
            raise ValueError(f"line {lineno}: expected =\" after label {name}")
        i += 2
        j = i
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise ValueError(f"line {lineno}: unterminated value of label {name}")
        if name in labels:
            raise ValueError(f"line {lineno}: duplicate label {name}")
        labels[name] = _unescape(text[i:j], quote=True)
        i = j + 1
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "}":
            return labels, i + 1
        else:
            raise ValueError(f"line {lineno}: expected , or }} after label {name}")


_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
             "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def parse_text(text: str) -> Dict[str, Dict[str, Any]]:
    """Read the text exposition format back.

    Returns ``{family: {"type": str, "help": str, "samples": [(sample name, {label:
    value}, value), ...]}}``; a histogram's ``_bucket``/``_sum``/``_count`` samples belong
    to its family, a sample without a TYPE line is its own ``untyped`` family. Timestamps
    are dropped. Raises ValueError (with the line number) on a malformed line.
    See ``get_sample`` to look one value up.
    """
    families: Dict[str, Dict[str, Any]] = {}

    def family(name: str) -> Dict[str, Any]:
        return families.setdefault(name, {"type": "untyped", "help": "", "samples": []})

    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line[1:].strip().split(None, 2)
            if len(parts) >= 2 and parts[0] == "HELP":
                family(parts[1])["help"] = _unescape(parts[2] if len(parts) > 2 else "", quote=False)
            elif len(parts) >= 2 and parts[0] == "TYPE":
                if len(parts) < 3 or parts[2] not in ("counter", "gauge", "histogram", "summary",
                                                      "untyped", "gaugehistogram"):
                    raise ValueError(f"line {lineno}: bad TYPE line {line!r}")
                family(parts[1])["type"] = parts[2]
            continue
        m = _NAME_AT.match(line)
        if not m:
            raise ValueError(f"line {lineno}: bad metric name in {line!r}")
        name, i = m.group(0), m.end()
        labels: Dict[str, str] = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, lineno)
        rest = line[i:].split()
        if not rest or len(rest) > 2:
            raise ValueError(f"line {lineno}: expected a value (and an optional timestamp) in {line!r}")
        value = _parse_value(rest[0], lineno)
        owner = name
        for base, fam in families.items():
            if name != base and name.startswith(base) and name[len(base):] in _SUFFIXES.get(fam["type"], ()):
                owner = base
                break
        family(owner)["samples"].append((name, labels, value))
    return families


def get_sample(parsed: Mapping[str, Mapping[str, Any]], name: str,
               labels: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The value of sample ``name`` with exactly ``labels`` (None if absent)."""
    want = dict(labels or {})
    for fam in parsed.values():
        for sample_name, sample_labels, value in fam["samples"]:
            if sample_name == name and sample_labels == want:
                return value
    return None


# --------------------------------------------------------------------------- kube-proxy's set


def _alpha(text: str) -> str:
    return f"[ALPHA] {text}"      # component-base prefixes HELP with the stability level


SYNC_BUCKETS = exponential_buckets(0.001, 2, 15)                 # 1ms .. 16.384s
NETWORK_PROGRAMMING_BUCKETS = merge_buckets(
    linear_buckets(0.25, 0.25, 2),     # 0.25s, 0.5s
    linear_buckets(1, 1, 59),          # 1s .. 59s
    linear_buckets(60, 5, 12),         # 60s .. 115s
    linear_buckets(120, 30, 7),        # 2min .. 5min
)                                      # and a leading 0 bucket, as upstream's MergeBuckets gives

# name -> (type, help, extra labels besides node, buckets, proxy modes that register it
# upstream; None = every mode)
KUBE_PROXY_METRICS: Dict[str, Tuple[str, str, Tuple[str, ...], Optional[Tuple[float, ...]],
                                    Optional[Tuple[str, ...]]]] = {
    "kubeproxy_sync_proxy_rules_duration_seconds":
        ("histogram", _alpha("SyncProxyRules latency in seconds"), (), SYNC_BUCKETS, None),
    "kubeproxy_sync_full_proxy_rules_duration_seconds":
        ("histogram", _alpha("SyncProxyRules latency in seconds for full resyncs"), (), SYNC_BUCKETS,
         ("iptables",)),
    "kubeproxy_sync_partial_proxy_rules_duration_seconds":
        ("histogram", _alpha("SyncProxyRules latency in seconds for partial resyncs"), (), SYNC_BUCKETS,
         ("iptables",)),
    "kubeproxy_network_programming_duration_seconds":
        ("histogram", _alpha("In Cluster Network Programming Latency in seconds"), (),
         NETWORK_PROGRAMMING_BUCKETS, None),
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds":
        ("gauge", _alpha("The last time proxy rules were successfully synced"), (), None, None),
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds":
        ("gauge", _alpha("The last time a sync of proxy rules was queued"), (), None, None),
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending":
        ("gauge", _alpha("Pending proxy rules Endpoint changes"), (), None, None),
    "kubeproxy_sync_proxy_rules_endpoint_changes_total":
        ("counter", _alpha("Cumulative proxy rules Endpoint changes"), (), None, None),
    "kubeproxy_sync_proxy_rules_service_changes_pending":
        ("gauge", _alpha("Pending proxy rules Service changes"), (), None, None),
    "kubeproxy_sync_proxy_rules_service_changes_total":
        ("counter", _alpha("Cumulative proxy rules Service changes"), (), None, None),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total":
        ("gauge", _alpha("Number of services with a Local traffic policy and no endpoints"),
         ("traffic_policy",), None, None),
    "kubeproxy_sync_proxy_rules_iptables_total":
        ("gauge", _alpha("Total number of iptables rules owned by kube-proxy"), ("table",), None,
         ("iptables",)),
    "kubeproxy_sync_proxy_rules_iptables_last":
        ("gauge", _alpha("Number of iptables rules written by kube-proxy in last sync"), ("table",),
         None, ("iptables",)),
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total":
        ("counter", _alpha("Cumulative proxy iptables restore failures"), (), None, ("iptables", "ipvs")),
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total":
        ("counter", _alpha("Cumulative proxy iptables partial restore failures"), (), None, ("iptables",)),
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total":
        ("counter", _alpha("Cumulative proxy nftables sync failures"), (), None, ("nftables",)),
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total":
        ("counter", _alpha("Cumulative proxy nftables cleanup failures"), (), None, ("nftables",)),
}

# kproxy's own (and the kubelet's prober_probe_total), cluster-wide: name -> (type, help, labels)
KPROXY_METRICS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "kproxy_pods": ("gauge", "Pods kproxy runs, by phase.", ("phase",)),
    "kproxy_pods_ready": ("gauge", "Pods whose Ready condition is True.", ()),
    "kproxy_container_restarts_total": ("counter", "Container restarts done by kproxy's kubelet.", ()),
    "prober_probe_total": ("counter", "[BETA] Cumulative number of a liveness, readiness or startup "
                                      "probe for a container by result.", ("probe_type", "result")),
    "kproxy_reconcile_passes_total": ("counter", "Reconcile passes run.", ()),
    "kproxy_drift_repairs_total": ("counter", "Differences between the desired and the actual state "
                                              "that a reconcile pass repaired, by what was repaired.",
                                   ("what",)),
}


@dataclass
class KubeProxyMetrics:
    """kube-proxy's metrics (each with a ``node`` label) and kproxy's own, ready to use::

        m = kube_proxy_metrics(registry, nodes=["node1"])
        n1 = m.for_node("node1")
        with n1.sync_proxy_rules_duration_seconds.time(): ...
        n1.sync_proxy_rules_iptables_total.set(42, table="nat")
        m.prober_probe_total.inc(probe_type="Readiness", result="successful")

    A metric the chosen proxy mode does not register upstream is ``NOOP`` (its calls do
    nothing).
    """

    registry: Registry
    sync_proxy_rules_duration_seconds: Any
    sync_full_proxy_rules_duration_seconds: Any
    sync_partial_proxy_rules_duration_seconds: Any
    network_programming_duration_seconds: Any
    sync_proxy_rules_last_timestamp_seconds: Any
    sync_proxy_rules_last_queued_timestamp_seconds: Any
    sync_proxy_rules_endpoint_changes_pending: Any
    sync_proxy_rules_endpoint_changes_total: Any
    sync_proxy_rules_service_changes_pending: Any
    sync_proxy_rules_service_changes_total: Any
    sync_proxy_rules_no_local_endpoints_total: Any
    sync_proxy_rules_iptables_total: Any
    sync_proxy_rules_iptables_last: Any
    sync_proxy_rules_iptables_restore_failures_total: Any
    sync_proxy_rules_iptables_partial_restore_failures_total: Any
    sync_proxy_rules_nftables_sync_failures_total: Any
    sync_proxy_rules_nftables_cleanup_failures_total: Any
    pods: Gauge
    pods_ready: Gauge
    container_restarts_total: Counter
    prober_probe_total: Counter
    reconcile_passes_total: Counter
    drift_repairs_total: Counter

    def for_node(self, node: str) -> "NodeProxyMetrics":
        """The kube-proxy metrics with ``node`` fixed (one proxier's view)."""
        views = {}
        for name in KUBE_PROXY_METRICS:
            attr = name[len("kubeproxy_"):]
            metric = getattr(self, attr)
            views[attr] = metric.bind(node=node) if isinstance(metric, _Metric) else NOOP
        return NodeProxyMetrics(node=node, **views)


@dataclass
class NodeProxyMetrics:
    node: str
    sync_proxy_rules_duration_seconds: Any
    sync_full_proxy_rules_duration_seconds: Any
    sync_partial_proxy_rules_duration_seconds: Any
    network_programming_duration_seconds: Any
    sync_proxy_rules_last_timestamp_seconds: Any
    sync_proxy_rules_last_queued_timestamp_seconds: Any
    sync_proxy_rules_endpoint_changes_pending: Any
    sync_proxy_rules_endpoint_changes_total: Any
    sync_proxy_rules_service_changes_pending: Any
    sync_proxy_rules_service_changes_total: Any
    sync_proxy_rules_no_local_endpoints_total: Any
    sync_proxy_rules_iptables_total: Any
    sync_proxy_rules_iptables_last: Any
    sync_proxy_rules_iptables_restore_failures_total: Any
    sync_proxy_rules_iptables_partial_restore_failures_total: Any
    sync_proxy_rules_nftables_sync_failures_total: Any
    sync_proxy_rules_nftables_cleanup_failures_total: Any


def kube_proxy_metrics(registry: Registry, *, mode: Optional[str] = None,
                       nodes: Iterable[str] = ()) -> KubeProxyMetrics:
    """Define kube-proxy's metric set and kproxy's own in ``registry``.

    ``mode`` ("iptables", "ipvs" or "nftables") registers only what upstream registers
    for that mode (the others become NOOP); None registers every one (kproxy can switch
    modes). Each kube-proxy metric has a ``node`` label; ``nodes`` creates their series
    up front, so a fresh proxier shows zeros as kube-proxy does.
    """
    made: Dict[str, Any] = {}
    for name, (kind, help_, extra, buckets, modes) in KUBE_PROXY_METRICS.items():
        attr = name[len("kubeproxy_"):]
        if mode is not None and modes is not None and mode not in modes:
            made[attr] = NOOP
            continue
        labels = ("node",) + extra
        if kind == "histogram":
            made[attr] = registry.histogram(name, help_, labels, buckets=buckets)
        elif kind == "gauge":
            made[attr] = registry.gauge(name, help_, labels)
        else:
            made[attr] = registry.counter(name, help_, labels)
        if not extra:
            for node in nodes:
                made[attr].labels(node=node)
    for name, (kind, help_, labels) in KPROXY_METRICS.items():
        attr = name[len("kproxy_"):] if name.startswith("kproxy_") else name
        made[attr] = (registry.gauge if kind == "gauge" else registry.counter)(name, help_, labels)
    return KubeProxyMetrics(registry=registry, **made)


# --------------------------------------------------------------------------- serving


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise ValueError(f"refusing to serve metrics on {host!r}: only a loopback address "
                         "(127.0.0.0/8 or ::1) may be bound")
    return str(ip)


class _Handler(BaseHTTPRequestHandler):
    registry: Registry
    server_version = "kproxy-metrics"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.registry.expose().encode(), CONTENT_TYPE)
        elif path == "/healthz":
            self._reply(200, b"ok", "text/plain; charset=utf-8")
        else:
            self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _reply(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:   # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A running /metrics + /healthz server (see ``serve``)."""

    def __init__(self, registry: Registry, host: str, port: int):
        address = _loopback(host)
        handler = type("Handler", (_Handler,), {"registry": registry})
        cls = _Server6 if ":" in address else _Server
        self.httpd = cls((address, port), handler)
        self.host = address
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"metrics:{self.port}",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(registry: Registry, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> MetricsServer:
    """Serve ``registry`` on http://host:port/metrics (and /healthz, "ok") from a daemon
    thread. Only loopback addresses are accepted (ValueError otherwise); port 0 takes an
    ephemeral port, readable as ``.port``. ``.stop()`` shuts it down."""
    return MetricsServer(registry, host, port)
