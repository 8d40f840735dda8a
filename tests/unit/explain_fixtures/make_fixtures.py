"""Regenerate the kernel-normalised fixtures of the explain tests (needs root).

    sudo .venv/bin/python tests/unit/explain_fixtures/make_fixtures.py

For each iptables case, kproxy's render is loaded with iptables-restore into a
throwaway network namespace (a unique ``kpexplain-<hex>`` name, always deleted), the
jump rules kube-proxy ensures are added with ``iptables -I`` in kube-proxy's order, and
``iptables-save`` prints the tables back: ``<case>.iptables-save.txt``. For nft, upstream's
TestOverallNFTablesRules script (``upstream_overall.nft``) is loaded with ``nft -f`` and
listed back as text and JSON: ``upstream_overall.nft-list.txt`` / ``.nft.json``.

The render settings are ``settings()`` in test_explain.py (no nfacct matches: a restore
naming a missing nfacct object fails).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))

from kproxy.proxy.iptables.jumps import all_jump_rules  # noqa: E402
from tests.unit.test_explain import CASES, case_payload  # noqa: E402


def run(ns: str, argv, stdin: str = None) -> str:
    res = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


class Netns:
    def __init__(self):
        self.name = f"kpexplain-{secrets.token_hex(4)}"

    def __enter__(self) -> str:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self.name

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def iptables_case(name: str) -> None:
    payload = case_payload(name)
    with Netns() as ns:
        run(ns, ["iptables-restore", "-w", "5", "--noflush", "--counters"], payload)
        for jr in all_jump_rules():
            res = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "5", *jr.check_argv()],
                                 capture_output=True)
            if res.returncode != 0:
                run(ns, ["iptables", "-w", "5", *jr.insert_argv()])
        saved = run(ns, ["iptables-save"])
    (HERE / f"{name}.iptables-save.txt").write_text(saved)
    print(f"wrote {name}.iptables-save.txt ({len(saved.splitlines())} lines)")


def kernel_order(script: str) -> str:
    """Upstream's fixture is in its test's sorted order; nft needs every chain, set and
    map declared before a rule names it: objects first, then rules, then elements."""
    rank = {"table": 0, "set": 1, "map": 1, "chain": 2, "rule": 3, "element": 4}
    lines = [l for l in script.splitlines() if l.strip() and not l.startswith("#")]
    return "\n".join(sorted(lines, key=lambda l: rank.get(l.split()[1], 5))) + "\n"


def nft_case() -> None:
    script = kernel_order((HERE / "upstream_overall.nft").read_text())
    with Netns() as ns:
        run(ns, ["nft", "-f", "-"], script)
        listed = run(ns, ["nft", "list", "ruleset"])
        as_json = run(ns, ["nft", "-j", "list", "ruleset"])
    (HERE / "upstream_overall.nft-list.txt").write_text(listed)
    (HERE / "upstream_overall.nft.json").write_text(as_json)
    print("wrote upstream_overall.nft-list.txt and upstream_overall.nft.json")


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (it creates a throwaway network namespace)", file=sys.stderr)
        return 1
    for name in CASES:
        iptables_case(name)
    nft_case()
    return 0


if __name__ == "__main__":
    sys.exit(main())
