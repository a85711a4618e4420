# stress_sessions (LUO kernel): 512 sessions with one memfd each (sizes
# cycling through 0, 1, 100, 4096, 8192, 12345 bytes), created and preserved
# by one client process (luo-qemu-tool fill, through luod's socket); after
# the kexec every file is retrieved and checked against the manifest (size
# and SHA-256 of each), which travelled in the repacked initramfs.
N=512
boot1() {
	step start-luod 60
	start_luod
	step fill 600
	run luo-qemu-tool fill --prefix s --sessions $N --files 1 --sizes 0,1,100,4096,8192,12345 --seed 3 --manifest /manifest --marker before --print-each
	expect_json '"name": "s0511"'
	c=$(grep -c '"owner_uid"' /run/status.json)
	[ "$c" = $N ] || fail "status shows $c sessions, expected $N"
	luo_cycle
}

boot2() {
	wait_updated
	status_json
	c=$(grep -c '"incoming": true' /run/status.json)
	[ "$c" = $N ] || fail "status shows $c incoming sessions, expected $N"
	info "$c incoming sessions"
	step retrieve 600
	run luo-qemu-tool check --manifest /manifest --marker after --print-each
	step finish 300
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	dmesg_has 'liveupdate number: 1'
	pass
}
