# iommu_groups_verified (LUO kernel; QEMU -machine q35 -device intel-iommu
# -device edu at 0000:00:01.0; intel_iommu=on): luod's IOMMU subsystem on a
# real IOMMU, through two real kexecs.
# Kernel 1: edu bound to vfio-pci through sysfs (driver_override +
# drivers_probe), luod --preserve-device 0000:00:01.0. A target command line
# with intel_iommu=off is vetoed (exit 13, the iommu subsystem's reason, no
# kexec image left loaded); `luoctl prepare --reuse-cmdline` succeeds (the
# IOMMU snapshot is taken), freeze, reboot: real kexec.
# Kernel 2: the groups seen by the shell equal kernel 1's, and luod's
# `status --json` notes say exactly "IOMMU groups unchanged (N groups, M
# devices)" with N and M counted in sysfs; finish. Then a second cycle whose
# target command line adds iommu=pt (allowed: the IOMMU stays on).
# Kernel 3: every group's default domain went from DMA-FQ to identity, and
# luod's note reports that drift ("IOMMU groups drifted (N changes, ...):
# group G default domain changed from DMA-FQ to identity; ..."); finish.

ADDR=0000:00:01.0
DEV=/sys/bus/pci/devices/$ADDR

# groups_listing: one line per IOMMU group, "N TYPE DEV...", sorted by N.
groups_listing() {
	for g in $(ls /sys/kernel/iommu_groups | sort -n); do
		echo "$g $(cat /sys/kernel/iommu_groups/$g/type) $(ls /sys/kernel/iommu_groups/$g/devices | tr '\n' ' ')"
	done
}

count_groups() {
	NGROUPS=$(ls /sys/kernel/iommu_groups | wc -l)
	NDEVICES=$(ls /sys/kernel/iommu_groups/*/devices | grep -c '^0000:')
}

# expect_note TEXT: luoctl --json status has TEXT (fixed string) in a note.
expect_note() {
	status_json
	grep -qF -- "$1" /run/status.json || { cat /run/status.json; fail "status JSON notes lack \"$1\""; }
	echo "status note: $1"
}

driver_of() {
	if [ -e "$DEV/driver" ]; then basename "$(readlink "$DEV/driver")"; else echo none; fi
}

boot1() {
	step iommu-groups 30
	[ -d /sys/kernel/iommu_groups ] || fail "no /sys/kernel/iommu_groups: the IOMMU is off"
	groups_listing | tee /iommu.boot1
	count_groups
	[ "$NGROUPS" -ge 2 ] || fail "only $NGROUPS IOMMU group(s)"
	[ -e "$DEV/iommu_group" ] || fail "edu ($ADDR) has no IOMMU group"
	[ "$(cat "$DEV/vendor"):$(cat "$DEV/device")" = 0x1234:0x11e8 ] || fail "$ADDR is not QEMU's edu device"
	info "kernel 1: $NGROUPS IOMMU groups, $NDEVICES devices; edu $ADDR in group $(basename "$(readlink "$DEV/iommu_group")")"
	step bind-vfio 30
	echo "+ echo vfio-pci > $DEV/driver_override; echo $ADDR > /sys/bus/pci/drivers_probe"
	echo vfio-pci >"$DEV/driver_override" || fail "writing driver_override"
	echo "$ADDR" >/sys/bus/pci/drivers_probe || fail "writing drivers_probe"
	[ "$(driver_of)" = vfio-pci ] || fail "edu is bound to $(driver_of), not vfio-pci"
	echo "edu $ADDR bound to vfio-pci ($(ls "$DEV/vfio-dev"))"
	step start-luod 60
	start_luod --preserve-device "$ADDR"
	expect_state normal
	expect_json '"backend": "luo"' '"iommu"' '"devices"'
	step veto-target-iommu-off 120
	expect_exit 13 '' luoctl prepare --kernel /kernel --cmdline "$(cat /proc/cmdline) intel_iommu=off"
	grep -qF "the target kernel's command line has intel_iommu=off, so the preserved device(s) $ADDR would have no IOMMU group after the update" /run/out.txt ||
		fail "the veto does not give the iommu subsystem's reason"
	expect_state normal
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a vetoed prepare left a kexec image loaded"
	info "kernel 1: a target command line with intel_iommu=off is vetoed by the iommu subsystem (exit 13)"
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	expect_state prepared
	step freeze 60
	mark freeze-start
	run luoctl freeze
	mark frozen
	expect_state frozen
	step kexec 180
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	grep -q 'intel_iommu=on' /proc/cmdline || fail "--reuse-cmdline lost intel_iommu=on"
	step iommu-groups 30
	groups_listing | tee /iommu.boot2
	cmp -s /iommu.boot1 /iommu.boot2 || { cat /iommu.boot1; fail "the IOMMU groups changed across the kexec (shell view)"; }
	count_groups
	wait_updated --preserve-device "$ADDR"
	step iommu-report 30
	expect_note "IOMMU groups unchanged ($NGROUPS groups, $NDEVICES devices)"
	info "kernel 2: luod's status note \"IOMMU groups unchanged ($NGROUPS groups, $NDEVICES devices)\" (the shell's listing of kernel 1 and 2 is identical)"
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"outcome": "finished"' '"live_updates": 1'
	# Second cycle: the target adds iommu=pt. The IOMMU stays on, so the
	# subsystem allows it; the new kernel must report the drift.
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --cmdline "$(cat /proc/cmdline) iommu=pt"
	expect_state prepared
	step freeze 60
	run luoctl freeze
	step kexec 180
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot3() {
	grep -q 'iommu=pt' /proc/cmdline || fail "the target command line lacks iommu=pt"
	step iommu-groups 30
	groups_listing | tee /iommu.boot3
	count_groups
	# The same members, every default domain now identity.
	sed 's/ DMA-FQ / identity /' /iommu.boot2 >/run/expected
	cmp -s /run/expected /iommu.boot3 || { cat /iommu.boot2; fail "expected kernel 2's groups with identity domains"; }
	wait_updated --preserve-device "$ADDR"
	step iommu-report 30
	n=0 items=""
	while read -r g t rest; do
		[ "$t" = DMA-FQ ] || continue
		n=$((n + 1))
		[ $n -le 5 ] && items="$items${items:+; }group $g default domain changed from DMA-FQ to identity"
	done </iommu.boot2
	[ $n -gt 0 ] || fail "kernel 2 had no DMA-FQ group"
	[ $n -gt 5 ] && items="$items; and $((n - 5)) more"
	expect_note "IOMMU groups drifted ($n changes, now $NGROUPS groups, $NDEVICES devices): $items"
	info "kernel 3 (iommu=pt): luod's status note reports the drift of all $n groups from DMA-FQ to identity"
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 2'
	dmesg_has 'liveupdate number: 2'
	pass
}
