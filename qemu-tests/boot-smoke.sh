#!/usr/bin/env bash
# Boot the LUO test kernel under QEMU (TCG) with a busybox initramfs, check
# that /dev/liveupdate and /dev/kvm exist in the guest, probe the LUO ioctl
# errnos, then kexec into the same kernel N times while a counter kept in a
# memfd is preserved through LUO (CREATE_SESSION + PRESERVE_FD before,
# RETRIEVE_SESSION + RETRIEVE_FD + FINISH after each kexec).
# --stock: the same with Debian's stock kernel (no LUO) and the counter kept
# in a memmap=1M$0x30000000 reserved range accessed through /dev/mem.
#
# --mode selftest --selftest NAME --extra DIR: run the kernel's own LUO
# selftest DIR/NAME (see selftests.sh), through a kexec unless NAME=liveupdate.
#
# Usage: qemu-tests/boot-smoke.sh [--kexecs N] [--kernel BZIMAGE] [--no-errnos]
#            [--mode luo|devmem|selftest] [--stock] [--selftest NAME --extra DIR]
#            [--timeout SECONDS] [--keep]
# Environment: LUO_CACHE, LUO_QEMU_MEM (1024), LUO_SMOKE_APPEND (extra cmdline).
# Exit 0 when every check passed; the serial log is kept in
# $LUO_CACHE/logs/boot-smoke-<timestamp>.log.
set -euo pipefail
LOG_TAG=boot-smoke
. "$(dirname "$0")/lib/common.sh"

kexecs=2 kernel="" errnos=1 tmo=300 keep=0 mode=luo stock=0 selftest="" extra=""
DEVMEM_ADDR=0x30000000
while [ $# -gt 0 ]; do
  case "$1" in
    --kexecs) kexecs="$2"; shift 2 ;;
    --kernel) kernel="$2"; shift 2 ;;
    --no-errnos) errnos=0; shift ;;
    --mode) mode="$2"; shift 2 ;;
    --stock) stock=1 mode=devmem; shift ;;
    --selftest) selftest="$2"; shift 2 ;;
    --extra) extra="$2"; shift 2 ;;
    --timeout) tmo="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$kexecs" in ''|*[!0-9]*) die "--kexecs needs a number" ;; esac
case "$mode" in luo|devmem|selftest) ;; *) die "--mode must be luo, devmem or selftest" ;; esac
if [ "$mode" = selftest ]; then
  [ -n "$selftest" ] && [ -x "$extra/$selftest" ] || die "--mode selftest needs --selftest NAME and --extra DIR with DIR/NAME"
  if [ "$selftest" = liveupdate ]; then kexecs=0; else kexecs=1; fi
fi

for t in qemu-system-x86_64 cpio gzip gcc timeout; do need "$t"; done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found; run qemu-tests/setup.sh (package busybox-static)"
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
  || die "busybox-static is not installed (a dynamic busybox does not work in the initramfs); run qemu-tests/setup.sh"

t_all=$(now_ms)
if [ -z "$kernel" ] && [ "$stock" = 1 ]; then
  ts=$(now_ms)
  kernel="$("$QEMU_TESTS_DIR/fetch-stock-kernel.sh" 2>/dev/null)" \
    || kernel="$("$QEMU_TESTS_DIR/fetch-stock-kernel.sh")"
  log "kernel: $kernel (fetch-stock-kernel.sh took $(secs_since "$ts") s)"
elif [ -z "$kernel" ]; then
  ts=$(now_ms)
  kernel="$("$QEMU_TESTS_DIR/build-kernel.sh")"
  log "kernel: $kernel (build-kernel.sh took $(secs_since "$ts") s)"
fi
[ -f "$kernel" ] || die "kernel image not found: $kernel"

