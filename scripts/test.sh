#!/usr/bin/env bash
# Runs every test: the workspace's unit and integration tests (no root needed
# except the ownership tests, which CI runs as root), then the real-kernel
# QEMU scenarios (qemu-tests/run.sh tests: every scenario and smoke check, no
# benchmark; scripts/bench.sh runs those). Installs what it needs (as root).
# Exit status: non-zero if anything failed; both parts always run.
set -uo pipefail
cd "$(dirname "$0")/.."

rc=0
echo "== cargo build --workspace --bins (the integration tests drive luod and luoctl)"
cargo build --workspace --bins --locked 2>&1 || rc=1
if [ -x qemu-tests/setup.sh ]; then
    # tests/tests/qemu_launcher.rs runs real QEMU guests inside cargo test:
    # Debian's QEMU (7.2, the too-old case), busybox-static and cpio first.
    echo "== qemu-tests/setup.sh (packages the QEMU launcher's tests need)"
    qemu-tests/setup.sh || rc=1
fi
echo "== cargo test --workspace"
cargo test --workspace --locked 2>&1 || rc=1

echo "== packaging/test-deb.sh (the .deb: contents, man pages, completions, lintian; install, upgrade, remove, purge in a chroot)"
packaging/test-deb.sh 2>&1 || rc=1

if [ -x qemu-tests/run.sh ]; then
    echo "== qemu-tests/run.sh tests (real kernels, real kexec)"
    qemu-tests/run.sh tests || rc=1
fi
exit $rc
