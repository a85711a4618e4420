#!/usr/bin/env bash
# Builds the launcher tests' guest initramfs (busybox + ./init) at $1.
# Needs Debian's busybox-static (a static /bin/busybox), cpio and gzip;
# with cc and a static libc it adds /bin/tsc (tsc.c).
#
#   make-initrd.sh OUT [MODULE.ko...]
#
# The modules (uncompressed .ko files of the guest's exact kernel, e.g.
# virtio_blk.ko with its dependencies first) go to /lib/modules; init loads
# them in the order given (/lib/modules/order). Without them the guest has
# no disk and its lines carry no disk fields.
set -euo pipefail
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
bb=$(command -v busybox)
file -L "$bb" 2>/dev/null | grep -q "statically linked" || { echo "make-initrd: $bb is not static (install busybox-static)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,proc,sys,dev,tmp}
cp "$here/fill" "$tmp/fill.sh"
cp "$bb" "$tmp/bin/busybox"
cp "$here/init" "$tmp/init"
# /bin/tsc (the guest's TSC on every tick), when a C compiler and a static
# libc are here (Rust's toolchain needs cc anyway).
if command -v cc >/dev/null && ! cc -static -O2 -o "$tmp/bin/tsc" "$here/tsc.c" 2>"$tmp/cc.err"; then
  echo "make-initrd: no /bin/tsc in the guest (cc -static failed: $(head -c 300 "$tmp/cc.err"))" >&2
fi
rm -f "$tmp/cc.err"
if [ $# -gt 0 ]; then
  mkdir -p "$tmp/lib/modules"
  for ko in "$@"; do
    case "$ko" in *.ko) ;; *) echo "make-initrd: $ko is not an uncompressed .ko" >&2; exit 1 ;; esac
    [ -f "$ko" ] || { echo "make-initrd: no module $ko" >&2; exit 1; }
    cp "$ko" "$tmp/lib/modules/"
    basename "$ko" >> "$tmp/lib/modules/order"
  done
fi
(cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
