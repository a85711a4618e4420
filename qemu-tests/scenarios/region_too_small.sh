# region_too_small (stock Debian kernel, reserved-memory backend,
# memmap=1M$0x30000000): a 2 MiB file is preserved; `luoctl prepare` is
# vetoed by the region-capacity subsystem with exit 13 and the numbers
# (bytes held, bytes the region holds, bytes short); `check` exits 3; the
# state stays normal and no kexec image stays loaded.
boot1() {
	step start-luod 60
	start_luod --backend reserved-memory
	expect_state normal
	step preserve 60
	run luo-qemu-tool gen --size 2M --seed 71 --out /run/d
	run luoctl session create vm0
	run luoctl session preserve vm0 --token 1 --file /run/d
	step veto 120
	expect_exit 13 'vetoed: 1 preserved file\(s\) hold 2097152 bytes but the region holds at most [0-9]+ bytes of data \([0-9]+ bytes short\)' \
		luoctl prepare --kernel /kernel --reuse-cmdline
	expect_exit 13 '"kind": "vetoed"' luoctl --json prepare --kernel /kernel --reuse-cmdline
	expect_exit 3 'region capacity' luoctl check --kernel /kernel --reuse-cmdline
	expect_state normal
	[ "$(cat /sys/kernel/kexec_loaded)" = 0 ] || fail "the vetoed prepare left the kexec image loaded"
	pass
}
