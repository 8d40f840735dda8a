"""The proxier: Services and EndpointSlices in, a backend's ruleset out.

``types`` turns API objects into what a proxier works on (ServicePortName, processed
service ports, endpoints); ``endpoints`` chooses the endpoints a node uses
(CategorizeEndpoints); each backend package (``iptables``...) renders rules from those.
"""
