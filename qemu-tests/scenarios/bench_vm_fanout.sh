# bench_vm_fanout (LUO kernel; a benchmark: it passes when it ran,
# whatever the figures; issue 8 item 2): the VM blackout through a live
# update with 8 VMs against with 1, alternating (1, 8, 1, 8, ...: ROUNDS of
# each, one kexec per round) so that a change of load on the host hits both
# alike. Measured per VM as bench_vm_blackout does: the guest's own blackout,
# last guest progress before the pause -> first guest progress after the
# claim, by the VMM with the TSC (it keeps counting across the kexec).
#
# Kernel B serves count(B) VMs named bB-vI (luo-test-vmm serve) and runs
# prepare, freeze, reboot; kernel B+1 starts luod and claims them all at once
# (each claiming VMM retries until luod answers), checks each guest went on,
# finishes, and serves the next round's VMs.
#
# The VMs are as most of a host's VMs are: mostly waiting (--idle-ms: the
# vCPU idles 10 ms after each progress exit, one every 1024 iterations of
# its loop; a pause wakes it at once). A flat-out guest is, under TCG, a
# nested KVM guest emulated instruction by instruction that takes all the
# CPU this guest has. The VMMs are started one after another, each waited
# for until it registered (`VMM: running`); 2 MiB of guest RAM each; no RAM
# hash at the pause nor at the claim, as a real VMM; the claiming VMM runs
# its guest 1 s (its TSC rate is calibrated over the run).
#
# The loops count in `vi`: the helpers (wait_for among them) use `i`. The
# first attempt at this benchmark (bench_vm_scale, removed) counted its VMMs
# in `i` around wait_for, which reset it: its loop never ended, and that is
# why it "hung starting 7 more luo-test-vmm".
ROUNDS=3
MANY=8
VMM_OPTS="--no-ram-checksum --heartbeat-ms 0 --idle-ms 10 --progress-every 1024"

# count B: how many VMs kernel B serves (1 in odd kernels, MANY in even ones).
count() {
	if [ $(($1 % 2)) = 1 ]; then echo 1; else echo "$MANY"; fi
}

serve_vms() {
	n=$(count "$BOOT")
	step vmm-start 120
	vi=0
	while [ $vi -lt "$n" ]; do
		luo-test-vmm serve --socket "$SOCK" --name "b$BOOT-v$vi" $VMM_OPTS >"/run/vmm$vi.log" 2>&1 &
		wait_for "/run/vmm$vi.log" 'VMM: running' 60
		vi=$((vi + 1))
	done
	info "kernel $BOOT: $n VM(s) registered"
	say "bench vms@$BOOT $n"
}

claim_vms() {
	prev=$((BOOT - 1))
	n=$(count "$prev")
	step start-luod 60
	mkdir -p /run/luod
	mark luod-exec
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod >>"$LUOD_LOG" 2>&1 &
	LUOD_PID=$!
	step claim 120
	pids=""
	vi=0
	while [ $vi -lt "$n" ]; do
		luo-test-vmm claim --socket "$SOCK" --name "b$prev-v$vi" --seconds 1 --no-verify >"/run/claim$vi.log" 2>&1 &
		pids="$pids $!"
		vi=$((vi + 1))
	done
	vi=0
	for p in $pids; do
		wait "$p" || { cat "/run/claim$vi.log"; fail "luo-test-vmm claim of b$prev-v$vi failed"; }
		vi=$((vi + 1))
	done
	mark vms-resumed
	vi=0
	while [ $vi -lt "$n" ]; do
		grep -q 'VMM: resumed .* increasing=yes static_match=yes ring=ok' "/run/claim$vi.log" ||
			{ cat "/run/claim$vi.log"; fail "the guest of b$prev-v$vi did not continue"; }
		bo=$(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' "/run/claim$vi.log")
		[ -n "$bo" ] || { cat "/run/claim$vi.log"; fail "no VM blackout measured for b$prev-v$vi"; }
		say "bench vm_tsc_ms@$prev.$vi $bo"
		say "bench vm_connect_ms@$prev.$vi $(field "/run/claim$vi.log" 'VMM: claimed ' connect_ms)"
		vi=$((vi + 1))
	done
	info "kernel $BOOT: $n VM(s) of kernel $prev claimed, each guest went on"
	expect_exit 0 "b$prev-v0.*claimed" luoctl vm list
	run luoctl finish
}

boot_any() {
	if [ "$BOOT" -gt 1 ]; then
		claim_vms
		[ "$BOOT" = $((2 * ROUNDS + 1)) ] && pass
	else
		step start-luod 60
		start_luod
		expect_state normal
	fi
	serve_vms
	luo_cycle
}