work="$(mktemp -d /tmp/luo-smoke.XXXXXX)"
cleanup() { if [ "$keep" = 1 ]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# --- initramfs ---------------------------------------------------------------
ts=$(now_ms)
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp}
cp "$BUSYBOX" "$root/bin/busybox"
cp "$QEMU_TESTS_DIR/guest/init" "$root/init"
chmod 755 "$root/init"
gcc -static -O2 -Wall -Wextra -Werror -o "$root/luo-smoke" "$QEMU_TESTS_DIR/guest/luo-smoke.c"
cp "$kernel" "$root/kernel"
if [ -n "$extra" ]; then cp -r "$extra" "$root/selftests"; fi
(cd "$root" && find . | cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$work/initrd.gz"
log "initramfs $(stat -c %s "$work/initrd.gz") bytes built in $(secs_since "$ts") s"

# --- boot ----------------------------------------------------------------------
mkdir -p "$LUO_CACHE/logs"
serial="$LUO_CACHE/logs/boot-smoke-$(date +%Y%m%d-%H%M%S).log"
if [ "$mode" = luo ]; then
  append="console=ttyS0 liveupdate=on kho=on panic=-1 luo_boot=1 luo_kexecs=$kexecs luo_errnos=$errnos"
elif [ "$mode" = selftest ]; then
  append="console=ttyS0 liveupdate=on kho=on panic=-1 luo_mode=selftest luo_selftest=$selftest luo_boot=1 luo_kexecs=$kexecs"
else
  append="console=ttyS0 panic=-1 memmap=1M\$$DEVMEM_ADDR luo_mode=devmem luo_devmem=$DEVMEM_ADDR luo_boot=1 luo_kexecs=$kexecs"
fi
append="$append ${LUO_SMOKE_APPEND:-}"
qemu=(qemu-system-x86_64 -accel tcg -cpu max -m "${LUO_QEMU_MEM:-1024}" -nographic -no-reboot
      -kernel "$kernel" -initrd "$work/initrd.gz" -append "$append")
log "running: timeout $tmo ${qemu[*]}"
log "serial log: $serial"

# Timestamp every serial line with host seconds since QEMU started.
t_q=$(now_ms)
start_us=${EPOCHREALTIME/./}
set +e
timeout "$tmo" "${qemu[@]}" </dev/null 2>&1 | while IFS= read -r line || [ -n "$line" ]; do
  now_us=${EPOCHREALTIME/./}
  line=${line%$'\r'}
  d=$(( (now_us - start_us) / 1000 ))
  printf '[%4d.%03d] %s\n' $((d / 1000)) $((d % 1000)) "$line"
done > "$serial"
rc=${PIPESTATUS[0]}
set -e
qemu_s=$(secs_since "$t_q")
[ "$rc" = 124 ] && log "QEMU timed out after $tmo s"

# --- verdict -------------------------------------------------------------------
grep -E 'SMOKE:|Kernel panic|BUG:|WARNING:|Oops|^\[ *[0-9.]+\] (ok|not ok|# (Totals|PASSED|FAILED)|# \[STAGE|# ---)' "$serial" | sed 's/^/  /' >&2 || true

fails=0
check() { # check DESCRIPTION REGEX
  if grep -qE "$2" "$serial"; then echo "  PASS  $1" >&2; else echo "  FAIL  $1" >&2; fails=$((fails + 1)); fi
}
stamp() { grep -m1 -E "$1" "$serial" | sed -E 's/^\[ *([0-9.]+)\].*/\1/'; }
echo "boot-smoke checks (mode $mode):" >&2
check "guest booted (/init ran)"                 'SMOKE: init start boot=1 '
if [ "$mode" = luo ]; then
  check "/dev/liveupdate exists in the guest"      'SMOKE: exists /dev/liveupdate'
  check "/dev/kvm exists and KVM_CREATE_VM works"  'SMOKE: /dev/kvm present, api=12, create_vm=ok'
  if [ "$errnos" = 1 ]; then check "LUO errnos as in the kernel source" 'SMOKE: errnos done, 0 mismatch'; fi
  what="counter memfd (LUO)"
elif [ "$mode" = devmem ]; then
  check "/dev/mem exists in the guest"             'SMOKE: exists /dev/mem'
  what="counter in memmap reserved range (/dev/mem)"
fi
if [ "$mode" = selftest ]; then
  check "/dev/liveupdate exists in the guest"      'SMOKE: exists /dev/liveupdate'
  check "selftest $selftest stage 1 passed"        "SMOKE: selftest $selftest stage 1 exit=0"
  if [ "$kexecs" = 1 ]; then
    check "kexec: kernel 2 booted"                 "SMOKE: init start boot=2 "
    check "selftest $selftest stage 2 passed"      "SMOKE: selftest $selftest stage 2 exit=0"
  fi
else
  for ((i = 2; i <= kexecs + 1; i++)); do
    check "kexec #$((i - 1)): kernel $i booted"                "SMOKE: init start boot=$i "
    check "kexec #$((i - 1)): $what survived" "SMOKE: retrieved counter=$((i - 1)) "
  done
fi
check "final kernel finished cleanly"           "SMOKE: done boot=$((kexecs + 1)) "
if grep -qE 'SMOKE: FAIL|MISMATCH|Kernel panic' "$serial"; then
  echo "  FAIL  no FAIL/MISMATCH/panic lines" >&2; fails=$((fails + 1))
fi
[ "$rc" = 0 ] || { echo "  FAIL  QEMU exit status $rc" >&2; fails=$((fails + 1)); }

# --- timings -------------------------------------------------------------------
echo "timings (host seconds since QEMU start; TCG, -cpu max, -m ${LUO_QEMU_MEM:-1024}; $(basename "$kernel")):" >&2
b1=$(stamp 'SMOKE: init start boot=1 ')
[ -n "$b1" ] && echo "  boot to /init (kernel 1):      $b1 s (guest uptime at /init: $(grep -m1 -oE 'init start boot=1 uptime=[0-9.]+' "$serial" | sed 's/.*=//') s)" >&2
for ((i = 1; i <= kexecs; i++)); do
  k=$(grep -E 'SMOKE: kexec now' "$serial" | sed -n "${i}p" | sed -E 's/^\[ *([0-9.]+)\].*/\1/')
  n=$(stamp "SMOKE: init start boot=$((i + 1)) ")
  if [ -n "$k" ] && [ -n "$n" ]; then
    echo "  kexec #$i (reboot() -> /init):  $(awk -v a="$n" -v b="$k" 'BEGIN{printf "%.3f", a-b}') s (guest uptime at /init: $(grep -m1 -oE "init start boot=$((i + 1)) uptime=[0-9.]+" "$serial" | sed 's/.*=//') s)" >&2
  fi
done
grep -oE 'kexec_file_load ok in [0-9.]+ ms' "$serial" | head -n1 | sed 's/^/  /' >&2 || true
grep -oE 'preserved counter=[0-9]+ in [0-9.]+ ms' "$serial" | head -n1 | sed 's/^/  /' >&2 || true
grep -oE 'retrieved counter=[0-9]+ in [0-9.]+ ms' "$serial" | head -n1 | sed 's/^/  /' >&2 || true
echo "  QEMU wall time:                $qemu_s s; whole script: $(secs_since "$t_all") s" >&2

if [ "$fails" -gt 0 ]; then
  log "$fails check(s) failed; serial log: $serial"
  exit 1
fi
log "all checks passed; serial log: $serial"
