# vm_two_updates (LUO kernel): the same KVM guest through two live updates
# in a row. Kernel 1: `luo-test-vmm serve`, prepare/freeze/reboot. Kernel 2:
# `luo-test-vmm claim --serve` claims the guest, continues it, and once
# `luoctl finish` has closed the update registers it with luod again (a new
# session vm-vm0 for the same memfd) and serves luod's calls; second
# prepare/freeze/reboot. Kernel 3: a new VMM claims it again: the RAM's
# SHA-256 equals the one at the second pause, the counter goes on above the
# value kernel 2 last saw, the state says generation 2.

start_luod_now() {
	mkdir -p /run/luod
	mark luod-exec
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod >>"$LUOD_LOG" 2>&1 &
	LUOD_PID=$!
}
cycle() { # cycle LOG: prepare, freeze (the VMM logging to LOG pauses), reboot
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	step freeze 60
	mark freeze-start
	run luoctl freeze
	mark frozen
	wait_for "$1" 'VMM: answered n=[0-9]* freeze ok' 10
	grep -E 'VMM: (call|paused|answered) ' "$1" | tail -n 3
	info "boot $BOOT: VM vm0 paused at counter $(field "$1" 'VMM: paused ' counter)"
	step kexec 180
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot1() {
	step start-luod 60
	start_luod
	step vmm-start 60
	luo-test-vmm serve --socket "$SOCK" --name vm0 --heartbeat-ms 500 >/run/vmm.log 2>&1 &
	wait_for /run/vmm.log 'VMM: heartbeat .* counter=[1-9]' 30
	cycle /run/vmm.log
}

boot2() {
	step start-luod 60
	start_luod_now
	step claim 90
	luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 2 --serve --heartbeat-ms 500 >/run/vmm.log 2>&1 &
	wait_for /run/vmm.log 'VMM: (resumed|result)' 60
	grep -E 'VMM: (claimed|restored|resumed|blackout_tsc_ms)' /run/vmm.log
	grep -q 'VMM: restored .* generation=1 .* ram_match=yes' /run/vmm.log || fail "RAM not verified at the first claim"
	grep -q 'VMM: resumed .* increasing=yes static_match=yes ring=ok' /run/vmm.log || fail "the guest did not continue after the first update"
	info "update 1: counter $(field /run/vmm.log 'VMM: resumed ' counter_before) -> $(field /run/vmm.log 'VMM: resumed ' counter_after); VM blackout (TSC) $(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' /run/vmm.log) ms"
	field /run/vmm.log 'VMM: resumed ' counter_after >/vm.counter
	step finish 60
	run luoctl finish
	step register-again 60
	wait_for /run/vmm.log 'VMM: registered name=vm0 .* again' 30
	grep -E 'VMM: (waiting|registered)' /run/vmm.log
	expect_exit 0 'vm0.*registered' luoctl vm list
	wait_for /run/vmm.log 'VMM: heartbeat .* state=running' 10
	cycle /run/vmm.log
}

boot3() {
	step start-luod 60
	start_luod_now
	step claim 90
	{
		luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 2 --mark vm-resumed
		echo $? >/run/claim.rc
	} 2>&1 | tee /run/claim.log
	[ "$(cat /run/claim.rc)" = 0 ] || fail "the second claim failed"
	grep -q 'VMM: restored .* generation=2 .* ram_match=yes' /run/claim.log || fail "RAM not verified at the second claim (or not generation 2)"
	before=$(field /run/claim.log 'VMM: resumed ' counter_before)
	after=$(field /run/claim.log 'VMM: resumed ' counter_after)
	seen=$(cat /vm.counter)
	[ "$before" -gt "$seen" ] && [ "$after" -gt "$before" ] || fail "counter not increasing over two updates: $seen (kernel 2) -> $before -> $after"
	info "update 2: counter $seen (kernel 2, after the first claim) -> $before (second pause) -> $after; VM blackout (TSC) $(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' /run/claim.log) ms"
	expect_exit 0 'vm0.*claimed' luoctl vm list
	run luoctl finish
	expect_json '"live_updates": 2'
	pass
}
