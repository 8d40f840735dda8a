"""kproxy.proxy.iptables.canon: one rule as kube-proxy writes it and as iptables-save
prints it back read to the same canonical form; a rule that differs does not."""
import pytest

from kproxy.proxy.iptables.canon import canonical_rule, canonical_rules

# (as rendered, as iptables-save printed it back for that payload on this machine)
SAME = [
    ('-m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O',
     '-d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O'),
    ("-m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
     '-p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT --to-destination 10.180.0.1:80'),
    ("-j MARK --or-mark 0x4000", "-j MARK --set-xmark 0x4000/0x4000"),
    ("-j MARK --xor-mark 0x4000", "-j MARK --set-xmark 0x4000/0x0"),
    ("-m mark ! --mark 0x00004000/0x00004000 -j RETURN", "-m mark ! --mark 0x4000/0x4000 -j RETURN"),
    ('-m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT',
     '-d 172.30.0.46/32 -p tcp -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp --dport 80 '
     '-j REJECT --reject-with icmp-port-unreachable'),
    ("-m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap "
     "-j KUBE-SEP-I77PXRDZVX7PMWMN",
     '-m comment --comment "ns5/svc5:p80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-I77PXRDZVX7PMWMN '
     "--mask 255.255.255.255 --rsource -j KUBE-SEP-I77PXRDZVX7PMWMN"),
    ('-m comment --comment "ns1/svc1:p80 -> 10.0.0.2:80" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-A',
     '-m comment --comment "ns1/svc1:p80 -> 10.0.0.2:80" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A'),
    ('-m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
     "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
     '! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" '
     "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"),
    ("-p tcp --dport 3001 -j KUBE-EXT-X", "-p tcp -m tcp --dport 3001 -j KUBE-EXT-X"),
    # a comment changes nothing the rule does; kube-proxy drops them past 1,000 endpoints
    # and leaves them on chains a partial sync does not rewrite
    ('-m comment --comment "kube-system/kube-dns:dns -> 10.244.1.2:53" -j KUBE-SEP-Z6M7ZHWCTBNMPLD7',
     "-j KUBE-SEP-Z6M7ZHWCTBNMPLD7"),
]

DIFFERENT = [
    ("-m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80", "-m tcp -p tcp -j DNAT --to-destination 10.180.0.1:81"),
    ("-d 172.30.0.41 -j KUBE-SVC-A", "-d 172.30.0.42 -j KUBE-SVC-A"),
    ("-s 10.0.0.0/8 -j KUBE-MARK-MASQ", "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"),
    ("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-A",
     "-m statistic --mode random --probability 0.2500000000 -j KUBE-SEP-A"),
    ("-j KUBE-SEP-A", "-j KUBE-SEP-B"),
    ("-j MARK --or-mark 0x4000", "-j MARK --xor-mark 0x4000"),
]


@pytest.mark.parametrize("written, saved", SAME)
def test_a_rule_and_its_iptables_save_spelling_are_one(written, saved):
    assert canonical_rule(written) == canonical_rule(saved)


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_rules_that_match_differently_stay_different(a, b):
    assert canonical_rule(a) != canonical_rule(b)


def test_chains_keep_rule_order_and_empty_chains():
    text = ("*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-EMPTY - [0:0]\n:PREROUTING ACCEPT [0:0]\n"
            "-A KUBE-SVC-A -j KUBE-SEP-1\n-A KUBE-SVC-A -j KUBE-SEP-2\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n")
    rules = canonical_rules(text)
    assert set(rules) == {("nat", "KUBE-SVC-A"), ("nat", "KUBE-EMPTY")}      # only kube-proxy's chains
    assert rules[("nat", "KUBE-EMPTY")] == []
    swapped = text.replace("KUBE-SEP-1\n-A KUBE-SVC-A -j KUBE-SEP-2", "KUBE-SEP-2\n-A KUBE-SVC-A -j KUBE-SEP-1")
    assert canonical_rules(swapped)[("nat", "KUBE-SVC-A")] != rules[("nat", "KUBE-SVC-A")]


def test_digests_compare_as_the_canonical_rules_do():
    from kproxy.proxy.iptables.canon import rule_digests
    written = "*nat\n:KUBE-A - [0:0]\n" + "".join(f"-A KUBE-A {w}\n" for w, _ in SAME) + "COMMIT\n"
    saved = "*nat\n:KUBE-A - [0:0]\n" + "".join(f"-A KUBE-A {s}\n" for _, s in SAME) + "COMMIT\n"
    assert rule_digests(written) == rule_digests(saved)
    assert len(rule_digests(written)[("nat", "KUBE-A")]) == len(SAME)
    edited = saved.replace("10.180.0.1:80", "10.180.0.1:81")
    assert rule_digests(edited) != rule_digests(written)
