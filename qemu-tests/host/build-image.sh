#!/usr/bin/env bash
# Build (or reuse from cache) the Debian host image: a Debian sid root made by
# mmdebstrap (--variant=minbase, no recommends), configured by
# qemu-tests/host/rootfs/ and the hooks below, written to an ext4 image with
# `mkfs.ext4 -d` (no loop mounts). Scenarios boot a fresh qcow2 overlay on it
# (qemu-tests/host/hostvm.py), never the image itself.
#
#   qemu-tests/host/build-image.sh --luo-kernel BZIMAGE
#
# stdout: the image directory (only that line); progress goes to stderr.
# The directory holds:
#   rootfs.ext4        the root filesystem (/dev/vda); /boot/vmlinuz-luo in it is BZIMAGE
#   id_ed25519{,.pub}  the harness's ssh key (root's authorized key in the image)
#   vmlinuz-stock, initrd-stock   sid's linux-image-amd64 (also in the image's /boot),
#                      to boot the host on Debian's stock kernel
#   manifest.json      resolved versions (systemd, qemu, glibc, stock kernel), key, build time
#   packages.txt       every installed package and version; build.log
#
# Cache key: $LUO_CACHE/host-image-<sha256[:16]> of the package set, this
# script, the rootfs/ overlay and BZIMAGE. Sid moves: a cached image keeps the
# versions it was built with (manifest.json) until the key changes or
# LUO_HOST_REBUILD=1.
#
# Environment: LUO_CACHE (/var/cache/liveupdate-qemu), LUO_DEBIAN_MIRROR
# (http://deb.debian.org/debian), LUO_HOST_REBUILD=1 (rebuild even if cached).
set -euo pipefail
LOG_TAG=host-image
. "$(dirname "$0")/../lib/common.sh"
HOST_DIR="$QEMU_TESTS_DIR/host"
: "${LUO_DEBIAN_MIRROR:=http://deb.debian.org/debian}"

luo_kernel=""
while [ $# -gt 0 ]; do
  case "$1" in
    --luo-kernel) luo_kernel="${2:-}"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (usage: build-image.sh --luo-kernel BZIMAGE)" ;;
  esac
done
[ -n "$luo_kernel" ] || die "--luo-kernel BZIMAGE is required (qemu-tests/build-kernel.sh prints it)"
[ -r "$luo_kernel" ] || die "LUO kernel not readable: $luo_kernel"

# The package set (sid, no recommends). Why each is there:
PKGS=(
  systemd-sysv        # systemd as PID 1 (>= 261: LUO-aware fd stores)
  dbus                # systemctl kexec/reboot talk to PID 1 over the system bus
  udev                # /dev nodes, module autoload on the stock kernel
  openssh-server      # the harness's way in (root, key only)
  python3             # scenario helpers inside the host
  qemu-system-x86     # VMs on the host (issue 10)
  iproute2            # ip
  kmod                # modprobe (stock kernel)
  kexec-tools         # kexec -s -l (kexec_file_load) before systemctl kexec
  jq                  # JSON from luoctl --json
  procps              # ps, pgrep
  linux-image-amd64   # Debian's stock kernel + modules + initramfs (reserved-memory backend)
  initramfs-tools     # the stock kernel's initramfs
)
for t in mmdebstrap mkfs.ext4 sha256sum flock tar python3; do need "$t"; done
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap root mode, mkfs.ext4 -d of root-owned files)"
mkdir -p "$LUO_CACHE"

key="$( {
  printf '%s\n' "${PKGS[@]}"
  sha256sum < "$0"
  tar -C "$HOST_DIR/rootfs" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - . | sha256sum
  sha256sum < "$luo_kernel"
} | sha256sum | cut -c1-16)"
out="$LUO_CACHE/host-image-$key"

if [ "${LUO_HOST_REBUILD:-0}" != 1 ] && [ -f "$out/manifest.json" ]; then
  log "cached: $out ($(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(", ".join(f"{k} {v}" for k,v in m["versions"].items()))' "$out/manifest.json"))"
  echo "$out"
  exit 0
fi

exec 9>"$LUO_CACHE/build-host-image.lock"
flock 9
if [ "${LUO_HOST_REBUILD:-0}" != 1 ] && [ -f "$out/manifest.json" ]; then
  log "cached (built while waiting for the lock): $out"
  echo "$out"
  exit 0
fi

t0=$(now_ms)
tmp="$out.tmp.$$"
rm -rf "$tmp"; mkdir -p "$tmp"
root="$tmp/root"
blog="$tmp/build.log"
trap 'rm -rf "$tmp"' EXIT

ssh-keygen -q -t ed25519 -N '' -C "liveupdate-qemu-host-$key" -f "$tmp/id_ed25519"
cp "$luo_kernel" "$tmp/vmlinuz-luo"

