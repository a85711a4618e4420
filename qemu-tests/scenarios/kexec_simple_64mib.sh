# kexec_simple_64mib (stock Debian kernel, reserved-memory backend): both
# kernels boot with memmap=160M$0x30000000 (/proc/iomem shows the range as
# Reserved). A 64 MiB memfd is preserved; prepare uses --reuse-cmdline (luod
# keeps the same memmap= on the target's command line); freeze copies the
# memfd and luod's record into the range; reboot is a real kexec into the
# stock kernel; the new luod finds the record in the range and, the new
# command line carrying the cycle's luod.handover= nonce, recreates the
# memfd; the retrieved file has the same SHA-256.
RANGE='160M$0x30000000'
check_iomem() {
	grep -i '30000000-39ffffff : Reserved' /proc/iomem || { cat /proc/iomem; fail "0x30000000..0x39ffffff is not Reserved in /proc/iomem"; }
}
boot1() {
	step start-luod 60
	check_iomem
	start_luod --backend reserved-memory
	expect_state normal
	expect_json '"backend": "reserved-memory"'
	step preserve 300
	run luo-qemu-tool gen --size 64M --seed 51 --out /run/data
	run luoctl session create vm0
	run luoctl session preserve vm0 --token 1 --file /run/data
	hashfile vm0/1 /run/data before
	rm /run/data
	step repack 120
	repack
	step prepare 300
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	step freeze 300
	mark freeze-start
	run luoctl --json freeze
	mark frozen
	step kexec 300
	mark reboot-call
	luoctl reboot
	sleep 240
	fail "still running 240 s after luoctl reboot"
}

boot2() {
	step start-luod 300
	check_iomem
	grep -q 'memmap=160M\$0x30000000' /proc/cmdline || fail "the target command line lost memmap=$RANGE"
	nonce=$(sed -n 's/.*luod\.handover=\([0-9a-f]\{16\}\).*/\1/p' /proc/cmdline)
	[ -n "$nonce" ] || fail "the target command line has no luod.handover= nonce"
	wait_updated --backend reserved-memory
	run luoctl status
	step retrieve 300
	run luoctl session retrieve vm0 --token 1 --output /run/data.after
	hashfile vm0/1 /run/data.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	luoctl --json history >/run/history.json || fail "luoctl --json history failed"
	grep -q "luod.handover=$nonce\"" /run/history.json || { cat /run/history.json; fail "the cycle's target command line lacks luod.handover=$nonce"; }
	info "the kexec'd kernel's command line carries the cycle's luod.handover=$nonce: taken as the update"
	pass
}
