# warm_reset_after_freeze and crash_after_freeze (stock Debian kernel,
# reserved-memory backend, memmap=16M$0x30000000 for luod and
# memmap=1M$0x32000000 for the scenario's own notes; QEMU runs without
# -no-reboot, so a reboot through the firmware resets the machine and keeps
# guest RAM). Both scenarios run this script; /scenario.name says which.
#
# Boot 1: a 1 MiB memfd is preserved, `check` shows where the nonce goes,
# `prepare --reuse-cmdline` (its note gives the nonce), `freeze`: the
# handover record and the file are in the range. Then no kexec but
#   warm_reset_after_freeze: `echo b > /proc/sysrq-trigger` (an immediate
#     reset through the firmware, as a watchdog or an operator's reset);
#   crash_after_freeze: `echo c > /proc/sysrq-trigger` (a kernel crash;
#     panic=-1 reboots at once).
# Boot 2 (the same kernel, initramfs and command line, booted by the
# firmware): the range is byte for byte what boot 1 left (SHA-256), the
# command line has no luod.handover=. luod starts `normal`, its status note
# names the stale record (boot 1's boot id, the missing nonce, the kept-aside
# file), no session is listed and the file cannot be retrieved (exit 15);
# the kept-aside file is mode 0600 and holds the region's record bytes. A
# luod started again stays normal without the note.
SCRATCH=$((0x32000000))
MARKER=luo-reset-boot-2

# scratch_read OFFSET LEN: LEN bytes of the scenario's range at OFFSET.
scratch_read() {
	dd if=/dev/mem bs=1 skip=$((SCRATCH + $1)) count="$2" 2>/dev/null | tr -d '\000'
}

# The boot after the reset finds boot 1's marker in the scenario's range
# (a fresh QEMU starts with zeroed RAM).
chain_position() {
	if [ "$(scratch_read 0 16)" = "$MARKER" ]; then echo 2; else echo 1; fi
}

region_sha() {
	dd if=/dev/mem bs=1M skip=$((0x30000000 >> 20)) count=16 2>/dev/null | sha256sum | cut -c1-64
}

check_iomem() {
	grep -i '30000000-30ffffff : Reserved' /proc/iomem && grep -i '32000000-320fffff : Reserved' /proc/iomem ||
		{ cat /proc/iomem; fail "the two ranges are not Reserved in /proc/iomem"; }
}

boot1() {
	step start-luod 120
	check_iomem
	start_luod --backend reserved-memory
	expect_state normal
	step preserve 120
	run luo-qemu-tool gen --size 1M --seed 71 --out /run/data
	run luoctl session create vm0
	run luoctl session preserve vm0 --token 1 --file /run/data
	step check 60
	run luoctl check --kernel /kernel --reuse-cmdline >/run/check.txt
	cat /run/check.txt
	grep -q 'luod.handover=<nonce>' /run/check.txt || fail "check does not show where the nonce goes"
	step prepare 120
	luoctl prepare --kernel /kernel --reuse-cmdline >/run/prepare.txt 2>&1 || { cat /run/prepare.txt; fail "prepare failed"; }
	cat /run/prepare.txt
	nonce=$(sed -n 's/.*carries luod\.handover=\([0-9a-f]\{16\}\): .*/\1/p' /run/prepare.txt | head -n 1)
	[ -n "$nonce" ] || fail "prepare's notes give no luod.handover= nonce"
	step freeze 120
	run luoctl --json freeze
	expect_state frozen
	boot_id=$(cat /proc/sys/kernel/random/boot_id)
	sha=$(region_sha)
	# What boot 2 checks, in memory the reset keeps.
	printf '%s%s%s%s' "$MARKER" "$nonce" "$sha" "$boot_id" | dd of=/dev/mem bs=1 seek=$SCRATCH conv=notrunc 2>/dev/null ||
		fail "cannot write the scenario's notes to /dev/mem"
	[ "$(chain_position)" = 2 ] || fail "the scenario's notes did not land in its range"
	info "frozen with the handover in the range (nonce $nonce, boot $boot_id, range SHA-256 $sha)"
	step reset 180
	case "$SCENARIO" in
	crash_after_freeze)
		say expect-panic
		echo "crashing the kernel: echo c > /proc/sysrq-trigger (panic=-1 reboots at once)"
		echo c >/proc/sysrq-trigger
		;;
	*)
		echo "warm reset: echo b > /proc/sysrq-trigger"
		echo b >/proc/sysrq-trigger
		;;
	esac
	sleep 60
	fail "still running 60 s after the sysrq"
}

boot2() {
	step check-ram 120
	check_iomem
	nonce=$(scratch_read 16 16)
	sha=$(scratch_read 32 64)
	boot_id=$(scratch_read 96 36)
	echo "boot 1 left: nonce $nonce, boot id $boot_id, range SHA-256 $sha"
	[ "$(region_sha)" = "$sha" ] || fail "the range changed across the reset: the scenario needs RAM kept"
	[ "$boot_id" != "$(cat /proc/sys/kernel/random/boot_id)" ] || fail "the boot id did not change"
	if grep -q 'luod\.handover=' /proc/cmdline; then fail "the firmware's boot has a luod.handover= on its command line"; fi
	info "after the reset: the range is byte for byte boot 1's (SHA-256), a new boot id, no luod.handover= on the command line"
	step start-luod 120
	start_luod --backend reserved-memory
	expect_state normal
	aside="/run/luod/stale-handover-$boot_id.record"
	expect_json '"sessions": \[\]' \
		"stale handover record not taken: it was written by boot $boot_id \\(kernel $(uname -r)\\) for update cycle 1" \
		"this boot's command line has no luod.handover=$nonce" \
		"the stale record is kept in $aside"
	grep -A2 '"notes"' /run/status.json
	step nothing-handed-out 60
	expect_exit 15 'no session named vm0' luoctl session retrieve vm0 --token 1 --output /run/data.after
	[ ! -e /run/data.after ] || fail "a file was written by a refused retrieve"
	expect_exit 11 '' luoctl finish
	run luoctl session list
	step kept-aside 60
	[ -f "$aside" ] || fail "$aside is missing"
	ls -l /run/luod
	mode=$(stat -c %a "$aside")
	[ "$mode" = 600 ] || fail "$aside has mode $mode, not 600"
	size=$(wc -c <"$aside")
	matched=""
	for slot in 0 8; do
		if dd if=/dev/mem bs=1M skip=$(((0x30000000 >> 20) + slot)) count=1 2>/dev/null | head -c "$size" | cmp -s - "$aside"; then
			matched=$slot
		fi
	done
	[ -n "$matched" ] || fail "$aside is not the record of either slot of the range"
	info "luod came up normal, nothing handed out; $aside (mode $mode, $size bytes) equals the record in slot $([ "$matched" = 0 ] && echo A || echo B)"
	step restart-luod 60
	kill -TERM "$LUOD_PID"
	wait "$LUOD_PID"
	start_luod --backend reserved-memory
	expect_state normal
	if grep -q 'stale' /run/status.json; then fail "the stale note came back after a restart"; fi
	pass
}
