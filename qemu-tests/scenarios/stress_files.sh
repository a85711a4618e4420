# stress_files (LUO kernel): 1,024 memfds in 4 sessions of 256 (sizes cycling
# through 0, 1, 4095, 4096, 4097, 65536, 12345 bytes; tokens 1, 2^64-1 and
# spread over the u64 range), preserved by one client process through luod's
# socket; after the kexec every file is retrieved and checked against the
# manifest (size and SHA-256 of each).
boot1() {
	step start-luod 60
	start_luod
	step fill 600
	run luo-qemu-tool fill --prefix f --sessions 4 --files 256 --sizes 0,1,4095,4096,4097,65536,12345 --seed 5 --manifest /manifest --marker before --print-each
	c=$(luoctl --json session list | luo-qemu-tool json --count 'sessions.*.files.*')
	[ "$c" = 1024 ] || fail "session list shows $c files, expected 1024"
	luo_cycle
}

boot2() {
	wait_updated
	status_json
	c=$(luoctl --json session list | luo-qemu-tool json --count 'sessions.*.files.*')
	[ "$c" = 1024 ] || fail "session list shows $c incoming files, expected 1024"
	step retrieve 600
	run luo-qemu-tool check --manifest /manifest --marker after --print-each
	step finish 300
	run luoctl finish
	expect_state normal
	dmesg_has 'liveupdate number: 1'
	pass
}
