#!/usr/bin/env bash
# Runs every test: the workspace's unit and integration tests (no root needed
# except the ownership tests, which CI runs as root) and, when present, the
# real-kernel QEMU scenarios. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build --workspace --bins (the integration tests drive luod and luoctl)"
cargo build --workspace --bins --locked 2>&1
echo "== cargo test --workspace"
cargo test --workspace --locked 2>&1

if [ -x qemu-tests/run.sh ]; then
    echo "== qemu-tests/run.sh (real kernels, real kexec)"
    qemu-tests/run.sh
fi
