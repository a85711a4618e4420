# bench_blackout (LUO kernel; a benchmark: it passes when it ran, whatever
# the figures): the blackout of a live update through luod against a bare
# kexec of the same kernel and initramfs without luod, alternating (bare,
# luod, bare, luod, ... ROUNDS times each) so that a change of load on the
# host hits both alike. The host stamps the serial markers with its monotonic clock:
#   bare:  "mark bare-kexec" (printed and drained right before
#          reboot(LINUX_REBOOT_CMD_KEXEC), the image already loaded, no luod
#          process and no LUO session) -> "mark init-start" (first line of the
#          next kernel's /init)
#   luod:  "mark freeze-start" (right before `luoctl freeze`, prepare done,
#          a 1 MiB memfd preserved) -> "mark updated" (luod started in the
#          new kernel and `luoctl status` says updated)
# Odd kernels (1, 3, 5, ...) end with a bare kexec; even ones (2, 4, ...)
# start a fresh luod and run a cycle; odd kernels after the first retrieve
# and check the memfd and finish the cycle first; the last one passes.
ROUNDS=5
# luod's start-up steps in its log (luo-qemu-tool luod-times prints them after each start).
LUOD_FILTER=debug
boot_any() {
	if [ $((BOOT % 2)) = 1 ]; then
		if [ "$BOOT" -gt 1 ]; then
			wait_updated
			step retrieve 60
			run luoctl session retrieve cache --token 1 --output /run/cache
			hashfile "cache@$((BOOT - 1))" /run/cache after
			run luoctl finish
			if [ "$BOOT" = $((2 * ROUNDS + 1)) ]; then
				compare_hashes
				pass
			fi
			stop_luod
		fi
		bare_kexec
	fi
	step start-luod 60
	start_luod
	expect_state normal
	run luo-qemu-tool gen --size 1M --seed $((80 + BOOT)) --out /run/cache
	hashfile "cache@$BOOT" /run/cache before
	run luoctl session create cache
	run luoctl session preserve cache --token 1 --file /run/cache
	luo_cycle
}
