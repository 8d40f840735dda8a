"""host-local IPAM: a pure range-set allocator, its stores, and the plugin executable."""
