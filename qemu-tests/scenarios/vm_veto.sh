# vm_veto (LUO kernel): a VMM refuses the live update. `luo-test-vmm serve
# --veto REASON` answers luod's prepare call with a veto: `luoctl prepare`
# fails with exit 13 and the VMM's reason, the state stays normal, and the
# guest never paused: its counter kept increasing through the prepare
# attempt (the VMM's heartbeats every 200 ms, before and after the call, and
# its own record of pauses: 0).
REASON="guest vm0 is being migrated"


boot1() {
	step start-luod 60
	start_luod
	expect_state normal
	step vmm-start 60
	echo "+ luo-test-vmm serve --socket $SOCK --name vm0 --veto '$REASON' &"
	luo-test-vmm serve --socket "$SOCK" --name vm0 --veto "$REASON" --heartbeat-ms 200 >/run/vmm0.log 2>&1 &
	wait_for /run/vmm0.log 'VMM: heartbeat .* counter=[1-9]' 30
	c0=$(field /run/vmm0.log 'VMM: heartbeat' counter)
	step prepare 120
	expect_exit 13 "vetoed: VM vm0: $REASON" luoctl prepare --kernel /kernel --reuse-cmdline
	expect_state normal
	expect_json '"name": "vm-vm0"'
	step guest-kept-running 60
	# Two more heartbeats after the answer.
	n=$(grep -c 'VMM: heartbeat' /run/vmm0.log)
	wait_for /run/vmm0.log 'VMM: answered n=1 prepare veto' 10
	i=0
	while [ "$(grep -c 'VMM: heartbeat' /run/vmm0.log)" -lt $((n + 2)) ]; do
		i=$((i + 1)); [ $i -lt 100 ] || fail "no heartbeat after the veto"; usleep 50000
	done
	echo "the VMM's lines around the prepare call:"
	grep -E 'VMM: (call|answered|paused|resumed|heartbeat)' /run/vmm0.log | grep -B 3 -A 3 'VMM: call'
	grep -q 'VMM: call n=1 prepare counter=[0-9]* paused=no' /run/vmm0.log || fail "the VMM did not get prepare with the guest running"
	! grep -qE 'VMM: (paused|resumed) ' /run/vmm0.log || fail "the VMM paused the guest"
	# Every heartbeat: running, no pause, a counter above the one before.
	grep 'VMM: heartbeat' /run/vmm0.log | awk '
		{ c = $0; sub(/.* counter=/, "", c); sub(/ .*/, "", c); c += 0
		  if ($0 !~ / state=running pauses=0 /) { print "not running: " $0; bad = 1 }
		  if (NR > 1 && c <= prev) { print "counter did not increase: " $0; bad = 1 }
		  prev = c }
		END { exit bad }' || fail "the guest stalled or paused"
	c_call=$(field /run/vmm0.log 'VMM: call n=1 prepare' counter)
	c1=$(field /run/vmm0.log 'VMM: heartbeat' counter)
	[ "$c1" -gt "$c_call" ] && [ "$c_call" -gt "$c0" ] || fail "counter $c0 -> $c_call -> $c1 is not increasing"
	info "guest vm0 never paused: counter $c0 (before luoctl prepare) -> $c_call (at the prepare call) -> $c1 (after the veto); $(grep -c 'VMM: heartbeat' /run/vmm0.log) heartbeats all running, 0 pauses"
	info "luoctl prepare: $(grep -i veto /run/out.txt | head -n 1)"
	expect_exit 0 'vm0.*registered' luoctl vm list
	pass
}
