# bench_vm_blackout (LUO kernel; a benchmark: it passes when it ran, whatever
# the figures): the blackout of a KVM guest (luo-test-vmm) through a live
# update against a bare kexec of the same kernel and initramfs, alternating
# (bare, VM, bare, VM, ... ROUNDS times each) so that a change of load on the
# host hits both alike.
#   bare: host-measured "mark bare-kexec" (right before
#         reboot(LINUX_REBOOT_CMD_KEXEC), image loaded, no luod, no LUO
#         session, no VM) -> "mark init-start" (the next kernel's /init)
#   VM:   the guest's own blackout, last guest progress before the pause ->
#         first guest progress after the claim, measured by the VMM with the
#         TSC (it keeps counting across the kexec); also host-measured from
#         "mark freeze-start" (right before `luoctl freeze`, so a little
#         more than the guest's) to "mark vm-resumed" (the claiming VMM prints
#         it at the first guest progress).
# The VMM runs as a real one would: no RAM hash at the pause nor at the
# claim (vm_survives_kexec does both: about 35 ms each on 2 MiB); the claim
# still checks counter, ring and the untouched RAM after the run.
# Odd kernels (1, 3, 5, ...) end with a bare kexec; even ones start luod and
# a VMM and do prepare, freeze, reboot; odd kernels after the first start
# luod and claim the VM at once (the VMM retries until luod answers),
# then finish and stop luod before their bare kexec.
ROUNDS=5


claim_vm() {
	step start-luod 60
	mkdir -p /run/luod
	mark luod-exec
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod >>"$LUOD_LOG" 2>&1 &
	LUOD_PID=$!
	step claim 90
	{
		luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 1 --no-verify --mark vm-resumed
		echo $? >/run/claim.rc
	} 2>&1 | tee /run/claim.log
	[ "$(cat /run/claim.rc)" = 0 ] || fail "luo-test-vmm claim failed (status $(cat /run/claim.rc))"
	grep -q 'VMM: resumed .* increasing=yes static_match=yes ring=ok' /run/claim.log || fail "the guest did not continue"
	bo=$(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' /run/claim.log)
	[ -n "$bo" ] || fail "no VM blackout measured"
	say "bench vm_tsc_ms@$BOOT $bo"
	say "bench vm_restore_to_first_progress_ms@$BOOT $(field /run/claim.log 'VMM: resumed ' restore_to_first_progress_ms)"
	say "bench vm_connect_ms@$BOOT $(field /run/claim.log 'VMM: claimed ' connect_ms)"
	info "kernel $BOOT: VM counter $(field /run/claim.log 'VMM: resumed ' counter_before) -> $(field /run/claim.log 'VMM: resumed ' counter_after), VM blackout (TSC) $bo ms"
	luo-qemu-tool luod-times --exec-ns "$(field /run/claim.log 'VMM: claim name=' realtime_ns)" --log "$LUOD_LOG"
	expect_exit 0 'vm0.*claimed' luoctl vm list
}

boot_any() {
	if [ $((BOOT % 2)) = 1 ]; then
		if [ "$BOOT" -gt 1 ]; then
			claim_vm
			run luoctl finish
			[ "$BOOT" = $((2 * ROUNDS + 1)) ] && pass
			stop_luod
		fi
		bare_kexec
	fi
	step start-luod 60
	start_luod
	expect_state normal
	step vmm-start 60
	luo-test-vmm serve --socket "$SOCK" --name vm0 --no-ram-checksum --heartbeat-ms 0 >/run/vmm0.log 2>&1 &
	wait_for /run/vmm0.log 'VMM: running' 30
	luo_cycle
}