# Runs inside mmdebstrap after every package is installed; $1 is the root.
cat > "$tmp/customize.sh" <<HOOK
#!/bin/sh
set -eu
r="\$1"
# Owned by root whoever checked the repository out; existing directories keep their metadata.
tar -C "$HOST_DIR/rootfs" --owner=0 --group=0 --numeric-owner -cf - . | tar -C "\$r" --no-overwrite-dir -xf -
install -d -m 700 "\$r/root/.ssh"
install -m 600 "$tmp/id_ed25519.pub" "\$r/root/.ssh/authorized_keys"
install -m 644 "$tmp/vmlinuz-luo" "\$r/boot/vmlinuz-luo"
# A fixed machine id (so journals of all boots of one overlay stay together,
# and systemd-firstboot never prompts on the console).
python3 -c 'import uuid; print(uuid.uuid4().hex)' > "\$r/etc/machine-id"
mkdir -p "\$r/var/log/journal"
chroot "\$r" systemctl enable systemd-networkd.service luo-host-marker.service serial-getty@ttyS0.service
chroot "\$r" systemctl mask systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
  dpkg-db-backup.timer e2scrub_all.timer fstrim.timer systemd-networkd-wait-online.service \
  ldconfig.service systemd-journal-catalog-update.service systemd-update-done.service \
  systemd-network-generator.service systemd-networkd-persistent-storage.service systemd-pstore.service \
  modprobe@drm.service modprobe@efi_pstore.service modprobe@fuse.service modprobe@configfs.service \
  e2scrub_reap.service sys-kernel-tracing.mount sys-kernel-debug.mount dev-hugepages.mount
# kexec-tools must not turn an ordinary reboot into a kexec.
if [ -f "\$r/etc/default/kexec" ]; then
  sed -i 's/^LOAD_KEXEC=.*/LOAD_KEXEC=false/' "\$r/etc/default/kexec"
fi
printf '%s\n' virtio_pci virtio_blk ext4 >> "\$r/etc/initramfs-tools/modules"
chroot "\$r" update-initramfs -u -k all
HOOK
chmod 755 "$tmp/customize.sh"

ts=$(now_ms)
log "running: mmdebstrap --variant=minbase --include=${PKGS[*]} sid (log: $out/build.log)"
if ! mmdebstrap --variant=minbase --mode=root \
      --aptopt='Acquire::Check-Valid-Until "false"' \
      --aptopt='APT::Install-Recommends "false"' \
      --aptopt='Acquire::Languages "none"' \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --include="$(IFS=,; echo "${PKGS[*]}")" \
      --customize-hook="$tmp/customize.sh \"\$1\"" \
      sid "$root" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $LUO_DEBIAN_MIRROR sid main" \
      > "$blog" 2>&1; then
  tail -n 40 "$blog" >&2
  die "mmdebstrap failed (log above; full log: $blog)"
fi
debootstrap_s="$(secs_since "$ts")"
log "root filesystem ready in $debootstrap_s s ($(du -sm "$root" | cut -f1) MiB)"

# The stock kernel and its initramfs, for QEMU's -kernel/-initrd.
stock_ver="$(ls "$root/lib/modules" | sort -V | tail -n1)"
[ -n "$stock_ver" ] && [ -f "$root/boot/vmlinuz-$stock_ver" ] && [ -f "$root/boot/initrd.img-$stock_ver" ] \
  || die "no stock kernel/initrd in the image's /boot (linux-image-amd64 installed? see $blog)"
cp "$root/boot/vmlinuz-$stock_ver" "$tmp/vmlinuz-stock"
cp "$root/boot/initrd.img-$stock_ver" "$tmp/initrd-stock"

chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' > "$tmp/packages.txt"
ver() { awk -v p="$1" '$1 == p {print $2}' "$tmp/packages.txt"; }
v_systemd="$(ver systemd)" v_qemu="$(ver qemu-system-x86)" v_libc="$(ver libc6)"

ts=$(now_ms)
used_mib="$(du -sm "$root" | cut -f1)"
size_mib=$(( (used_mib * 12 / 10 + 3072 + 255) / 256 * 256 ))
log "running: mkfs.ext4 -d <root> rootfs.ext4 ${size_mib}M"
mkfs.ext4 -q -F -L luo-host -d "$root" "$tmp/rootfs.ext4" "${size_mib}M" >> "$blog" 2>&1 \
  || { tail -n 20 "$blog" >&2; die "mkfs.ext4 -d failed (log: $blog)"; }
mkfs_s="$(secs_since "$ts")"
rm -rf "$root"
rm -f "$tmp/customize.sh" "$tmp/vmlinuz-luo"

python3 - "$tmp/manifest.json" <<PY
import json, sys
m = {
    "key": "$key",
    "suite": "sid",
    "mirror": "$LUO_DEBIAN_MIRROR",
    "packages": "${PKGS[*]}".split(),
    "versions": {
        "systemd": "$v_systemd",
        "qemu-system-x86": "$v_qemu",
        "libc6": "$v_libc",
        "openssh-server": "$(ver openssh-server)",
        "linux-image-amd64": "$(ver linux-image-amd64)",
    },
    "stock_kernel_release": "$stock_ver",
    "luo_kernel_sha256": "$(sha256sum < "$luo_kernel" | cut -d' ' -f1)",
    "image_size_mib": $size_mib,
    "used_mib": $used_mib,
    "mmdebstrap_seconds": $debootstrap_s,
    "mkfs_seconds": $mkfs_s,
    "total_seconds": $(secs_since "$t0"),
}
json.dump(m, open(sys.argv[1], "w"), indent=2)
PY
trap - EXIT
rm -rf "$out"; mv "$tmp" "$out"
log "built $out in $(secs_since "$t0") s: systemd $v_systemd, qemu $v_qemu, glibc $v_libc, stock kernel $stock_ver"
echo "$out"
