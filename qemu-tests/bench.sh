#!/usr/bin/env bash
# The QEMU benchmarks (what scripts/bench.sh runs): the blackout of a live
# update through luod against a bare kexec, and the reserved-memory copy
# against memcpy, and on the Debian host the blackout of an unmodified QEMU VM
# against a bare kexec (bench_qemu_blackout). Figures are printed as ratios;
# no threshold fails the run.
#   qemu-tests/bench.sh   ==   qemu-tests/run.sh bench
exec "$(dirname "$0")/run.sh" bench "$@"
