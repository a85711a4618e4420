#!/usr/bin/env bash
# Run luo-test-vmm's guest under real KVM inside a QEMU TCG guest (-cpu max
# offers AMD SVM, so /dev/kvm works there): boot, run, pause, save, continue
# in fresh processes (RAM as a file copy and as an inherited fd), check the
# counter keeps increasing, the RAM checksums match, and report the blackout.
#
# Usage: vmm/qemu-smoke.sh [--kernel BZIMAGE] [--vmm STATIC_BINARY]
#            [--seconds N] [--every N] [--timeout SECONDS] [--keep]
# Without --vmm the binary is built statically (glibc, crt-static) into
# $VMM_TARGET_DIR (default /work/target-vmm-static).
# Environment: LUO_CACHE (/var/cache/liveupdate-qemu), LUO_QEMU_MEM (1024).
# Exit 0 when every step passed; the serial log is kept in
# $LUO_CACHE/logs/vmm-smoke-<timestamp>.log (or /tmp if not writable).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
: "${LUO_CACHE:=/var/cache/liveupdate-qemu}"
log() { printf 'vmm-smoke: %s\n' "$*" >&2; }
die() { printf 'vmm-smoke: ERROR: %s\n' "$*" >&2; exit 1; }

kernel="" vmm="" seconds=2 every=65536 tmo=600 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel="$2"; shift 2 ;;
    --vmm) vmm="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --every) every="$2"; shift 2 ;;
    --timeout) tmo="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
for t in qemu-system-x86_64 cpio gzip timeout; do command -v "$t" >/dev/null || die "$t not found"; done
[ -x /bin/busybox ] || die "/bin/busybox not found (package busybox-static)"

if [ -z "$kernel" ]; then
  # The LUO test kernel (has CONFIG_KVM_AMD=y); newest one in the cache.
  kernel="$(ls -d "$LUO_CACHE"/kernel-7.*/bzImage 2>/dev/null | sort -V | tail -n1 || true)"
fi
[ -f "$kernel" ] || die "kernel image not found: '$kernel' (use --kernel; qemu-tests/build-kernel.sh builds one)"

if [ -z "$vmm" ]; then
  tdir="${VMM_TARGET_DIR:-/work/target-vmm-static}"
  log "building static luo-test-vmm into $tdir"
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$tdir" \
    cargo build --release --target x86_64-unknown-linux-gnu -p luo-test-vmm >&2)
  vmm="$tdir/x86_64-unknown-linux-gnu/release/luo-test-vmm"
fi
[ -x "$vmm" ] || die "VMM binary not found: $vmm"
if file "$vmm" 2>/dev/null | grep -q 'dynamically linked'; then die "$vmm is dynamically linked; build with -C target-feature=+crt-static"; fi

work="$(mktemp -d /tmp/vmm-smoke.XXXXXX)"
cleanup() { if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp}
cp /bin/busybox "$root/bin/busybox"
cp "$here/qemu-init" "$root/init"
chmod 755 "$root/init"
cp "$vmm" "$root/luo-test-vmm"
(cd "$root" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$work/initrd.gz"

logdir="$LUO_CACHE/logs"
mkdir -p "$logdir" 2>/dev/null && [ -w "$logdir" ] || logdir=/tmp
serial="$logdir/vmm-smoke-$(date +%Y%m%d-%H%M%S).log"
qemu=(qemu-system-x86_64 -accel tcg -cpu max -m "${LUO_QEMU_MEM:-1024}" -nographic -no-reboot
      -kernel "$kernel" -initrd "$work/initrd.gz"
      -append "console=ttyS0 panic=-1 vmm_seconds=$seconds vmm_every=$every")
log "running: timeout $tmo ${qemu[*]}"
set +e
timeout "$tmo" "${qemu[@]}" </dev/null >"$serial" 2>&1
rc=$?
set -e
tr -d '\r' <"$serial" >"$serial.tmp" && mv "$serial.tmp" "$serial"
grep -E '^(VMMSMOKE|VMM):|Kernel panic|BUG:|Oops|luo-test-vmm: error' "$serial" >&2 || true

fails=0
check() { if grep -qE "$2" "$serial"; then echo "  PASS  $1" >&2; else echo "  FAIL  $1" >&2; fails=$((fails + 1)); fi; }
echo "vmm-smoke checks:" >&2
check "/dev/kvm present in the QEMU guest" 'VMMSMOKE: /dev/kvm present'
for s in check run cycle pause-save restore-1 restore-2 fd-pause-save fd-restore fast-pause-save fast-restore kick deadline damaged-state; do
  check "step $s" "VMMSMOKE: step $s ok"
done
check "counter strictly increasing across a fresh-process restore" 'VMM: resumed .* increasing=yes static_match=yes ring=ok blackout_ms=[0-9]'
check "RAM equal at restore (SHA-256 of all RAM)" 'VMM: restored .* ram_match=yes'
kick_ms=$(awk '/VMMSMOKE: step kick start/{f=1} f && /pause_latency_ms=/{sub(/.*pause_latency_ms=/, ""); print; exit}' "$serial")
if [ -n "$kick_ms" ] && awk -v v="$kick_ms" 'BEGIN{exit !(v < 1000)}'; then
  echo "  PASS  pause is prompt without progress exits (kick): ${kick_ms} ms" >&2
else
  echo "  FAIL  pause is prompt without progress exits (kick): '${kick_ms}' ms" >&2; fails=$((fails + 1))
fi
took=$(sed -n 's/^VMMSMOKE: deadline run took \([0-9.]*\) s.*/\1/p' "$serial")
if [ -n "$took" ] && awk -v v="$took" 'BEGIN{exit !(v < 3)}'; then
  echo "  PASS  run --seconds 1 without progress exits returns in time: ${took} s" >&2
else
  echo "  FAIL  run --seconds 1 without progress exits returns in time: '${took}' s" >&2; fails=$((fails + 1))
fi
check "all steps finished" 'VMMSMOKE: done fails=0'
[ "$rc" = 0 ] || { echo "  FAIL  QEMU exit status $rc" >&2; fails=$((fails + 1)); }
if [ "$fails" -gt 0 ]; then log "$fails check(s) failed; serial log: $serial"; exit 1; fi
log "all checks passed; serial log: $serial"
