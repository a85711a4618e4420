# bench_blackout (LUO kernel; a benchmark, it passes when it ran): the
# blackout of a live update through luod against a bare kexec of the same
# kernel and initramfs without luod. The host stamps the serial markers with
# its monotonic clock:
#   bare:  "mark bare-kexec" (printed and drained right before
#          reboot(LINUX_REBOOT_CMD_KEXEC), the image already loaded) ->
#          "mark init-start" (first line of the next kernel's /init)
#   luod:  "mark freeze-start" (right before `luoctl freeze`, prepare done)
#          -> "mark updated" (after luod started in the new kernel and
#          `luoctl status` says updated)
# Kernels 1..BARE do bare kexecs; kernel BARE+1 starts luod, preserves a
# 1 MiB memfd and runs LUOD cycles; the last kernel checks the file.
BARE=3
LUOD=3
bare_kexec() {
	step repack 120
	repack
	step kexec 180
	luo-qemu-tool kexec --kernel /kernel --initrd /run/initrd.cpio --cmdline "$(cat /proc/cmdline)" --mark bare-kexec
	fail "the bare kexec returned"
}
boot_any() {
	if [ "$BOOT" -le $BARE ]; then
		bare_kexec
	fi
	if [ "$BOOT" = $((BARE + 1)) ]; then
		step start-luod 60
		start_luod
		run luo-qemu-tool gen --size 1M --seed 81 --out /run/cache
		hashfile "cache@$BOOT" /run/cache before
	else
		wait_updated
		step retrieve 60
		run luoctl session retrieve cache --token 1 --output /run/cache
		hashfile "cache@$((BOOT - 1))" /run/cache after
		run luoctl finish
		if [ "$BOOT" = $((BARE + LUOD + 1)) ]; then
			compare_hashes
			expect_json "\"live_updates\": $LUOD"
			run luoctl history
			pass
		fi
		hashfile "cache@$BOOT" /run/cache before
	fi
	run luoctl session create cache
	run luoctl session preserve cache --token 1 --file /run/cache
	luo_cycle
}
