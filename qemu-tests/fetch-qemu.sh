#!/usr/bin/env bash
# Fetch (or reuse from cache) QEMU 10.0 from Debian bookworm-backports for
# the QEMU launcher's tests (luo-qemu needs cpr-reboot, QEMU 8.2+; Debian
# 12's own QEMU is 7.2). The packages are downloaded with a private apt
# configuration and unpacked with dpkg-deb -x, never installed: the
# machine's QEMU (used by the rest of the harness) is untouched. Its
# libraries are those of Debian 12.
#
# stdout: one line, the path of a wrapper that runs this QEMU with its own
# firmware (-L) and modules (QEMU_MODULE_DIR: the machine's 7.2 modules do
# not load into 10.0) and passes every argument and descriptor on.
#
# Environment: LUO_CACHE, LUO_QEMU_SUITE (bookworm-backports).
set -euo pipefail
LOG_TAG=fetch-qemu
. "$(dirname "$0")/lib/common.sh"
. "$QEMU_TESTS_DIR/lib/apt-private.sh"
for t in apt-get dpkg-deb flock; do need "$t"; done
: "${LUO_QEMU_SUITE:=bookworm-backports}"
mkdir -p "$LUO_CACHE"
APT_DIR="$LUO_CACHE/apt-$LUO_QEMU_SUITE"
LUO_APT_SOURCES="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $LUO_DEBIAN_MIRROR $LUO_QEMU_SUITE main"
export LUO_APT_SOURCES
exec 9>"$LUO_CACHE/fetch-qemu.lock"
flock 9
latest="$LUO_CACHE/qemu-latest-$LUO_QEMU_SUITE"
if [ -s "$latest" ] && [ -x "$(cut -d' ' -f1 "$latest")" ]; then
  cat "$latest"
  exit 0
fi
apt_private_update >&2
pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
ver=$(apt-cache "${APT_PRIV[@]}" show "qemu-system-x86/$LUO_QEMU_SUITE" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
[ -n "$ver" ] || die "qemu-system-x86 is not in $LUO_QEMU_SUITE"
dir="$LUO_CACHE/qemu-${ver//[:~+]/_}"
if [ ! -f "$dir/.extracted" ]; then
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/debs"
  (cd "$dir.tmp/debs" && apt-get "${APT_PRIV[@]}" -q download "${pkgs[@]/%//$LUO_QEMU_SUITE}" >&2)
  for d in "$dir.tmp"/debs/*.deb; do dpkg-deb -x "$d" "$dir.tmp/root"; done
  rm -rf "$dir.tmp/debs"
  rm -rf "$dir" && mv "$dir.tmp" "$dir" && touch "$dir/.extracted"
fi
bin="$dir/root/usr/bin/qemu-system-x86_64"
"$bin" --version >&2 || die "$bin does not run on this machine"
cat > "$dir/qemu-system-x86_64.new" <<WRAP
#!/bin/sh
QEMU_MODULE_DIR="$dir/root/usr/lib/x86_64-linux-gnu/qemu" exec "$bin" -L "$dir/root/usr/share/qemu" -L "$dir/root/usr/share/seabios" "\$@"
WRAP
chmod 0755 "$dir/qemu-system-x86_64.new" && mv "$dir/qemu-system-x86_64.new" "$dir/qemu-system-x86_64"
echo "$dir/qemu-system-x86_64" | tee "$latest"
