# liveupdate_busy (LUO kernel, 1 boot): /dev/liveupdate is exclusive, and
# luod retries EBUSY for 5 s, then says another agent holds it.
# - Another process (a shell: `exec 3<>/dev/liveupdate`, like systemd before
#   a kexec) holds the device; a second open gets EBUSY.
# - luod's start needs the device (it creates its own session): with the
#   holder alive it exits 1 after 5 s of retries, printing exactly
#   "luod: /dev/liveupdate (held by another process for over 5 s; systemd
#   opens it before a kexec — find the holder with `fuser /dev/liveupdate`)
#   is busy: another agent holds it".
# - Holder killed: luod starts; while it runs the device is free (luod opens
#   it only for the calls that need it: another process can open it).
# - Held again: `luoctl status` still answers at once, `luoctl session create
#   x` exits 17 after 5 s with the same message and creates nothing; holder
#   killed, the same request succeeds.
# - Held again, `luoctl session create y` started, the holder released 1 s
#   later: the request succeeds within the retry window.

MSG='/dev/liveupdate (held by another process for over 5 s; systemd opens it before a kexec — find the holder with `fuser /dev/liveupdate`) is busy: another agent holds it'

# hold: another process opens /dev/liveupdate and keeps it open (HOLDER).
hold() {
	rm -f /run/held
	sh -c 'exec 3<>/dev/liveupdate || exit 1; echo held >/run/held; exec sleep 600' &
	HOLDER=$!
	i=0
	until [ -f /run/held ]; do
		kill -0 "$HOLDER" 2>/dev/null || fail "the holder could not open /dev/liveupdate"
		i=$((i + 1))
		[ $i -lt 200 ] || fail "the holder did not open /dev/liveupdate within 10 s"
		usleep 50000
	done
	echo "pid $HOLDER holds /dev/liveupdate: $(ls -l /proc/$HOLDER/fd/3 | sed 's/.*-> //')"
}

release() {
	kill "$HOLDER"
	wait "$HOLDER" 2>/dev/null
	echo "holder $HOLDER killed"
}

# ms_since NS: milliseconds from NS (luo-qemu-tool now) to now.
ms_since() { echo $((($(luo-qemu-tool now) - $1) / 1000000)); }

# expect_busy_wait MS: the call took at least the 5 s retry window, and not much more.
expect_busy_wait() {
	[ "$1" -ge 5000 ] || fail "gave up after $1 ms, before the 5 s retry window"
	[ "$1" -lt 12000 ] || fail "took $1 ms, far beyond the 5 s retry window"
}

boot1() {
	step hold 30
	[ -c /dev/liveupdate ] || fail "no /dev/liveupdate"
	hold
	if sh -c 'exec 4<>/dev/liveupdate' 2>/run/second.txt; then
		fail "a second open of /dev/liveupdate succeeded"
	fi
	cat /run/second.txt
	grep -qi 'busy' /run/second.txt || fail "the second open did not fail with EBUSY"
	step luod-start-busy 40
	mkdir -p /run/luod
	echo "+ luod --socket $SOCK --state-dir /run/luod (expecting exit 1 after 5 s)"
	t0=$(luo-qemu-tool now)
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod >/run/luod-busy.log 2>&1
	rc=$?
	ms=$(ms_since "$t0")
	cat /run/luod-busy.log
	[ "$rc" = 1 ] || fail "luod exited with status $rc while the device was held, expected 1"
	grep -qxF "luod: $MSG" /run/luod-busy.log || fail "luod's message is not \"luod: $MSG\""
	expect_busy_wait "$ms"
	info "device held: luod's start exits 1 after $ms ms: luod: $MSG"
	step luod-start-free 60
	release
	start_luod
	expect_state normal
	expect_json '"backend": "luo"'
	# luod keeps the device closed while it idles.
	sh -c 'exec 4<>/dev/liveupdate' || fail "luod keeps /dev/liveupdate open while idle"
	echo "with luod running, another process can open /dev/liveupdate"
	step session-busy 40
	hold
	run luoctl status
	t0=$(luo-qemu-tool now)
	expect_exit 17 '' luoctl session create x
	ms=$(ms_since "$t0")
	grep -qF "$MSG" /run/out.txt || fail "luoctl's message lacks \"$MSG\""
	expect_busy_wait "$ms"
	luoctl session list >/run/list.txt 2>&1
	grep -qw x /run/list.txt && { cat /run/list.txt; fail "session x exists after the refused create"; }
	info "device held: luoctl session create exits 17 after $ms ms: $(cat /run/out.txt)"
	step session-free 40
	release
	run luoctl session create x
	run luo-qemu-tool gen --size 4096 --seed 3 --out /run/d
	run luoctl session preserve x --token 1 --file /run/d
	expect_exit 0 '' luoctl session list
	grep -qw x /run/out.txt || fail "session x not listed"
	info "holder killed: the same luoctl session create x succeeds (and x takes a memfd)"
	step released-during-retry 40
	hold
	t0=$(luo-qemu-tool now)
	luoctl session create y >/run/y.txt 2>&1 &
	CREATE=$!
	sleep 1
	release
	wait "$CREATE"
	rc=$?
	ms=$(ms_since "$t0")
	cat /run/y.txt
	[ "$rc" = 0 ] || fail "luoctl session create y failed (status $rc) although the holder let go after 1 s"
	[ "$ms" -ge 1000 ] || fail "session create y returned after $ms ms, before the holder let go"
	[ "$ms" -lt 5000 ] || fail "session create y took $ms ms"
	expect_exit 0 '' luoctl session list
	grep -qw y /run/out.txt || fail "session y not listed"
	info "holder released 1 s into luod's retries: luoctl session create y succeeds after $ms ms"
	pass
}
