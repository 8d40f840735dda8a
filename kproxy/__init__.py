"""kproxy: a Kubernetes service network, emulated in network namespaces on one machine."""

__version__ = "0.1.0"
