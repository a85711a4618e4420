#!/usr/bin/env bash
# The demo: an unmodified QEMU VM with a Linux guest keeps running across its
# host's live update (qemu-tests/host/scenarios/demo_qemu.py).
#
# The host is Debian sid under QEMU (TCG) with systemd 262 and luod from the
# project's .deb; the VM is the host's Debian QEMU (-accel kvm, nested) run by
# luo-qemu@web.service, its guest RAM in a memfd luod preserves through the
# kernel's LUO. A client service also hands luod three memfds (a workload's
# cache). luoctl prepare, freeze (QEMU's cpr-reboot checkpoint), reboot (an
# orderly `systemctl kexec`); in the new kernel the launcher relaunches QEMU
# on the preserved RAM; luoctl finish. The story is printed as it happens;
# the summary at the end gives the guest's own evidence (boot id unchanged,
# counter and uptime going on, its tmpfs file's MD5), the host's kernel and
# boot id before and after, and the VM blackout with its parts.
#
# On a fresh Debian 12 machine, as root: installs what it needs
# (qemu-tests/setup.sh), builds the LUO kernel (~7 min on 2 cores), the host
# image (mmdebstrap, 2-4 min), the .deb and the static binaries (cached
# afterwards), then runs the scenario (3-5 min under TCG). Logs in
# $LUO_CACHE/logs/demo_qemu-*. The older busybox demo (a cache memfd and the
# project's test VMM across a kexec in an initramfs, ~40 s) is still there:
# `qemu-tests/run.sh demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec qemu-tests/run.sh demo_qemu
