#!/usr/bin/env bash
# Run the kernel's own LUO selftests (tools/testing/selftests/liveupdate of
# the very source the test kernel was built from) in QEMU: "liveupdate" in one
# boot, and each kexec test (luo_kexec_simple, luo_multi_session,
# luo_stress_sessions, luo_stress_files) as stage 1, real kexec, stage 2.
# The programs are compiled here with gcc -static against the source's own
# uapi headers (make headers, cached next to the source).
#
# Usage: qemu-tests/selftests.sh [TEST...]   (default: all five)
# Ends with "selftests: N passed, N failed".
set -euo pipefail
LOG_TAG=selftests
. "$(dirname "$0")/lib/common.sh"
need gcc; need make

ALL=(liveupdate luo_kexec_simple luo_multi_session luo_stress_sessions luo_stress_files)
if [ $# -gt 0 ]; then tests=("$@"); else tests=("${ALL[@]}"); fi

kernel="$("$QEMU_TESTS_DIR/build-kernel.sh")"
meta="$(dirname "$kernel")/source-version"
[ -f "$meta" ] || die "no $meta next to $kernel"
ver="$(sed -n 's/^version=//p' "$meta")"
pkg="$(sed -n 's/^package=//p' "$meta")"
src="$LUO_CACHE/src/$ver/linux-source-${pkg#linux-source-}"
sel="$src/tools/testing/selftests/liveupdate"
[ -d "$sel" ] || die "selftests not found at $sel (was the source removed from the cache?)"

hdr="$LUO_CACHE/src/$ver/headers"
if [ ! -f "$hdr/usr/include/linux/liveupdate.h" ]; then
  ts=$(now_ms)
  log "running: make -C $src O=$hdr headers"
  rm -rf "$hdr"; mkdir -p "$hdr"
  nice -n 10 make -s -C "$src" O="$hdr" headers >"$hdr.log" 2>&1 || { tail -n 30 "$hdr.log" >&2; die "make headers failed"; }
  log "headers in $(secs_since "$ts") s"
fi

work="$(mktemp -d /tmp/luo-selftests.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
for t in "${ALL[@]}"; do
  gcc -static -O2 -Wall -Wno-unused-function -isystem "$hdr/usr/include" \
      -I"$sel/lib/include" -I"$sel/.." "$sel/$t.c" "$sel/lib/lu_utils.c" -o "$work/bin/$t" 2>"$work/$t.cc.log" \
    || { cat "$work/$t.cc.log" >&2; die "compiling $t failed"; }
done
log "compiled ${ALL[*]} from $sel"

passed=0 failed=0 lines=()
for t in "${tests[@]}"; do
  ts=$(now_ms)
  if "$QEMU_TESTS_DIR/boot-smoke.sh" --kernel "$kernel" --mode selftest --selftest "$t" --extra "$work/bin" \
       > "$work/$t.log" 2>&1 </dev/null; then
    passed=$((passed + 1)); lines+=("PASS $t ($(secs_since "$ts") s)")
  else
    failed=$((failed + 1)); lines+=("FAIL $t ($(secs_since "$ts") s)")
    sed 's/^/  | /' "$work/$t.log" >&2
  fi
done
printf '  %s\n' "${lines[@]}"
echo "selftests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
