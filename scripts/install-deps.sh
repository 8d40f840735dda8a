#!/usr/bin/env bash
# Install what kproxy needs on a Debian/Ubuntu machine, skipping what is already there.
# One script for `make`, CI and the Vagrant box. Run as root.
#   install-deps.sh [--vm]      --vm also installs what `make test-vm` needs (qemu, a kernel)
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(iproute2 iputils-ping iptables nftables conntrack tcpdump ipset ipvsadm
      containernetworking-plugins busybox-static
      python3 python3-venv python3-pip make)
if [ "${1:-}" = "--vm" ]; then
  PKGS+=(qemu-system-x86 cpio kmod)
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.kproxy-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  touch "$stamp"
fi
