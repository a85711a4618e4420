#!/usr/bin/env bash
# Builds the launcher tests' guest initramfs (busybox + ./init) at $1.
# Needs Debian's busybox-static (a static /bin/busybox), cpio and gzip.
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
bb=$(command -v busybox)
file -L "$bb" 2>/dev/null | grep -q "statically linked" || { echo "make-initrd: $bb is not static (install busybox-static)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,proc,sys,dev,tmp}
cp "$here/fill" "$tmp/fill.sh"
cp "$bb" "$tmp/bin/busybox"
cp "$here/init" "$tmp/init"
(cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
