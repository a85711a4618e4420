# device_rebound_to_vfio (LUO kernel; QEMU -machine q35 -device intel-iommu
# -device edu at 0000:00:01.0; intel_iommu=on): luod's device subsystem
# through a real kexec.
# Kernel 1: edu has no driver. luod --preserve-device 0000:00:01.0:
# `luoctl prepare` exits 13 and the veto carries the exact commands (`echo
# vfio-pci > .../driver_override; echo ADDR > /sys/bus/pci/drivers_probe`);
# the scenario runs the commands taken from the message: edu is bound to
# vfio-pci (a VFIO cdev appears). prepare succeeds, freeze, reboot: real
# kexec.
# Kernel 2: before luod starts, edu is unbound and driver_override is empty
# (it does not survive a kexec). luod (same --preserve-device) restores:
# edu's driver is vfio-pci again, driver_override is vfio-pci, the VFIO cdev
# is back, and `status --json` notes say "device 0000:00:01.0 bound to
# vfio-pci"; finish.

ADDR=0000:00:01.0
DEV=/sys/bus/pci/devices/$ADDR

driver_of() {
	if [ -e "$DEV/driver" ]; then basename "$(readlink "$DEV/driver")"; else echo none; fi
}

# expect_note TEXT: luoctl --json status has TEXT (fixed string) in a note.
expect_note() {
	status_json
	grep -qF -- "$1" /run/status.json || { cat /run/status.json; fail "status JSON notes lack \"$1\""; }
	echo "status note: $1"
}

boot1() {
	step device 30
	[ "$(cat "$DEV/vendor"):$(cat "$DEV/device")" = 0x1234:0x11e8 ] || fail "$ADDR is not QEMU's edu device"
	[ -e "$DEV/iommu_group" ] || fail "edu ($ADDR) has no IOMMU group"
	[ "$(driver_of)" = none ] || fail "edu is bound to $(driver_of) at boot"
	echo "edu $ADDR: driver none, driver_override $(cat "$DEV/driver_override"), group $(basename "$(readlink "$DEV/iommu_group")")"
	step start-luod 60
	start_luod --preserve-device "$ADDR"
	expect_state normal
	step veto-not-bound 120
	expect_exit 13 '' luoctl prepare --kernel /kernel --reuse-cmdline
	cmds="echo vfio-pci > $DEV/driver_override; echo $ADDR > /sys/bus/pci/drivers_probe"
	grep -qF "subsystem devices failed prepare: vetoed: device $ADDR (1234:11e8) is bound to no driver, not vfio-pci: run \`$cmds\`" /run/out.txt ||
		fail "the veto does not carry the exact commands \`$cmds\`"
	expect_state normal
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "a vetoed prepare left a kexec image loaded"
	info "edu not bound: luoctl prepare exits 13 and says: run \`$cmds\`"
	step bind-as-told 30
	# The commands exactly as the message gives them.
	told=$(sed -n 's/.*: run `\([^`]*\)`.*/\1/p' /run/out.txt)
	[ "$told" = "$cmds" ] || fail "could not take the commands from the message (got: $told)"
	echo "+ sh -c '$told'"
	sh -c "$told" || fail "the commands from the veto failed"
	[ "$(driver_of)" = vfio-pci ] || fail "after the commands from the veto, edu is bound to $(driver_of)"
	[ "$(cat "$DEV/driver_override")" = vfio-pci ] || fail "driver_override is $(cat "$DEV/driver_override")"
	vdev=$(ls "$DEV/vfio-dev")
	[ -c "/dev/vfio/devices/$vdev" ] || fail "no VFIO cdev /dev/vfio/devices/$vdev"
	echo "edu bound to vfio-pci: $DEV/vfio-dev/$vdev, /dev/vfio/devices/$vdev"
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	expect_state prepared
	step freeze 60
	mark freeze-start
	run luoctl freeze
	mark frozen
	step kexec 180
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	step device 30
	d=$(driver_of)
	o=$(cat "$DEV/driver_override")
	[ "$d" = none ] || fail "edu is bound to $d before luod ran"
	[ "$o" = "(null)" ] || fail "driver_override survived the kexec: $o"
	[ -e "$DEV/vfio-dev" ] && fail "edu has a VFIO device before luod ran"
	info "kernel 2 before luod: edu $ADDR driver none, driver_override $o (the binding did not survive the kexec)"
	wait_updated --preserve-device "$ADDR"
	step rebound 30
	[ "$(driver_of)" = vfio-pci ] || fail "after luod's restore, edu is bound to $(driver_of), not vfio-pci"
	[ "$(cat "$DEV/driver_override")" = vfio-pci ] || fail "driver_override is $(cat "$DEV/driver_override") after the restore"
	vdev=$(ls "$DEV/vfio-dev")
	[ -c "/dev/vfio/devices/$vdev" ] || fail "no VFIO cdev /dev/vfio/devices/$vdev after the restore"
	echo "$DEV/driver -> $(readlink "$DEV/driver"); /dev/vfio/devices/$vdev"
	expect_note "device $ADDR bound to vfio-pci"
	expect_note "IOMMU groups unchanged"
	info "kernel 2 after luod started: $DEV/driver -> vfio-pci, /dev/vfio/devices/$vdev; status note \"device $ADDR bound to vfio-pci\""
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"outcome": "finished"'
	[ "$(driver_of)" = vfio-pci ] || fail "edu lost vfio-pci at finish"
	pass
}
