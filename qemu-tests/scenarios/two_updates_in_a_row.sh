# two_updates_in_a_row (LUO kernel): two full cycles. Cycle 1 carries
# session a (token 1); in the second kernel it is retrieved and finished,
# then session a is created again (same name) with the retrieved data and a
# new session b is added; cycle 2 carries both. The kernel logs
# "liveupdate number: 2", `luoctl status --json` says live_updates 2 and the
# history holds two finished cycles.
boot1() {
	step start-luod 60
	start_luod
	step preserve 60
	run luo-qemu-tool gen --size 300000 --seed 31 --out /run/a
	run luoctl session create a
	run luoctl session preserve a --token 1 --file /run/a
	hashfile a/1@1 /run/a before
	luo_cycle
}

boot2() {
	wait_updated
	step retrieve 60
	run luoctl session retrieve a --token 1 --output /run/a
	hashfile a/1@1 /run/a after
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	dmesg_has 'liveupdate number: 1'
	step preserve 60
	run luoctl session create a
	run luoctl session preserve a --token 1 --file /run/a
	hashfile a/1@2 /run/a before
	run luo-qemu-tool gen --size 5000 --seed 32 --out /run/b
	run luoctl session create b
	run luoctl session preserve b --token 2 --file /run/b
	hashfile b/2@2 /run/b before
	luo_cycle
}

boot3() {
	wait_updated
	step retrieve 60
	run luoctl session retrieve b --token 2 --output /run/b.after
	run luoctl session retrieve a --token 1 --output /run/a.after
	hashfile a/1@2 /run/a.after after
	hashfile b/2@2 /run/b.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 2'
	dmesg_has 'liveupdate number: 2'
	luoctl --json history >/run/history.json
	c=$(grep -c '"outcome": "finished"' /run/history.json)
	[ "$c" = 2 ] || { cat /run/history.json; fail "history holds $c finished cycles, expected 2"; }
	run luoctl history
	pass
}
