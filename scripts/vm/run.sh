#!/usr/bin/env bash
# Run a command inside a throwaway VM that boots a stock Debian kernel (IP_VS, dummy,
# vxlan, ...) with this machine's / shared read-only over 9p under a tmpfs overlay.
#
#   scripts/vm/run.sh [OPTIONS] -- COMMAND [ARG...]
#
# COMMAND runs as root in the VM, in the directory the caller is in, with the host's
# files (the repository, .venv, /usr) at the same paths. Its stdout and stderr stream to
# ours; we exit with its exit code. The VM has no network device. docs/vm.md tells more.
#
# Options (environment variable in brackets):
#   --cache DIR         kernel, initramfs and downloads (default: REPO/vm) [KPROXY_VM_CACHE]
#   --timeout SECONDS   power the VM off (kill qemu) after this long; default 1200 [KPROXY_VM_TIMEOUT]
#   --kernel PKG        Debian kernel package (linux-image-6.1.0-57-amd64, or just
#                       6.1.0-57-amd64); default: the cached one, else what
#                       linux-image-amd64 depends on [KPROXY_VM_KERNEL]
#   --update            look linux-image-amd64 up again even when a kernel is cached,
#                       and drop the other cached kernels once the new one is ready
#   --accel auto|kvm|tcg  default auto: kvm when /dev/kvm works, else tcg [KPROXY_VM_ACCEL]
#   --mem MB            guest memory, default 2048 [KPROXY_VM_MEM]
#   --smp N             guest CPUs, default 2 [KPROXY_VM_SMP]
#   --out DIR           keep the files COMMAND writes to $KPROXY_VM_OUT (pcaps, logs) in DIR
#   --env NAME[=VALUE]  pass a variable to COMMAND (repeatable). PATH, LANG, LC_*, TZ,
#                       VIRTUAL_ENV, PYTHON*, PYTEST_ADDOPTS, CI and KPROXY_* always pass.
#   --host-tmp          show the host's /tmp in the VM (default: an empty tmpfs)
#   --modules FILE      the module list (default: scripts/vm/modules.list)
#   --console           stream the VM's console (kernel and init messages) to stderr
#   --prepare           download and build the kernel and initramfs, do not boot
#   -h, --help
#
# Exit status: COMMAND's, else 124 when the timeout killed the VM, 125 when the VM or
# this script failed before COMMAND's exit code was known (reason on stderr).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PATH=$PATH:/usr/sbin:/sbin
# Bump when the initramfs recipe below changes: cached initramfs images are rebuilt.
BUILD_FORMAT=2

CACHE=${KPROXY_VM_CACHE:-$REPO/vm}
TIMEOUT=${KPROXY_VM_TIMEOUT:-1200}
KPKG=${KPROXY_VM_KERNEL:-}
ACCEL=${KPROXY_VM_ACCEL:-auto}
MEM=${KPROXY_VM_MEM:-2048}
SMP=${KPROXY_VM_SMP:-2}
MODULES_LIST=$HERE/modules.list
UPDATE=0 PREPARE_ONLY=0 CONSOLE=0 HOST_TMP=0 OUT_DIR=""
ENV_PASS=()

# Work directories to remove however we exit (the run's own cleanup is added below).
TEMPS=()
trap 'rm -rf "${TEMPS[@]}"' EXIT
log() { echo "kproxy-vm: $*" >&2; }
die() { echo "kproxy-vm: error: $*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

need() { [ $# -ge 2 ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case $1 in
    --cache) need "$@"; CACHE=$2; shift 2 ;;
    --cache=*) CACHE=${1#*=}; shift ;;
    --timeout) need "$@"; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --kernel) need "$@"; KPKG=$2; shift 2 ;;
    --kernel=*) KPKG=${1#*=}; shift ;;
    --accel) need "$@"; ACCEL=$2; shift 2 ;;
    --accel=*) ACCEL=${1#*=}; shift ;;
    --mem) need "$@"; MEM=$2; shift 2 ;;
    --mem=*) MEM=${1#*=}; shift ;;
    --smp) need "$@"; SMP=$2; shift 2 ;;
    --smp=*) SMP=${1#*=}; shift ;;
    --out) need "$@"; OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    --env) need "$@"; ENV_PASS+=("$2"); shift 2 ;;
    --env=*) ENV_PASS+=("${1#*=}"); shift ;;
    --modules) need "$@"; MODULES_LIST=$2; shift 2 ;;
    --modules=*) MODULES_LIST=${1#*=}; shift ;;
    --update) UPDATE=1; shift ;;
    --host-tmp) HOST_TMP=1; shift ;;
    --console) CONSOLE=1; shift ;;
    --prepare) PREPARE_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --; see --help)" ;;
  esac
