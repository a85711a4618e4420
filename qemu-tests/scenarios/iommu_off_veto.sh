# iommu_off_veto (LUO kernel; QEMU -machine q35 -device edu at 0000:00:01.0,
# no intel-iommu device, so no DMAR table and no IOMMU): a device to preserve
# without an IOMMU group vetoes prepare.
# The guest has no IOMMU groups and vfio-pci refuses edu (the bind commands
# leave it unbound). luod --preserve-device 0000:00:01.0: `luoctl prepare`
# exits 13 with the iommu subsystem's reason (no IOMMU groups at all, boot
# with intel_iommu=on); state normal, no kexec image loaded, no cycle in the
# history. The same luod without --preserve-device prepares (and cancels).

ADDR=0000:00:01.0
DEV=/sys/bus/pci/devices/$ADDR

boot1() {
	step no-iommu 30
	[ "$(cat "$DEV/vendor"):$(cat "$DEV/device")" = 0x1234:0x11e8 ] || fail "$ADDR is not QEMU's edu device"
	groups=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)
	[ "$groups" = 0 ] || fail "$groups IOMMU group(s) without an IOMMU"
	[ -e "$DEV/iommu_group" ] && fail "edu has an IOMMU group without an IOMMU"
	echo "no IOMMU groups; edu $ADDR has none"
	# vfio-pci refuses a device without a group.
	echo vfio-pci >"$DEV/driver_override"
	echo "$ADDR" >/sys/bus/pci/drivers_probe 2>/dev/null
	[ -e "$DEV/driver" ] && fail "edu got bound to $(readlink "$DEV/driver") without an IOMMU"
	echo "vfio-pci did not take edu (no IOMMU group), as expected"
	step start-luod 60
	start_luod --preserve-device "$ADDR"
	expect_state normal
	step veto 120
	expect_exit 13 '' luoctl prepare --kernel /kernel --reuse-cmdline
	grep -qF "subsystem iommu failed prepare: vetoed: device $ADDR is marked for preservation but has no IOMMU group: this kernel has no IOMMU groups at all (/sys/kernel/iommu_groups is empty or missing), so the IOMMU is off: boot with intel_iommu=on" /run/out.txt ||
		fail "the veto does not give the iommu subsystem's reason"
	expect_exit 13 '"kind": "vetoed"' luoctl --json prepare --kernel /kernel --reuse-cmdline
	expect_state normal
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a vetoed prepare left a kexec image loaded"
	luoctl --json history >/run/history.json
	grep -q '"cycles": \[\]' /run/history.json || { cat /run/history.json; fail "a vetoed prepare left a cycle in the history"; }
	info "no IOMMU: luoctl prepare exits 13, vetoed by the iommu subsystem (edu $ADDR has no IOMMU group; boot with intel_iommu=on)"
	step without-device 120
	run kill "$LUOD_PID"
	i=0
	while kill -0 "$LUOD_PID" 2>/dev/null; do
		i=$((i + 1))
		[ $i -lt 100 ] || fail "luod did not exit on SIGTERM"
		usleep 50000
	done
	start_luod
	run luoctl prepare --kernel /kernel --reuse-cmdline
	expect_state prepared
	run luoctl cancel
	expect_state normal
	info "the same host without --preserve-device: prepare succeeds"
	pass
}
