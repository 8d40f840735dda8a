"""A CNI (spec 1.0, also 0.3.x/0.4.0/1.1) bridge plugin with host-local IPAM.

- `cni.invoke`: what the cluster code calls: ``call(command, config, container_id=...,
  netns=..., host_netns=...)``, ``CNIError``, ``plugin_dir()``.
- `cni.skel`: the protocol (env vars + stdin in, result or error object out).
- `cni.bridge`: ``kproxy-bridge``; `cni.ipam.host_local`: ``kproxy-host-local``.
- `cni.netns`: named network namespaces entered per thread.
- `cni.fastnl`: the synchronous rtnetlink client ADD and DEL use; `cni.links` (pyroute2)
  reads for CHECK.
"""
