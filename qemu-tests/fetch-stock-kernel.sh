#!/usr/bin/env bash
# Fetch (or reuse from cache) a stock Debian kernel: the versioned package
# that linux-image-amd64 of $LUO_STOCK_RELEASE (default bookworm, with its
# -updates and -security suites) points to. Unpacked with dpkg-deb -x, never
# installed. Then report whether what the QEMU tests need is built in (its
# modules are not in our initramfs).
#
# stdout: the path of the vmlinuz (only that line); the report goes to stderr
# and to <cache dir>/report.txt.
#
# Environment: LUO_CACHE, LUO_STOCK_RELEASE (bookworm), LUO_STOCK_REFRESH=1
# (re-resolve the version instead of using the last one fetched).
set -euo pipefail
LOG_TAG=fetch-stock-kernel
. "$(dirname "$0")/lib/common.sh"
. "$QEMU_TESTS_DIR/lib/apt-private.sh"

for t in apt-get apt-cache dpkg dpkg-deb; do need "$t"; done
mkdir -p "$LUO_CACHE" || die "cannot create $LUO_CACHE (run as root or set LUO_CACHE)"

# What we need built in (=y), and why.
NEEDS=(
  "CONFIG_SERIAL_8250=y|8250 UART driver (console=ttyS0)"
  "CONFIG_SERIAL_8250_CONSOLE=y|console on the 8250 UART"
  "CONFIG_BLK_DEV_INITRD=y|initramfs support"
  "CONFIG_RD_GZIP=y|gzip-compressed initramfs"
  "CONFIG_DEVTMPFS=y|devtmpfs for /dev"
  "CONFIG_DEVMEM=y|/dev/mem (reserved-memory backend)"
  "CONFIG_KEXEC_FILE=y|kexec_file_load syscall"
  "CONFIG_TMPFS=y|tmpfs"
  "CONFIG_MEMFD_CREATE=y|memfd_create"
  "CONFIG_PROC_FS=y|/proc"
  "CONFIG_SYSFS=y|/sys"
  "CONFIG_BINFMT_SCRIPT=y|#! scripts (/init)"
)
# Interesting but optional.
INFO=(CONFIG_STRICT_DEVMEM CONFIG_IO_STRICT_DEVMEM CONFIG_X86_PMEM_LEGACY CONFIG_BLK_DEV_PMEM CONFIG_LIBNVDIMM
      CONFIG_KEXEC CONFIG_KEXEC_SIG CONFIG_KEXEC_SIG_FORCE CONFIG_KEXEC_BZIMAGE_VERIFY_SIG CONFIG_SECURITY_LOCKDOWN_LSM
      CONFIG_LOCK_DOWN_KERNEL_FORCE_NONE CONFIG_KEXEC_HANDOVER CONFIG_LIVEUPDATE CONFIG_KVM CONFIG_KVM_AMD CONFIG_RANDOMIZE_BASE)

resolve() {
  apt_private_update "${LUO_APT_MAX_AGE:-21600}"
  local rel="$LUO_STOCK_RELEASE" best="" v suite
  while IFS='|' read -r _ v suite; do
    v="$(echo "$v" | xargs)"
    case "$suite" in
      *" $rel/"*|*" $rel-security/"*|*" $rel-updates/"*) ;;
      *) continue ;;
    esac
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
  done < <(apt-cache "${APT_PRIV[@]}" madison linux-image-amd64)
  [ -n "$best" ] || die "linux-image-amd64 not found in $rel{,-updates,-security}"
  local dep
  dep="$(apt-cache "${APT_PRIV[@]}" show "linux-image-amd64=$best" | sed -n 's/^Depends: //p' | head -n1 \
         | tr ',' '\n' | grep -o 'linux-image-[0-9][^ ]*' | head -n1)"
  [ -n "$dep" ] || die "cannot find the versioned image package linux-image-amd64=$best depends on"
  # The versioned package carries the same Debian version as the metapackage.
  echo "$dep $best"
}

latest="$LUO_CACHE/stock-latest-$LUO_STOCK_RELEASE"
if [ "${LUO_STOCK_REFRESH:-0}" != 1 ] && [ -f "$latest" ]; then
  read -r pkg ver < "$latest"
else
  read -r pkg ver < <(resolve)
fi
out="$LUO_CACHE/stock-$pkg-$ver"

if [ ! -f "$out/.extracted" ]; then
  apt_private_update "${LUO_APT_MAX_AGE:-21600}"
  mkdir -p "$LUO_CACHE/debs"
  ts=$(now_ms)
  log "running: (cd $LUO_CACHE/debs && apt-get <private config> download $pkg=$ver)"
  (cd "$LUO_CACHE/debs" && apt-get "${APT_PRIV[@]}" -q download "$pkg=$ver" </dev/null) >&2
  deb="$(ls "$LUO_CACHE/debs/${pkg}_"*_amd64.deb | while read -r f; do
           [ "$(dpkg-deb -f "$f" Version)" = "$ver" ] && echo "$f"; done | head -n1)"
  [ -n "$deb" ] || die "download of $pkg=$ver produced no .deb"
  rm -rf "$out"; mkdir -p "$out/root"
  dpkg-deb -x "$deb" "$out/root"
  touch "$out/.extracted"
  log "downloaded and extracted $(basename "$deb") in $(secs_since "$ts") s"
fi
echo "$pkg $ver" > "$latest"

vmlinuz="$(ls "$out"/root/boot/vmlinuz-* | head -n1)"
config="$(ls "$out"/root/boot/config-* | head -n1)"
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-* in $pkg"
[ -f "$config" ] || die "no /boot/config-* in $pkg"

{
  echo "stock kernel: $pkg $ver ($LUO_STOCK_RELEASE)"
  echo "vmlinuz: $vmlinuz"
  missing=0
  for n in "${NEEDS[@]}"; do
    want="${n%%|*}" why="${n#*|}" sym="${want%%=*}"
    got="$(grep -E "^(# )?${sym}[= ]" "$config" || echo "$sym absent")"
    if [ "$got" = "$want" ]; then
      echo "  ok       $got  ($why)"
    else
      echo "  MISSING  $got  (need $want: $why)"
      missing=$((missing + 1))
    fi
  done
  echo "  ok       memmap= (x86 core boot parameter, always built in)"
  for sym in "${INFO[@]}"; do
    echo "  info     $(grep -E "^(# )?${sym}[= ]" "$config" || echo "$sym absent")"
  done
  echo "built-in requirements missing: $missing"
} | tee "$out/report.txt" >&2
echo "$vmlinuz"
