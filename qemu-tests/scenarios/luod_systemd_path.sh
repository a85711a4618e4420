# luod_systemd_path (LUO kernel): luod's systemd reboot path against the real
# kernel. The busybox guest has no systemd, so `luo-qemu-tool fake-pid1`
# plays a LUO-aware systemd's part (qemu-tests/tool/src/fake_pid1.rs): it
# keeps luod's fd store (NOTIFY_SOCKET), and on the fake `systemctl kexec`
# stops luod, creates the LUO session `systemd`, records luod's session fds
# by name, PRESERVE_FDs the other fds (luod's memfds are preserved in luod's
# sessions already: EBUSY, dropped, as systemd drops them), and kexecs. In the
# new kernel it retrieves `systemd` and each session by name and starts luod
# with LISTEN_FDS. luod must choose the systemd path (check, status), answer
# `reboot` with the orderly note, take its sessions from the fd store without
# a second RETRIEVE_SESSION (which would fail: PID 1 retrieved them), come
# up `updated`, and hand the memfds back byte-identical. luod is killed
# (SIGKILL) in prepared, frozen and updated, and fake-pid1 starts it again
# with its fd store (Restart=on-failure): nothing is lost.
SYSTEMCTL=/fake-systemctl

# kill_luod STATE: SIGKILL to luod; fake-pid1 starts it again with its fd
# store (Restart=on-failure); it must come back in STATE with the same
# sessions.
kill_luod() {
	luoctl --json session list >/run/sessions.before
	pid=$(pidof luod) || fail "no luod running"
	echo "+ kill -KILL $pid (luod in $1)"
	kill -KILL "$pid"
	i=0
	until [ "$(pidof luod)" ] && [ "$(pidof luod)" != "$pid" ] && luoctl status >/dev/null 2>&1; do
		i=$((i + 1))
		[ $i -lt 600 ] || { cat "$LUOD_LOG"; fail "luod was not restarted within 30 s"; }
		usleep 50000
	done
	expect_state "$1"
	luoctl --json session list >/run/sessions.after
	cmp /run/sessions.before /run/sessions.after || { cat /run/sessions.before /run/sessions.after; fail "sessions differ after luod's restart in $1"; }
	info "luod killed in $1 and restarted with its fd store: $1, same sessions"
}

start_pid1() {
	mkdir -p /run/luod
	echo "+ luo-qemu-tool fake-pid1 $* (luod's log: $LUOD_LOG)"
	luo-qemu-tool fake-pid1 --notify /run/notify --control /run/fake-pid1.ctl "$@" \
		--exec "luod --backend luo --fd-store systemd --systemctl $SYSTEMCTL --systemd-unit luod.service --socket $SOCK --state-dir /run/luod" \
		2>>"$LUOD_LOG" &
	PID1=$!
}

boot1() {
	step setup 60
	cat >"$SYSTEMCTL" <<'SH'
#!/bin/sh
echo "fake systemctl $*" >&2
case "$*" in
*--property=Version*) echo 262.1-1 ;;
*--property=FileDescriptorStorePreserve*) echo yes ;;
*kexec*) echo kexec >/run/fake-pid1.ctl ;;
*) echo "fake systemctl: unexpected $*" >&2; exit 1 ;;
esac
SH
	chmod 755 "$SYSTEMCTL"
	step start-luod 60
	# At the kexec: luod's sessions luod, vm0, vm1 go by name; its record
	# memfd and the three client memfds are preserved in those sessions
	# already, so systemd's PRESERVE_FD of each fails (EBUSY) and drops it.
	start_pid1 --expect "3 sessions, 0 fds, dropped 4"
	i=0
	until luoctl status >/dev/null 2>&1; do
		kill -0 "$PID1" 2>/dev/null || fail "fake-pid1 exited"
		i=$((i + 1))
		[ $i -lt 600 ] || { cat "$LUOD_LOG"; fail "luod did not answer within 30 s"; }
		usleep 50000
	done
	step check 60
	luoctl check >/run/check.txt 2>&1
	cat /run/check.txt
	grep -q "reboot path.*systemd: orderly shutdown: reboot runs .systemctl kexec.; systemd 262" /run/check.txt ||
		fail "luoctl check does not name the systemd reboot path"
	luoctl --json status >/run/status.json
	grep -q '"path": "systemd"' /run/status.json || { cat /run/status.json; fail "status --json does not name the systemd path"; }
	info "luod chose the systemd reboot path (check and status --json)"
	step preserve 60
	run luoctl session create vm0
	run luoctl session create vm1
	run luo-qemu-tool gen --size 1048576 --seed 31 --out /run/d1
	run luo-qemu-tool gen --size 4096 --seed 32 --out /run/d2
	run luo-qemu-tool gen --size 999 --seed 33 --out /run/d3
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
	step restart-prepared 60
	kill_luod prepared
	step freeze 60
	run luoctl freeze
	step restart-frozen 60
	kill_luod frozen
	step kexec 180
	luoctl reboot >/run/reboot.txt 2>&1
	rc=$?
	cat /run/reboot.txt
	[ $rc = 0 ] || fail "luoctl reboot exited with $rc"
	grep -q "orderly shutdown under way" /run/reboot.txt || fail "reboot's reply does not say the orderly shutdown is under way"
	info "luoctl reboot: orderly shutdown under way (systemctl kexec queued)"
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	step start-luod 60
	start_pid1 --restore
	i=0
	until luoctl --json status >/run/status.json 2>/dev/null && grep -q '"state": "updated"' /run/status.json; do
		kill -0 "$PID1" 2>/dev/null || fail "fake-pid1 exited"
		i=$((i + 1))
		[ $i -lt 1500 ] || { cat /run/status.json; cat "$LUOD_LOG"; fail "luod did not say updated within 30 s"; }
		usleep 20000
	done
	[ "$(cat /run/fake-pid1.restored)" = 3 ] || fail "PID 1 restored $(cat /run/fake-pid1.restored) fds, not 3 (luod, vm0, vm1)"
	grep -q "IncomingFromSystemd start" "$LUOD_LOG" || { cat "$LUOD_LOG"; fail "luod did not take its sessions from systemd's fd store"; }
	grep -q '"path": "systemd"' /run/status.json || fail "status --json does not name the systemd path after the kexec"
	info "luod took its 3 sessions from the fd store (no RETRIEVE_SESSION of its own) and is updated"
	step retrieve 60
	run luoctl session retrieve vm1 --token 3 --output /run/d3.after
	step restart-updated 60
	kill_luod updated
	step retrieve-rest 60
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
