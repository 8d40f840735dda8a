"""The cluster DNS: records as CoreDNS's kubernetes plugin serves them, a small server
for them (``python -m kproxy.dns.server``), and the pods' resolv.conf."""

from kproxy.dns.records import (DEFAULT_DNS_IP, DEFAULT_DOMAIN, TTL, Answer, Record, Zone,
                                kube_dns_service, records_for)
from kproxy.dns.resolv import install, resolv_conf, uninstall

__all__ = ["Answer", "DEFAULT_DNS_IP", "DEFAULT_DOMAIN", "Record", "TTL", "Zone", "install",
           "kube_dns_service", "records_for", "resolv_conf", "uninstall"]
