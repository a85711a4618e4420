# cancel_before_reboot (LUO kernel): two client sessions (three memfds) are
# preserved; prepare loads the target and freeze quiesces; then `cancel`
# abandons the cycle: state normal, the kexec image unloaded
# (/sys/kernel/kexec_loaded = 0), the cycle in the history as cancelled, and
# the sessions still there (cancel keeps them). The clients then finish their
# sessions, which unpreserves their files in the kernel. A kexec happens
# anyway: a bare kexec_file_load + reboot(KEXEC) (luo-qemu-tool kexec), the
# way an operator's `kexec -e` or another tool would, with luod still
# running. In the new kernel, before luod starts, /dev/liveupdate is asked
# for the client sessions by name: RETRIEVE_SESSION must say ENOENT (the
# kernel carried nothing of them). Then luod starts in `normal` with no
# session and no incoming file, `live_updates` 0, and its history (carried
# in luod's own LUO session) still shows the cancelled cycle.
boot1() {
	step start-luod 60
	start_luod
	step preserve 60
	run luoctl session create c1
	run luoctl session create c2
	run luo-qemu-tool gen --size 65536 --seed 11 --out /run/a
	run luo-qemu-tool gen --size 4096 --seed 12 --out /run/b
	run luoctl session preserve c1 --token 1 --file /run/a
	run luoctl session preserve c1 --token 2 --file /run/b
	run luoctl session preserve c2 --token 1 --file /run/a
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	[ "$(cat /sys/kernel/kexec_loaded)" = 1 ] || fail "prepare did not load the kexec image"
	step freeze 60
	run luoctl freeze
	expect_state frozen
	step cancel 60
	run luoctl cancel
	expect_state normal
	expect_json '"outcome": "cancelled"' '"name": "c1"' '"name": "c2"'
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "cancel left the kexec image loaded"
	info "after cancel: state normal, kexec image unloaded, sessions c1 c2 kept"
	step clients-finish 60
	run luoctl session finish c1
	run luoctl session finish c2
	expect_json '"sessions": \[\]'
	expect_exit 11 'normal' luoctl freeze
	step kexec 180
	# The repacked initramfs above is reused: it was made before anything
	# of the cancelled cycle happened.
	luo-qemu-tool kexec --kernel /kernel --initrd /run/initrd.cpio --cmdline "$(cat /proc/cmdline)" --mark bare-kexec
	fail "the bare kexec returned"
}

boot2() {
	step probe 60
	dmesg | grep -E 'luo:|KHO' | tail -n 5
	run luo-qemu-tool probe --expect absent c1 c2
	wait_state=normal
	step start-luod 60
	start_luod
	expect_state normal
	expect_json '"sessions": \[\]' '"live_updates": 0'
	if grep -q '"incoming": true' /run/status.json; then fail "an incoming session after a cancelled cycle"; fi
	luoctl --json history >/run/history.json || fail "luoctl history"
	grep -qE '"outcome": "cancelled"' /run/history.json || { cat /run/history.json; fail "the cancelled cycle is missing from the history"; }
	expect_exit 11 '' luoctl finish
	run luoctl status
	run luoctl history
	pass
}
