# kexec_simple (LUO kernel): one session, one memfd (1 MiB + 123 bytes of
# pseudo-random data), through luoctl prepare/freeze/reboot and a real kexec
# into the same kernel; the new kernel's luod comes up `updated`, the file is
# retrieved with the same SHA-256, `finish` closes the cycle.
boot1() {
	step start-luod 60
	start_luod
	expect_state normal
	expect_json '"backend": "luo"'
	step preserve 60
	run luo-qemu-tool gen --size $(((1 << 20) + 123)) --seed 7 --out /run/data
	run luoctl session create vm0
	run luoctl session preserve vm0 --token 7 --file /run/data
	hashfile vm0/7 /run/data before
	# The command line of the lead's manual run, given explicitly.
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --cmdline "$(cat /proc/cmdline)"
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
	wait_updated
	expect_json '"incoming": true' '"name": "vm0"'
	step retrieve 60
	run luoctl session retrieve vm0 --token 7 --output /run/data.after
	hashfile vm0/7 /run/data.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1' '"outcome": "finished"'
	dmesg_has 'liveupdate number: 1'
	run luoctl status
	run luoctl history
	pass
}
