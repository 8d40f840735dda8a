"""Kubernetes objects as dataclasses, a kubectl-style manifest loader, and the
EndpointSlice controller as a pure function.

    >>> from kproxy.model import load
    >>> objs = load("sesiones/Sesion4-Kubernetes/Stateful-app")   # doctest: +SKIP
"""

from kproxy.model.endpoints import endpoint_slices_for, find_port
from kproxy.model.errors import ManifestError
from kproxy.model.loader import LoadedObject, expand_paths, load, loads
from kproxy.model.objects import (
    Container, ContainerPort, Deployment, DeploymentStrategy, Endpoint, EndpointConditions,
    EndpointPort, Endpoints, EndpointSlice, LoadBalancerIngress, Namespace, NotEmulated,
    ObjectMeta, Pod, PodSpec, PodStatus, PodTemplate, ResourceQuota, RollingUpdate, Service,
    ServicePort,
)

__all__ = [
    "Container", "ContainerPort", "Deployment", "DeploymentStrategy", "Endpoint",
    "EndpointConditions", "EndpointPort", "Endpoints", "EndpointSlice", "LoadBalancerIngress",
    "LoadedObject", "ManifestError", "Namespace", "NotEmulated", "ObjectMeta", "Pod", "PodSpec",
    "PodStatus", "PodTemplate", "ResourceQuota", "RollingUpdate", "Service", "ServicePort",
    "endpoint_slices_for",
    "expand_paths", "find_port", "load", "loads",
]
