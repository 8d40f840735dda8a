"""The only part of kproxy (with cni/) that changes the machine.

Everything here acts inside named network namespaces that kproxy created; none of
it is ever pointed at the machine's own namespace.
"""