done
[ "$PREPARE_ONLY" = 1 ] || [ $# -gt 0 ] || die "no command: scripts/vm/run.sh [OPTIONS] -- COMMAND [ARG...]"
# A caller (or a checkout) under /tmp, such as a CI clone, would find an empty /tmp in the
# VM: show the host's /tmp then, so the working directory and the repository are there.
case "$PWD/ $REPO/" in /tmp/*|*" /tmp/"*) HOST_TMP=1 ;; esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] && [ "$TIMEOUT" -gt 0 ] || die "--timeout wants a number of seconds, not '$TIMEOUT'"
[[ $MEM =~ ^[0-9]+$ ]] || die "--mem wants megabytes, not '$MEM'"
[[ $SMP =~ ^[0-9]+$ ]] || die "--smp wants a number, not '$SMP'"
case $ACCEL in auto|kvm|tcg) ;; *) die "--accel is auto, kvm or tcg, not '$ACCEL'" ;; esac
[ -f "$MODULES_LIST" ] || die "no module list at $MODULES_LIST"
[ -z "$KPKG" ] || [[ $KPKG == linux-image-* ]] || KPKG=linux-image-$KPKG

for tool in qemu-system-x86_64 dpkg-deb depmod modprobe cpio busybox flock; do
  command -v "$tool" >/dev/null ||
    die "$tool is missing: run 'bash scripts/install-deps.sh --vm' (qemu-system-x86 cpio kmod busybox-static)"
done

# ---------------------------------------------------------------------------------------
# The kernel and the initramfs, prepared once into $CACHE:
#   debs/linux-image-VERSION_*.deb                 the downloaded package
#   kernels/PKG/{vmlinux or vmlinuz,kernel,config,kernel-version,package-version}
#   kernels/PKG/initramfs-STAMP.img                busybox, init, modules (STAMP: their hash)
#   current                                        the package a plain run uses

build_stamp() {
  { echo "format $BUILD_FORMAT"; sha256sum "$HERE/init" "$MODULES_LIST" "$(command -v busybox)" | cut -d' ' -f1; } |
    sha256sum | cut -c1-16
}

# What linux-image-amd64 depends on in the apt lists: linux-image-6.1.0-57-amd64.
apt_kernel_package() {
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}') || true
  if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
    log "the apt lists do not know linux-image-amd64: running apt-get update"
    apt-get update -qq >&2 || true
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}') || true
  fi
  [ -n "$pkg" ] || die "cannot tell which kernel linux-image-amd64 means (apt-cache depends linux-image-amd64 says nothing: run apt-get update, or pass --kernel linux-image-VERSION-amd64)"
  echo "$pkg"
}

download_deb() {  # PKG -> path of the cached .deb
  local pkg=$1 debdir=$CACHE/debs deb tmp
  mkdir -p "$debdir"
  deb=$(ls "$debdir/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n 1) || true
  if [ -z "$deb" ]; then
    tmp=$(mktemp -d "$debdir/.download.XXXXXX")
    TEMPS+=("$tmp")
    # apt downloads as _apt when it may write there (otherwise it warns and goes on as root).
    chown _apt "$tmp" 2>/dev/null || true
    log "downloading $pkg (about 70 MB, once; cached in $debdir)"
    if ! (cd "$tmp" && apt-get download -q "$pkg" </dev/null >&2); then
      rm -rf "$tmp"
      die "apt-get download $pkg failed (is it in the apt lists? apt-get update; apt-cache policy $pkg)"
    fi
    mv "$tmp"/*.deb "$debdir"/
    rmdir "$tmp"
    deb=$(ls "$debdir/${pkg}"_*.deb | sort -V | tail -n 1)
  fi
  echo "$deb"
}

# Unpack the package (into $TREE) and find its kernel version ($KVER, $MODDIR).
unpack_deb() {
  local deb=$1 d
  TREE=$(mktemp -d "$CACHE/.unpacked.XXXXXX")
  TEMPS+=("$TREE")
  dpkg-deb -x "$deb" "$TREE" || die "dpkg-deb -x $deb failed (a damaged download? remove it and run again)"
  # Debian 12 installs modules in /lib/modules, later releases in /usr/lib/modules.
  if [ ! -d "$TREE/lib/modules" ] && [ -d "$TREE/usr/lib/modules" ]; then
    mkdir -p "$TREE/lib" && ln -s ../usr/lib/modules "$TREE/lib/modules"
  fi
  local vers=()
  for d in "$TREE"/lib/modules/*/; do [ -f "$d/modules.order" ] && vers+=("$(basename "$d")"); done
  [ ${#vers[@]} = 1 ] || die "$deb holds ${#vers[@]} kernel module trees (${vers[*]:-none}), expected one"
  KVER=${vers[0]}
  MODDIR=$TREE/lib/modules/$KVER
  [ -f "$TREE/boot/vmlinuz-$KVER" ] || die "$deb has no boot/vmlinuz-$KVER"
  depmod -b "$TREE" "$KVER" || die "depmod -b $TREE $KVER failed"
}

# modprobe --show-depends in the unpacked tree, ignoring this machine's modprobe.d:
# prints the module's and its dependencies' paths relative to $MODDIR, "builtin" for a
# built-in one; fails when the kernel has no such module.
module_paths() {
  local out line
  out=$(modprobe -d "$TREE" -S "$KVER" -C "$EMPTY_CONF" --show-depends "$1" 2>/dev/null) || return 1
  [ -n "$out" ] || return 1
  while read -r line; do
    case $line in
      insmod\ *) line=${line#insmod }; line=${line%% *}; echo "${line#"$MODDIR"/}" ;;
      builtin\ *) echo builtin ;;
    esac
  done <<<"$out"
}

build_initramfs() {  # -> $1 (the image)
  local img=$1 root kind arg rest name names rel f n_load=0 n_carry=0
  local -A carry=() deps=()
  root=$(mktemp -d "$CACHE/.initramfs.XXXXXX")
  TEMPS+=("$root")
  EMPTY_CONF=$root/.empty-modprobe.d
  mkdir -p "$EMPTY_CONF" "$root"/{bin,sbin,dev,proc,sys,etc/kproxy-vm,"lib/modules/$KVER"}

  local bb
  bb=$(command -v busybox)
  [[ $(LC_ALL=C ldd "$bb" 2>&1 || true) =~ "not a dynamic executable"|"statically linked" ]] ||
    die "$bb is not statically linked: install busybox-static (bash scripts/install-deps.sh)"
  cp "$bb" "$root/bin/busybox"
  for name in $("$bb" --list); do
    [ "$name" = busybox ] || ln -s busybox "$root/bin/$name"
  done
  ln -s ../bin/busybox "$root/sbin/modprobe"   # the kernel's request_module() runs /sbin/modprobe
  install -m 0755 "$HERE/init" "$root/init"

  while IFS=: read -r name rest; do deps[$name]=$rest; done <"$MODDIR/modules.dep"
  local -A want=()
  : >"$root/etc/kproxy-vm/modules"
  while read -r kind arg rest; do
    case $kind in ''|\#*) continue ;; esac
    [ -n "$arg" ] || die "$MODULES_LIST: '$kind' without a name"
    case $kind in
      required|load)
        if [[ $arg == *[\*\?\[]* ]]; then
          names=$(find "$MODDIR/kernel" -name "$arg.ko*" -printf '%f\n' | sed 's/\.ko.*$//' | sort)
          [ -n "$names" ] || { log "warning: no module matches '$arg' in $KVER"; continue; }
        else
          names=$arg
        fi
        for name in $names; do
          local paths
          if ! paths=$(module_paths "$name"); then
            [ "$kind" = required ] && die "$KVER has no module $name, which $MODULES_LIST requires"
            log "warning: $KVER has no module $name (listed in $(basename "$MODULES_LIST")): left out"
            continue
          fi
          [ "$paths" = builtin ] && continue   # built into the kernel: nothing to load
          for rel in $paths; do [ "$rel" = builtin ] || want[$rel]=1; done
          echo "$kind $name" >>"$root/etc/kproxy-vm/modules"
          n_load=$((n_load + 1))
        done
        ;;
      carry)
        if [ -d "$MODDIR/kernel/$arg" ]; then
          while read -r f; do carry[${f#"$MODDIR"/}]=1; done < <(find "$MODDIR/kernel/$arg" -name '*.ko*')
        elif [ -f "$MODDIR/kernel/$arg" ]; then
          carry[kernel/$arg]=1
        else
          log "warning: $KVER has no kernel/$arg (carry line of $(basename "$MODULES_LIST"))"
        fi
        ;;
      *) die "$MODULES_LIST: unknown line '$kind $arg' (required, load or carry)" ;;
    esac
  done <"$MODULES_LIST"
  for rel in "${!carry[@]}"; do
    want[$rel]=1
    for f in ${deps[$rel]:-}; do want[$f]=1; done
    n_carry=$((n_carry + 1))
  done
  for rel in "${!want[@]}"; do
    mkdir -p "$root/lib/modules/$KVER/$(dirname "$rel")"
    cp "$MODDIR/$rel" "$root/lib/modules/$KVER/$rel"
  done
  for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -f "$MODDIR/$f" ] && cp "$MODDIR/$f" "$root/lib/modules/$KVER/"
  done
  depmod -b "$root" "$KVER" || die "depmod for the initramfs failed"
  rm -rf "$EMPTY_CONF"
  # Not compressed: decompressing gzip under TCG delays every boot by about 1.5 s; the
  # image is 15 MB instead of 5.
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$img.tmp"
  mv "$img.tmp" "$img"
  log "initramfs: ${#want[@]} modules ($n_load loaded at boot, $n_carry carried for on-demand loading), $(du -h "$img" | cut -f1)"
  rm -rf "$root"
}

