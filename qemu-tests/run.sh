#!/usr/bin/env bash
# The real-kernel QEMU checks, non-interactively (CI's entry point, as root on
# a fresh Debian 12 machine):
#
#   qemu-tests/run.sh [SCENARIO|GROUP...]     (no argument: all)
#
# Groups: all (every scenario, check and benchmark), tests (every scenario and
# check, no benchmark: what scripts/test.sh runs), bench (the benchmarks:
# what qemu-tests/bench.sh and scripts/bench.sh run), luo, stock, smoke, host
# (the Debian host scenarios: qemu-tests/host/scenarios/*.py).
# `qemu-tests/scenarios.py --list` lists the names.
#
# Steps:
#   1. setup.sh                install what is missing (root), or print the apt-get line
#   2. build-kernel.sh         the LUO kernel (cached: $LUO_CACHE/kernel-<version>-<fragment hash>)
#   3. fetch-stock-kernel.sh   Debian's stock kernel (cached)
#      host/build-image.sh     the Debian sid host image (host scenarios only; cached:
#                              $LUO_CACHE/host-image-<hash>)
#   4. cargo build             static luod, luoctl, luo-qemu-tool, luo-test-vmm, luo-qemu (+crt-static, non-PIE), in
#                              $LUO_QEMU_TARGET_DIR (default target/qemu-static)
#   5. scenarios.py            one QEMU run per scenario: per-step and per-scenario
#                              timeouts, host-side SHA-256 comparison; one line per
#                              scenario (PASS/FAIL, seconds), then "N passed, N failed"
# Exit status 0 only if every selected scenario passed (2: unknown name).
#
# Environment: LUO_CACHE (/var/cache/liveupdate-qemu), LUO_QEMU_JOBS (CPUs to
# fill with scenarios at once, default: the CPU count; a Debian-host scenario
# runs alone), LUO_QEMU_TOTAL_TIMEOUT (3600 s: no scenario starts
# after it), LUO_QEMU_TARGET_DIR, and those of build-kernel.sh and
# fetch-stock-kernel.sh.
set -uo pipefail
LOG_TAG=qemu-tests
. "$(dirname "$0")/lib/common.sh"
D="$QEMU_TESTS_DIR"
REPO="$(cd "$D/.." && pwd)"

case "${1:-}" in
  -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
esac
[ $# -gt 0 ] || set -- all
exec </dev/null

command -v python3 >/dev/null || { "$D/setup.sh" || true; }
read -r count kinds < <(python3 "$D/scenarios.py" --needs "$@") || true
if [ -z "${count:-}" ] || ! [ "$count" -ge 0 ] 2>/dev/null; then
  python3 "$D/scenarios.py" --needs "$@"
  exit 2
fi
t_all=$(now_ms)
fail_all() { log "$1"; echo "0 passed, $count failed"; exit 1; }

ts=$(now_ms)
"$D/setup.sh" || fail_all "setup.sh failed: nothing can run (see above)"
log "setup: $(secs_since "$ts") s"

luo_kernel="" stock_kernel="" host_image=""
if [[ " $kinds " == *" luo "* || " $kinds " == *" host "* ]]; then
  ts=$(now_ms)
  luo_kernel="$("$D/build-kernel.sh")" || { log "build-kernel.sh failed: the LUO scenarios will fail"; luo_kernel=""; }
  log "LUO kernel: ${luo_kernel:-none} ($(secs_since "$ts") s)"
fi
if [[ " $kinds " == *" stock "* ]]; then
  ts=$(now_ms)
  stock_kernel="$("$D/fetch-stock-kernel.sh")" || { log "fetch-stock-kernel.sh failed: the stock-kernel scenarios will fail"; stock_kernel=""; }
  log "stock kernel: ${stock_kernel:-none} ($(secs_since "$ts") s)"
fi
if [[ " $kinds " == *" host "* ]] && [ -n "$luo_kernel" ]; then
  ts=$(now_ms)
  host_image="$("$D/host/build-image.sh" --luo-kernel "$luo_kernel")" || { log "host/build-image.sh failed: the host scenarios will fail"; host_image=""; }
  log "host image: ${host_image:-none} ($(secs_since "$ts") s)"
fi

ts=$(now_ms)
target_dir="${LUO_QEMU_TARGET_DIR:-$REPO/target/qemu-static}"
triple=x86_64-unknown-linux-gnu
bindir="$target_dir/$triple/release"
# Static and not position-independent: QEMU 7.2's TCG (Debian 12) keys its
# translated code by virtual address, so a static-pie, loaded at a new random
# base by each exec, is translated again at every start (a luoctl call: 75-90
# ms; non-PIE 33-47 ms once its code was translated in this kernel).
rustflags="-C target-feature=+crt-static -C relocation-model=static"
log "running: RUSTFLAGS='$rustflags' CARGO_TARGET_DIR=$target_dir cargo build --release --locked --target $triple -p luod -p luoctl -p luo-qemu-tool -p luo-test-vmm -p luo-qemu"
if ! (cd "$REPO" && RUSTFLAGS="$rustflags" CARGO_TARGET_DIR="$target_dir" \
      cargo build --release --locked --target "$triple" -p luod -p luoctl -p luo-qemu-tool -p luo-test-vmm -p luo-qemu 2>&1 | tail -n 3 >&2); then
  log "cargo build of the static binaries failed: the luod scenarios will fail"
fi
log "static binaries: $(secs_since "$ts") s"

log "setup, kernels and binaries took $(secs_since "$t_all") s; running $count scenario(s): $*"
LUO_RUN_T0_MS=$t_all exec python3 "$D/scenarios.py" --luo-kernel "$luo_kernel" --stock-kernel "$stock_kernel" --host-image "$host_image" --bindir "$bindir" "$@"
