#!/usr/bin/env bash
# Runs the benchmarks. Each prints its figures as ratios against a baseline
# measured in the same run (memcpy, bare kexec); none fails on a ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== record write vs memcpy (64 MiB, file-backed region)"
cargo bench --locked -p liveupdate --bench record_write 2>&1
echo "== luod: status during a freeze waiting on a hung VMM vs idle; threads and RSS at 5,000 idle connections vs 0"
cargo bench --locked -p liveupdate-tests --bench responsiveness 2>&1
echo "== scale: per-file preserve and prepare+freeze+reboot cost at 10,000/100 and 100,000/10,000 files"
cargo bench --locked -p liveupdate-tests --bench scale 2>&1
if [ -x qemu-tests/bench.sh ]; then
    echo "== QEMU: blackout vs bare kexec (and luod's share of it), VM blackout vs bare kexec, reserved-memory copy vs memcpy, a QEMU VM's blackout vs bare kexec on the Debian host (and 4x its RAM)"
    qemu-tests/bench.sh
fi
