#!/usr/bin/env bash
# Run every QEMU end-to-end check, non-interactively (CI entry point):
#   1. setup.sh            install what is missing (root) or say what to run
#   2. build-kernel.sh     LUO kernel from Debian's newest linux-source >= 6.19 (cached)
#   3. boot-smoke.sh       LUO kernel: /dev/liveupdate, /dev/kvm, errnos, 2 kexecs with a preserved memfd
#   4. selftests.sh        the kernel's own LUO selftests (5 programs, 4 through a kexec)
#   5. fetch-stock-kernel.sh  Debian's stock kernel + built-in feature report (cached)
#   6. boot-smoke.sh --stock  stock kernel: 2 kexecs with a counter in a memmap= range via /dev/mem
# Ends with "qemu-tests: N passed, N failed"; exit status 0 only if all passed.
set -euo pipefail
LOG_TAG=qemu-tests
. "$(dirname "$0")/lib/common.sh"
D="$QEMU_TESTS_DIR"

passed=0 failed=0 names=()
step() { # step NAME COMMAND...
  local name="$1" ts rc=0; shift
  ts=$(now_ms)
  log "=== $name: $*"
  "$@" </dev/null || rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1)); names+=("PASS $name ($(secs_since "$ts") s)")
  else
    failed=$((failed + 1)); names+=("FAIL $name (exit $rc, $(secs_since "$ts") s)")
  fi
  return "$rc"
}

step setup "$D/setup.sh" || { log "setup failed; nothing else can run"; echo "qemu-tests: 0 passed, 1 failed"; exit 1; }
if step build-kernel "$D/build-kernel.sh"; then
  step boot-smoke-luo "$D/boot-smoke.sh" || true
  step kernel-selftests "$D/selftests.sh" || true
else
  failed=$((failed + 2)); names+=("FAIL boot-smoke-luo (no kernel)" "FAIL kernel-selftests (no kernel)")
fi
if step fetch-stock-kernel "$D/fetch-stock-kernel.sh"; then
  step boot-smoke-stock "$D/boot-smoke.sh" --stock || true
else
  failed=$((failed + 1)); names+=("FAIL boot-smoke-stock (no kernel)")
fi

printf '  %s\n' "${names[@]}"
echo "qemu-tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
