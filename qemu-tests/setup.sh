#!/usr/bin/env bash
# Install (from the machine's normal Debian sources) everything the QEMU
# end-to-end tests need: QEMU, a static busybox, cpio, and the kernel build
# dependencies. Safe to run repeatedly: it only installs what is missing.
#
# Usage: qemu-tests/setup.sh            (as root, non-interactive)
# Not root: prints the exact apt-get line to run and exits 1.
set -euo pipefail

# Debian packages needed (comments say why).
PKGS=(
  qemu-system-x86    # qemu-system-x86_64 (TCG)
  busybox-static     # /bin/busybox for the initramfs
  cpio               # packs the initramfs
  gzip
  gcc                # static helper programs (kexec / LUO smoke test)
  libc6-dev
  make
  bc
  bison
  flex
  libelf-dev
  libssl-dev
  xz-utils
  bzip2
  perl
  python3
  ca-certificates
  debian-archive-keyring
  mmdebstrap         # the Debian sid root of the host image (qemu-tests/host/build-image.sh)
  qemu-utils         # qemu-img: a qcow2 overlay per host scenario
  e2fsprogs          # mkfs.ext4 -d: the host image without loop mounts
  openssh-client     # ssh into the host
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all packages already installed: ${PKGS[*]}"
  exit 0
fi

line="apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "setup: missing packages: ${missing[*]}" >&2
  echo "setup: not root; run as root:" >&2
  echo "  apt-get update && DEBIAN_FRONTEND=noninteractive $line" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup: running: apt-get update"
apt-get update
echo "setup: running: $line"
$line </dev/null
echo "setup: done"
