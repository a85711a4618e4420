#!/usr/bin/env bash
# A live update end to end, in QEMU, on the LUO kernel (Linux with the Live
# Update Orchestrator, built from Debian's linux-source by
# qemu-tests/build-kernel.sh; cached after the first run, which takes ~8 min).
#
# In the guest: luod starts; a workload builds a 32 MiB cache and hands it
# (and its own state) to luod as memfds; `luoctl check`, `prepare`, `freeze`
# and `reboot` move the guest by a real kexec into the LUO kernel; luod comes
# up `updated`; the workload takes its cache back, checks its SHA-256 and
# goes on; a KVM guest (luo-test-vmm, RAM in a memfd registered with luod)
# is paused at freeze and continued by a new VMM after the kexec;
# `luoctl finish`. Then a summary: backend, sessions, bytes
# preserved, kernel before and after, and the blackout with its parts (from
# `luoctl --json history`, and as measured on the host from the serial
# console), the guest's counter before and after and the VM blackout.
#
# On a fresh Debian 12 machine, as root: installs what it needs
# (qemu-tests/setup.sh), builds the kernel and static luod/luoctl, boots
# QEMU (TCG). The whole console log is kept in $LUO_CACHE/logs/demo-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
exec qemu-tests/run.sh demo
