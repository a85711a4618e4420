# luod_restart_mid_cycle (LUO kernel): after `prepare`, luod is killed with
# SIGKILL (its fd holder survives, in its own process group) and started
# again: it comes back `prepared` with the same sessions and files and the
# kexec image still loaded; the cycle goes on (freeze, reboot: a real kexec)
# and the memfds arrive intact.
boot1() {
	step start-luod 60
	start_luod
	step preserve 60
	run luoctl session create vm0
	run luoctl session create vm1
	run luo-qemu-tool gen --size 2097152 --seed 21 --out /run/d1
	run luo-qemu-tool gen --size 4096 --seed 22 --out /run/d2
	run luo-qemu-tool gen --size 777 --seed 23 --out /run/d3
	run luoctl session preserve vm0 --token 1 --file /run/d1
	run luoctl session preserve vm0 --token 2 --file /run/d2
	run luoctl session preserve vm1 --token 3 --file /run/d3
	hashfile vm0/1 /run/d1 before
	hashfile vm0/2 /run/d2 before
	hashfile vm1/3 /run/d3 before
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	expect_state prepared
	luoctl --json session list >/run/sessions.before
	step kill-luod 60
	echo "+ kill -KILL $LUOD_PID"
	kill -KILL "$LUOD_PID"
	wait "$LUOD_PID" 2>/dev/null
	if luoctl status >/dev/null 2>&1; then fail "luod still answers after SIGKILL"; fi
	holder=$(cat /run/luod/holder.pid 2>/dev/null)
	[ -n "$holder" ] && kill -0 "$holder" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$holder/status" ||
		fail "the fd holder did not survive luod"
	echo "fd holder pid $holder survived luod's SIGKILL"
	step restart-luod 60
	start_luod
	expect_state prepared
	luoctl --json session list >/run/sessions.after
	cmp /run/sessions.before /run/sessions.after || { cat /run/sessions.before /run/sessions.after; fail "sessions differ after the restart"; }
	[ "$(cat /sys/kernel/kexec_loaded)" = 1 ] || fail "the kexec image is no longer loaded"
	info "luod restarted after SIGKILL: prepared, same sessions, kexec image loaded"
	step freeze 60
	mark freeze-start
	run luoctl freeze
	step kexec 180
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	wait_updated
	step retrieve 60
	run luoctl session retrieve vm1 --token 3 --output /run/d3.after
	run luoctl session retrieve vm0 --token 2 --output /run/d2.after
	run luoctl session retrieve vm0 --token 1 --output /run/d1.after
	hashfile vm0/1 /run/d1.after after
	hashfile vm0/2 /run/d2.after after
	hashfile vm1/3 /run/d3.after after
	compare_hashes
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"live_updates": 1'
	dmesg_has 'liveupdate number: 1'
	pass
}
