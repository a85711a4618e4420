# garbage_region_at_boot (stock Debian kernel, reserved-memory backend,
# memmap=16M$0x30000000): before luod starts, the whole range is filled with
# random bytes through /dev/mem (dd; STRICT_DEVMEM and IO_STRICT_DEVMEM allow
# it: the range is not System RAM and not claimed by a driver). luod starts
# in `normal`, writes nothing, and `luoctl --json status` notes say the
# record cannot be read and why (each slot's reason); changes are refused
# (exit 18) until `luoctl discard-record --yes`. luod then works on the
# region: a session is preserved, prepare/cancel succeed, and a luod started
# again finds its own record (no note, the session kept).
boot1() {
	step garbage 120
	grep -i '30000000-30ffffff : Reserved' /proc/iomem || { cat /proc/iomem; fail "the range is not Reserved"; }
	run dd if=/dev/urandom of=/dev/mem bs=1M seek=$((0x30000000 >> 20)) count=16
	dd if=/dev/mem bs=64 skip=$((0x30000000 / 64)) count=1 2>/dev/null | hexdump -C | head -n 4
	step start-luod 60
	start_luod --backend reserved-memory
	expect_state normal
	expect_json '"notes": \[' 'the handover record cannot be read: ' 'slot A: .*slot B: ' 'discard-record --yes'
	grep -A3 '"notes"' /run/status.json
	expect_json '"sessions": \[\]'
	expect_exit 18 'the handover record cannot be read' luoctl session create vm0
	step discard 60
	expect_exit 2 'discard-record --yes' luoctl discard-record
	expect_exit 0 '"generation": 1' luoctl --json discard-record --yes
	step use-region 120
	run luoctl session create vm0
	run luo-qemu-tool gen --size 100000 --seed 61 --out /run/d
	run luoctl session preserve vm0 --token 1 --file /run/d
	run luoctl prepare --kernel /kernel --reuse-cmdline
	run luoctl cancel
	step restart-luod 60
	kill -TERM "$LUOD_PID"
	wait "$LUOD_PID"
	start_luod --backend reserved-memory
	expect_state normal
	expect_json '"name": "vm0"'
	if grep -q 'cannot be read' /run/status.json; then fail "the note survived a restart on a valid record"; fi
	pass
}
