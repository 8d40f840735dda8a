"""Pods run real processes: what an emulated container listens on or runs, and the
built-in server that answers in its place.

* :mod:`kproxy.workload.images`: the well-known image table, :func:`listeners_for`,
  :func:`runs_command`, :func:`plan`.
* :mod:`kproxy.workload.server`: the built-in workload server
  (``python -m kproxy.workload.server``), :func:`server_argv`
  (not imported here, so ``python -m`` runs it cleanly).
* :mod:`kproxy.workload.client`: stdlib client helpers and :func:`parse_facts`.
"""
from kproxy.workload.images import (ContainerPlan, ImageInfo, Listener, http_echo_text, image_name,
                                    listeners_for, lookup, plan, runs_command)

__all__ = ["ContainerPlan", "ImageInfo", "Listener", "http_echo_text", "image_name", "listeners_for",
           "lookup", "plan", "runs_command"]
