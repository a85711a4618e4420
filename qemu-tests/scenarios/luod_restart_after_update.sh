# luod_restart_after_update (LUO kernel, 3 boots): luod reads and writes the
# record memfd the kernel handed back in place and preserves it in a new
# session only at the next prepare. Killed with SIGKILL in `updated` before
# that prepare, it comes back from what it parked (the incoming record and
# session: luod-record-in, luod-session-in) still `updated` with its
# session; the client's memfd arrives intact; the next cycle's prepare
# preserves the record again and the second kexec carries it (kernel 3:
# updated, two live updates in the history).
boot1() {
	step start-luod 60
	start_luod
	step preserve 60
	run luo-qemu-tool gen --size 300000 --seed 41 --out /run/a
	run luoctl session create a
	run luoctl session preserve a --token 1 --file /run/a
	hashfile a/1@1 /run/a before
	luo_cycle
}

boot2() {
	wait_updated
	step kill-luod 60
	echo "+ kill -KILL $LUOD_PID"
	kill -KILL "$LUOD_PID"
	wait "$LUOD_PID" 2>/dev/null
	step restart-luod 60
	start_luod
	expect_state updated
	grep -q 'Restarted start' "$LUOD_LOG" || { cat "$LUOD_LOG"; fail "luod did not restart from what it parked"; }
	expect_exit 0 '"name": "a"' luoctl --json session list
	step retrieve 60
	run luoctl session retrieve a --token 1 --output /run/a
	hashfile a/1@1 /run/a after
	step finish 60
	run luoctl finish
	expect_state normal
	step preserve 60
	run luo-qemu-tool gen --size 5000 --seed 42 --out /run/b
	run luoctl session create b
	run luoctl session preserve b --token 2 --file /run/b
	hashfile b/2@2 /run/b before
	# prepare preserves the record in a new session (without it the reboot
	# refuses: luod's own session would not be open).
	luo_cycle
}

boot3() {
	wait_updated
	step retrieve 60
	run luoctl session retrieve b --token 2 --output /run/b.after
	hashfile b/2@2 /run/b.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_json '"live_updates": 2'
	pass
}