# The kernel qemu boots, recorded in DIR/kernel. Debian's bzImage is xz-compressed, and
# under TCG decompressing it takes about 5 s of every boot: when the kernel has PVH entry
# (CONFIG_PVH=y) qemu boots the uncompressed ELF (vmlinux) directly, so unpack it once here.
install_kernel() {  # BZIMAGE CONFIG DIR
  local bz=$1 config=$2 dir=$3
  if grep -qx 'CONFIG_PVH=y' "$config" && command -v python3 >/dev/null &&
     python3 - "$bz" "$dir/vmlinux.tmp" <<'PY'
import bz2, gzip, lzma, sys, zlib
data = open(sys.argv[1], "rb").read()
formats = [(b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
           (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
           (b"\x5d\x00\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)),
           (b"BZh", lambda: bz2.BZ2Decompressor())]
for magic, make in formats:
    at = data.find(magic)
    while at >= 0:
        try:
            out = make().decompress(data[at:])
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
        at = data.find(magic, at + 1)
sys.exit(1)
PY
  then
    mv "$dir/vmlinux.tmp" "$dir/vmlinux"
    echo vmlinux >"$dir/kernel"
  else
    rm -f "$dir/vmlinux.tmp"
    log "booting the compressed kernel (no PVH entry, or no python3 to unpack it): about 5 s slower under TCG"
    cp "$bz" "$dir/vmlinuz"
    echo vmlinuz >"$dir/kernel"
  fi
}

prepare() {
  mkdir -p "$CACHE"
  CACHE=$(cd "$CACHE" && pwd)
  exec 8>"$CACHE/.lock"
  flock 8   # two runs sharing a cache build it once

  local pkg explicit=0 stamp kdir deb
  if [ -n "$KPKG" ]; then
    pkg=$KPKG explicit=1
  elif [ "$UPDATE" = 0 ] && [ -s "$CACHE/current" ] && [ -f "$CACHE/kernels/$(cat "$CACHE/current")/kernel" ]; then
    pkg=$(cat "$CACHE/current")
  else
    if [ "$UPDATE" = 1 ] && [ "$(id -u)" = 0 ]; then
      log "--update: apt-get update"
      apt-get update -qq >&2 || log "warning: apt-get update failed; using the lists apt has"
    fi
    pkg=$(apt_kernel_package)
  fi
  stamp=$(build_stamp)
  kdir=$CACHE/kernels/$pkg
  INITRD=$kdir/initramfs-$stamp.img
  if [ ! -f "$kdir/kernel" ] || [ ! -f "$INITRD" ]; then
    local t0=$EPOCHREALTIME
    deb=$(download_deb "$pkg")
    unpack_deb "$deb"
    mkdir -p "$kdir"
    log "building the initramfs for $KVER ($(basename "$deb"))"
    build_initramfs "$INITRD"
    if [ ! -f "$kdir/kernel" ]; then
      cp "$TREE/boot/config-$KVER" "$kdir/config"
      echo "$KVER" >"$kdir/kernel-version"
      dpkg-deb -f "$deb" Version >"$kdir/package-version"
      install_kernel "$TREE/boot/vmlinuz-$KVER" "$TREE/boot/config-$KVER" "$kdir"
    fi
    rm -rf "$TREE"
    # Keep the two newest initramfs images of this kernel (another module list, an older recipe).
    ls -t "$kdir"/initramfs-*.img | tail -n +3 | xargs -r rm -f
    log "prepared in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}') s"
  fi
  KVER=$(cat "$kdir/kernel-version")
  KERNEL=$kdir/$(cat "$kdir/kernel")
  if [ "$explicit" = 0 ]; then
    echo "$pkg" >"$CACHE/current"
    if [ "$UPDATE" = 1 ]; then   # drop the kernels --update replaced
      for d in "$CACHE"/kernels/*/; do
        [ "$(basename "$d")" = "$pkg" ] || { log "removing the older $(basename "$d")"; rm -rf "$d"; }
      done
      for d in "$CACHE"/debs/*.deb; do
        [[ $(basename "$d") == "${pkg}"_* ]] || rm -f "$d"
      done
    fi
  fi
  exec 8>&-
}

prepare
if [ "$PREPARE_ONLY" = 1 ]; then
  log "ready: $KERNEL ($KVER), $INITRD; cache $(du -sh "$CACHE" | cut -f1) in $CACHE"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# The run.

# /dev/kvm can exist where KVM cannot run a guest: on this kind of sandbox SeaBIOS runs
# but the kernel hangs as it enters long mode. So: the CPU must show vmx or svm, and a
# boot of the kernel with no initramfs must reach its "cannot mount root" panic (qemu
# exits, -no-reboot) within 15 s. The answer is cached per host kernel and qemu.
kvm_usable() {
  [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
  grep -qwE 'vmx|svm' /proc/cpuinfo || return 1
  local key probe=$CACHE/kvm-probe
  key="$(uname -r) $(qemu-system-x86_64 --version | head -n 1)"
  if [ -f "$probe" ] && [ "$(sed -n 1p "$probe")" = "$key" ]; then
    [ "$(sed -n 2p "$probe")" = yes ]
    return
  fi
  local ok=no
  if timeout 15 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -no-user-config -display none \
      -monitor none -no-reboot -serial none -kernel "$KERNEL" -append "panic=-1 loglevel=0" \
      </dev/null >/dev/null 2>&1; then
    ok=yes
  fi
  printf '%s\n%s\n' "$key" "$ok" >"$probe"
  [ "$ok" = yes ]
}
case $ACCEL in
  auto) if kvm_usable; then ACCEL=kvm; else ACCEL=tcg; fi ;;
  kvm) [ -c /dev/kvm ] || die "--accel kvm: there is no /dev/kvm here (try --accel tcg)" ;;
esac
if [ "$ACCEL" = kvm ]; then CPU=host; else CPU=max; fi

RUN=$(mktemp -d "${TMPDIR:-/tmp}/kproxy-vm.XXXXXX")
SHARE=$RUN/share
mkdir -p "$SHARE/vm" "$SHARE/out"
QPID="" SPID="" OPID="" EPID="" TPID=""
cleanup() {
  local p
  for p in $QPID $SPID $OPID $EPID $TPID; do kill "$p" 2>/dev/null || true; done
  rm -rf "$RUN" "${TEMPS[@]}"
}
trap cleanup EXIT
trap 'log "interrupted: stopping the VM"; exit 130' INT TERM HUP

# The command, as a bash script on the share: same directory, chosen environment.
STDOUT_TTY=0
[ -t 1 ] && STDOUT_TTY=1
{
  echo "# written by scripts/vm/run.sh"
  for name in $(compgen -e); do
    case $name in
      PATH|LANG|LC_*|TZ|VIRTUAL_ENV|PYTHON*|PYTEST_ADDOPTS|CI|KPROXY_*) printf 'export %s=%q\n' "$name" "${!name}" ;;
    esac
  done
  for kv in "${ENV_PASS[@]}"; do
    if [[ $kv == *=* ]]; then printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
    elif [ -n "${!kv+x}" ]; then printf 'export %s=%q\n' "$kv" "${!kv}"
    fi
  done
  if [ "$STDOUT_TTY" = 1 ]; then printf 'export TERM=%q\n' "${TERM:-vt100}"; else echo 'export TERM=dumb'; fi
  echo 'export HOME=/root USER=root LOGNAME=root KPROXY_IN_VM=1 KPROXY_VM_OUT=/run/kproxy-vm/out'
  printf 'cd -- %q 2>/dev/null || { echo "kproxy-vm: cannot enter %q in the VM (its /run, /tmp and /var/lib/kproxy start empty; --host-tmp shows the host'"'"'s /tmp)" >&2; exit 125; }\n' "$PWD" "$PWD"
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$SHARE/vm/command.sh"
if [ -t 1 ]; then stty size <&1 >"$SHARE/vm/tty1" 2>/dev/null || echo >"$SHARE/vm/tty1"; fi
if [ -t 2 ]; then stty size <&2 >"$SHARE/vm/tty2" 2>/dev/null || echo >"$SHARE/vm/tty2"; fi
[ "$HOST_TMP" = 0 ] || touch "$SHARE/vm/host-tmp"

# ttyS0: the console (a log file); ttyS1, ttyS2: COMMAND's stdout and stderr, through fifos
# that cat copies to ours, whatever they are (terminal, pipe, file, socket).
mkfifo "$RUN/stdout" "$RUN/stderr"
cat "$RUN/stdout" & OPID=$!
cat "$RUN/stderr" >&2 & EPID=$!

# Boot time under TCG: cryptomgr.notests skips the crypto self-tests (about 1 s), and
# acpi=noirq routes PCI interrupts from the PIRQ table instead of running ACPI's link
# methods in the emulated CPU (about 0.5 s per virtio device).
APPEND="console=ttyS0,115200 loglevel=4 panic=-1 mitigations=off random.trust_cpu=on cryptomgr.notests acpi=noirq"
APPEND+=" i8042.noaux i8042.nomux i8042.nopnp ${KPROXY_VM_APPEND:-}"
Q_RUN=${RUN//,/,,} Q_SHARE=${SHARE//,/,,}   # qemu's option syntax doubles commas
QEMU=(qemu-system-x86_64 -name kproxy-vm -nodefaults -no-user-config -display none -monitor none
  -no-reboot -machine pc -accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM"
  -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
  -chardev "file,id=console,path=$Q_RUN/console.log" -serial chardev:console
  -chardev "file,id=stdout,path=$Q_RUN/stdout" -serial chardev:stdout
  -chardev "file,id=stderr,path=$Q_RUN/stderr" -serial chardev:stderr
  -nic none -device virtio-rng-pci
  -virtfs local,path=/,mount_tag=kproxyroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$Q_SHARE,mount_tag=kproxyvm,security_model=none,multidevs=remap")

T0=$EPOCHREALTIME
"${QEMU[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
sleep "$TIMEOUT" & SPID=$!
if [ "$CONSOLE" = 1 ]; then
  touch "$RUN/console.log"
  tail -n +1 -F --pid="$QPID" "$RUN/console.log" >&2 2>/dev/null & TPID=$!
fi
TIMED_OUT=0
wait -n "$QPID" "$SPID" || true
if kill -0 "$QPID" 2>/dev/null; then
  TIMED_OUT=1
  log "timeout: the VM is still running after ${TIMEOUT} s: killing it (qemu pid $QPID)"
  kill -TERM "$QPID" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$QPID" 2>/dev/null || true
fi
QRC=0
wait "$QPID" || QRC=$?
QPID=""
T1=$EPOCHREALTIME
kill "$SPID" 2>/dev/null || true
wait "$SPID" 2>/dev/null || true
SPID=""
# Unblock a cat whose fifo qemu never opened; then let both finish copying.
for f in stdout stderr; do exec 9<>"$RUN/$f"; exec 9>&-; done
wait "$OPID" || true
wait "$EPID" || true
OPID="" EPID=""
if [ -n "$TPID" ]; then wait "$TPID" 2>/dev/null || true; TPID=""; fi

if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR"
  cp -a "$SHARE/out/." "$OUT_DIR/"
fi

show_console() {
  log "the VM's console (last 40 lines of $1):"
  tail -n 40 "$RUN/console.log" >&2 2>/dev/null || true
  if [ -s "$RUN/qemu.log" ]; then log "qemu said:"; cat "$RUN/qemu.log" >&2; fi
}
if [ -s "$SHARE/vm/exit-code" ]; then
  RC=$(cat "$SHARE/vm/exit-code")
  read -r t_init t_mod t_ready <"$SHARE/vm/times-ready" || true
  t_off=$(cat "$SHARE/vm/time-off" 2>/dev/null || cat "$SHARE/vm/time-end")
  failed=$(cat "$SHARE/vm/modules-failed" 2>/dev/null || true)
  [ -z "${failed// /}" ] || log "warning: optional modules that did not load in the VM:$failed"
  awk -v t0="$T0" -v t1="$T1" -v ti="$t_init" -v tm="$t_mod" -v tr="$t_ready" -v te="$(cat "$SHARE/vm/time-end")" \
      -v to="$t_off" -v accel="$ACCEL" -v kver="$KVER" -v rc="$RC" 'BEGIN {
    wall = t1 - t0; boot = wall - (to - tr)
    printf "kproxy-vm: booted in %.1f s (%s, %s: /init at %.1f s of uptime, modules by %.1f s, root ready at %.1f s); command ran %.1f s; exit code %d\n",
      boot, accel, kver, ti, tm, tr, te - tr, rc > "/dev/stderr" }'
  exit "$RC"
fi
if [ "$TIMED_OUT" = 1 ]; then
  show_console "the killed VM"
  exit 124
fi
if [ -s "$SHARE/vm/error" ]; then
  log "error: the VM could not run the command: $(cat "$SHARE/vm/error")"
  show_console "the VM"
  exit 125
fi
err=$(grep -a -o 'KPROXY-VM-ERROR=.*' "$RUN/console.log" 2>/dev/null | head -n 1 | tr -d '\r') || true
if [ -n "$err" ]; then
  log "error: the VM could not run the command: ${err#KPROXY-VM-ERROR=}"
else
  log "error: the VM stopped without an exit code (qemu exited with $QRC)"
fi
show_console "the VM"
exit 125
