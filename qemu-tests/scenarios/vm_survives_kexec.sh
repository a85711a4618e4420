# vm_survives_kexec (LUO kernel): a real KVM guest (luo-test-vmm: a counter
# and a ring in 2 MiB of memfd RAM) keeps running across a real kexec.
# Kernel 1: luod; `luo-test-vmm serve` boots the guest and registers it with
# luod (its RAM memfd preserved in session vm-vm0); prepare, freeze (the VMM
# pauses the vCPU and hands its state, with the SHA-256 of RAM, to luod),
# reboot: real kexec. Kernel 2: luod comes up updated; `luo-test-vmm claim`
# takes the memfd and the state, checks the RAM (SHA-256 equal to the one at
# the pause), continues the guest: the counter must go on strictly above its
# value at the pause; the VM blackout is measured with the TSC. `luoctl vm
# list` says claimed, `luoctl finish` succeeds.


boot1() {
	step start-luod 60
	start_luod
	expect_state normal
	step vmm-start 60
	echo "+ luo-test-vmm serve --socket $SOCK --name vm0 &"
	luo-test-vmm serve --socket "$SOCK" --name vm0 --heartbeat-ms 500 >/run/vmm0.log 2>&1 &
	VMM_PID=$!
	wait_for /run/vmm0.log 'VMM: heartbeat .* counter=[1-9]' 30
	grep -E 'VMM: (booted|registered|running|heartbeat)' /run/vmm0.log | head -n 4
	expect_exit 0 'vm0.*registered' luoctl vm list
	expect_json '"name": "vm-vm0"'
	step repack 120
	repack
	step prepare 120
	run luoctl prepare --kernel /kernel --initrd /run/initrd.cpio --reuse-cmdline
	expect_state prepared
	grep -E 'VMM: (call|answered) ' /run/vmm0.log
	step freeze 60
	mark freeze-start
	run luoctl freeze
	mark frozen
	expect_state frozen
	grep -E 'VMM: (call|paused|answered) ' /run/vmm0.log | tail -n 3
	sha=$(field /run/vmm0.log 'VMM: paused ' ram_sha256)
	counter=$(field /run/vmm0.log 'VMM: paused ' counter)
	[ -n "$sha" ] && [ "$sha" != none ] || fail "the VMM printed no RAM SHA-256 at the pause"
	say "hash before vm0/ram $sha $(field /run/vmm0.log 'VMM: registered' ram_size)"
	info "VM vm0 paused at freeze: counter=$counter, RAM sha256 $(echo "$sha" | cut -c1-16)..., pause latency $(field /run/vmm0.log 'VMM: paused ' pause_latency_ms) ms"
	step kexec 180
	mark reboot-call
	luoctl reboot
	sleep 120
	fail "still running 120 s after luoctl reboot"
}

boot2() {
	# luod and the claiming VMM start at once (the VMM retries until luod
	# answers): the VM blackout ends as early as it can.
	step start-luod 60
	mkdir -p /run/luod
	mark luod-exec
	NO_COLOR=1 luod --socket "$SOCK" --state-dir /run/luod >>"$LUOD_LOG" 2>&1 &
	LUOD_PID=$!
	step claim 90
	{
		luo-test-vmm claim --socket "$SOCK" --name vm0 --seconds 3 --mark vm-resumed
		echo $? >/run/claim.rc
	} 2>&1 | tee /run/claim.log
	[ "$(cat /run/claim.rc)" = 0 ] || fail "luo-test-vmm claim failed (status $(cat /run/claim.rc))"
	grep -q 'VMM: restored .* ram_match=yes' /run/claim.log || fail "RAM not verified equal at the claim"
	grep -q 'VMM: resumed .* increasing=yes static_match=yes ring=ok' /run/claim.log || fail "the guest did not continue"
	say "hash after vm0/ram $(field /run/claim.log 'VMM: restored ' ram_sha256) $(field /run/claim.log 'VMM: restored ' ram_size)"
	before=$(field /run/claim.log 'VMM: resumed ' counter_before)
	first=$(field /run/claim.log 'VMM: resumed ' first_progress_counter)
	after=$(field /run/claim.log 'VMM: resumed ' counter_after)
	bo=$(sed -n 's/^VMM: blackout_tsc_ms=\([0-9.]*\).*/\1/p' /run/claim.log)
	[ -n "$bo" ] || fail "no VM blackout measured"
	[ "$first" -gt "$before" ] && [ "$after" -gt "$first" ] || fail "counter not strictly increasing: $before -> $first -> $after"
	info "VM vm0: counter at the pause $before -> first progress after the claim $first -> $after 3 s later (strictly increasing); RAM SHA-256 equal; VM blackout (TSC) $bo ms"
	say "bench vm_blackout_tsc_ms $bo"
	echo "luod's log, in ms after the claiming VMM started:"
	luo-qemu-tool luod-times --exec-ns "$(field /run/claim.log 'VMM: claim name=' realtime_ns)" --log "$LUOD_LOG"
	expect_state updated
	expect_exit 0 'vm0.*claimed' luoctl vm list
	step finish 60
	run luoctl finish
	expect_state normal
	expect_json '"outcome": "finished"'
	dmesg_has 'liveupdate number: 1'
	pass
}
